"""The exact reference with the density contrast as a fourth unknown: the mass ridge.

Checked against what does not share its mathematics: a plain 4-D quadrature of the problem's own
log posterior, importance sampling with an independent proposal, numerical integrals of the ridge
factor k(m), the exact-mass limit (drho^(-1/3) and R^(-3) along the ridge), the known-density
reference (same (x0, z) posterior, evidence ratio in closed form), and the mirror image of a
negative contrast.
"""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import integrate, stats
from scipy.special import logsumexp

import forward
from gravity_flows.scoring import reference
from test_reference import (TINY_NOISE, assert_agrees_with_importance_sampling, assert_unimodal, gaussian_draws,
                            importance_sampling)

DENSITY_BOUNDS = (1000.0, 4000.0)
TRUE_MASS = 2500.0 * 2.0**3  # drho R^3 of the default sphere


def free_problem(**kwargs):
    return forward.synthetic_problem(density_bounds=DENSITY_BOUNDS, **kwargs)


def broad_problem(negative=False):
    """15 stations with per-station sigma of 1.5–3 µGal: a wide posterior, the R box cutting the ridge.

    ``negative``: the same data with the sign of g flipped and drho in [-4000, -1000], R in [1, 3].
    """
    stations = np.linspace(-20.0, 20.0, 15)
    sigma = np.linspace(1.5, 3.0, stations.size)
    rng = np.random.default_rng(7)
    g_obs = forward.sphere_anomaly(stations, np.array([3.0, 6.0, 2.0]), 2500.0) + rng.normal(0.0, sigma)
    bounds = [[-2.0, 8.0], [2.0, 12.0], [1.0, 2.2], [1000.0, 4000.0]]
    if negative:
        g_obs = -g_obs
        bounds[2:] = [[1.0, 3.0], [-4000.0, -1000.0]]
    return forward.Problem(stations, g_obs, sigma, density=-2500.0 if negative else 2500.0,
                           bounds=np.array(bounds), parameters=forward.SPHERE_FREE_DENSITY)


def mirrored(problem):
    """The same data with the sign of g flipped and the density box negated."""
    box = problem.bounds.copy()
    box[3] = -box[3, ::-1]
    return forward.Problem(problem.stations, -problem.g_obs, problem.noise_sd, density=-problem.density,
                           bounds=box, parameters=forward.SPHERE_FREE_DENSITY)


@pytest.fixture(scope="module")
def free_default():
    problem = free_problem()
    laplace = forward.laplace_approximation(problem)
    return problem, laplace, reference.compute_reference(problem, laplace)


@pytest.fixture(scope="module")
def tiny_noise_free():
    """The default data at noise 1e-6 µGal with the density free, and the Gauss–Newton fit of (x0, z, m)."""
    problem = free_problem(noise_sd=TINY_NOISE)
    laplace = forward.laplace_approximation(problem)
    start = laplace.theta_map
    mass_fit = reference.mass_laplace(problem, [start[0], start[1], start[3] * start[2] ** 3])
    return problem, mass_fit, reference.compute_reference(problem, laplace)


@pytest.fixture(scope="module")
def broad():
    problem = broad_problem()
    laplace = forward.laplace_approximation(problem)
    return problem, laplace, reference.compute_reference(problem, laplace)


# ----------------------------------------------------------------------------------------------
# The mathematics of the ridge


@pytest.mark.parametrize("radius_box", [(0.5, 5.0), (0.5, 2.2), (1.9, 2.1)])
def test_mass_factor_and_conditional_moments_against_numerical_integrals(radius_box):
    """k(m) = ∫ 1[R in box] drho / (3 drho^(1/3) m^(2/3)) and E[. | m] against quad over drho, kinks and ends included."""
    bounds = np.array([[0, 10], [1, 15], radius_box, DENSITY_BOUNDS])
    problem = forward.Problem(np.linspace(-1, 1, 5), np.zeros(5), 1.0, bounds=bounds, parameters=forward.SPHERE_FREE_DENSITY)
    box = reference.RidgeBox.of(problem)
    low, high = box.mass_range
    masses = np.concatenate([np.geomspace(low * 1.0001, high * 0.9999, 23), [1000 * radius_box[1] ** 3, 4000 * radius_box[0] ** 3]])
    masses = masses[(masses > low) & (masses < high)]
    moments = box.conditional_moments(masses)
    for index, mass in enumerate(masses):
        def radius(t):
            return (mass / t) ** (1 / 3)

        def inside(t):
            return radius_box[0] <= radius(t) <= radius_box[1]

        def density(t):  # the joint density of (m, drho) from a uniform prior on (R, drho), Jacobian dR/dm
            return inside(t) / (3 * t ** (1 / 3) * mass ** (2 / 3))

        kinks = [mass / radius_box[1] ** 3, mass / radius_box[0] ** 3]
        k = integrate.quad(density, *DENSITY_BOUNDS, points=kinks, epsabs=0, epsrel=1e-12)[0]
        assert np.exp(box.log_mass_factor(mass)) == pytest.approx(k, rel=1e-9)
        expected = [integrate.quad(lambda t: f(t) * density(t), *DENSITY_BOUNDS, points=kinks, epsabs=0, epsrel=1e-12)[0] / k
                    for f in (lambda t: t, lambda t: t**2, radius, lambda t: radius(t) ** 2, lambda t: radius(t) * t)]
        np.testing.assert_allclose([m[index] for m in moments], expected, rtol=1e-8)
    # no ridge outside the allowed masses, and a ridge shrinking to a point stays finite
    assert np.all(np.exp(box.log_mass_factor(np.array([0.5 * low, 2 * high]))) == 0)
    point = box.conditional_moments(np.array([high * (1 - 1e-14)]))
    np.testing.assert_allclose([m[0] for m in point], [4000, 4000**2, radius_box[1], radius_box[1] ** 2, 4000 * radius_box[1]], rtol=1e-9)


def test_grid_values_are_the_problems_own_posterior_on_the_ridge(broad):
    """exp(log_theta_density) * Z = L p at (x0, z, R, drho) for any drho on the ridge through a node (per-station sigma)."""
    problem, laplace, _ = broad
    result = reference.compute_reference(problem, laplace, grid_points=41)
    rng = np.random.default_rng(0)
    index = tuple(rng.integers(0, 41, size=(3, 50)))
    mass = result.nodes[2][index[2]]
    a = np.maximum(1000.0, mass / 2.2**3)
    b = np.minimum(4000.0, mass / 1.0**3)
    keep = b > a
    contrast = rng.uniform(a, b)
    theta = np.stack([result.nodes[0][index[0]], result.nodes[1][index[1]], (mass / contrast) ** (1 / 3), contrast], axis=1)
    expected = problem.log_posterior(theta[keep])
    assert np.all(np.isfinite(expected)) and keep.sum() > 30
    np.testing.assert_allclose(result.log_theta_density[index][keep] + result.log_evidence, expected, rtol=1e-10)


def test_known_density_limit_evidence_ratio_and_position(free_default, default_reference):
    """With the ridge cut by the density box only, k(m) ∝ m^(-2/3) like the known density's dR/dm, so
    x0 and z have the known-density posterior and Z_free / Z_known = 3/2 rho0^(1/3) (t_hi^(2/3) - t_lo^(2/3)) / (t_hi - t_lo)."""
    _, _, free = free_default
    lo, hi = DENSITY_BOUNDS
    ratio = 1.5 * 2500.0 ** (1 / 3) * (hi ** (2 / 3) - lo ** (2 / 3)) / (hi - lo)
    assert free.log_evidence - default_reference.log_evidence == pytest.approx(np.log(ratio), abs=1e-6)
    assert np.all(np.abs(free.mean[:2] - default_reference.mean[:2]) < 1e-6 * free.sd[:2])
    np.testing.assert_allclose(free.sd[:2], default_reference.sd[:2], rtol=1e-5)
    assert free.correlation[0, 1] == pytest.approx(default_reference.correlation[0, 1], abs=1e-5)
    # the mass is the known-density posterior of rho0 R^3
    nodes, density = free.mass_marginal()
    r_nodes, r_density = default_reference.marginal(2)
    assert np.trapezoid(nodes * density, nodes) == pytest.approx(np.trapezoid(2500 * r_nodes**3 * r_density, r_nodes), rel=1e-7)


@pytest.mark.parametrize("radius_box", [(0.5, 5.0), (0.5, 2.2)])
def test_exact_mass_limit_gives_the_analytic_ridge(radius_box):
    """With tiny noise m is known: drho ∝ drho^(-1/3) on [a, b], R ∝ R^(-3) on [(m/b)^(1/3), (m/a)^(1/3)]."""
    problem = free_problem(noise_sd=1e-3, bounds=((0, 10), (1, 15), radius_box))
    result = reference.compute_reference(problem)
    a, b = max(DENSITY_BOUNDS[0], TRUE_MASS / radius_box[1] ** 3), min(DENSITY_BOUNDS[1], TRUE_MASS / radius_box[0] ** 3)
    r1, r2 = (TRUE_MASS / b) ** (1 / 3), (TRUE_MASS / a) ** (1 / 3)
    contrast = lambda t: t ** (-1 / 3) / (1.5 * (b ** (2 / 3) - a ** (2 / 3)))  # noqa: E731
    radius = lambda r: 2 * r**-3 / (r1**-2 - r2**-2)  # noqa: E731
    moments = []
    for i, (lo, hi, analytic) in enumerate([(r1, r2, radius), (a, b, contrast)], start=2):
        nodes, density = result.marginal(i)
        interior = (nodes > lo * (1 + 1e-3)) & (nodes < hi * (1 - 1e-3))
        assert interior.sum() > 300
        np.testing.assert_allclose(density[interior], analytic(nodes[interior]), rtol=1e-4)
        assert np.all(density[(nodes < lo * (1 - 1e-3)) | (nodes > hi * (1 + 1e-3))] < 1e-6 * density.max())
        mean = integrate.quad(lambda x: x * analytic(x), lo, hi)[0]
        sd = np.sqrt(integrate.quad(lambda x: (x - mean) ** 2 * analytic(x), lo, hi)[0])
        assert result.mean[i] == pytest.approx(mean, rel=1e-5)
        assert result.sd[i] == pytest.approx(sd, rel=1e-4)
        moments.append((mean, sd))
    # R and drho are one curve: the correlation of R with drho is that of (m/drho)^(1/3) with drho
    (mean_r, sd_r), (mean_t, sd_t) = moments
    covariance = integrate.quad(lambda t: ((TRUE_MASS / t) ** (1 / 3) - mean_r) * (t - mean_t) * contrast(t), a, b)[0]
    assert result.correlation[2, 3] == pytest.approx(covariance / (sd_r * sd_t), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Cross-checks by independent computations


def brute_force(problem, points=40):
    """Plain trapezoid quadrature of problem.log_posterior on a points^4 grid over the whole prior box."""
    nodes = [np.linspace(lo, hi, points) for lo, hi in problem.bounds]
    log_weights = [np.log(reference._trapezoid_weights(x)) for x in nodes]
    rest = np.stack(np.meshgrid(*nodes[1:], indexing="ij"), axis=-1)
    log_post = np.stack([problem.log_posterior(np.concatenate([np.full(rest.shape[:-1] + (1,), x0), rest], axis=-1))
                         for x0 in nodes[0]])
    log_cell = sum(np.expand_dims(w, [a for a in range(4) if a != k]) for k, w in enumerate(log_weights))
    log_evidence = logsumexp(log_post + log_cell)
    mass = np.exp(log_post + log_cell - log_evidence)
    marginals = [mass.sum(axis=tuple(a for a in range(4) if a != k)) / np.exp(log_weights[k]) for k in range(4)]
    means = np.array([np.sum(nodes[k] * m * np.exp(log_weights[k])) for k, m in enumerate(marginals)])
    sds = np.sqrt([np.sum((nodes[k] - means[k]) ** 2 * m * np.exp(log_weights[k])) for k, m in enumerate(marginals)])
    ridge = mass.sum(axis=(0, 1)) / np.outer(np.exp(log_weights[2]), np.exp(log_weights[3]))
    return nodes, log_evidence, means, sds, marginals, ridge


@pytest.mark.parametrize("negative", [False, True], ids=["R-box-cuts-ridge", "negative-contrast"])
def test_agrees_with_brute_force_4d_quadrature(negative, broad):
    problem = broad[0] if not negative else broad_problem(negative=True)
    result = broad[2] if not negative else reference.compute_reference(problem)
    nodes, log_evidence, means, sds, marginals, ridge = brute_force(problem)
    # the brute force converges as h^2; at 40 nodes per axis it is within ~2e-4 of the limit
    assert result.log_evidence == pytest.approx(log_evidence, abs=1e-3)
    assert np.all(np.abs(result.mean - means) < 1e-3 * result.sd)
    np.testing.assert_allclose(result.sd, sds, rtol=3e-3)
    for i in range(4):
        ref_nodes, ref_density = result.marginal(i)
        np.testing.assert_allclose(np.interp(nodes[i], ref_nodes, ref_density, left=0, right=0), marginals[i],
                                   rtol=0, atol=5e-3 * marginals[i].max())
    radius, contrast, joint = result.joint_marginal(2, 3)
    interpolated = reference_joint_at(radius, contrast, joint, nodes[2], nodes[3])
    assert np.max(np.abs(interpolated - ridge)) < 0.02 * ridge.max()


def reference_joint_at(nodes_i, nodes_j, joint, points_i, points_j):
    from scipy.interpolate import RegularGridInterpolator

    interpolator = RegularGridInterpolator((nodes_i, nodes_j), joint, bounds_error=False, fill_value=0.0)
    grid = np.stack(np.meshgrid(points_i, points_j, indexing="ij"), axis=-1)
    return interpolator(grid)


def test_importance_sampling_with_an_independent_proposal(free_default, default_laplace):
    """Self-normalised IS of problem.log_posterior: the proposal is drho uniform on its box and (x0, z, R (drho/2500)^(1/3))
    a Student-t around the known-density Laplace fit, nothing from the ridge reference."""
    problem, _, result = free_default
    rng = np.random.default_rng(11)
    n = 60_000
    t3 = stats.multivariate_t(loc=default_laplace.theta_map, shape=4.0 * default_laplace.theta_cov, df=4, seed=rng)
    geometry = t3.rvs(size=n)
    contrast = rng.uniform(*DENSITY_BOUNDS, size=n)
    theta = np.column_stack([geometry[:, :2], geometry[:, 2] * (2500.0 / contrast) ** (1 / 3), contrast])
    log_proposal = t3.logpdf(geometry) + np.log(contrast / 2500.0) / 3 - np.log(DENSITY_BOUNDS[1] - DENSITY_BOUNDS[0])
    log_target = np.concatenate([problem.log_posterior(chunk) for chunk in np.array_split(theta, 12)])
    estimate = importance_sampling(theta, log_target, log_proposal)
    assert estimate["ess"] > 0.1 * n  # the proposal is a sensible one
    assert_agrees_with_importance_sampling(result, estimate)
    # and the evidence: Z = E_q[L p / q]
    assert estimate["log_z"] == pytest.approx(result.log_evidence, abs=0.02)


@pytest.mark.parametrize("problem_name", ["default", "broad"])
@pytest.mark.parametrize("settings", [dict(grid_points=181), dict(grid_points=161, window_sds=11)], ids=["finer", "wider"])
def test_refining_the_grid_or_widening_the_window_changes_nothing(problem_name, settings, free_default, broad):
    problem, laplace, result = broad if problem_name == "broad" else free_default
    other = reference.compute_reference(problem, laplace, **settings)
    assert np.all(np.abs(other.mean - result.mean) < 1e-3 * result.sd)
    assert np.all(np.abs(other.sd - result.sd) < 1e-3 * result.sd)
    assert other.log_evidence == pytest.approx(result.log_evidence, abs=1e-3)
    np.testing.assert_allclose(other.correlation, result.correlation, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Tiny noise: sum w d^2 ~ 4e16, the mass known to 1.4e-8 of itself


def proposal_on_the_ridge(problem, mass_fit, n, rng):
    """(x0, z, m) from the Gauss–Newton Gaussian, drho uniform on its box, R = (m / drho)^(1/3): theta (n, 4)
    and log q(theta), with the Jacobian dm/dR = 3 drho R^2."""
    geometry, log_geometry = gaussian_draws(*mass_fit, n, rng)
    contrast = rng.uniform(*DENSITY_BOUNDS, size=n)
    radius = (geometry[:, 2] / contrast) ** (1 / 3)
    theta = np.column_stack([geometry[:, :2], radius, contrast])
    return theta, log_geometry - np.log(DENSITY_BOUNDS[1] - DENSITY_BOUNDS[0]) + np.log(3 * contrast * radius**2)


def test_tiny_noise_grid_values_are_the_problems_own_posterior(tiny_noise_free):
    """At noise 1e-6 µGal the sum of squares, expanded about m = 0, lost ~10 nats to the rounding of sum w d^2."""
    problem, _, result = tiny_noise_free
    rng = np.random.default_rng(6)
    index = tuple(rng.integers(0, reference.GRID_POINTS, size=(3, 50)))
    mass = result.nodes[2][index[2]]
    contrast = rng.uniform(*DENSITY_BOUNDS, size=mass.size)  # R stays inside its box for m near 2e4
    theta = np.stack([result.nodes[0][index[0]], result.nodes[1][index[1]], (mass / contrast) ** (1 / 3), contrast], axis=1)
    np.testing.assert_allclose(result.log_theta_density[index] + result.log_evidence, problem.log_posterior(theta),
                               rtol=0, atol=1e-3)


def test_tiny_noise_mass_posterior_is_the_gauss_newton_gaussian(tiny_noise_free):
    """(x0, z, m) is Gaussian: the Gauss–Newton sds and mode, a unimodal mass marginal (it had dozens of
    peaks), and the ±8 sd window holds it all (each marginal at exp(-32) of its peak at the ends)."""
    _, (mode, covariance), result = tiny_noise_free
    sd = np.sqrt(np.diag(covariance))
    mass_nodes, mass_density = result.mass_marginal()
    mass_mean = np.trapezoid(mass_nodes * mass_density, mass_nodes)
    mass_sd = np.sqrt(np.trapezoid((mass_nodes - mass_mean) ** 2 * mass_density, mass_nodes))
    np.testing.assert_allclose([*result.sd[:2], mass_sd], sd, rtol=0.01)
    assert np.all(np.abs([*result.mean[:2], mass_mean] - mode) < 0.01 * sd)
    for density in (result.marginal(0)[1], result.marginal(1)[1], mass_density):
        assert_unimodal(density)
        assert max(density[0], density[-1]) < 1e-10 * density.max()


def test_tiny_noise_marginals_of_radius_and_density_resolve_their_edges(tiny_noise_free):
    """With the mass known to 1e-8 of itself, R (∝ R^-3 between its ends) falls to zero over ~1e-8 m at each
    end: the dense nodes across each edge are kept, and the marginals give the reference's means and sds."""
    _, _, result = tiny_noise_free
    for i in (2, 3):
        nodes, density = result.marginal(i)
        mean = np.trapezoid(nodes * density, nodes)
        assert mean == pytest.approx(result.mean[i], abs=1e-4 * result.sd[i])
        assert np.sqrt(np.trapezoid((nodes - mean) ** 2 * density, nodes)) == pytest.approx(result.sd[i], rel=1e-4)


def test_tiny_noise_agrees_with_importance_sampling_along_the_ridge(tiny_noise_free):
    """Means, sds and log Z of all four parameters of the problem's own posterior, importance-sampled from the
    Gauss–Newton Gaussian of (x0, z, m) with drho uniform: R and drho lie along the ridge drho R^3 = m."""
    problem, mass_fit, result = tiny_noise_free
    theta, log_proposal = proposal_on_the_ridge(problem, mass_fit, 40_000, np.random.default_rng(8))
    estimate = importance_sampling(theta, problem.log_posterior(theta), log_proposal)
    assert estimate["ess"] > 0.5 * theta.shape[0]
    assert_agrees_with_importance_sampling(result, estimate)
    assert estimate["log_z_se"] < 0.01
    assert result.log_evidence == pytest.approx(estimate["log_z"], abs=4 * estimate["log_z_se"] + 1e-6)


def test_default_free_density_reference_is_pinned(free_default):
    """The default data's free-density reference to rounding: its numbers as computed before the sum of
    squares was expanded about the best mass per (x0, z) node rather than about m = 0 (differences ~1e-12)."""
    _, _, result = free_default
    pinned_mean = [2.978850970092729, 6.014515483155675, 2.0960943255847315, 2389.555704613083]
    assert np.all(np.abs(result.mean - pinned_mean) < 1e-9 * result.sd)
    np.testing.assert_allclose(result.sd, [0.030310894076213513, 0.05286723267344508, 0.27929188930633375, 870.278755036058],
                               rtol=1e-9)
    np.testing.assert_allclose(result.correlation[np.triu_indices(4, 1)],
                               [0.0021279864908702963, 7.61479382703569e-05, 0.0, 0.03302748665054372, 0.0, -0.9722794050624871],
                               rtol=0, atol=1e-9)
    assert result.log_evidence == pytest.approx(-1422.7843379504477, abs=1e-8)


# ----------------------------------------------------------------------------------------------
# The public interface: marginals, joints, samples, scores


def test_marginals_and_joints_are_normalised_and_consistent(free_default):
    _, _, result = free_default
    assert result.dim == 4 and result.covariance.shape == (4, 4)
    for i in range(4):
        nodes, density = result.marginal(i)
        assert np.all(np.diff(nodes) > 0) and np.all(density >= 0)
        assert np.trapezoid(density, nodes) == pytest.approx(1.0, abs=1e-12)
        assert np.trapezoid(nodes * density, nodes) == pytest.approx(result.mean[i], abs=1e-4 * result.sd[i])
        assert np.sqrt(np.trapezoid((nodes - result.mean[i]) ** 2 * density, nodes)) == pytest.approx(result.sd[i], rel=1e-4)
        assert result.quantile(i, 0.5) == pytest.approx(np.interp(0.5, *result.marginal_cdf(i)[::-1]))
    for i in range(4):
        for j in range(i + 1, 4):
            nodes_i, nodes_j, joint = result.joint_marginal(i, j)
            assert joint.shape == (nodes_i.size, nodes_j.size) and np.all(joint >= 0)
            assert np.trapezoid(np.trapezoid(joint, nodes_j, axis=1), nodes_i) == pytest.approx(1.0, abs=1e-12)
            for axis, (k, nodes_k) in enumerate([(i, nodes_i), (j, nodes_j)]):
                reduced = np.trapezoid(joint, nodes_j if axis == 0 else nodes_i, axis=1 - axis)
                marginal_nodes, marginal = result.marginal(k)
                # the R–drho joint is on its own (coarser, geometric) grid: its edges are interpolated
                tolerance = 0.02 if (i, j) == (2, 3) else 1e-4
                assert np.max(np.abs(np.interp(marginal_nodes, nodes_k, reduced) - marginal)) < tolerance * marginal.max()
            np.testing.assert_allclose(result.joint_marginal(j, i)[2], joint.T)


def test_the_ridge_panel_resolves_the_ridge(free_default):
    """The R–drho grid covers the ridge over its whole length and has many nodes across its width."""
    _, _, result = free_default
    radius, contrast, joint = result.joint_marginal(2, 3)
    assert radius[0] < result.quantile(2, 1e-4) and radius[-1] > result.quantile(2, 1 - 1e-4)
    assert contrast[0] == DENSITY_BOUNDS[0] and contrast[-1] == DENSITY_BOUNDS[1]
    # across the ridge at the middle drho: nodes within the ±2 sd band of the mass
    nodes, density = result.mass_marginal()
    mean = np.trapezoid(nodes * density, nodes)
    sd = np.sqrt(np.trapezoid((nodes - mean) ** 2 * density, nodes))
    middle = contrast[contrast.size // 2]
    band = np.abs(middle * radius**3 - mean) < 2 * sd
    assert band.sum() >= 10
    # the density along the ridge crest follows the prior along it: p(R, drho) constant on drho R^3 = m
    crest = joint[np.argmin(np.abs(radius[:, None] ** 3 * contrast[None, :] - mean), axis=0), np.arange(contrast.size)]
    assert crest.min() > 0.8 * crest.max()


@pytest.mark.parametrize("case", ["default", "R-box-cuts-ridge", "negative-contrast", "per-station-sigma"])
def test_samples_agree_with_the_marginals(case, free_default):
    if case == "default":
        problem, result = free_default[0], free_default[2]
    else:
        if case == "R-box-cuts-ridge":
            problem = free_problem(bounds=((0, 10), (1, 15), (0.5, 2.2)))
        elif case == "negative-contrast":
            problem = forward.synthetic_problem(density=-2500.0, density_bounds=(-4000.0, -1000.0))
        else:
            base = free_problem()
            problem = forward.Problem(base.stations, base.g_obs, np.linspace(0.5, 2.0, base.n_stations),
                                      bounds=base.bounds, parameters=base.parameters)
        result = reference.compute_reference(problem)
    samples = result.sample(100_000, np.random.default_rng(5))
    assert samples.shape == (100_000, 4)
    assert problem.inside(samples).all()
    assert np.all(np.isfinite(problem.log_posterior(samples[:2000])))
    scores = reference.score(samples, result)
    assert len(scores["w1_over_sd"]) == 4 and scores["error"] < 0.02
    assert np.all(np.abs(samples.mean(axis=0) - result.mean) < 0.015 * result.sd)
    np.testing.assert_allclose(samples.std(axis=0), result.sd, rtol=0.015)
    assert np.corrcoef(samples[:, 2], samples[:, 3])[0, 1] == pytest.approx(result.correlation[2, 3], abs=0.005)
    if case == "negative-contrast":
        assert np.all(samples[:, 3] < 0) and result.mean[3] < 0


def test_negative_contrast_is_the_mirror_image(free_default):
    problem, _, positive = free_default
    negative = reference.compute_reference(mirrored(problem))
    flip = np.array([1, 1, 1, -1])
    np.testing.assert_allclose(negative.mean, flip * positive.mean, rtol=1e-12)
    np.testing.assert_allclose(negative.sd, positive.sd, rtol=1e-12)
    np.testing.assert_allclose(negative.correlation, positive.correlation * np.outer(flip, flip), atol=1e-12)
    assert negative.log_evidence == pytest.approx(positive.log_evidence, abs=1e-9)
    nodes, density = negative.marginal(3)
    np.testing.assert_allclose(-nodes[::-1], positive.marginal(3)[0], rtol=1e-12)
    np.testing.assert_allclose(density[::-1], positive.marginal(3)[1], rtol=1e-9)


def test_score_is_per_parameter_and_sees_a_shift(free_default):
    _, _, result = free_default
    samples = result.sample(100_000, np.random.default_rng(1))
    shifted = samples + 0.1 * result.sd
    scores = reference.score(shifted, result)
    np.testing.assert_allclose(scores["w1_over_sd"], 0.1, atol=0.015)
    assert result.summary()["mean"] == result.mean.tolist() and len(result.summary()["correlation"]) == 4


def test_command_line_prints_the_free_density_reference(capsys):
    from gravity_flows.command import reference as reference_command

    reference_command.main(["--density-bounds", "1000", "4000"])
    text = capsys.readouterr().out
    assert "drho" in text and "log evidence" in text
    with pytest.raises(SystemExit) as exit_info:
        reference_command.main(["--density-bounds", "-1000", "4000"])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------------------------
# A posterior pressed on a bound: examples/profile.csv's body lies at x0 = -2 m, outside the default box


PROFILE = forward.read_profile(Path(__file__).resolve().parents[2] / "examples" / "profile.csv")


def profile_problem(density_bounds=None):
    """examples/profile.csv (41 stations, sigma 0.5 and 1 µGal) in the default box, where x0 piles up against 0."""
    box, parameters = forward.prior_box(forward.DEFAULT_BOUNDS, density_bounds)
    stations, g_obs, sigma = PROFILE
    return forward.Problem(stations, g_obs, sigma, bounds=box, parameters=parameters)


@pytest.fixture(scope="module")
def pressed_free():
    problem = profile_problem(DENSITY_BOUNDS)
    laplace = forward.laplace_approximation(problem)
    return problem, laplace, reference.compute_reference(problem, laplace)


def nested_quadrature(problem, windows, points=(61, 31, 31, 31)):
    """Mean and sd of x0 and z by plain trapezoid quadrature of ``problem.log_posterior`` itself, nested: for each
    drho node a (x0, z, R) grid, R spanning the ridge's width at that drho (R = (m / drho)^(1/3) for m in the
    window's mass range, within the R box), then over drho. Nothing of the reference's (x0, z, m) mathematics."""
    (x0_window, z_window, mass_window), (n0, nz, nr, nt) = windows, points
    x0, z = np.linspace(*x0_window, n0), np.linspace(*z_window, nz)
    contrasts = np.linspace(*problem.bounds[3], nt)
    log_integrals, moments = [], []
    for contrast in contrasts:
        radius = np.linspace(*np.clip(np.cbrt(np.asarray(mass_window) / contrast), *problem.bounds[2]), nr)
        grid = np.stack(np.meshgrid(x0, z, radius, [contrast], indexing="ij"), axis=-1)[..., 0, :]
        log_cell = sum(np.expand_dims(np.log(reference._trapezoid_weights(n)), [a for a in range(3) if a != k])
                       for k, n in enumerate((x0, z, radius)))
        log_mass = problem.log_posterior(grid) + log_cell
        log_integrals.append(logsumexp(log_mass))
        mass = np.exp(log_mass - log_integrals[-1])
        moments.append([np.sum(mass * grid[..., k] ** p) for k in (0, 1) for p in (1, 2)])
    log_outer = np.array(log_integrals) + np.log(reference._trapezoid_weights(contrasts))
    weights = np.exp(log_outer - logsumexp(log_outer))
    m = weights @ np.array(moments)
    return np.array([m[0], m[2]]), np.sqrt([m[1] - m[0] ** 2, m[3] - m[2] ** 2]), logsumexp(log_outer)


def test_posterior_pressed_on_a_bound_agrees_with_nested_brute_force(pressed_free):
    """x0 pressed on 0, density free. The Gauss–Newton window (x0 in [0, 1.34], 121 nodes, one spacing about the
    posterior's sd) put x0 at 0.01050 ± 0.01265 m, 0.13 sd off the brute force (0.01207 ± 0.01202 m at 121+ nodes);
    the fitted window resolves it, and its self-check passes."""
    problem, laplace, result = pressed_free
    assert laplace.on_bound == ("x0",)
    windows = [(0.0, 0.15), (result.mean[1] - 10 * result.sd[1], result.mean[1] + 10 * result.sd[1])]
    mass_nodes, mass_density = result.mass_marginal()
    mass_mean = np.trapezoid(mass_nodes * mass_density, mass_nodes)
    mass_sd = np.sqrt(np.trapezoid((mass_nodes - mass_mean) ** 2 * mass_density, mass_nodes))
    windows.append((mass_mean - 10 * mass_sd, mass_mean + 10 * mass_sd))
    means, sds, log_evidence = nested_quadrature(problem, windows)
    # the brute force at these nodes is within 0.005 sd of its own limit in x0 (0.0027 sd at 0.6x the nodes)
    assert np.all(np.abs(result.mean[:2] - means) < 0.01 * result.sd[:2]), (result.mean[:2], means)
    np.testing.assert_allclose(result.sd[:2], sds, rtol=0.01)
    assert result.log_evidence == pytest.approx(log_evidence, abs=0.02)
    assert result.check["ok"] and result.nodes[0][0] == 0.0 and result.nodes[0][-1] < 0.3


def test_self_check_catches_a_coarse_or_misplaced_window(pressed_free):
    """The self-check fails the window the Gauss–Newton fit gave before (x0 in [0, 1.34]: the trapezoid rule's error
    at the bound), and a window that cuts the posterior off (z ending 2 sd above its mean)."""
    problem, _, result = pressed_free
    box = reference.RidgeBox.of(problem)
    limits = np.array([*problem.bounds[:2, 0], box.mass_range[0]]), np.array([*problem.bounds[:2, 1], box.mass_range[1]])
    low, high = np.array([n[0] for n in result.nodes]), np.array([n[-1] for n in result.nodes])
    coarse = reference._ridge_grid_reference(problem, box, [0.0, *low[1:]], [1.3445, *high[1:]], reference.GRID_POINTS)
    check = reference.grid_check(coarse, *limits)
    assert not check["ok"] and check["grid_error"][0] > 10 * reference.GRID_TOLERANCE
    assert abs(coarse.mean[0] - result.mean[0]) > 0.1 * result.sd[0]  # what the check saved us from
    cut = high.copy()
    cut[1] = result.mean[1] + 2 * result.sd[1]
    misplaced = reference._ridge_grid_reference(problem, box, low, cut, reference.GRID_POINTS)
    check = reference.grid_check(misplaced, *limits)
    assert not check["ok"] and check["edge_mass"] > 1e3 * reference.EDGE_TOLERANCE
    assert "check fails" in reference.check_warning(SimpleNamespace(check=check))
    assert reference.check_warning(result) is None


def test_a_misplaced_first_window_is_moved_out():
    """_fit_window moves a side of the window out where the posterior goes on beyond it."""
    problem = free_problem()
    laplace = forward.laplace_approximation(problem)
    exact = reference.compute_reference(problem, laplace)
    box = reference.RidgeBox.of(problem)
    limit_low = np.array([*problem.bounds[:2, 0], box.mass_range[0]])
    limit_high = np.array([*problem.bounds[:2, 1], box.mass_range[1]])
    low = np.array([n[0] for n in exact.nodes])
    high = np.array([n[-1] for n in exact.nodes])
    high[0] = exact.mean[0] + 1.0 * exact.sd[0]  # x0 cut one sd above its mean

    def grid_reference(lo, hi, points):
        return reference._ridge_grid_reference(problem, box, lo, hi, points)

    moved = reference._fit_window(grid_reference, low, high, limit_low, limit_high, reference.GRID_POINTS)
    assert moved.check["ok"]
    assert np.all(np.abs(moved.mean - exact.mean) < 2e-3 * exact.sd)


def test_posterior_pressed_on_a_bound_with_the_density_known_agrees_with_brute_force():
    """The same profile with the density known: a plain 3-D trapezoid quadrature of problem.log_posterior on a window
    of ±10 of the result's sd (x0 from its bound 0) agrees, and the self-check passes."""
    problem = profile_problem()
    result = reference.compute_reference(problem)
    low = np.maximum(result.mean - 10 * result.sd, problem.bounds[:, 0])
    high = np.minimum(result.mean + 10 * result.sd, problem.bounds[:, 1])
    nodes = [np.linspace(lo, hi, n) for lo, hi, n in zip(low, high, (121, 41, 41))]
    grid = np.stack(np.meshgrid(*nodes, indexing="ij"), axis=-1)
    log_cell = sum(np.expand_dims(np.log(reference._trapezoid_weights(n)), [a for a in range(3) if a != k])
                   for k, n in enumerate(nodes))
    log_mass = problem.log_posterior(grid) + log_cell
    mass = np.exp(log_mass - logsumexp(log_mass))
    means = np.array([np.sum(mass * grid[..., k]) for k in range(3)])
    sds = np.sqrt([np.sum(mass * (grid[..., k] - means[k]) ** 2) for k in range(3)])
    assert np.all(np.abs(result.mean - means) < 0.01 * result.sd), (result.mean, means)
    np.testing.assert_allclose(result.sd, sds, rtol=0.01)
    assert result.log_evidence == pytest.approx(logsumexp(log_mass), abs=0.01)
    assert result.check["ok"] and result.nodes[0][0] == 0.0
