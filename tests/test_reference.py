"""The exact reference posterior: normalisation, grid convergence, agreement with Laplace, scores."""

import numpy as np
import pytest

import forward
import reference


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
    low = np.maximum(result.mean - 20 * result.sd, problem.bounds[:, 0])
    high = np.minimum(result.mean + 20 * result.sd, problem.bounds[:, 1])
    other = reference._theta_grid_reference(problem, low, high, 161)
    assert np.all(np.abs(other.mean - result.mean) < 5e-3 * result.sd)
    np.testing.assert_allclose(other.sd, result.sd, rtol=3e-3)
    assert other.log_evidence == pytest.approx(result.log_evidence, abs=3e-3)
