"""Variational inference machinery: the flow posterior's density bookkeeping and training on known targets."""

import math
import types

import numpy as np
import pytest
import torch

import Gravity_auto_Affine
import Gravity_auto_NSF
import Gravity_coupling_Affine
import Gravity_coupling_NSF
import Gravity_invertible_Affine
import Gravity_planar
from gravity_flows.flows.autoregressive import AutoregressiveAffine, AutoregressiveSpline
from gravity_flows.inference import vi
from layer_harness import randomize_
from gravity_flows.flows.layers import AffineCoupling
from gravity_flows.flows.splines import SplineCoupling

SCRIPTS = {
    "bare": None,
    "planar": Gravity_planar,
    "coupling_Affine": Gravity_coupling_Affine,
    "invertible_Affine": Gravity_invertible_Affine,
    "auto_Affine": Gravity_auto_Affine,
    "auto_NSF": Gravity_auto_NSF,
    "coupling_NSF": Gravity_coupling_NSF,
}
DEFAULT_FLOWS = {"planar": 8, "coupling_Affine": 4, "invertible_Affine": 3, "auto_Affine": 4, "auto_NSF": 3, "coupling_NSF": 3}

# Known targets live well inside a wide box, so that the box's truncation is negligible and
# log Z = 0 when the "likelihood" is the target density times the box volume.
HALF_WIDTH = 40.0
BOUNDS = np.array([[-HALF_WIDTH, HALF_WIDTH]] * 3)
LOG_VOLUME = 3 * math.log(2 * HALF_WIDTH)
LOG_PRIOR = -LOG_VOLUME


def to_u(theta):
    theta = np.asarray(theta, dtype=float)
    return np.log((theta + HALF_WIDTH) / (HALF_WIDTH - theta))


def layers_of(method, flows=None, seed=0):
    """The script's layers at its default size, their weights drawn from ``seed`` (whatever ran before)."""
    if SCRIPTS[method] is None:
        return []
    args = types.SimpleNamespace(flows=flows or DEFAULT_FLOWS[method], hidden=32, bins=8, tail_bound=5.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SCRIPTS[method].build_layers(args, 3)


def make_flow(layers, shift_theta, scale_theta, seed=0):
    """A FlowPosterior whose fixed standardisation puts theta ≈ shift + scale * y near the box centre."""
    slope = 2 * HALF_WIDTH * 0.25  # dtheta/du at u = 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = vi.FlowPosterior(layers, BOUNDS, to_u(shift_theta), np.diag(np.asarray(scale_theta) / slope))
    return model.double()


def fit(model, log_target, iterations, batch=64, lr=0.01, seed=0, n_eval=20_000):
    generator = torch.Generator().manual_seed(seed)
    vi.train(model, log_target, LOG_PRIOR, iterations=iterations, batch=batch, lr=lr, generator=generator, progress=False)
    theta, log_weights = vi.evaluate(model, log_target, LOG_PRIOR, n_eval, generator)
    return theta, log_weights


# ----------------------------------------------------------------------------------------------
# Density bookkeeping


@pytest.mark.parametrize("method", ["bare", "coupling_Affine", "invertible_Affine", "auto_Affine", "auto_NSF", "coupling_NSF"])
def test_log_q_of_samples_equals_density_by_the_inverse_path(method):
    """log q from the sampling pass must equal log q computed backwards through every step."""
    model = make_flow(layers_of(method), [1.0, -2.0, 0.5], [1.0, 2.0, 0.5])
    randomize_(model, scale=0.3)
    theta, log_q = model.sample(50, torch.Generator().manual_seed(1))
    with torch.no_grad():
        u, log_det_box = model.box.inverse(theta)
        y = torch.linalg.solve_triangular(model.scale_tril, (u - model.shift).T, upper=False).T
        x, log_det_layers = model.flow.inverse(y)
        matrix = model.base_matrix()
        eps = torch.linalg.solve_triangular(matrix, (x - model.loc).T, upper=False).T
        log_base = -0.5 * eps.square().sum(-1) - 1.5 * math.log(2 * math.pi)
        expected = (log_base - torch.log(torch.diagonal(matrix)).sum() + log_det_layers
                    - model.log_det_scale + log_det_box)
    torch.testing.assert_close(log_q.detach(), expected, atol=1e-7, rtol=1e-9)


def test_bare_flow_at_start_is_the_standardising_gaussian():
    shift, scale_tril = np.array([0.1, -0.2, 0.3]), np.array([[0.02, 0, 0], [0.01, 0.03, 0], [0.0, -0.01, 0.01]])
    model = vi.FlowPosterior([], BOUNDS, shift, scale_tril).double()
    theta, log_q = model.sample(1000, torch.Generator().manual_seed(0))
    u, log_det_box = model.box.inverse(theta)
    gaussian = torch.distributions.MultivariateNormal(torch.tensor(shift), scale_tril=torch.tensor(scale_tril))
    torch.testing.assert_close(log_q.detach(), gaussian.log_prob(u) + log_det_box, atol=1e-8, rtol=1e-10)
    np.testing.assert_allclose(np.cov(u.detach().numpy().T), scale_tril @ scale_tril.T, rtol=0.15, atol=5e-5)


def test_samples_never_leave_the_box():
    model = make_flow([], [0, 0, 0], [1e3, 1e3, 1e3])  # a q far wider than the box
    theta, _ = model.sample(10_000, torch.Generator().manual_seed(0))
    assert (theta >= -HALF_WIDTH).all() and (theta <= HALF_WIDTH).all()


# ----------------------------------------------------------------------------------------------
# Training on targets whose answer is known

GAUSSIAN_MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
GAUSSIAN_SD = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
GAUSSIAN_CORRELATION = torch.tensor([[1, 0.3, 0.2], [0.3, 1, 0.6], [0.2, 0.6, 1]], dtype=torch.float64)
GAUSSIAN_COVARIANCE = GAUSSIAN_CORRELATION * torch.outer(GAUSSIAN_SD, GAUSSIAN_SD)


def gaussian_log_target(theta):
    distribution = torch.distributions.MultivariateNormal(GAUSSIAN_MEAN, GAUSSIAN_COVARIANCE)
    return distribution.log_prob(theta) + LOG_VOLUME


#: Training on the Gaussian: iterations and Adam's rate. At 300 and 0.02 every flow was within 0.53 of
#: each tolerance below (seed 0), as at 500 and 0.01 (0.52); at 300 and 0.01 the bare flow's sd was not
#: yet within its tolerance (1.14 times it).
GAUSSIAN_ITERATIONS = 300
GAUSSIAN_LR = 0.02


@pytest.mark.parametrize("method", list(SCRIPTS))
def test_every_flow_learns_a_correlated_gaussian(method):
    # Start from a wrong standardisation (shifted by half an sd, 1.5 times too wide, uncorrelated).
    model = make_flow(layers_of(method), GAUSSIAN_MEAN + 0.5 * GAUSSIAN_SD, 1.5 * GAUSSIAN_SD)
    theta, log_weights = fit(model, gaussian_log_target, iterations=GAUSSIAN_ITERATIONS, lr=GAUSSIAN_LR)
    kl = -np.mean(log_weights)  # log Z = 0
    standard_error = np.std(log_weights) / np.sqrt(log_weights.size)
    assert -4 * standard_error < kl < 0.01  # a wrong log q would show as a negative "KL"
    sd = GAUSSIAN_SD.numpy()
    np.testing.assert_allclose(theta.mean(axis=0), GAUSSIAN_MEAN.numpy(), atol=0.05 * sd.max())
    np.testing.assert_allclose(theta.std(axis=0), sd, rtol=0.05)
    np.testing.assert_allclose(np.corrcoef(theta.T), GAUSSIAN_CORRELATION.numpy(), atol=0.05)


BANANA_CURVATURE = 0.5
SPLIT_SD = (0.5, 2.0)  # left and right sd of the skewed conditional


def banana_log_target(theta):
    """theta_0 ~ N(0, 1); theta_1 = 0.5 theta_0^2 + e, e split-normal (sd 0.5 left, 2 right); theta_2 ~ N(0, 1)."""
    b, a, c = theta.unbind(-1)
    x = a - BANANA_CURVATURE * b**2
    sd = torch.where(x < 0, SPLIT_SD[0], SPLIT_SD[1])
    log_split_normal = math.log(2 / (math.sqrt(2 * math.pi) * sum(SPLIT_SD))) - 0.5 * (x / sd) ** 2
    return -0.5 * (b**2 + c**2) - math.log(2 * math.pi) + log_split_normal + LOG_VOLUME


#: Training on the banana: iterations and Adam's rate. KL (nats) at 600 and 0.02 (seed 0): affine coupling
#: 0.119, spline coupling 0.011, affine autoregressive 0.127, spline autoregressive 0.010 (at 1000 and 0.01:
#: 0.136, 0.020, 0.114, 0.007; at 400 and 0.02 the spline coupling was 0.034). The affine layers' KL is
#: their family's floor (an affine map keeps the conditional Gaussian), reached at either length.
BANANA_ITERATIONS = 600
BANANA_LR = 0.02


def banana_kl(layer):
    model = make_flow([layer], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0])
    _, log_weights = fit(model, banana_log_target, iterations=BANANA_ITERATIONS, batch=128, lr=BANANA_LR)
    return -np.mean(log_weights)


def test_splines_beat_affine_on_a_curved_skewed_target():
    """One layer that transforms theta_1 given theta_0: an affine map can only shift and scale the
    conditional (it stays Gaussian); a spline can also skew it, which this target needs."""
    torch.manual_seed(0)
    kl = {
        "affine coupling": banana_kl(AffineCoupling(3, [1, 2], hidden=32)),
        "spline coupling": banana_kl(SplineCoupling(3, [1, 2], hidden=32)),
        "affine autoregressive": banana_kl(AutoregressiveAffine(3, hidden=32, order=[0, 1, 2])),
        "spline autoregressive": banana_kl(AutoregressiveSpline(3, hidden=32, order=[0, 1, 2])),
    }
    print("KL(q||p) in nats on the skewed banana:", {name: round(float(value), 4) for name, value in kl.items()})
    assert kl["spline coupling"] < 0.03 and kl["spline autoregressive"] < 0.03, kl
    assert kl["spline coupling"] < kl["affine coupling"] - 0.05, kl
    assert kl["spline autoregressive"] < kl["affine autoregressive"] - 0.05, kl
    assert min(kl.values()) > -0.01, kl  # KL is never negative beyond Monte Carlo noise


def test_nan_loss_stops_training_naming_the_iteration():
    calls = {"n": 0}

    def failing_target(theta):
        calls["n"] += 1
        value = gaussian_log_target(theta)
        return value * float("nan") if calls["n"] == 3 else value

    model = make_flow([], [0, 0, 0], [1, 1, 1])
    with pytest.raises(vi.TrainingDiverged, match="iteration 3 of 10"):
        vi.train(model, failing_target, LOG_PRIOR, iterations=10, batch=8, lr=0.01, progress=False)


def test_importance_diagnostics_of_an_exact_q():
    model = make_flow([], GAUSSIAN_MEAN, GAUSSIAN_SD)  # q = N(mean, diag sd^2) up to the box's slight bend

    def diagonal_gaussian(theta):
        return torch.distributions.Normal(GAUSSIAN_MEAN, GAUSSIAN_SD).log_prob(theta).sum(-1) + LOG_VOLUME

    _, log_weights = vi.evaluate(model, diagonal_gaussian, LOG_PRIOR, 20_000, torch.Generator().manual_seed(0))
    result = vi.importance_diagnostics(log_weights, log_evidence=0.0)
    assert abs(result["kl"]) < 0.01 and result["is_ess"] > 0.95 and result["khat"] < 0.5


# ----------------------------------------------------------------------------------------------
# Annealing, divergence checks without a per-step host sync, and the checkpoint clock


def test_anneal_schedule_rises_geometrically_to_one():
    beta = vi.anneal_schedule(1000, 0.6)
    assert beta[0] == pytest.approx(vi.BETA_START) and beta[599] == pytest.approx(1.0)
    np.testing.assert_allclose(beta[1:600] / beta[:599], (1 / vi.BETA_START) ** (1 / 599))  # geometric
    assert np.all(beta[600:] == 1.0) and np.all(np.diff(beta) >= 0)
    assert np.all(vi.anneal_schedule(50, 0.0) == 1.0)
    with pytest.raises(ValueError):
        vi.anneal_schedule(10, 1.5)


RIDGE_BOUNDS = np.array([[0.5, 3.0], [0.5, 3.0], [-5.0, 5.0]])
RIDGE_WIDTH = 0.01


def ridge_log_likelihood(theta):
    """A thin curved ridge a·b³ = 1 (relative width 1 %) across a box, like the mass ridge of R and Δρ."""
    a, b, c = theta.unbind(-1)
    return -0.5 * ((a * b**3 - 1) / RIDGE_WIDTH) ** 2 - 0.5 * c**2


def ridge_log_evidence():
    """log ∫ L p over the box by quadrature: a dense grid in (a, b) times the exact Gaussian integral in c."""
    a = np.linspace(*RIDGE_BOUNDS[0], 4001)
    b = np.linspace(*RIDGE_BOUNDS[1], 4001)
    grid = -0.5 * ((a[:, None] * b[None, :] ** 3 - 1) / RIDGE_WIDTH) ** 2
    from scipy.special import erf
    mass_c = math.sqrt(2 * math.pi) * erf(5 / math.sqrt(2))
    area = np.trapezoid(np.trapezoid(np.exp(grid), b, axis=1), a)
    return math.log(area * mass_c) - np.sum(np.log(RIDGE_BOUNDS[:, 1] - RIDGE_BOUNDS[:, 0]))


def test_annealing_fits_a_curved_ridge_better_from_the_prior():
    """From the prior, reverse KL without annealing collapses onto part of a thin ridge; tempering the
    likelihood lets q spread along it first. Same flow, same budget, same seed. At 400 iterations and
    Adam's rate 0.01 (seed 0) KL is 6.8 nats without annealing and 0.112 with it (at 600 and 0.005: 10.9
    and 0.073; at 1500: 4.4 and 0.032)."""
    log_prior = -float(np.sum(np.log(RIDGE_BOUNDS[:, 1] - RIDGE_BOUNDS[:, 0])))
    log_z = ridge_log_evidence()
    kl = {}
    for anneal in (0.0, 0.6):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = vi.FlowPosterior(layers_of("auto_Affine"), RIDGE_BOUNDS, np.zeros(3), np.eye(3)).double()
        generator = torch.Generator().manual_seed(0)
        vi.train(model, ridge_log_likelihood, log_prior, iterations=400, batch=64, lr=0.01, generator=generator, progress=False,
                 anneal=anneal)
        _, log_weights = vi.evaluate(model, ridge_log_likelihood, log_prior, 20_000, generator)
        kl[anneal] = log_z - np.mean(log_weights)
    print("KL(q||p) on the ridge without and with annealing:", kl)
    assert kl[0.6] < 0.5 * kl[0.0] and -0.01 < kl[0.6] < 0.2, kl


def test_training_checks_the_loss_without_a_host_sync_every_step(monkeypatch):
    syncs = {"n": 0}
    item, boolean = torch.Tensor.item, torch.Tensor.__bool__

    # Adam reads its step counters with .item(): they live on the host (float32 scalars) even when
    # training runs on a GPU, so only reads of the float64 model's values and of boolean checks count.
    def counting_item(self):
        syncs["n"] += self.dtype in (torch.float64, torch.bool)
        return item(self)

    def counting_bool(self):
        syncs["n"] += self.dtype in (torch.float64, torch.bool)
        return boolean(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    def plain_gaussian(theta):  # torch.distributions would check its arguments on the host at every call
        return -0.5 * theta.square().sum(-1)

    model = make_flow([], [0, 0, 0], [1, 1, 1])
    history, _ = vi.train(model, plain_gaussian, LOG_PRIOR, iterations=500, batch=8, lr=0.01, progress=False)
    assert history.shape == (500,) and np.all(np.isfinite(history))
    assert syncs["n"] <= 500 // vi.CHECK_EVERY * 3 + 10  # a few per check, none per step


def test_scoring_at_checkpoints_is_not_counted_as_training_time(method_timer):
    """A slow scorer at every checkpoint (100 s each, on the clock's timer, not slept: nothing here races
    the machine's load): the training time excludes it, and the readings never run backwards."""
    model = make_flow([], [0, 0, 0], [1, 1, 1])
    calls = []

    def slow_scorer(iteration, seconds):
        calls.append((iteration, seconds))
        method_timer.advance(100.0)

    started = method_timer()
    _, seconds = vi.train(model, gaussian_log_target, LOG_PRIOR, iterations=200, batch=8, lr=0.01, progress=False,
                          checkpoints=(50, 100, 200), on_checkpoint=slow_scorer)
    elapsed = method_timer() - started
    assert [iteration for iteration, _ in calls] == [50, 100, 200]
    assert elapsed - seconds >= 300.0  # the three pauses are not training
    assert 0 < seconds <= elapsed - 300.0
    assert all(a[1] < b[1] for a, b in zip(calls, calls[1:])) and calls[-1][1] <= seconds


def test_the_prior_frame_moves_only_to_a_mode_pressed_on_a_bound():
    """From the prior the flow's frame is the box's centre, u = 0, except in a coordinate whose mode lies beyond
    PRESSED_U in u; with weak data (the mode no guide) nowhere."""
    laplace = types.SimpleNamespace(u_map=np.array([-6.7, 2.9, -3.1, 0.2]), weak=False)
    np.testing.assert_array_equal(vi.prior_centre(laplace), [-6.7, 0.0, -3.1, 0.0])
    shift, scale_tril = vi.standardisation("prior", laplace)
    np.testing.assert_array_equal(shift, [-6.7, 0.0, -3.1, 0.0])
    np.testing.assert_array_equal(scale_tril, np.eye(4))
    np.testing.assert_array_equal(vi.prior_centre(types.SimpleNamespace(u_map=laplace.u_map, weak=True)), np.zeros(4))


MASS_RIDGE_BOX = np.array([[0.0, 10.0], [1.0, 15.0], [0.5, 5.0], [1000.0, 4000.0]])


def test_the_laplace_frame_in_mass_coordinates_is_the_fit_carried_by_the_delta_method():
    """In mass coordinates the Laplace fit's mode, mapped through the box onto theta and back, is the frame's
    shift, and its covariance is carried by the Jacobian of that map (checked by central differences); the
    frame's draws land where the box's own Laplace Gaussian puts them, to first order."""
    import forward

    u_map = np.array([-0.4, -0.9, -1.3, 0.2])
    u_cov = np.diag([1e-4, 4e-4, 9e-4, 0.5])
    laplace = types.SimpleNamespace(u_map=u_map, u_cov=u_cov, weak=False)
    shift, scale_tril = vi.standardisation("laplace", laplace, "mass", MASS_RIDGE_BOX)
    box, mass = forward.BoxBijection(MASS_RIDGE_BOX).double(), forward.MassBijection(MASS_RIDGE_BOX).double()
    theta_map = box(torch.tensor(u_map))[0]
    torch.testing.assert_close(mass(torch.tensor(shift))[0], theta_map, rtol=1e-12, atol=1e-9)

    def to_mass_u(u):
        return mass.inverse(box(torch.as_tensor(u))[0])[0].numpy()

    step = 1e-6
    jacobian = np.column_stack([(to_mass_u(u_map + step * e) - to_mass_u(u_map - step * e)) / (2 * step)
                                for e in np.eye(4)])
    np.testing.assert_allclose(scale_tril @ scale_tril.T, jacobian @ u_cov @ jacobian.T, rtol=1e-6, atol=1e-12)
    # in the box's coordinates nothing is carried: the fit itself
    shift_box, scale_box = vi.standardisation("laplace", laplace)
    np.testing.assert_array_equal(shift_box, u_map)
    np.testing.assert_allclose(scale_box @ scale_box.T, u_cov, rtol=1e-12)


def test_a_flow_in_mass_coordinates_has_the_density_of_its_draws():
    """log q of a flow's draws in mass coordinates equals the density computed backwards (layers inverted, the
    mass map's inverse log-determinant): the mass map enters the flow's density exactly once."""
    args = types.SimpleNamespace(flows=2, hidden=16)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = vi.FlowPosterior(Gravity_coupling_Affine.build_layers(args, 4), MASS_RIDGE_BOX, np.zeros(4), np.eye(4),
                                 "mass").double()
    randomize_(model, scale=0.3)
    theta, log_q = model.sample(200, torch.Generator().manual_seed(4))
    with torch.no_grad():
        u, log_det_box = model.box.inverse(theta)
        x, log_det_layers = model.flow.inverse(u)
        matrix = model.base_matrix()
        eps = torch.linalg.solve_triangular(matrix, (x - model.loc).T, upper=False).T
        expected = (-0.5 * eps.square().sum(-1) - 2 * math.log(2 * math.pi) - torch.log(torch.diagonal(matrix)).sum()
                    + log_det_layers + log_det_box)
    torch.testing.assert_close(log_q.detach(), expected, atol=1e-7, rtol=1e-9)
    assert model.coordinates == "mass"
    low, high = torch.tensor(MASS_RIDGE_BOX[:, 0]), torch.tensor(MASS_RIDGE_BOX[:, 1])
    assert ((theta >= low) & (theta <= high)).all()
