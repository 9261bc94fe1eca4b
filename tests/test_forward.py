"""The forward model against analytic facts, the posterior, the box bijection and the Laplace approximation."""

import math

import numpy as np
import pytest
import torch

import forward
from forward import G, sphere_anomaly

DENSITY = 2500.0
THETA = np.array([3.0, 6.0, 2.0])


def mass(theta=THETA, density=DENSITY):
    return density * 4.0 / 3.0 * math.pi * theta[2] ** 3


def test_peak_is_point_mass_attraction_above_centre():
    peak = sphere_anomaly(np.array([THETA[0]]), THETA, DENSITY)[0]
    assert peak == pytest.approx(G * mass() / THETA[1] ** 2 * 1e8, rel=1e-12)


def test_symmetric_about_x0_and_positive():
    offsets = np.linspace(0.1, 30, 50)
    left = sphere_anomaly(THETA[0] - offsets, THETA, DENSITY)
    right = sphere_anomaly(THETA[0] + offsets, THETA, DENSITY)
    np.testing.assert_allclose(left, right, rtol=1e-13)
    assert np.all(left > 0)


def test_half_width_at_half_maximum_is_0766_depth():
    # g(x)/g(x0) = (1 + (x/z)^2)^(-3/2) = 1/2  =>  x = z sqrt(2^(2/3) - 1) ≈ 0.766 z
    half_width = THETA[1] * math.sqrt(2 ** (2 / 3) - 1)
    assert half_width / THETA[1] == pytest.approx(0.766, abs=1e-3)
    ratio = sphere_anomaly(np.array([THETA[0] + half_width]), THETA, DENSITY) / sphere_anomaly(np.array([THETA[0]]), THETA, DENSITY)
    assert ratio[0] == pytest.approx(0.5, rel=1e-12)


def test_far_field_decays_as_inverse_cube():
    far = np.array([1e3, 2e3, 4e3])
    values = sphere_anomaly(THETA[0] + far, THETA, DENSITY)
    np.testing.assert_allclose(values[:-1] / values[1:], 8.0, rtol=1e-3)


def test_linear_in_density_and_cubic_in_radius():
    x = np.linspace(-20, 20, 7)
    base = sphere_anomaly(x, THETA, DENSITY)
    np.testing.assert_allclose(sphere_anomaly(x, THETA, 2 * DENSITY), 2 * base, rtol=1e-13)
    np.testing.assert_allclose(sphere_anomaly(x, THETA * [1, 1, 2], DENSITY), 8 * base, rtol=1e-13)


def test_numpy_and_torch_agree_and_batch_shapes():
    rng = np.random.default_rng(0)
    x = np.linspace(-20, 20, 11)
    theta = rng.uniform([0, 1, 0.5], [10, 15, 5], size=(4, 5, 3))
    values = sphere_anomaly(x, theta, DENSITY)
    assert values.shape == (4, 5, 11)
    values_torch = sphere_anomaly(x, torch.tensor(theta), DENSITY)
    assert values_torch.dtype == torch.float64
    np.testing.assert_allclose(values_torch.numpy(), values, rtol=1e-12)
    np.testing.assert_allclose(values[2, 3], sphere_anomaly(x, theta[2, 3], DENSITY), rtol=1e-15)


def test_analytic_gradient_matches_autograd():
    x = np.linspace(-20, 20, 9)
    theta = torch.tensor(THETA + [0.3, -0.2, 0.1], requires_grad=True)
    jacobian = torch.autograd.functional.jacobian(lambda t: sphere_anomaly(x, t, DENSITY), theta)
    np.testing.assert_allclose(forward.sphere_anomaly_gradient(x, theta.detach().numpy(), DENSITY), jacobian.numpy(), rtol=1e-10)


def test_synthetic_data_is_seeded_and_leaves_global_rng_alone():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    first = forward.synthetic_problem()
    assert np.random.random() == before
    second = forward.synthetic_problem()
    np.testing.assert_array_equal(first.g_obs, second.g_obs)
    assert first.n_stations == 1000 and first.stations[0] == -20 and first.stations[-1] == 20
    noise = first.g_obs - first.predict(first.truth)
    assert np.std(noise) == pytest.approx(1.0, abs=0.05)
    assert not np.array_equal(forward.synthetic_problem(noise_seed=1).g_obs, first.g_obs)


def test_log_posterior_minus_infinity_outside_box(default_problem):
    inside = np.array([3.0, 6.0, 2.0])
    outside = np.array([[-0.1, 6, 2], [3, 15.5, 2], [3, 6, 0.4], [11, 0.5, 6]])
    assert np.isfinite(default_problem.log_posterior(inside))
    assert np.all(default_problem.log_posterior(outside) == -np.inf)
    both = default_problem.log_posterior(np.vstack([inside, outside]))
    assert np.isfinite(both[0]) and np.all(both[1:] == -np.inf)


def test_log_likelihood_is_the_normalised_gaussian(default_problem):
    theta = np.array([3.1, 5.9, 2.05])
    residual = default_problem.g_obs - default_problem.predict(theta)
    expected = np.sum(-0.5 * residual**2 - 0.5 * np.log(2 * np.pi))  # sigma = 1
    assert default_problem.log_likelihood(theta) == pytest.approx(expected, rel=1e-12)


def test_torch_likelihood_matches_numpy_and_has_finite_gradient(default_problem):
    likelihood = forward.TorchLikelihood(default_problem)
    theta = torch.tensor([[3.1, 5.9, 2.05], [2.0, 9.0, 3.0]], dtype=torch.float64, requires_grad=True)
    value = likelihood(theta)
    np.testing.assert_allclose(value.detach().numpy(), default_problem.log_likelihood(theta.detach().numpy()), rtol=1e-12)
    value.sum().backward()
    assert torch.isfinite(theta.grad).all() and (theta.grad != 0).all()


def small_problem(free_density=False, per_station_sigma=False):
    """A 25-station profile (gradcheck's finite differences are cheap on it), density known or free."""
    problem = forward.synthetic_problem(density_bounds=(1000.0, 4000.0) if free_density else None)
    stations, g_obs = problem.stations[::40], problem.g_obs[::40]
    noise_sd = np.linspace(0.5, 2.0, stations.size) if per_station_sigma else 1.3
    return forward.Problem(stations, g_obs, noise_sd, bounds=problem.bounds, parameters=problem.parameters)


def plain_log_likelihood(problem, theta):
    """The likelihood as autograd records it from the forward model: the reference for the fused pass."""
    density = theta[..., 3:4] if problem.free_density else problem.density
    predicted = sphere_anomaly(torch.as_tensor(problem.stations), theta, density)
    return forward.gaussian_misfit(predicted, torch.as_tensor(problem.g_obs), torch.as_tensor(problem.weights)) \
        + problem.log_likelihood_constant


def parameter_sets(problem, n, seed=0):
    """n parameter sets spread over the posterior's neighbourhood and beyond (10 % about the truth)."""
    truth = np.append(forward.DEFAULT_TRUTH, 2500.0)[:problem.dim]
    rng = np.random.default_rng(seed)
    return torch.tensor(truth * (1 + 0.1 * rng.standard_normal((n, problem.dim))), dtype=torch.float64)


@pytest.mark.parametrize("free_density", [False, True])
@pytest.mark.parametrize("per_station_sigma", [False, True])
def test_fused_likelihood_passes_gradcheck_and_gradgradcheck(free_density, per_station_sigma):
    """The fused pass's analytic gradient against finite differences (float64), and its Hessian path."""
    problem = small_problem(free_density, per_station_sigma)
    likelihood = forward.TorchLikelihood(problem)
    theta = parameter_sets(problem, 5).requires_grad_()
    assert torch.autograd.gradcheck(likelihood, (theta,), eps=1e-6, atol=1e-5, rtol=1e-6)
    assert torch.autograd.gradgradcheck(likelihood, (theta,), eps=1e-6, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("free_density", [False, True])
def test_fused_likelihood_equals_the_plain_expression_and_its_autograd_gradient(free_density):
    problem = forward.synthetic_problem(density_bounds=(1000.0, 4000.0) if free_density else None)
    theta = parameter_sets(problem, 64).requires_grad_()
    value = forward.TorchLikelihood(problem)(theta)
    (gradient,) = torch.autograd.grad(value.sum(), theta)
    theta_plain = theta.detach().requires_grad_()
    expected = plain_log_likelihood(problem, theta_plain)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), theta_plain)
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-10, atol=1e-10 * expected_gradient.abs().max().item())


def test_fused_likelihood_keeps_batch_shapes_and_needs_no_gradient():
    problem = forward.synthetic_problem()
    likelihood = forward.TorchLikelihood(problem)
    theta = parameter_sets(problem, 12).reshape(3, 4, 3)
    value = likelihood(theta)
    assert value.shape == (3, 4) and not value.requires_grad
    np.testing.assert_allclose(value.numpy(), problem.log_likelihood(theta.numpy()), rtol=1e-12)
    assert likelihood(theta[0, 0]).shape == ()


def mixed_sigma_problem():
    """The default data with per-station noise sd from 0.5 to 2 µGal."""
    problem = forward.synthetic_problem()
    sigma = np.linspace(0.5, 2.0, problem.n_stations)
    return forward.Problem(problem.stations, problem.g_obs, sigma, bounds=problem.bounds, truth=problem.truth)


def test_per_station_sigma_log_likelihood_is_the_sum_of_normal_densities():
    from scipy import stats

    problem = mixed_sigma_problem()
    theta = np.array([[3.1, 5.9, 2.05], [2.9, 6.2, 1.9]])
    expected = stats.norm.logpdf(problem.g_obs, problem.predict(theta), problem.noise_sd).sum(axis=-1)
    np.testing.assert_allclose(problem.log_likelihood(theta), expected, rtol=1e-12)
    torch_value = forward.TorchLikelihood(problem)(torch.tensor(theta))
    np.testing.assert_allclose(torch_value.numpy(), expected, rtol=1e-12)


def test_per_station_sigma_weights_the_misfit():
    problem = forward.synthetic_problem()
    doubled = forward.Problem(problem.stations, problem.g_obs, np.full(problem.n_stations, 2.0), bounds=problem.bounds)
    theta = np.array([3.1, 5.9, 2.05])
    assert doubled.misfit(theta) == pytest.approx(problem.misfit(theta) / 4, rel=1e-12)


def test_numpy_box_map_agrees_with_torch(default_problem):
    u = np.array([[0.3, -1.2, 2.0]])
    theta, _ = forward.to_box(default_problem, u)
    theta_torch, _ = forward.BoxBijection(default_problem.bounds)(torch.tensor(u))
    np.testing.assert_allclose(theta, theta_torch.numpy(), rtol=1e-14)


def test_laplace_mode_and_hessian_against_autograd(default_problem, default_laplace):
    laplace = default_laplace
    assert laplace.on_bound == ()
    np.testing.assert_allclose(laplace.theta_map, [3, 6, 2], atol=0.1)
    likelihood = forward.TorchLikelihood(default_problem)
    theta_map = torch.tensor(laplace.theta_map)
    gradient = torch.autograd.functional.jacobian(likelihood, theta_map)
    assert gradient.abs().max() < 1e-3  # a stationary point
    hessian = torch.autograd.functional.hessian(likelihood, theta_map).numpy()
    np.testing.assert_allclose(laplace.theta_cov, np.linalg.inv(-hessian), rtol=1e-4)

    bijection = forward.BoxBijection(default_problem.bounds)

    def log_density_u(u):
        theta, log_det = bijection(u[None])
        return likelihood(theta)[0] + log_det[0]

    hessian_u = torch.autograd.functional.hessian(log_density_u, torch.tensor(laplace.u_map)).numpy()
    np.testing.assert_allclose(laplace.u_cov, np.linalg.inv(-hessian_u), rtol=1e-4)


def test_mode_on_a_bound_is_reported():
    tight = forward.synthetic_problem(bounds=((0, 10), (1, 5.5), (0.5, 5)))
    laplace = forward.laplace_approximation(tight)
    assert laplace.on_bound == ("z",)
    assert not laplace.theta_peak and not laplace.weak  # theta's Hessian on the bound describes no peak


def test_read_profile_sorts_and_reads_sigma(tmp_path):
    path = tmp_path / "profile.csv"
    path.write_text("x,g,sigma\n1.0,5.0,0.5\n-1.0,4.0,0.5\n0.0,6.0,1\n2.0,3.0,2\n")
    stations, g, sigma = forward.read_profile(path)
    np.testing.assert_array_equal(stations, [-1, 0, 1, 2])
    np.testing.assert_array_equal(g, [4, 6, 5, 3])
    np.testing.assert_array_equal(sigma, [0.5, 1, 0.5, 2])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("1,2\n3,4\n5,6\n7,8\n", "no 'x' column"),
        ("x,sigma\n1,2\n", "no 'g' column"),
        ("x,g\n1,2\n2,abc\n3,4\n4,5\n", "line 3, column 'g': not a number"),
        ("x,g\n1,2\n2,nan\n3,4\n4,5\n", "line 3, column 'g'"),
        ("x,g\n1,2\n2,3\n3,4\n", "at least 4"),
        ("x,g\n1,2\n1,3\n3,4\n4,5\n", "more than once"),
        ("x,g,sigma\n1,2,1\n2,3,0\n3,4,1\n4,5,1\n", "line 3, column 'sigma': must be > 0"),
    ],
)
def test_read_profile_rejects_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(forward.DataError, match=message):
        forward.read_profile(path)


def test_read_profile_missing_file(tmp_path):
    with pytest.raises(forward.DataError, match="not found"):
        forward.read_profile(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    "bounds, message",
    [(((5, 5), (1, 15), (0.5, 5)), "x0"), (((0, 10), (0, 15), (0.5, 5)), "z must be > 0"), (((0, 10), (1, 15), (3, 2)), "R")],
)
def test_check_bounds(bounds, message):
    with pytest.raises(forward.DataError, match=message):
        forward.check_bounds(bounds)


def test_data_without_an_anomaly_get_a_weak_posterior_not_an_error():
    """Pure noise: no peak in theta at the best fit, but a posterior all the same, close to the prior and flagged
    as weak (it used to be refused with "the data do not determine the sphere"; tests/integration/test_weak_data.py checks it)."""
    stations = np.linspace(-20, 20, 50)
    noise = forward.Problem(stations, np.random.default_rng(1).normal(size=50), 1.0, bounds=np.array(forward.DEFAULT_BOUNDS))
    laplace = forward.laplace_approximation(noise)
    assert laplace.weak and not laplace.theta_peak
    assert np.all(np.isfinite(laplace.theta_cov)) and np.all(noise.inside(laplace.theta_map))
    assert "barely constrain" in forward.weak_data_warning(laplace)


@pytest.mark.parametrize("bounds, pinned", [(((0, 10), (7, 15), (0.5, 5)), "z"), (((0, 10), (1, 15), (2.5, 5)), "R")])
def test_best_fit_pressed_against_a_bound_is_a_posterior_with_the_warning(bounds, pinned):
    """The true sphere (z = 6, R = 2) outside the box: theta's Hessian at the best fit is not negative definite
    there (it used to be refused); the u-space Laplace, mapped by the delta method, takes over."""
    problem = forward.synthetic_problem(bounds=bounds)
    laplace = forward.laplace_approximation(problem)
    assert laplace.on_bound == (pinned,) and not laplace.weak and not laplace.theta_peak
    theta_map, dtheta_du = forward.to_box(problem, laplace.u_map)
    np.testing.assert_allclose(laplace.theta_cov, laplace.u_cov * np.outer(dtheta_du, dtheta_du), rtol=1e-12)
    assert abs(laplace.theta_map[0] - 3.0) < 0.1 and laplace.theta_sd[0] < 0.05


def units_problem(scale, noise_sd):
    """The default sphere's anomaly with 1 µGal noise, multiplied by ``scale`` (a profile in other units read
    as µGal), with noise sd ``noise_sd`` as stated."""
    stations = np.linspace(**forward.DEFAULT_STATIONS)
    signal = sphere_anomaly(stations, THETA, DENSITY) + np.random.default_rng(0).normal(size=stations.size)
    return forward.Problem(stations, scale * signal, noise_sd, bounds=np.array(forward.DEFAULT_BOUNDS))


@pytest.mark.parametrize(
    "scale, noise_sd, message",
    [
        # mGal read as µGal with its noise in mGal: an anomaly smaller than any sphere in the box makes, seen clearly
        (1e-3, 1e-3, r"no sphere in the prior box explains the data: the best fit \(.*\) sits on the bound of z, R and "
                     r"still misses the data by 19.8 times the noise"),
        # nGal read as µGal: an anomaly larger than any sphere in the box makes
        (1e3, 1.0, "no sphere in the prior box explains the data"),
        # mGal read as µGal with the noise in µGal: the data look like nothing only because the noise dwarfs them
        (1e-3, 1.0, r"the data scatter about the best fit by only 0.02 times the stated noise.*g in µGal, not mGal"),
    ],
    ids=["mGal-small-noise", "nGal", "mGal-noise-in-microGal"],
)
def test_wrong_units_stay_an_error(scale, noise_sd, message):
    with pytest.raises(forward.DataError, match=message):
        forward.laplace_approximation(units_problem(scale, noise_sd))


def test_a_box_that_cuts_a_well_fitted_posterior_is_no_error():
    """On a bound but explaining the data within the noise (RMS of the weighted residuals 2, below 5): a warning."""
    laplace = forward.laplace_approximation(forward.synthetic_problem(bounds=((0, 10), (1, 15), (0.5, 1.5))))
    assert laplace.on_bound == ("R",) and not laplace.weak


def test_write_profile_reads_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(3)
    stations = np.sort(rng.uniform(-20, 20, 30))
    g_obs = rng.standard_normal(30) * 1e3
    sigma = rng.uniform(0.1, 2.0, 30)
    path = forward.write_profile(tmp_path / "profile.csv", stations, g_obs, sigma)
    back = forward.read_profile(path)
    assert all(np.array_equal(a, b) for a, b in zip(back, (stations, g_obs, sigma)))
    _, _, one_sigma = forward.read_profile(forward.write_profile(tmp_path / "one.csv", stations, g_obs, 0.7))
    assert np.array_equal(one_sigma, np.full(30, 0.7))
    x, g, no_sigma = forward.read_profile(forward.write_profile(tmp_path / "none.csv", stations, g_obs))
    assert no_sigma is None and np.array_equal(x, stations) and np.array_equal(g, g_obs)


#: Free-density boxes for the mass coordinates: the default ridge, a box whose R range cuts the ridge, a cavity.
MASS_BOXES = {
    "ridge": ((0, 10), (1, 15), (0.5, 5), (1000, 4000)),
    "R-cut": ((-10, 10), (0.5, 10), (0.5, 2), (1000, 4000)),
    "cavity": ((0, 10), (1, 15), (0.5, 5), (-2700, -1000)),
}
#: The flows' fixed bijections onto a box: the box's own on the default box, and the mass coordinates' on each
#: free-density box; (class, bounds).
BIJECTIONS = {"box": (forward.BoxBijection, forward.DEFAULT_BOUNDS)} | {
    f"mass-{name}": (forward.MassBijection, box) for name, box in MASS_BOXES.items()}


@pytest.mark.parametrize("name", BIJECTIONS)
def test_bijection_round_trip_and_log_jacobian(name):
    kind, box = BIJECTIONS[name]
    bijection = kind(np.array(box, dtype=float))
    u = torch.randn(20, len(box), dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2.5
    theta, log_det = bijection(u)
    u_back, log_det_inverse = bijection.inverse(theta)
    torch.testing.assert_close(u_back, u, atol=1e-8, rtol=1e-8)
    # the probit's tail: Phi(u) near 1 keeps fewer digits of u, so the inverse's log-determinant agrees to 1e-8
    torch.testing.assert_close(log_det + log_det_inverse, torch.zeros(20, dtype=torch.float64), atol=1e-8, rtol=0)
    for row, value in zip(u, log_det):
        jacobian = torch.autograd.functional.jacobian(lambda v: bijection(v)[0], row)
        assert value.item() == pytest.approx(torch.linalg.slogdet(jacobian).logabsdet.item(), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("name", BIJECTIONS)
def test_bijection_never_leaves_the_box(name):
    kind, box = BIJECTIONS[name]
    bounds = np.array(box, dtype=float)
    bijection = kind(bounds)
    signs = torch.tensor([(-1.0) ** i for i in range(len(box))], dtype=torch.float64)
    extremes = torch.stack([40 * signs, -40 * signs, 1e3 * signs, -1e3 * signs, torch.full_like(signs, 9.0)])
    u = torch.cat([extremes, torch.randn(2000, len(box), dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 4])
    theta, log_det = bijection(u)
    low, high = torch.tensor(bounds[:, 0]), torch.tensor(bounds[:, 1])
    assert ((theta >= low) & (theta <= high)).all()
    assert torch.isfinite(log_det).all()
    theta32, _ = bijection(u.float())
    assert ((theta32 >= low.float()) & (theta32 <= high.float())).all()


@pytest.mark.parametrize("box", MASS_BOXES.values(), ids=MASS_BOXES.keys())
def test_mass_bijection_carries_a_density_whole_onto_the_box(box):
    """A standard normal in u pushed onto the box has a density there (log N(u) + log|du/dtheta|) that
    integrates to 1: E over theta uniform on the box of q(theta) / U(theta) is 1. A log-determinant off by a
    constant (log 3, log L) or by a term in u (the probit's log phi) fails this."""
    bounds = np.array(box, dtype=float)
    bijection = forward.MassBijection(bounds)
    rng = np.random.default_rng(3)
    n = 400_000
    theta = torch.as_tensor(rng.uniform(bounds[:, 0], bounds[:, 1], size=(n, 4)))
    inside = (theta[:, 3].abs() * theta[:, 2] ** 3 > 0)  # every draw: any (R, drho) of the box has a mass
    u, log_det_inverse = bijection.inverse(theta[inside])
    log_q = -0.5 * u.square().sum(-1) - 2 * math.log(2 * math.pi) + log_det_inverse
    log_volume = float(np.log(bounds[:, 1] - bounds[:, 0]).sum())
    ratio = torch.exp(log_q + log_volume)
    assert ratio.mean().item() == pytest.approx(1.0, abs=6 * ratio.std().item() / math.sqrt(n))


def test_mass_bijection_makes_the_ridge_a_tilted_normal():
    """Along the ridge (u_0, u_1, u_2 fixed) the uniform prior's density in u_3 is phi(u_3) exp((2/3) l Phi(u_3))
    times a constant (the docstring's reason for the probit): the ratio is the same at every u_3."""
    bounds = np.array(MASS_BOXES["ridge"], dtype=float)
    bijection = forward.MassBijection(bounds)
    u3 = torch.linspace(-4, 4, 41, dtype=torch.float64)
    u = torch.stack([torch.full_like(u3, 0.3), torch.full_like(u3, -0.2), torch.full_like(u3, 0.1), u3], -1)
    theta, log_det = bijection(u)  # log p_u = log U + log_det: the prior's density in u
    mass = theta[0, 3] * theta[0, 2] ** 3
    a, b = max(1000.0, mass.item() / 5.0**3), min(4000.0, mass.item() / 0.5**3)
    tilted = -0.5 * u3.square() + (2.0 / 3.0) * math.log(b / a) * torch.special.ndtr(u3)
    torch.testing.assert_close(theta[:, 3] * theta[:, 2] ** 3, mass.expand(41), rtol=1e-12, atol=0)  # one mass
    ratio = log_det - tilted
    assert (ratio - ratio[0]).abs().max().item() < 1e-10


def test_flow_coordinates_refuse_what_they_cannot_map():
    with pytest.raises(ValueError, match="free density"):
        forward.flow_bijection("mass", np.array(forward.DEFAULT_BOUNDS))
    with pytest.raises(ValueError, match="coordinates must be one of"):
        forward.flow_bijection("log", np.array(forward.DEFAULT_BOUNDS))
    assert forward.default_flow_coordinates(forward.synthetic_problem()) == "box"
    assert forward.default_flow_coordinates(forward.synthetic_problem(density_bounds=(1000, 4000))) == "mass"
