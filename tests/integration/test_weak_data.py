"""Weakly informative data: an anomaly buried in noise gets a posterior close to the prior, not an error.

The default sphere (peak 15.5 µGal) under noise of 1e4 µGal (``--noise 1e4``): the data rule out only
the large shallow spheres, whose anomalies would reach thousands of µGal. Checked: the Laplace flags
the data as weak instead of refusing them; the exact reference covers the whole prior box, converges
under grid refinement and agrees with importance sampling from the prior (a fine proposal when the
data are weak); the warning; the start; and the Metropolis–Hastings sampler against the reference.
"""

import dataclasses

import numpy as np
import pytest
from scipy.special import logsumexp

import forward
import Gravity_MCMC
from gravity_flows.inference import start
from gravity_flows.scoring import reference

NOISE = 1e4  # µGal
DENSITY_BOUNDS = (1000.0, 4000.0)


@pytest.fixture(scope="module")
def weak():
    problem = forward.synthetic_problem(noise_sd=NOISE)
    laplace = forward.laplace_approximation(problem)
    return problem, laplace, reference.compute_reference(problem, laplace)


@pytest.fixture(scope="module")
def weak_free_density():
    problem = forward.synthetic_problem(noise_sd=NOISE, density_bounds=DENSITY_BOUNDS)
    laplace = forward.laplace_approximation(problem)
    return problem, laplace, reference.compute_reference(problem, laplace)


def pure_noise_problem():
    """50 stations of N(0, 1) noise and sigma 1 µGal: no anomaly at all."""
    stations = np.linspace(-20.0, 20.0, 50)
    return forward.Problem(stations, np.random.default_rng(1).normal(size=50), 1.0, bounds=np.array(forward.DEFAULT_BOUNDS))


def importance_sampling_from_the_prior(problem, n, seed):
    """Self-normalised importance sampling with the prior as proposal: (theta, normalised weights, log Z, its se)."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(problem.bounds[:, 0], problem.bounds[:, 1], size=(n, problem.dim))
    log_likelihood = np.concatenate([problem.log_likelihood(chunk) for chunk in np.array_split(theta, 20)])
    weights = np.exp(log_likelihood - log_likelihood.max())
    weights /= weights.sum()
    log_z = logsumexp(log_likelihood) - np.log(n)  # Z = E_prior[L]
    log_z_se = np.sqrt(np.var(weights * n) / n)  # delta method: se(log mean) = sd / (sqrt(n) mean), mean(w n) = 1
    return theta, weights, log_z, log_z_se


def assert_moments_agree_with_importance_sampling(problem, result, n, seed):
    theta, weights, log_z, log_z_se = importance_sampling_from_the_prior(problem, n, seed)
    assert 1 / np.sum(weights**2) > 0.8 * n  # the data are weak: the prior is nearly the posterior
    mean = weights @ theta
    centred = theta - mean
    variance = weights @ centred**2
    mean_se = np.sqrt(weights**2 @ centred**2)
    sd_se = np.sqrt(weights**2 @ (centred**2 - variance) ** 2) / (2 * np.sqrt(variance))
    assert np.all(mean_se < 0.01 * result.sd) and np.all(sd_se < 0.01 * result.sd)  # the check has power
    assert np.all(np.abs(mean - result.mean) < 4 * mean_se), (mean, result.mean, mean_se)
    assert np.all(np.abs(np.sqrt(variance) - result.sd) < 4 * sd_se), (np.sqrt(variance), result.sd, sd_se)
    assert result.log_evidence == pytest.approx(log_z, abs=4 * log_z_se)
    assert log_z_se < 1e-3


# ----------------------------------------------------------------------------------------------
# (a) the Laplace approximation flags weak data instead of refusing them


def test_laplace_of_weak_data_is_the_u_space_laplace_and_flags_them(weak):
    problem, laplace, _ = weak
    assert laplace.weak and laplace.barely_constrained == ("x0", "z", "R")
    assert not laplace.theta_peak
    assert laplace.on_bound == ()  # the best fit of a body the data hardly see sits on bounds, and means nothing
    # theta's Gaussian is the u-space Laplace mapped onto the box by the delta method
    theta_map, dtheta_du = forward.to_box(problem, laplace.u_map)
    np.testing.assert_allclose(laplace.theta_map, theta_map, rtol=1e-12)
    np.testing.assert_allclose(laplace.theta_cov, laplace.u_cov * np.outer(dtheta_du, dtheta_du), rtol=1e-12)
    # close to the Laplace of the prior alone: u ~ N(0, 2), theta sd sqrt(2)/4 of the range
    np.testing.assert_allclose(np.diag(laplace.u_cov), 2.0, rtol=0.15)
    fractions = np.array([laplace.sd_fraction[name] for name in problem.names])
    np.testing.assert_allclose(fractions, forward.PRIOR_SD_FRACTION, rtol=0.1)
    np.testing.assert_allclose(laplace.theta_sd / np.diff(problem.bounds, axis=1).ravel(), fractions, rtol=1e-12)


@pytest.mark.parametrize("noise, weak, theta_peak", [(100.0, True, False), (10.0, False, True), (1.0, False, True)])
def test_weak_is_told_by_the_spread_not_only_by_a_failing_hessian(noise, weak, theta_peak):
    """At 100 µGal the θ-space Hessian at the best fit is negative definite, yet its sd exceeds the box:
    the data are weak all the same. At 10 µGal and below the anomaly is seen."""
    problem = forward.synthetic_problem(noise_sd=noise)
    laplace = forward.laplace_approximation(problem)
    assert laplace.weak == weak and laplace.theta_peak == theta_peak
    largest = max(laplace.sd_fraction[name] for name in ("x0", "z", "R"))
    assert (largest >= forward.WEAK_SD_FRACTION) == weak
    if not weak:
        assert largest < 0.5 * forward.WEAK_SD_FRACTION


def test_pure_noise_is_weak_and_the_free_density_too(weak_free_density):
    laplace = forward.laplace_approximation(pure_noise_problem())
    assert laplace.weak and {"x0", "z"} <= set(laplace.barely_constrained)
    _, laplace, _ = weak_free_density
    assert laplace.weak and laplace.barely_constrained == ("x0", "z")  # R and drho lie on the ridge by nature
    assert not forward.laplace_approximation(forward.synthetic_problem(density_bounds=DENSITY_BOUNDS)).weak


# ----------------------------------------------------------------------------------------------
# (b) the exact reference covers the whole box, converges, and agrees with importance sampling


def test_reference_of_weak_data_covers_the_whole_box(weak):
    problem, _, result = weak
    for nodes, (low, high) in zip(result.nodes, problem.bounds):
        assert nodes[0] == low and nodes[-1] == high
    for i in range(3):
        nodes, density = result.marginal(i)
        assert np.trapezoid(density, nodes) == pytest.approx(1.0, abs=1e-10)
    # close to the prior (sd of a uniform: range / sqrt(12)), with the large shallow spheres ruled out
    width = np.diff(problem.bounds, axis=1).ravel()
    np.testing.assert_allclose(result.sd, width / np.sqrt(12), rtol=0.15)
    assert result.mean[1] > problem.bounds[1].mean() and result.mean[2] < problem.bounds[2].mean()
    assert result.correlation[1, 2] > 0.05  # depth and radius still trade off through the anomaly they may not make
    radius_nodes, density = result.marginal(2)
    _, depth_density = result.marginal(1)
    assert density[-1] < 0.7 * density[0] and depth_density[0] < 0.5 * depth_density[-1]


def test_reference_of_weak_data_converges_under_refinement(weak):
    problem, laplace, result = weak
    fine = reference.compute_reference(problem, laplace, grid_points=161)
    assert np.all(np.abs(fine.mean - result.mean) < 1e-3 * fine.sd)
    np.testing.assert_allclose(result.sd, fine.sd, rtol=1e-3)
    np.testing.assert_allclose(result.correlation, fine.correlation, atol=1e-3)
    assert result.log_evidence == pytest.approx(fine.log_evidence, abs=1e-4)


def test_reference_of_weak_data_agrees_with_importance_sampling_from_the_prior(weak):
    problem, _, result = weak
    assert_moments_agree_with_importance_sampling(problem, result, n=100_000, seed=5)


def test_reference_of_weak_data_is_the_problems_own_posterior_at_its_nodes(weak):
    problem, _, result = weak
    rng = np.random.default_rng(0)
    index = tuple(rng.integers(0, reference.GRID_POINTS, size=(3, 20)))
    nodes = np.stack([result.nodes[axis][index[axis]] for axis in range(3)], axis=1)
    np.testing.assert_allclose(result.log_density[index] + result.log_evidence, problem.log_posterior(nodes), rtol=1e-10)


def test_reference_zooms_where_the_whole_box_grid_finds_a_narrow_posterior():
    """Pure noise on 50 stations rules out every sphere above about 1 µGal: R is pressed against its lower
    bound (sd 0.13 m, 3 nodes of a whole-box grid). The reference zooms in on R and is then converged."""
    problem = pure_noise_problem()
    laplace = forward.laplace_approximation(problem)
    result = reference.compute_reference(problem, laplace)
    assert result.nodes[2][0] == 0.5 and result.nodes[2][-1] < 2.0  # zoomed in on R
    assert result.nodes[0][0] == 0.0 and result.nodes[0][-1] == 10.0  # x0 unconstrained: the whole box
    # a finer grid on the zoomed window (the window is where the whole-box grid found all the probability)
    window = np.array([[nodes[0], nodes[-1]] for nodes in result.nodes])
    fine = reference._theta_grid_reference(problem, window[:, 0], window[:, 1], 181)
    assert np.all(np.abs(fine.mean - result.mean) < 2e-3 * fine.sd)
    np.testing.assert_allclose(result.sd, fine.sd, rtol=2e-3)
    assert result.log_evidence == pytest.approx(fine.log_evidence, abs=2e-4)
    # without the zoom the same number of nodes is 20 times further off
    box = reference._theta_grid_reference(problem, problem.bounds[:, 0], problem.bounds[:, 1], reference.GRID_POINTS)
    assert np.max(np.abs(box.mean - fine.mean) / fine.sd) > 20 * np.max(np.abs(result.mean - fine.mean) / fine.sd)


def test_free_density_reference_of_weak_data_covers_the_box_and_agrees_with_importance_sampling(weak_free_density):
    problem, _, result = weak_free_density
    low, high = reference.RidgeBox.of(problem).mass_range
    x0, z, mass = result.nodes
    assert (x0[0], x0[-1], z[0], z[-1]) == (0.0, 10.0, 1.0, 15.0)
    assert mass[0] == low and mass[-1] == high  # every mass the box allows, 1000 * 0.5^3 to 4000 * 5^3
    spacing = np.diff(np.cbrt(mass))  # uniform in m^(1/3), where the prior's k(m) dm is smooth
    np.testing.assert_allclose(spacing, spacing[0], rtol=1e-9)
    assert_moments_agree_with_importance_sampling(problem, result, n=100_000, seed=6)


@pytest.mark.parametrize("case", ["known density", "free density"])
def test_exact_draws_from_weak_references_score_near_zero(case, weak, weak_free_density):
    """Cells by their mass, then uniformly within them; on the free density's m axis (uniform in m^(1/3))
    between the midpoints to the neighbouring nodes."""
    problem, _, result = weak if case == "known density" else weak_free_density
    samples = result.sample(50_000, np.random.default_rng(2))
    assert np.all(problem.inside(samples))
    assert reference.score(samples, result)["error"] < 0.02
    assert np.all(np.abs(samples.mean(axis=0) - result.mean) < 0.02 * result.sd)
    np.testing.assert_allclose(samples.std(axis=0), result.sd, rtol=0.02)


def test_draws_within_a_cell_of_an_uneven_axis_span_the_cell():
    """All the mass on the node 3 of the axis (0, 1, 3, 7): its cell is [2, 5], between the midpoints."""
    nodes = [np.array([0.0, 1.0, 3.0, 7.0])]
    draws = reference._sample_cells(np.array([0.0, 0.0, 1.0, 0.0]), nodes, 20_000, np.random.default_rng(0))[:, 0]
    assert draws.min() >= 2.0 and draws.max() <= 5.0
    np.testing.assert_allclose(np.histogram(draws, bins=6, range=(2, 5))[0] / draws.size, 1 / 6, atol=0.015)


def test_free_density_reference_of_weak_data_converges(weak_free_density):
    problem, laplace, result = weak_free_density
    fine = reference.compute_reference(problem, laplace, grid_points=161)
    assert np.all(np.abs(fine.mean - result.mean) < 1e-3 * fine.sd)
    np.testing.assert_allclose(result.sd, fine.sd, rtol=1e-3)
    assert result.log_evidence == pytest.approx(fine.log_evidence, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# (c) the warning, (e) the start


def test_weak_data_warning_names_what_the_data_barely_constrain(weak, default_laplace):
    _, laplace, _ = weak
    text = forward.weak_data_warning(laplace)
    assert text.startswith("warning: the data barely constrain the body: the Laplace sd of x0, z, R is ")
    assert "\n" not in text
    for name in ("x0", "z", "R"):
        assert f"{100 * laplace.sd_fraction[name]:.0f} %" in text
    assert "35 % with no data at all" in text
    assert forward.weak_data_warning(default_laplace) is None
    one = dataclasses.replace(laplace, barely_constrained=("z",))
    assert "the Laplace sd of z is 34 % of its prior range" in forward.weak_data_warning(one)


def test_auto_start_is_the_prior_for_weak_data_without_judging_the_laplace(weak, default_problem, default_laplace):
    problem, laplace, _ = weak
    chosen = start.choose_start("auto", problem, laplace)
    assert chosen.init == "prior" and "barely constrain" in chosen.reason
    assert chosen.khat is None and chosen.likelihood_evaluations == 0  # decided by the flag, not by the draws
    assert start.choose_start("laplace", problem, laplace).init == "laplace"  # an explicit choice stays
    assert start.choose_start("auto", default_problem, default_laplace).init == "laplace"


# ----------------------------------------------------------------------------------------------
# (d) Metropolis–Hastings from the prior finds the weak posterior


def test_adaptive_metropolis_from_the_prior_matches_the_reference(weak):
    """Eight chains from the prior, the original's 0.01 m first proposal, adapted during the burn-in."""
    problem, laplace, result = weak
    assert start.choose_start("auto", problem, laplace).init == "prior"
    rng = np.random.default_rng(1)
    starts = np.vstack([Gravity_MCMC.ORIGINAL_START, rng.uniform(problem.bounds[:, 0], problem.bounds[:, 1], size=(7, 3))])
    run = Gravity_MCMC.sample(problem, starts, Gravity_MCMC.ORIGINAL_PROPOSAL_SCALE * np.eye(3), 2000, 3000, rng, adapt=True)
    theta = run.chains[run.burn_in:].reshape(-1, 3)
    assert np.all(problem.inside(theta))
    assert reference.score(theta, result)["error"] < 0.08
    assert np.all(np.abs(theta.mean(axis=0) - result.mean) < 0.08 * result.sd)



def test_command_line_prints_the_weak_reference(capsys):
    from gravity_flows.command import reference as reference_command

    reference_command.main(["--noise", "1e4"])
    text = capsys.readouterr().out
    assert "with noise 10000 µGal" in text and "over the whole prior box" in text
    assert "warning: the data barely constrain the body" in text and "log evidence: -10618.58" in text
