"""Metropolis–Hastings: unbiased on known targets, and the script end to end."""

import json

import numpy as np

import diagnostics
import Gravity_MCMC as mcmc


class GaussianTarget:
    """A correlated 3-D Gaussian with the sampler's only requirement, ``log_posterior``."""

    def __init__(self, mean, covariance):
        self.mean, self.covariance = np.asarray(mean), np.asarray(covariance)
        self.precision = np.linalg.inv(self.covariance)

    def log_posterior(self, theta):
        centred = np.asarray(theta) - self.mean
        return -0.5 * np.einsum("...i,ij,...j->...", centred, self.precision, centred)


class UniformBoxTarget:
    """Flat density on [0, 1]^3: a sampler that reflected proposals instead of rejecting them would bias the edges."""

    def log_posterior(self, theta):
        theta = np.asarray(theta)
        return np.where(((theta >= 0) & (theta <= 1)).all(axis=-1), 0.0, -np.inf)


def test_recovers_mean_and_covariance_of_a_correlated_gaussian():
    sd = np.array([0.03, 0.05, 0.009])
    correlation = np.array([[1, 0.3, 0.2], [0.3, 1, 0.94], [0.2, 0.94, 1]])
    target = GaussianTarget([3.0, 6.0, 2.0], correlation * np.outer(sd, sd))
    rng = np.random.default_rng(1)
    starts = target.mean + sd * rng.standard_normal((8, 3))
    chains, _, accepted = mcmc.metropolis_hastings(
        target, starts, np.linalg.cholesky(target.covariance * mcmc.optimal_scale(3)), 12_000, rng
    )
    kept = chains[2000:]
    acceptance = accepted / chains.shape[0]
    assert np.all((acceptance > 0.1) & (acceptance < 0.9))
    ess = diagnostics.effective_sample_size(kept)
    standard_error = sd / np.sqrt(ess)
    pooled = kept.reshape(-1, 3)
    assert np.all(np.abs(pooled.mean(axis=0) - target.mean) < 4 * standard_error)
    np.testing.assert_allclose(pooled.std(axis=0), sd, rtol=0.05)
    np.testing.assert_allclose(np.corrcoef(pooled.T), correlation, atol=0.05)
    rhat = diagnostics.split_rhat(kept)
    assert np.all(rhat < 1.01)


def test_rejects_instead_of_reflecting_at_the_box_edge():
    rng = np.random.default_rng(2)
    chains, _, _ = mcmc.metropolis_hastings(UniformBoxTarget(), np.full((8, 3), 0.5), 0.4 * np.eye(3), 25_000, rng)
    pooled = chains[1000:].reshape(-1, 3)
    assert pooled.min() >= 0 and pooled.max() <= 1
    np.testing.assert_allclose(pooled.mean(axis=0), 0.5, atol=0.01)
    np.testing.assert_allclose(pooled.var(axis=0), 1 / 12, rtol=0.05)
    # the 10 % of mass next to each face holds 10 % of the samples
    np.testing.assert_allclose((pooled < 0.1).mean(axis=0), 0.1, atol=0.01)


def test_same_seed_same_chain():
    target = GaussianTarget(np.zeros(3), np.eye(3))
    first = mcmc.metropolis_hastings(target, np.zeros((2, 3)), np.eye(3), 500, np.random.default_rng(5))[0]
    second = mcmc.metropolis_hastings(target, np.zeros((2, 3)), np.eye(3), 500, np.random.default_rng(5))[0]
    np.testing.assert_array_equal(first, second)


EXPECTED_FILES = ["marginals.png", "predictive_check.png", "pairs.png", "trace.png", "autocorrelation.png",
                  "misfit.png", "summary.json", "samples.npz"]


def test_script_writes_every_file_and_is_accurate(tmp_path, default_reference):
    out = tmp_path / "mcmc"
    status = mcmc.main(["--iterations", "10000", "--burn-in", "500", "--out", str(out), "--quiet"])
    assert status == 0
    for name in EXPECTED_FILES:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    for key in ["method", "settings", "parameters", "posterior", "reference", "error", "w1_over_sd", "wall_time_s",
                "iterations", "acceptance", "ess", "rhat"]:
        assert key in summary, key
    assert summary["parameters"] == ["x0", "z", "R"]
    assert summary["settings"]["chains"] == 4 and len(summary["rhat"]) == 3
    assert summary["error"] <= 0.05
    assert 0.15 < summary["acceptance"] < 0.5
    samples = np.load(out / "samples.npz")
    assert samples["theta"].shape == (10_000, 3)
    assert samples["x"].shape == samples["g_obs"].shape == (1000,)
    assert float(samples["density"]) == 2500.0 and float(samples["sigma"]) == 1.0
    np.testing.assert_allclose(summary["reference"]["sd"], default_reference.sd, rtol=1e-9)


def test_original_settings_run_with_one_chain(tmp_path):
    out = tmp_path / "original"
    status = mcmc.main(["--init", "prior", "--iterations", "2000", "--burn-in", "100", "--out", str(out), "--quiet"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rhat"] is None
    assert summary["settings"]["start"] is None and summary["settings"]["proposal_scale"] == 0.01
    theta = np.load(out / "samples.npz")["theta"]
    assert theta.shape == (2000, 3)
