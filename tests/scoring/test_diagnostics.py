"""Diagnostics against processes whose answer is known: AR(1) chains, iid draws, exact Pareto tails."""

import warnings

import numpy as np
import pytest
from scipy import stats

from gravity_flows.scoring import diagnostics


def ar1_chains(rho, n_steps, n_chains, dim, rng):
    """x_t = rho x_{t-1} + sqrt(1 - rho^2) eps_t, started in the stationary N(0, 1); tau = (1 + rho)/(1 - rho)."""
    noise = rng.normal(size=(n_steps, n_chains, dim))
    chains = np.empty_like(noise)
    chains[0] = noise[0]
    scale = np.sqrt(1.0 - rho**2)
    for t in range(1, n_steps):
        chains[t] = rho * chains[t - 1] + scale * noise[t]
    return chains


def test_autocorrelation_of_ar1_is_geometric():
    rng = np.random.default_rng(0)
    acf = np.mean([diagnostics.autocorrelation(ar1_chains(0.8, 20000, 1, 1, rng)[:, 0, 0]) for _ in range(4)], axis=0)
    assert acf[0] == pytest.approx(1.0)
    np.testing.assert_allclose(acf[1:6], 0.8 ** np.arange(1, 6), atol=0.03)


def test_autocorrelation_matches_direct_sum():
    x = np.random.default_rng(1).normal(size=37)  # odd length: exercises the zero-padding
    centred = x - x.mean()
    direct = np.array([np.sum(centred[: x.size - t] * centred[t:]) for t in range(x.size)]) / np.sum(centred**2)
    np.testing.assert_allclose(diagnostics.autocorrelation(x), direct, atol=1e-12)


@pytest.mark.parametrize("rho", [0.9, 0.5])
def test_integrated_time_of_ar1(rho):
    rng = np.random.default_rng(2)
    chains = ar1_chains(rho, 20000, 4, 2, rng)
    tau, reliable = diagnostics.integrated_time(chains)
    exact = (1 + rho) / (1 - rho)  # 19 for rho = 0.9, 3 for rho = 0.5
    np.testing.assert_allclose(tau, exact, rtol=0.2)
    assert reliable


def test_integrated_time_accepts_one_chain_as_2d():
    chains = ar1_chains(0.9, 20000, 1, 2, np.random.default_rng(3))
    tau_2d, _ = diagnostics.integrated_time(chains[:, 0, :])
    tau_3d, _ = diagnostics.integrated_time(chains)
    np.testing.assert_array_equal(tau_2d, tau_3d)
    np.testing.assert_allclose(tau_2d, 19.0, rtol=0.25)


def test_short_chain_is_flagged_unreliable_with_a_warning_not_an_error():
    chains = ar1_chains(0.9, 300, 2, 3, np.random.default_rng(4))  # 300 < 50 * 19
    with pytest.warns(UserWarning, match="unreliable"):
        tau, reliable = diagnostics.integrated_time(chains)
    assert not reliable
    assert tau.shape == (3,) and np.all(np.isfinite(tau))


def test_stuck_chain_has_infinite_tau_and_zero_ess():
    chains = np.ones((100, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tau, reliable = diagnostics.integrated_time(chains)
        ess = diagnostics.effective_sample_size(chains)
    assert np.all(np.isinf(tau)) and not reliable
    np.testing.assert_array_equal(ess, 0.0)


def test_ess_of_iid_draws_is_their_number():
    draws = np.random.default_rng(5).normal(size=(5000, 4, 3))
    ess = diagnostics.effective_sample_size(draws)
    np.testing.assert_allclose(ess, 20000, rtol=0.15)


def test_ess_of_ar1_is_n_over_tau():
    chains = ar1_chains(0.9, 20000, 4, 1, np.random.default_rng(6))
    assert diagnostics.effective_sample_size(chains)[0] == pytest.approx(80000 / 19.0, rel=0.2)


def test_split_rhat_of_agreeing_chains_is_one():
    draws = np.random.default_rng(7).normal(size=(4000, 4, 3))
    rhat = diagnostics.split_rhat(draws)
    assert rhat.shape == (3,)
    assert np.all(rhat < 1.01)


def test_split_rhat_detects_chains_on_different_targets():
    rng = np.random.default_rng(8)
    draws = rng.normal(size=(4000, 4, 3))
    draws[:, 0, :] += 2.0  # one chain samples N(2, 1): expected R = sqrt(1 + 6/7) = 1.36
    rhat = diagnostics.split_rhat(draws)
    assert np.all(rhat > 1.2)
    np.testing.assert_allclose(rhat, np.sqrt(1 + 6 / 7), rtol=0.05)


def test_split_rhat_detects_a_drifting_chain():
    # Each chain's first half differs from its second half: only the *split* R-hat can see this.
    rng = np.random.default_rng(9)
    draws = rng.normal(size=(4000, 4, 1))
    draws[2000:] += 1.0
    assert diagnostics.split_rhat(draws)[0] > 1.1


def test_split_rhat_of_one_chain_is_none():
    assert diagnostics.split_rhat(np.zeros((100, 3))) is None


@pytest.mark.parametrize("shape", [0.3, 0.8])
def test_generalized_pareto_fit_recovers_known_shape(shape):
    x = stats.genpareto.rvs(shape, scale=2.0, size=5000, random_state=np.random.default_rng(10))
    k, sigma = diagnostics.fit_generalized_pareto(x)
    assert k == pytest.approx(shape, abs=0.1)
    assert sigma == pytest.approx(2.0, rel=0.15)


def test_generalized_pareto_fit_of_a_light_tail_is_negative():
    x = stats.genpareto.rvs(-0.3, scale=1.0, size=5000, random_state=np.random.default_rng(11))
    assert diagnostics.fit_generalized_pareto(x)[0] == pytest.approx(-0.3, abs=0.1)


def gaussian_log_weights(q_sd, size, rng):
    """log p/q for p = N(0, 1) and draws from q = N(0, q_sd^2)."""
    theta = rng.normal(0.0, q_sd, size=size)
    return stats.norm.logpdf(theta) - stats.norm.logpdf(theta, scale=q_sd)


def test_khat_of_a_perfect_proposal_is_small():
    rng = np.random.default_rng(12)
    assert diagnostics.psis_khat(np.zeros(4000)) < 0.5  # q = p exactly: constant weights
    assert diagnostics.psis_khat(3.0 + 1e-6 * rng.normal(size=4000)) < 0.5
    assert diagnostics.psis_khat(gaussian_log_weights(1.0, 4000, rng)) < 0.5


def test_khat_of_a_too_narrow_proposal_is_large():
    # Weights exp(x^2 (1/(2 s^2) - 1/2)) with x ~ N(0, s^2) have a Pareto tail of k = 1 - s^2 = 0.91.
    # Finite-sample k-hat scatters around that, so judge the median of five replicates.
    rng = np.random.default_rng(13)
    khats = [diagnostics.psis_khat(gaussian_log_weights(0.3, 10000, rng)) for _ in range(5)]
    assert np.median(khats) > 0.7


def test_khat_of_a_wider_proposal_is_small():
    khat = diagnostics.psis_khat(gaussian_log_weights(1.5, 10000, np.random.default_rng(14)))
    assert khat < 0.5


def test_khat_is_invariant_to_shifting_log_weights_and_handles_zero_weights():
    log_weights = gaussian_log_weights(0.5, 4000, np.random.default_rng(15))
    shifted = diagnostics.psis_khat(log_weights + 5000.0)  # would overflow without the max shift
    assert shifted == pytest.approx(diagnostics.psis_khat(log_weights), abs=1e-9)
    with_zeros = np.concatenate([log_weights, np.full(100, -np.inf)])
    assert np.isfinite(diagnostics.psis_khat(with_zeros))


def test_importance_ess_limits():
    assert diagnostics.importance_ess(np.zeros(1000)) == pytest.approx(1.0)
    dominant = np.zeros(1000)
    dominant[17] = 50.0
    assert diagnostics.importance_ess(dominant) == pytest.approx(1 / 1000, rel=1e-6)
    assert diagnostics.importance_ess(np.full(10, -np.inf)) == 0.0
    half = np.concatenate([np.zeros(500), np.full(500, -np.inf)])  # half the weights are zero
    assert diagnostics.importance_ess(half) == pytest.approx(0.5)


def test_khat_of_one_dominant_weight_is_large_without_numerical_warnings():
    import warnings

    log_weights = np.full(2000, -1e4)
    log_weights[0], log_weights[1:40] = 0.0, -800.0  # the rest of the tail underflows against the top weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert diagnostics.psis_khat(log_weights) > 0.7
        assert diagnostics.psis_khat(np.random.default_rng(0).normal(size=2000) * 300) > 0.7


@pytest.mark.parametrize("shape", [0.5, 0.0, -0.3])
def test_generalized_pareto_quantile_matches_scipy(shape):
    probability = np.linspace(0.0, 0.999, 50)
    np.testing.assert_allclose(diagnostics.generalized_pareto_quantile(probability, shape, 2.0),
                               stats.genpareto.ppf(probability, shape, scale=2.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [0.3, 0.8])
def test_khat_recovers_the_shape_of_pareto_weights(shape):
    # log w = shape * E with E ~ Exp(1): P(w > t) = t^(-1/shape), an exact Pareto tail of GPD shape k = shape,
    # whose exceedances over any threshold are exactly generalized Pareto. Tolerance: 3 standard errors,
    # (1 + k) / sqrt(M) with M = 949 tail draws of S = 100 000 (0.13 for k = 0.3, 0.18 for k = 0.8).
    size = 100_000
    log_weights = shape * np.random.default_rng(16).exponential(size=size)
    tail_size = int(np.ceil(3 * np.sqrt(size)))
    khat = diagnostics.psis_khat(log_weights, prior_adjustment=False)
    assert khat == pytest.approx(shape, abs=3 * (1 + shape) / np.sqrt(tail_size))
    _, smoothed_khat = diagnostics.pareto_smoothed_log_weights(log_weights, prior_adjustment=False)
    assert smoothed_khat == khat  # one fit serves both


def test_smoothing_keeps_the_order_and_changes_only_the_tail():
    size = 4000
    tail_size = int(np.ceil(3 * np.sqrt(size)))  # 190
    log_weights = gaussian_log_weights(0.5, size, np.random.default_rng(17))
    smoothed, khat = diagnostics.pareto_smoothed_log_weights(log_weights)
    assert khat == diagnostics.psis_khat(log_weights)
    order = np.argsort(log_weights)
    body, tail = order[:-tail_size], order[-tail_size:]
    np.testing.assert_array_equal(smoothed[body], log_weights[body])  # bit for bit
    assert np.all(np.diff(smoothed[order]) >= 0)  # raw w_i <= w_j  =>  smoothed w_i <= w_j
    assert np.max(smoothed) <= np.max(log_weights)  # truncated at the largest raw weight
    assert np.min(smoothed[tail]) >= log_weights[body[-1]]  # the tail stays above its threshold
    assert np.any(smoothed[tail] != log_weights[tail])
    shifted, _ = diagnostics.pareto_smoothed_log_weights(log_weights + 1000.0)  # scale-free, no overflow
    np.testing.assert_allclose(shifted - 1000.0, smoothed, atol=1e-9)


@pytest.mark.parametrize("shape", [0.5, 0.2, -0.2])
def test_a_tail_at_its_expected_order_statistics_is_left_nearly_as_it_is(shape):
    # The tail is built exactly at the fitted distribution's quantiles (z - 1/2) / M over the threshold 1:
    # the fit recovers k and smoothing reproduces the tail. Not exactly, since the Zhang-Stephens estimate is a
    # posterior mean rather than a fixed point; measured 1.1 % at most, so 3 % is allowed.
    size = 4000
    tail_size = int(np.ceil(3 * np.sqrt(size)))
    body = np.linspace(0.01, 1.0, size - tail_size)
    tail = 1.0 + diagnostics.generalized_pareto_quantile((np.arange(1, tail_size + 1) - 0.5) / tail_size, shape, 1.0)
    log_weights = np.log(np.concatenate([body, tail]))
    smoothed, khat = diagnostics.pareto_smoothed_log_weights(log_weights, prior_adjustment=False)
    assert khat == pytest.approx(shape, abs=0.03)
    np.testing.assert_allclose(np.exp(smoothed[-tail_size:]), tail, rtol=0.03)
    np.testing.assert_array_equal(smoothed[:-tail_size], log_weights[:-tail_size])


def test_weights_without_a_fit_are_returned_unchanged():
    flat = np.full(1000, 2.5)
    smoothed, khat = diagnostics.pareto_smoothed_log_weights(flat)
    assert khat == -np.inf
    np.testing.assert_array_equal(smoothed, flat)
    few = np.random.default_rng(18).normal(size=20)  # fewer than 25: no k-hat
    smoothed, khat = diagnostics.pareto_smoothed_log_weights(few)
    assert np.isnan(khat)
    np.testing.assert_array_equal(smoothed, few)
