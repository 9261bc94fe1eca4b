"""Metropolis–Hastings: unbiased on known targets, adaptive during the burn-in only, and the script end to end."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from gravity_flows.scoring import diagnostics
import Gravity_MCMC as mcmc

SD = np.array([0.03, 0.05, 0.009])
CORRELATION = np.array([[1, 0.3, 0.2], [0.3, 1, 0.94], [0.2, 0.94, 1]])


class GaussianTarget:
    """A correlated 3-D Gaussian with the sampler's only requirement, ``log_posterior``."""

    def __init__(self, mean, covariance):
        self.mean, self.covariance = np.asarray(mean), np.asarray(covariance)
        self.precision = np.linalg.inv(self.covariance)

    def log_posterior(self, theta):
        centred = np.asarray(theta) - self.mean
        return -0.5 * np.einsum("...i,ij,...j->...", centred, self.precision, centred)


class UniformBoxTarget:
    """Flat density on [0, 1]^3: a sampler that reflected proposals instead of rejecting them would bias the edges.

    Counts the parameter sets it was asked about that lie inside (whose "likelihood" a problem would compute)."""

    def __init__(self):
        self.inside = 0

    def log_posterior(self, theta):
        theta = np.asarray(theta)
        inside = ((theta >= 0) & (theta <= 1)).all(axis=-1)
        self.inside += int(np.count_nonzero(inside))
        return np.where(inside, 0.0, -np.inf)


def correlated_gaussian():
    return GaussianTarget([3.0, 6.0, 2.0], CORRELATION * np.outer(SD, SD))


def assert_gaussian_moments(kept, target):
    """Mean within 4 Monte Carlo standard errors (from the ESS), sd within 5 %, correlations within 0.05."""
    ess = diagnostics.effective_sample_size(kept)
    pooled = kept.reshape(-1, 3)
    assert np.all(np.abs(pooled.mean(axis=0) - target.mean) < 4 * SD / np.sqrt(ess))
    np.testing.assert_allclose(pooled.std(axis=0), SD, rtol=0.05)
    np.testing.assert_allclose(np.corrcoef(pooled.T), CORRELATION, atol=0.05)
    assert np.all(diagnostics.split_rhat(kept) < 1.01)


def test_recovers_mean_and_covariance_of_a_correlated_gaussian():
    target = correlated_gaussian()
    rng = np.random.default_rng(1)
    starts = target.mean + SD * rng.standard_normal((8, 3))
    chains, _, accepted = mcmc.metropolis_hastings(
        target, starts, np.linalg.cholesky(target.covariance * mcmc.optimal_scale(3)), 12_000, rng
    )
    acceptance = accepted / chains.shape[0]
    assert np.all((acceptance > 0.1) & (acceptance < 0.9))
    assert_gaussian_moments(chains[2000:], target)


def test_adaptive_chain_learns_the_covariance_and_recovers_a_correlated_gaussian():
    """From a proposal a hundred times too wide in R and blind to the 0.94 correlation, the burn-in learns
    the target's covariance (scaled by 2.38²/d) and the kept chain has the target's moments."""
    target = correlated_gaussian()
    rng = np.random.default_rng(3)
    starts = target.mean + 3 * SD * rng.standard_normal((8, 3))
    run = mcmc.sample(target, starts, 0.3 * np.eye(3), 3000, 10_000, rng)
    assert run.adaptations == 3000 // mcmc.ADAPT_EVERY
    learned = run.proposal_chol @ run.proposal_chol.T / mcmc.optimal_scale(3)
    whitening = np.linalg.inv(np.linalg.cholesky(target.covariance))
    # learned = target covariance up to sampling error: every eigenvalue of the whitened matrix near 1
    np.testing.assert_allclose(np.linalg.eigvalsh(whitening @ learned @ whitening.T), 1.0, atol=0.25)
    acceptance = run.accepted / 10_000
    assert np.all((acceptance > 0.15) & (acceptance < 0.45))
    assert run.chains.shape == (13_000, 8, 3)
    assert_gaussian_moments(run.chains[3000:], target)


@pytest.mark.parametrize("adapt", [False, True])
def test_rejects_instead_of_reflecting_at_the_box_edge(adapt):
    rng = np.random.default_rng(2)
    run = mcmc.sample(UniformBoxTarget(), np.full((8, 3), 0.5), 0.4 * np.eye(3), 1000, 24_000, rng, adapt=adapt)
    pooled = run.chains[1000:].reshape(-1, 3)
    assert pooled.min() >= 0 and pooled.max() <= 1
    # a uniform's mean 1/2 and variance 1/12 (MC error of the mean about 0.003 at these ESS)
    np.testing.assert_allclose(pooled.mean(axis=0), 0.5, atol=0.01)
    np.testing.assert_allclose(pooled.var(axis=0), 1 / 12, rtol=0.05)
    # the 10 % of mass next to each face holds 10 % of the samples
    np.testing.assert_allclose((pooled < 0.1).mean(axis=0), 0.1, atol=0.01)
    np.testing.assert_allclose((pooled > 0.9).mean(axis=0), 0.1, atol=0.01)
    if adapt:  # the box's covariance, I/12, scaled by 2.38²/3
        np.testing.assert_allclose(run.proposal_chol @ run.proposal_chol.T, np.eye(3) / 12 * mcmc.optimal_scale(3),
                                   atol=0.03)


def test_proposal_is_fixed_after_the_burn_in():
    """The kept steps are exactly plain Metropolis–Hastings with the proposal the burn-in ended with."""
    target = correlated_gaussian()
    starts = target.mean + SD * np.random.default_rng(0).standard_normal((4, 3))
    first = mcmc.sample(target, starts, 0.01 * np.eye(3), 1000, 3000, np.random.default_rng(4))

    rng = np.random.default_rng(4)
    burn_in = mcmc.sample(target, starts, 0.01 * np.eye(3), 1000, 0, rng)
    kept, _, accepted = mcmc.metropolis_hastings(target, burn_in.chains[-1], burn_in.proposal_chol, 3000, rng)
    np.testing.assert_array_equal(first.proposal_chol, burn_in.proposal_chol)
    np.testing.assert_array_equal(first.chains[:1000], burn_in.chains)
    np.testing.assert_array_equal(first.chains[1000:], kept)
    np.testing.assert_array_equal(first.accepted, accepted)
    assert first.adaptations == 1000 // mcmc.ADAPT_EVERY


def test_without_adaptation_the_proposal_never_changes():
    target = correlated_gaussian()
    chol = 0.01 * np.eye(3)
    run = mcmc.sample(target, np.tile(target.mean, (2, 1)), chol, 500, 500, np.random.default_rng(6), adapt=False)
    assert run.adaptations == 0 and run.adapted_covariance is None
    np.testing.assert_array_equal(run.proposal_chol, chol)


def test_likelihood_evaluations_count_the_starts_and_the_proposals_inside_the_box():
    target = UniformBoxTarget()
    run = mcmc.sample(target, np.full((4, 3), 0.5), 0.5 * np.eye(3), 200, 300, np.random.default_rng(7))
    assert run.likelihood_evaluations == target.inside
    assert 4 < run.likelihood_evaluations < 4 + 4 * 500  # wide proposals: many fall outside


def test_same_seed_same_chain():
    target = GaussianTarget(np.zeros(3), np.eye(3))
    for adapt in (False, True):
        first, second = (mcmc.sample(target, np.zeros((2, 3)), np.eye(3), 400, 500, np.random.default_rng(5),
                                     adapt=adapt).chains for _ in range(2))
        np.testing.assert_array_equal(first, second)


def test_thinning_takes_every_chain_s_share():
    kept = np.arange(100 * 4).reshape(100, 4, 1).astype(float)  # value = 4 * step + chain
    theta = mcmc.thin(kept, 40)
    chain = theta[:, 0].astype(int) % 4
    np.testing.assert_array_equal(np.bincount(chain), [10, 10, 10, 10])


def test_convergence_warning_names_what_failed():
    names = ("x0", "z", "R")
    assert mcmc.convergence_warning(np.array([1.001, 1.002, 1.0]), np.array([5000, 900, 401]), names) is None
    assert mcmc.convergence_warning(None, np.array([5000, 900, 401]), names) is None
    line = mcmc.convergence_warning(np.array([1.001, 1.05, 1.0]), np.array([5000, 90, 401]), names)
    assert line.startswith("warning: not converged") and "\n" not in line
    assert "split R-hat up to 1.050 > 1.01 (z)" in line and "smallest ESS 90 < 400 (z)" in line
    assert "not converged" in mcmc.convergence_warning(np.array([np.nan, 1.0, 1.0]), np.full(3, 1e4), names)


EXPECTED_FILES = ["marginals.png", "predictive_check.png", "pairs.png", "trace.png", "autocorrelation.png",
                  "misfit.png", "summary.json", "samples.npz"]


def test_script_writes_every_file_and_is_accurate(tmp_path, default_reference, capsys):
    out = tmp_path / "mcmc"
    status = mcmc.main(["--iterations", "10000", "--burn-in", "500", "--out", str(out), "--quiet"])
    assert status == 0
    for name in EXPECTED_FILES:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    for key in ["method", "settings", "parameters", "posterior", "reference", "error", "w1_over_sd", "wall_time_s",
                "iterations", "acceptance", "ess", "rhat", "tau", "converged", "adapted_covariance",
                "likelihood_evaluations", "start"]:
        assert key in summary, key
    assert summary["parameters"] == ["x0", "z", "R"]
    # --init auto: the Laplace Gaussian describes this posterior, so the chains start from it
    assert summary["settings"]["init"] == "auto" and summary["start"]["init"] == "laplace"
    assert summary["settings"]["chains"] == 8 and len(summary["rhat"]) == 3 and summary["settings"]["adapt"]
    assert summary["adaptations"] == math.ceil(500 / mcmc.ADAPT_EVERY) and np.shape(summary["adapted_covariance"]) == (3, 3)
    assert summary["converged"] and summary["convergence_warning"] is None
    assert summary["error"] <= 0.05
    assert 0.15 < summary["acceptance"] < 0.5
    # the starts, every proposal (all inside the box here) and the importance draws that judged the start
    assert summary["likelihood_evaluations"] == 8 + 8 * 10_500 + summary["start"]["likelihood_evaluations"]
    samples = np.load(out / "samples.npz")
    assert samples["theta"].shape == (10_000, 3)
    assert samples["x"].shape == samples["g_obs"].shape == (1000,)
    assert float(samples["density"]) == 2500.0 and float(samples["sigma"]) == 1.0
    np.testing.assert_allclose(summary["reference"]["sd"], default_reference.sd, rtol=1e-9)
    stderr = capsys.readouterr().err
    assert "start: laplace (the Laplace Gaussian describes the posterior" in stderr and "not converged" not in stderr


def test_original_settings_run_with_one_chain_and_no_adaptation_and_a_short_run_is_not_converged(tmp_path, capsys):
    out = tmp_path / "original"
    status = mcmc.main(["--init", "prior", "--iterations", "2000", "--burn-in", "100", "--out", str(out), "--quiet"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rhat"] is None and summary["chains"] == 1
    assert summary["settings"]["start"] is None and summary["settings"]["proposal_scale"] == 0.01
    assert not summary["settings"]["adapt"] and summary["adapted_covariance"] is None and summary["adaptations"] == 0
    np.testing.assert_allclose(summary["proposal_covariance"], 1e-4 * np.eye(3))
    assert summary["start"]["init"] == "prior" and summary["start"]["reason"] == "--init prior"
    theta = np.load(out / "samples.npz")["theta"]
    assert theta.shape == (2000, 3)
    # one chain of 2000 steps with τ in the hundreds: an ESS of a few dozen, flagged on one line and in the summary
    assert min(summary["ess"]) < mcmc.ESS_LIMIT
    assert summary["converged"] is False and "smallest ESS" in summary["convergence_warning"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "not converged" in line]
    assert lines == [summary["convergence_warning"]]


@pytest.mark.parametrize("free_density, weak, expected", [
    (False, False, (1, 100_000, 20_000, 0.01, False)),  # the original's run
    (True, False, (24, 100_000, 10_000, 0.01, True)),  # the mass ridge
    (False, True, (24, 100_000, 10_000, 0.01, True)),  # a posterior as wide as the prior box
])
def test_defaults_from_the_prior_are_the_original_s_run_only_where_it_can_work(free_density, weak, expected):
    args = mcmc.build_parser().parse_args(["--init", "prior"])
    problem, laplace = SimpleNamespace(free_density=free_density), SimpleNamespace(weak=weak)
    mcmc.resolve_defaults(args, "prior", problem, laplace)
    assert (args.chains, args.iterations, args.burn_in, args.proposal_scale, args.adapt) == expected
    args = mcmc.resolve_defaults(mcmc.build_parser().parse_args(["--chains", "3"]), "prior", problem, laplace)
    assert args.chains == 3  # an option given is never overridden


#: A short run on the mass ridge (the default 24 chains, 5000 burn-in + 8000 kept steps, a twelfth of the
#: defaults' draws): its error against the exact four-parameter reference was 0.03-0.10 over seeds 0-7
#: (0.10 for seed 0, this test's); the defaults reach about 0.02.
RIDGE_TOLERANCE = 0.15


def test_free_density_run_crosses_the_ridge(tmp_path, capsys):
    out = tmp_path / "ridge"
    status = mcmc.main(["--density-bounds", "1000", "4000", "--iterations", "8000", "--burn-in", "5000",
                        "--samples", "5000", "--out", str(out), "--quiet"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"] == ["x0", "z", "R", "drho"] and summary["settings"]["density_bounds"] == [1000, 4000]
    # --init auto: the Laplace Gaussian is the ridge's tangent only, so the chains start from the prior
    assert summary["start"]["init"] == "prior" and summary["settings"]["adapt"]
    assert summary["chains"] == mcmc.DEFAULTS["prior"]["chains"]
    assert summary["error"] <= RIDGE_TOLERANCE
    # the adapted proposal spans the ridge: its R-drho correlation is strongly negative, its drho sd hundreds of kg/m³
    covariance = np.array(summary["adapted_covariance"])
    assert covariance[2, 3] / np.sqrt(covariance[2, 2] * covariance[3, 3]) < -0.8 and covariance[3, 3] > 300**2
    theta = np.load(out / "samples.npz")["theta"]
    assert theta.shape == (5000, 4) and theta[:, 3].min() >= 1000 and theta[:, 3].max() <= 4000
    assert "start: prior (the Laplace Gaussian misses much of the posterior" in capsys.readouterr().err
