"""The exact reference posterior: normalisation, grid convergence, agreement with Laplace, scores."""

import numpy as np
import pytest
from scipy.special import logsumexp

import forward
from gravity_flows.scoring import reference

#: Noise (µGal) at which w = 1e12 and sum w d^2 ~ 4e16: the posterior is a Gaussian of sd 3e-8 m in x0.
TINY_NOISE = 1e-6


@pytest.fixture(scope="module", params=[TINY_NOISE, 1e-8], ids=["noise-1e-6", "noise-1e-8"])
def tiny_noise(request):
    """The default sphere at tiny noise; at 1e-8 µGal |log Z| ~ 2e4 leaves the grid's total mass 1 only to
    ~4e-12, which unnormalised would shift the mean of x0 (3 m) by 2 % of its sd (3e-10 m)."""
    problem = forward.synthetic_problem(noise_sd=request.param)
    laplace = forward.laplace_approximation(problem)
    return problem, laplace, reference.compute_reference(problem, laplace)


def gaussian_draws(mean, covariance, n, rng):
    """n draws from N(mean, covariance) and their log densities."""
    cholesky = np.linalg.cholesky(covariance)
    standard = rng.standard_normal((n, mean.size))
    log_density = (-0.5 * np.sum(standard**2, axis=1) - np.sum(np.log(np.diag(cholesky)))
                   - 0.5 * mean.size * np.log(2 * np.pi))
    return mean + standard @ cholesky.T, log_density


def importance_sampling(theta, log_target, log_proposal):
    """Self-normalised importance sampling of draws ``theta`` (n, dim) from a proposal: the mean and sd of
    the target, their standard errors, the effective sample size, and log Z = log E_q[target / q] with its
    standard error (delta method: se(log mean) = sd / (sqrt(n) mean), and the mean of w n is 1)."""
    log_ratio = log_target - log_proposal
    weights = np.exp(log_ratio - log_ratio.max())
    weights /= weights.sum()
    n = weights.size
    mean = weights @ theta
    centred = theta - mean
    variance = weights @ centred**2
    return {
        "mean": mean,
        "sd": np.sqrt(variance),
        "mean_se": np.sqrt(weights**2 @ centred**2),
        "sd_se": np.sqrt(weights**2 @ (centred**2 - variance) ** 2) / (2 * np.sqrt(variance)),
        "ess": 1 / np.sum(weights**2),
        "log_z": logsumexp(log_ratio) - np.log(n),
        "log_z_se": np.sqrt(np.var(weights * n) / n),
    }


def assert_agrees_with_importance_sampling(result, estimate, power=0.02):
    """The reference's means and sds within 4 standard errors of the estimate's, errors below ``power`` sd."""
    assert np.all(estimate["mean_se"] < power * result.sd) and np.all(estimate["sd_se"] < power * result.sd)
    assert np.all(np.abs(estimate["mean"] - result.mean) < 4 * estimate["mean_se"]), (estimate["mean"], result.mean)
    assert np.all(np.abs(estimate["sd"] - result.sd) < 4 * estimate["sd_se"]), (estimate["sd"], result.sd)


def assert_unimodal(density):
    """Rises to its peak and falls after it (up to rounding)."""
    peak = np.argmax(density)
    slack = 1e-9 * density[peak]
    assert np.all(np.diff(density[: peak + 1]) > -slack) and np.all(np.diff(density[peak:]) < slack)


def test_marginals_integrate_to_one(default_reference):
    for i in range(3):
        nodes, density = default_reference.marginal(i)
        assert np.trapezoid(density, nodes) == pytest.approx(1.0, abs=1e-10)
        assert np.all(density >= 0)
    _, _, joint = default_reference.joint_marginal(1, 2)
    assert joint.shape == (reference.GRID_POINTS, reference.GRID_POINTS)


def test_grid_refinement_changes_nothing(default_problem, default_laplace, default_reference):
    fine = reference.compute_reference(default_problem, default_laplace, grid_points=181)
    assert np.all(np.abs(fine.mean - default_reference.mean) < 1e-3 * fine.sd)
    np.testing.assert_allclose(default_reference.sd, fine.sd, rtol=1e-3)
    assert default_reference.log_evidence == pytest.approx(fine.log_evidence, abs=1e-6)


def test_wider_window_changes_nothing(default_problem, default_laplace, default_reference):
    wide = reference.compute_reference(default_problem, default_laplace, grid_points=161, window_sds=11)
    assert np.all(np.abs(wide.mean - default_reference.mean) < 1e-3 * wide.sd)
    np.testing.assert_allclose(default_reference.sd, wide.sd, rtol=1e-3)
    assert default_reference.log_evidence == pytest.approx(wide.log_evidence, abs=1e-6)


def test_default_posterior_agrees_with_laplace(default_reference, default_laplace):
    np.testing.assert_allclose(default_reference.sd, default_laplace.theta_sd, rtol=0.02)
    assert default_reference.correlation[1, 2] == pytest.approx(0.94, abs=0.01)
    np.testing.assert_allclose(default_reference.sd, [0.03, 0.05, 0.009], rtol=0.1)


def test_log_evidence_of_a_gaussian_likelihood_matches_the_laplace_formula(default_problem, default_laplace, default_reference):
    # The posterior is nearly Gaussian, so log Z ≈ log L(map) + log prior + 0.5 log det(2 pi Sigma)
    laplace = default_laplace
    approximate = (
        default_problem.log_likelihood(laplace.theta_map)
        + default_problem.log_prior_density
        + 0.5 * np.linalg.slogdet(2 * np.pi * laplace.theta_cov)[1]
    )
    assert default_reference.log_evidence == pytest.approx(approximate, abs=0.01)


def test_evidence_scales_with_the_prior_box():
    # The posterior lies well inside both boxes, so doubling the x0 range exactly halves Z.
    small = forward.synthetic_problem(bounds=((0, 10), (1, 15), (0.5, 5)))
    large = forward.synthetic_problem(bounds=((-10, 10), (1, 15), (0.5, 5)))
    assert reference.compute_reference(large).log_evidence == pytest.approx(
        reference.compute_reference(small).log_evidence - np.log(2), abs=1e-9
    )


def test_samples_from_the_reference_score_near_zero(default_reference):
    samples = default_reference.sample(100_000, np.random.default_rng(0))
    result = reference.score(samples, default_reference)
    assert result["error"] < 0.02
    np.testing.assert_allclose(samples.mean(axis=0), default_reference.mean, atol=0.02 * default_reference.sd.max())


def test_shifted_samples_score_their_shift(default_reference):
    samples = default_reference.sample(100_000, np.random.default_rng(1))
    shifted = samples + 0.1 * default_reference.sd
    result = reference.score(shifted, default_reference)
    np.testing.assert_allclose(result["w1_over_sd"], 0.1, atol=0.015)
    assert result["error"] == max(result["w1_over_sd"])


def test_too_narrow_samples_score_badly(default_reference):
    narrow = default_reference.mean + 0.5 * (default_reference.sample(20_000, np.random.default_rng(2)) - default_reference.mean)
    # W1 of N(0, 1/4) to N(0, 1) is 0.5 * E|X| = 0.5 * 0.798
    assert reference.score(narrow, default_reference)["w1_over_sd"][0] == pytest.approx(0.399, abs=0.02)




def test_grid_density_is_the_normalised_posterior_with_per_station_sigma():
    """log_density + log Z must equal the problem's own log posterior at every grid node (any sigma)."""
    problem = forward.synthetic_problem()
    problem = forward.Problem(problem.stations, problem.g_obs, np.linspace(0.5, 2.0, problem.n_stations),
                              bounds=problem.bounds)
    result = reference.compute_reference(problem, grid_points=41)
    rng = np.random.default_rng(0)
    index = tuple(rng.integers(0, 41, size=(3, 20)))
    nodes = np.stack([result.nodes[axis][index[axis]] for axis in range(3)], axis=1)
    np.testing.assert_allclose(result.log_density[index] + result.log_evidence, problem.log_posterior(nodes), rtol=1e-10)


@pytest.mark.parametrize("depth_box", [(1.0, 5.5), (7.0, 15.0)], ids=["below-the-truth", "above-the-truth"])
def test_posterior_pressed_against_a_bound_gets_the_whole_box_grid_zoomed_in(depth_box):
    """The true z = 6 outside the depth box: the best fit sits on the bound, where theta's Hessian describes no
    peak (the gradient is not zero, and the posterior falls off from the bound over a tenth of its sd; with
    z in [7, 15] it is not even negative definite). The grid starts from the whole box and zooms in on where it
    finds the posterior (the ±8 Laplace sd window this used to take put z's mean 0.6 sd off with z in [1, 5.5]).
    A finer grid on a window of ±20 of the result's own sd around its mean (clipped to the box) gives the same
    posterior. (Not ±8: pressed against the bound, z falls off exponentially, so 8 sd leave 3e-4 of the mass
    out; and the trapezoid rule converges as h² only, the posterior being cut off at its largest by the bound.)"""
    problem = forward.synthetic_problem(bounds=((0, 10), depth_box, (0.5, 5)))
    laplace = forward.laplace_approximation(problem)
    assert not laplace.theta_peak and laplace.on_bound == ("z",)
    result = reference.compute_reference(problem, laplace)
    bound = depth_box[0] if depth_box[0] > 6 else depth_box[1]
    assert bound in (result.nodes[1][0], result.nodes[1][-1])
    assert result.nodes[1][-1] - result.nodes[1][0] < 0.2  # zoomed in, against the bound
    # and resolved there: the z axis has more nodes than the others, and the self-check passes
    assert result.check["ok"] and result.nodes[1].size > reference.GRID_POINTS
    low = np.maximum(result.mean - 20 * result.sd, problem.bounds[:, 0])
    high = np.minimum(result.mean + 20 * result.sd, problem.bounds[:, 1])
    other = reference._theta_grid_reference(problem, low, high, 161)
    assert np.all(np.abs(other.mean - result.mean) < 5e-3 * result.sd)
    np.testing.assert_allclose(other.sd, result.sd, rtol=3e-3)
    assert other.log_evidence == pytest.approx(result.log_evidence, abs=3e-3)


def test_self_check_of_the_default_reference_passes_and_is_in_its_summary(default_reference):
    check = default_reference.summary()["check"]
    assert check["ok"] and check["grid_points"] == [reference.GRID_POINTS] * 3
    assert max(check["grid_error"]) < 1e-9 and check["edge_mass"] < 1e-12


def test_default_reference_is_pinned(default_reference):
    """The default problem's reference to rounding: its numbers as computed before the sum of squares was
    expanded about the best amplitude per (x0, z) node rather than about R = 0 (differences ~1e-12)."""
    pinned_mean = [2.978850970092598, 6.014515483155399, 1.998011149752871]
    assert np.all(np.abs(default_reference.mean - pinned_mean) < 1e-9 * default_reference.sd)
    np.testing.assert_allclose(default_reference.sd, [0.03031089407622412, 0.05286723267346264, 0.00937427619149689], rtol=1e-9)
    np.testing.assert_allclose(default_reference.correlation[np.triu_indices(3, 1)],
                               [0.0021279864903229915, 0.0021625482857902246, 0.937957563646713], rtol=0, atol=1e-9)
    assert default_reference.log_evidence == pytest.approx(-1422.8152274615923, abs=1e-8)


# ----------------------------------------------------------------------------------------------
# Tiny noise: sum w d^2 ~ 4e16, the posterior a Gaussian of sd 3e-8 m


def test_tiny_noise_grid_density_is_the_problems_own_posterior(tiny_noise):
    """At noise 1e-6 µGal the sum of squares, expanded about R = 0, lost ~10 nats to the rounding of
    sum w d^2 ~ 4e16; the problem's own log posterior sums the squared residuals, station by station."""
    problem, _, result = tiny_noise
    rng = np.random.default_rng(3)
    index = tuple(rng.integers(0, reference.GRID_POINTS, size=(3, 50)))
    nodes = np.stack([result.nodes[axis][index[axis]] for axis in range(3)], axis=1)
    np.testing.assert_allclose(result.log_density[index] + result.log_evidence, problem.log_posterior(nodes), rtol=0, atol=1e-3)


def test_tiny_noise_posterior_is_the_laplace_gaussian(tiny_noise):
    """The posterior is Gaussian: the Laplace's sd, correlation and mode, a unimodal marginal of R (it had
    dozens of peaks), and the ±8 sd window holds it all (each marginal is at exp(-32) of its peak at the ends)."""
    _, laplace, result = tiny_noise
    np.testing.assert_allclose(result.sd, laplace.theta_sd, rtol=0.01)
    np.testing.assert_allclose(result.correlation, laplace.theta_cov / np.outer(laplace.theta_sd, laplace.theta_sd), atol=0.01)
    assert np.all(np.abs(result.mean - laplace.theta_map) < 0.01 * result.sd)
    for i in range(3):
        nodes, density = result.marginal(i)
        assert_unimodal(density)
        assert max(density[0], density[-1]) < 1e-10 * density.max()
        assert np.trapezoid(density, nodes) == pytest.approx(1.0, abs=1e-9)


def test_tiny_noise_agrees_with_importance_sampling_from_the_laplace(tiny_noise):
    """Means, sds and log Z of the problem's own posterior, importance-sampled from the Laplace Gaussian."""
    problem, laplace, result = tiny_noise
    theta, log_proposal = gaussian_draws(laplace.theta_map, laplace.theta_cov, 20_000, np.random.default_rng(4))
    estimate = importance_sampling(theta, problem.log_posterior(theta), log_proposal)
    assert estimate["ess"] > 0.5 * theta.shape[0]
    assert_agrees_with_importance_sampling(result, estimate)
    # the weights are constant to ~1e-9 (a Gaussian posterior), so allow for the grid's own error too
    assert estimate["log_z_se"] < 0.01
    assert result.log_evidence == pytest.approx(estimate["log_z"], abs=4 * estimate["log_z_se"] + 1e-6)
