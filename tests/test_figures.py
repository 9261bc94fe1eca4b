"""Figures: each writes a PNG, zooms to the posterior, survives bad input; the credible-level helper is exact."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rms_misfit(problem, theta):
    return np.sqrt(np.mean((problem.g_obs - problem.predict(theta)) ** 2, axis=-1))


@pytest.fixture(scope="module")
def theta(default_reference):
    return default_reference.sample(2000, np.random.default_rng(0))


@pytest.fixture(scope="module")
def chains(default_reference):
    """A fake 3-chain run: an AR(1) walk from the original MCMC start into the posterior."""
    rng = np.random.default_rng(1)
    root = np.linalg.cholesky(default_reference.covariance)
    state = np.tile([5.5, 8.5, 4.5], (3, 1)) - default_reference.mean
    steps = []
    for _ in range(1500):
        state = 0.9 * state + math.sqrt(1 - 0.81) * rng.normal(size=(3, 3)) @ root.T
        steps.append(default_reference.mean + state)
    return np.array(steps)


def assert_png(path):
    assert path.exists() and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert not plt.get_fignums(), "the figure was not closed"
    assert not list(path.parent.glob(".tmp-*")), "a temporary file was left behind"


# ---------------------------------------------------------------------------------------------
# credible levels


def gaussian_grid(covariance, half_width=6.0, n=301):
    sd = np.sqrt(np.diag(covariance))
    xs, ys = (np.linspace(-half_width * s, half_width * s, n) for s in sd)
    grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1)
    precision = np.linalg.inv(covariance)
    mahalanobis2 = np.einsum("...i,ij,...j->...", grid, precision, grid)
    density = np.exp(-0.5 * mahalanobis2) / (2 * math.pi * math.sqrt(np.linalg.det(covariance)))
    return xs, ys, density


@pytest.mark.parametrize("radius, mass", [(1.0, figures.ONE_SIGMA_MASS), (2.0, figures.TWO_SIGMA_MASS)])
def test_credible_level_of_a_gaussian_is_its_density_on_the_mahalanobis_ellipse(radius, mass):
    covariance = np.array([[0.03**2, 0.94 * 0.03 * 0.009], [0.94 * 0.03 * 0.009, 0.009**2]])  # like z–R
    xs, ys, density = gaussian_grid(covariance)
    (level,) = figures.credible_levels(density, figures._cell_areas(xs, ys), masses=(mass,))
    on_ellipse = math.exp(-0.5 * radius**2) / (2 * math.pi * math.sqrt(np.linalg.det(covariance)))
    assert level == pytest.approx(on_ellipse, rel=0.02)


def test_credible_levels_are_ordered_and_mass_constants_are_gaussian():
    assert figures.ONE_SIGMA_MASS == pytest.approx(0.393, abs=5e-4)
    assert figures.TWO_SIGMA_MASS == pytest.approx(0.865, abs=5e-4)
    xs, ys, density = gaussian_grid(np.eye(2))
    one, two = figures.credible_levels(density, figures._cell_areas(xs, ys))
    assert one > two > 0


def test_credible_level_accepts_a_scalar_cell_area():
    xs, ys, density = gaussian_grid(np.eye(2))
    area = (xs[1] - xs[0]) * (ys[1] - ys[0])
    (level,) = figures.credible_levels(density, area, masses=(figures.ONE_SIGMA_MASS,))
    assert level == pytest.approx(math.exp(-0.5) / (2 * math.pi), rel=0.02)


# ---------------------------------------------------------------------------------------------
# zoom


def test_view_zooms_to_the_posterior_not_the_prior_box(default_reference, default_problem, theta):
    for i in range(3):
        low, high = figures._view_limits(theta[:, i], default_reference, i, default_problem.truth[i])
        sd = default_reference.sd[i]
        assert high - low < 14 * sd  # ± 5 sd and a small margin, not the metres-wide prior box
        assert low < default_reference.mean[i] - 4.9 * sd and high > default_reference.mean[i] + 4.9 * sd


def test_view_widens_to_hold_samples_far_off(default_reference, theta):
    shifted = theta[:, 1] + 100 * default_reference.sd[1]
    low, high = figures._view_limits(shifted, default_reference, 1)
    assert low < default_reference.mean[1] and high > np.quantile(shifted, 0.99)


def test_view_of_identical_samples_has_width():
    low, high = figures._view_limits(np.full(50, 2.0))
    assert low < 2.0 < high


def test_running_mean_is_centred_and_skips_nan():
    values = np.array([1.0, 2.0, 3.0, np.nan, 5.0])
    np.testing.assert_allclose(figures._running_mean(values, 3), [1.5, 2.0, 2.5, 4.0, 5.0])


# ---------------------------------------------------------------------------------------------
# every figure is written


def test_posterior_figures_are_written(tmp_path, default_problem, default_reference, theta):
    figures.plot_marginals(tmp_path / "marginals.png", theta, default_reference, default_problem.truth, title="Test")
    assert_png(tmp_path / "marginals.png")
    figures.plot_pairs(tmp_path / "pairs.png", theta, default_reference, default_problem.truth, title="Test")
    assert_png(tmp_path / "pairs.png")
    figures.plot_predictive_check(tmp_path / "predictive.png", default_problem, theta, np.random.default_rng(2), title="Test", n_draws=200)
    assert_png(tmp_path / "predictive.png")


def test_posterior_figures_without_reference_or_truth(tmp_path, theta):
    figures.plot_marginals(tmp_path / "marginals.png", theta)
    assert_png(tmp_path / "marginals.png")
    figures.plot_pairs(tmp_path / "pairs.png", theta)
    assert_png(tmp_path / "pairs.png")


@pytest.mark.parametrize("case", ["shifted", "identical", "one sample"])
def test_posterior_figures_survive_samples_off_the_posterior(tmp_path, default_problem, default_reference, theta, case):
    bad = {
        "shifted": theta + 100 * default_reference.sd,
        "identical": np.tile(theta[0], (300, 1)),
        "one sample": theta[:1],
    }[case]
    figures.plot_marginals(tmp_path / "marginals.png", bad, default_reference, default_problem.truth)
    assert_png(tmp_path / "marginals.png")
    figures.plot_pairs(tmp_path / "pairs.png", bad, default_reference, default_problem.truth)
    assert_png(tmp_path / "pairs.png")
    figures.plot_predictive_check(tmp_path / "predictive.png", default_problem, bad, np.random.default_rng(3), n_draws=50)
    assert_png(tmp_path / "predictive.png")


def test_chain_figures_are_written(tmp_path, default_problem, chains):
    burn_in = 300
    figures.plot_trace(tmp_path / "trace.png", chains, burn_in=burn_in, title="Test")
    assert_png(tmp_path / "trace.png")
    figures.plot_autocorrelation(tmp_path / "acf.png", chains[burn_in:], title="Test")
    assert_png(tmp_path / "acf.png")
    rms = rms_misfit(default_problem, chains.reshape(-1, 3)).reshape(chains.shape[:2])
    figures.plot_misfit(tmp_path / "misfit.png", rms, default_problem.noise_sd, burn_in=burn_in, title="Test")
    assert_png(tmp_path / "misfit.png")


@pytest.mark.parametrize("case", ["ten steps", "stuck", "one chain 2-D"])
def test_chain_figures_survive_short_or_stuck_chains(tmp_path, default_problem, chains, case):
    bad = {
        "ten steps": chains[:10],
        "stuck": np.tile(chains[-1], (200, 1, 1)),
        "one chain 2-D": chains[:, 0, :],
    }[case]
    figures.plot_trace(tmp_path / "trace.png", bad, burn_in=3)
    assert_png(tmp_path / "trace.png")
    figures.plot_autocorrelation(tmp_path / "acf.png", bad)
    assert_png(tmp_path / "acf.png")
    rms = rms_misfit(default_problem, bad)
    figures.plot_misfit(tmp_path / "misfit.png", rms, default_problem.noise_sd_array, burn_in=3)
    assert_png(tmp_path / "misfit.png")


@pytest.mark.parametrize("length", [2000, 10])
def test_elbo_figure_is_written_with_and_without_log_evidence(tmp_path, default_reference, length):
    rng = np.random.default_rng(4)
    iterations = np.arange(1, length + 1)
    kl = 500 * np.exp(-iterations / 100) + 0.02
    elbo = default_reference.log_evidence - kl + rng.normal(size=length) * (0.05 + 0.3 * np.sqrt(kl))
    elbo[length // 2] = np.nan  # a NaN estimate is drawn around, not fatal
    figures.plot_elbo(tmp_path / "elbo.png", elbo, default_reference.log_evidence, title="Test")
    assert_png(tmp_path / "elbo.png")
    figures.plot_elbo(tmp_path / "elbo_no_z.png", elbo)
    assert_png(tmp_path / "elbo_no_z.png")
