"""Refinement of q's draws toward p, on targets whose answer is known: Gaussians and a three-state distribution."""

import numpy as np
import pytest
from scipy import stats

from gravity_flows.inference import refine
from gravity_flows.scoring import diagnostics

#: Tolerances are this many Monte Carlo standard errors (a 4-sigma miss has probability 6e-5).
N_SE = 4


def gaussian_pool(q_mean, q_sd, size, dim, rng):
    """Draws of q = N(q_mean, q_sd^2 I) and their log weights against p = N(0, I), up to a constant log Z."""
    theta = rng.normal(q_mean, q_sd, size=(size, dim))
    log_weights = stats.norm.logpdf(theta).sum(axis=1) - stats.norm.logpdf(theta, q_mean, q_sd).sum(axis=1)
    return theta, log_weights + 7.3


def test_equal_weights_resample_flat_and_always_accept():
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(4000, 2))
    log_weights = np.full(4000, 3.7)  # q = p: every weight equals Z

    draws, info = refine.importance_resample(theta, log_weights, 4000, rng)
    assert info["is_ess"] == pytest.approx(1.0)  # 100 %
    assert info["khat"] == -np.inf
    # flat weights: every draw is picked Binomial(4000, 1/4000) times, so about 1 - 1/e of them appear
    assert info["distinct"] == pytest.approx(4000 * (1 - np.exp(-1)), abs=N_SE * 30)

    chains, info = refine.independence_mh(theta, log_weights, 4, rng)
    np.testing.assert_array_equal(info["acceptance_per_chain"], 1.0)
    assert info["acceptance"] == 1.0
    # every proposal accepted: chain c walks through draws c, 4 + c, 8 + c, ...
    np.testing.assert_array_equal(chains, theta.reshape(1000, 4, 2))


@pytest.mark.parametrize("method", ["importance", "mh"])
@pytest.mark.parametrize("dim, q_mean", [(1, 0.5), (3, 0.3)])
def test_refined_moments_match_p_where_raw_q_does_not(method, dim, q_mean):
    # q = N(q_mean, 0.8^2) per coordinate is shifted and narrower than p = N(0, 1): k = 1 - 0.8^2 = 0.36.
    size = 20_000
    rng = np.random.default_rng(1 + dim)
    theta, log_weights = gaussian_pool(q_mean, 0.8, size, dim, rng)
    refined, report = refine.refine(method, theta, log_weights, size, rng)
    assert refined.shape == (size, dim)
    assert report["trustworthy"] and report["warning"] is None
    if method == "importance":
        # PSIS estimate (ESS = is_ess * S) plus multinomial resampling noise (n draws): two variances add
        ess = 1.0 / (1.0 / (report["is_ess"] * size) + 1.0 / size)
    else:
        ess = np.asarray(report["ess"])  # per parameter, from the chains' integrated autocorrelation time
    # p's sd is 1: SE(mean) = 1 / sqrt(ESS); SE(sd) ~ 1 / sqrt(2 ESS), taken as 1 / sqrt(ESS) to be safe
    tolerance = N_SE / np.sqrt(ess)
    assert np.all(tolerance < 0.15)

    def matches_p(draws):
        mean_error, sd_error = np.abs(draws.mean(axis=0)), np.abs(draws.std(axis=0) - 1.0)
        return bool(np.all(mean_error < tolerance) and np.all(sd_error < tolerance))

    assert matches_p(refined)
    assert not matches_p(theta)  # the same check fails on the raw draws of q: the test can fail


def three_state_pool(size, rng):
    """Draws of q = (0.5, 0.3, 0.2) on states {0, 1, 2}, with log weights of p = (0.2, 0.3, 0.5)."""
    p, q = np.array([0.2, 0.3, 0.5]), np.array([0.5, 0.3, 0.2])
    states = rng.choice(3, size=size, p=q)
    return states.astype(float), np.log(p / q)[states], p, q


def test_mh_on_three_states_has_the_exact_acceptance_and_frequencies():
    # At stationarity an independence sampler accepts with probability sum_x sum_y p(x) q(y) min(1, w(y)/w(x))
    # (0.61 here); a reversed ratio w(x)/w(y) would give 0.37 and frequencies near q instead of p.
    size = 40_000
    theta, log_weights, p, q = three_state_pool(size, np.random.default_rng(5))
    weight = p / q
    exact_acceptance = np.sum(p[:, None] * q[None, :] * np.minimum(1.0, weight[None, :] / weight[:, None]))
    assert exact_acceptance == pytest.approx(0.61)
    chains, info = refine.independence_mh(theta[:, None], log_weights, 4, np.random.default_rng(6))
    n_states = chains.shape[0] * chains.shape[1]
    tau, ess = info["tau"][0], info["ess"][0]
    # the accept indicators are correlated about as the states are: binomial SE inflated by sqrt(tau)
    assert info["acceptance"] == pytest.approx(exact_acceptance, abs=N_SE * np.sqrt(0.61 * 0.39 * tau / n_states))
    frequencies = np.array([(chains == state).mean() for state in range(3)])
    np.testing.assert_allclose(frequencies, p, atol=N_SE * np.sqrt(0.25 / ess))


def test_importance_resampling_on_three_states_has_p_frequencies():
    size = 40_000
    theta, log_weights, p, _ = three_state_pool(size, np.random.default_rng(7))
    draws, info = refine.importance_resample(theta[:, None], log_weights, size, np.random.default_rng(8))
    assert set(np.unique(draws)) <= {0.0, 1.0, 2.0}  # draws are rows of the pool
    ess = 1.0 / (1.0 / (info["is_ess"] * size) + 1.0 / size)
    frequencies = np.array([(draws == state).mean() for state in range(3)])
    np.testing.assert_allclose(frequencies, p, atol=N_SE * np.sqrt(0.25 / ess))


@pytest.mark.parametrize("method", ["importance", "mh"])
def test_khat_flags_a_too_narrow_q_and_not_a_wider_one(method):
    rng = np.random.default_rng(9)
    narrow = gaussian_pool(0.0, 0.3, 10_000, 3, rng)  # weights with a tail of k = 1 - 0.3^2 = 0.91
    _, report = refine.refine(method, *narrow, 10_000, rng)
    assert report["khat"] > diagnostics.PSIS_KHAT_LIMIT
    assert not report["trustworthy"]
    assert report["warning"].startswith("the refined result cannot be trusted: the flow misses part of the posterior")
    assert f"(k-hat {report['khat']:.2f} > 0.7)" in report["warning"] and "\n" not in report["warning"]

    wide = gaussian_pool(0.3, 1.5, 10_000, 3, rng)  # bounded weights: every moment finite
    _, report = refine.refine(method, *wide, 10_000, rng)
    assert report["khat"] < 0.5
    assert report["trustworthy"] and report["warning"] is None


def test_mh_flags_chains_that_disagree():
    # Good weights but two chains each given a different half of the space: R-hat, not k-hat, must catch it.
    theta = np.tile([-1.0, 1.0], 2000)[:, None]  # chain 0 proposes every even draw (-1), chain 1 every odd (+1)
    theta = theta + np.random.default_rng(10).normal(scale=0.1, size=theta.shape)
    _, report = refine.refine("mh", theta, np.zeros(4000), 4000, np.random.default_rng(11), n_chains=2)
    assert report["khat"] < 0.7
    assert not report["trustworthy"] and "the chains disagree (split R-hat" in report["warning"]


def test_mh_uses_extra_draws_as_burn_in():
    rng = np.random.default_rng(12)
    theta, log_weights = gaussian_pool(0.3, 0.8, 10_000, 2, rng)
    assert refine.draws_needed("mh", 4001, n_chains=4) == 4004
    assert refine.draws_needed("importance", 4001) == 4001
    refined, report = refine.refine("mh", theta, log_weights, 4001, rng)
    assert refined.shape == (4001, 2)
    assert report["iterations"] == 1001 and report["burn_in"] == 2500 - 1001 and report["chains"] == 4
    # the chain states are draws of the pool: the last kept step of chain 3 is one of chain 3's own draws
    assert np.any(np.all(theta[3::4] == refined[-1], axis=1))
    with pytest.raises(ValueError, match="needs at least 10004 draws"):
        refine.refine("mh", theta, log_weights, 10_001, rng)


def test_none_and_bad_input():
    theta = np.arange(20.0).reshape(10, 2)
    same, report = refine.refine("none", theta, np.full(10, np.nan), 6, np.random.default_rng(13))
    np.testing.assert_array_equal(same, theta[:6])
    assert report == {"method": "none"}
    with pytest.raises(ValueError, match="unknown refinement 'psis'"):
        refine.refine("psis", theta, np.zeros(10), 6, np.random.default_rng(13))
    with pytest.raises(ValueError, match="NaN"):
        refine.importance_resample(theta, np.array([0.0] * 9 + [np.nan]), 5, np.random.default_rng(13))
    with pytest.raises(ValueError, match="every importance weight is zero"):
        refine.independence_mh(theta, np.full(10, -np.inf), 2, np.random.default_rng(13))


def test_report_is_json_ready():
    import json

    rng = np.random.default_rng(14)
    theta, log_weights = gaussian_pool(0.3, 0.8, 4000, 3, rng)
    for method in ("importance", "mh"):
        _, report = refine.refine(method, theta, log_weights, 4000, rng)
        json.dumps(report, allow_nan=False)
