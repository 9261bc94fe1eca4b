"""Figures: each writes a PNG, zooms to the posterior, survives bad input; the credible-level helper is exact.

With the density contrast free the figures are tested against :class:`RidgeStandIn`, an exact
posterior of the (x0, z, R, Δρ) ridge built from the default problem's reference, with the
interface of :class:`reference.Reference`.
"""

import functools
import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest

import forward
from gravity_flows.reporting import figures, output
from gravity_flows.reporting.figures import posterior, style
from gravity_flows.scoring import predictive, reference

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


@pytest.mark.parametrize("radius, mass", [(1.0, predictive.ONE_SIGMA_MASS), (2.0, predictive.TWO_SIGMA_MASS)])
def test_credible_level_of_a_gaussian_is_its_density_on_the_mahalanobis_ellipse(radius, mass):
    covariance = np.array([[0.03**2, 0.94 * 0.03 * 0.009], [0.94 * 0.03 * 0.009, 0.009**2]])  # like z–R
    xs, ys, density = gaussian_grid(covariance)
    (level,) = predictive.credible_levels(density, style._cell_areas(xs, ys), masses=(mass,))
    on_ellipse = math.exp(-0.5 * radius**2) / (2 * math.pi * math.sqrt(np.linalg.det(covariance)))
    assert level == pytest.approx(on_ellipse, rel=0.02)


def test_credible_levels_are_ordered_and_mass_constants_are_gaussian():
    assert predictive.ONE_SIGMA_MASS == pytest.approx(0.393, abs=5e-4)
    assert predictive.TWO_SIGMA_MASS == pytest.approx(0.865, abs=5e-4)
    xs, ys, density = gaussian_grid(np.eye(2))
    one, two = predictive.credible_levels(density, style._cell_areas(xs, ys))
    assert one > two > 0


def test_credible_level_accepts_a_scalar_cell_area():
    xs, ys, density = gaussian_grid(np.eye(2))
    area = (xs[1] - xs[0]) * (ys[1] - ys[0])
    (level,) = predictive.credible_levels(density, area, masses=(predictive.ONE_SIGMA_MASS,))
    assert level == pytest.approx(math.exp(-0.5) / (2 * math.pi), rel=0.02)


# ---------------------------------------------------------------------------------------------
# zoom


def test_view_zooms_to_the_posterior_not_the_prior_box(default_reference, default_problem, theta):
    for i in range(3):
        low, high = style._view_limits(theta[:, i], default_reference, i, default_problem.truth[i])
        sd = default_reference.sd[i]
        assert high - low < 14 * sd  # ± 5 sd and a small margin, not the metres-wide prior box
        assert low < default_reference.mean[i] - 4.9 * sd and high > default_reference.mean[i] + 4.9 * sd


def test_view_widens_to_hold_samples_far_off(default_reference, theta):
    shifted = theta[:, 1] + 100 * default_reference.sd[1]
    low, high = style._view_limits(shifted, default_reference, 1)
    assert low < default_reference.mean[1] and high > np.quantile(shifted, 0.99)


def test_view_of_identical_samples_has_width():
    low, high = style._view_limits(np.full(50, 2.0))
    assert low < 2.0 < high


def test_running_mean_is_centred_and_skips_nan():
    values = np.array([1.0, 2.0, 3.0, np.nan, 5.0])
    np.testing.assert_allclose(style._running_mean(values, 3), [1.5, 2.0, 2.5, 4.0, 5.0])


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


# ---------------------------------------------------------------------------------------------
# stand-in exact posteriors with the interface of reference.Reference


class RidgeStandIn:
    """Exact posterior of the free-density sphere, p(x0, z, R, Δρ) ∝ N3(x0, z, R s(Δρ)) on the box, s = (Δρ/ρ0)^(1/3).

    N3 = N(mean, covariance) is the posterior of (x0, z, R) at the known contrast ρ0 (Gaussian to a
    good approximation on the default problem). The data see R and Δρ only through r = R s, the
    radius of the same mass at contrast ρ0. Changing (R, Δρ) to (r, Δρ), dR = dr / s, gives
    p(x0, z, r, Δρ) ∝ N3(x0, z, r) Δρ^(-1/3) (the SPEC's p(Δρ | m) ∝ Δρ^(-1/3)): (x0, z, r) Gaussian
    and Δρ independent of them, as long as the R box does not cut the ridge. Samples are then exact,
    and so are the densities: p(R, Δρ) = N(R s) s p(Δρ), p(a, R) = ∫ N2(a, R s) s p(Δρ) dΔρ.
    """

    dim = 4

    def __init__(self, mean, covariance, density, density_bounds, radius_bounds, n=241):
        self.mu, self.cov, self.rho0 = np.asarray(mean, float), np.asarray(covariance, float), float(density)
        self.low, self.high = density_bounds
        sd = np.sqrt(np.diag(self.cov))
        r_low, r_high = self.mu[2] - 7 * sd[2], self.mu[2] + 7 * sd[2]
        radius_low, radius_high = r_low / self._s(self.high), r_high / self._s(self.low)
        assert radius_bounds[0] < radius_low and radius_high < radius_bounds[1], "the R box cuts the ridge"
        self.nodes = [np.linspace(m - 7 * s, m + 7 * s, 81) for m, s in zip(self.mu[:2], sd[:2])]
        self.nodes += [np.linspace(radius_low, radius_high, n), np.linspace(self.low, self.high, n)]
        self._contrasts = np.linspace(self.low, self.high, 301)  # to integrate over Δρ
        marginals = [self.marginal(i) for i in range(4)]
        self.mean = np.array([np.trapezoid(d * x, x) for x, d in marginals])
        self.sd = np.sqrt([np.trapezoid(d * (x - m) ** 2, x) for (x, d), m in zip(marginals, self.mean)])
        self.correlation = np.eye(4)
        for i, j in style._pairs(4):
            a, b, d = self.joint_marginal(i, j)
            cross = np.outer(a - self.mean[i], b - self.mean[j]) * d
            self.correlation[i, j] = self.correlation[j, i] = np.trapezoid(np.trapezoid(cross, b), a) / (self.sd[i] * self.sd[j])

    def _s(self, contrast):
        return (np.asarray(contrast, float) / self.rho0) ** (1.0 / 3.0)

    def _contrast_density(self, contrast):
        return np.asarray(contrast, float) ** (-1.0 / 3.0) / (1.5 * (self.high ** (2 / 3) - self.low ** (2 / 3)))

    def _normal(self, index, values):
        """Gaussian density of the components ``index`` of (x0, z, r) at ``values`` (..., len(index))."""
        mu, cov = self.mu[list(index)], self.cov[np.ix_(index, index)]
        centred = values - mu
        quadratic = np.sum((centred @ np.linalg.inv(cov)) * centred, axis=-1)
        return np.exp(-0.5 * quadratic) / math.sqrt((2 * math.pi) ** len(index) * np.linalg.det(cov))

    def _ridge_density(self, radius, contrast):
        s = self._s(contrast)
        return self._normal([2], (radius * s)[..., None]) * s * self._contrast_density(contrast)

    def marginal(self, i):
        x = self.nodes[i]
        if i < 2:
            return x, self._normal([i], x[:, None])
        if i == 3:
            return x, self._contrast_density(x)
        return x, np.trapezoid(self._ridge_density(x[:, None], self._contrasts[None, :]), self._contrasts)

    @functools.lru_cache(maxsize=None)
    def joint_marginal(self, i, j):
        a, b = self.nodes[i], self.nodes[j]
        if (i, j) == (0, 1):
            density = self._normal([0, 1], np.stack(np.meshgrid(a, b, indexing="ij"), axis=-1))
        elif j == 3 and i < 2:
            density = np.outer(self._normal([i], a[:, None]), self._contrast_density(b))
        elif (i, j) == (2, 3):
            density = self._ridge_density(a[:, None], b[None, :])
        else:  # (x0 or z, R): integrate N2(a, R s) s p(Δρ) over Δρ
            s = self._s(self._contrasts)
            r = np.outer(b, s)
            weight = s * self._contrast_density(self._contrasts)
            density = np.stack([np.trapezoid(self._normal([i, 2], np.stack(np.broadcast_arrays(value, r), axis=-1)) * weight,
                                             self._contrasts) for value in a])
        return a, b, density

    def quantile(self, i, probabilities):
        x, d = self.marginal(i)
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (d[1:] + d[:-1]) * np.diff(x))])
        keep = np.concatenate([[True], np.diff(cdf) > 0])
        return np.interp(probabilities, cdf[keep] / cdf[-1], x[keep])

    def sample(self, n, rng):
        x0, z, r = (rng.normal(size=(n, 3)) @ np.linalg.cholesky(self.cov).T + self.mu).T
        u = rng.uniform(size=n)  # inverse of the CDF ∝ Δρ^(2/3) - low^(2/3)
        contrast = (self.low ** (2 / 3) + u * (self.high ** (2 / 3) - self.low ** (2 / 3))) ** 1.5
        return np.stack([x0, z, r / self._s(contrast), contrast], axis=1)


class TinyGaussianStandIn:
    """Independent Gaussians tabulated on a grid whose cells are ``spacing`` wide, centred on a node.

    With sd much smaller than the spacing the posterior is narrower than one cell: all its mass
    sits at one node (the rest underflows to 0). ``scale=0`` makes the density zero everywhere.
    """

    def __init__(self, mean, sd, spacing, scale=1.0, n=21):
        self.mean, self.sd = np.asarray(mean, float), np.asarray(sd, float)
        self.dim = self.mean.size
        self.correlation = np.eye(self.dim)
        self.nodes = [m + spacing * (np.arange(n) - n // 2) for m in self.mean]
        self.scale = scale

    def marginal(self, i):
        x = self.nodes[i]
        return x, self.scale * np.exp(-0.5 * ((x - self.mean[i]) / self.sd[i]) ** 2) / (math.sqrt(2 * math.pi) * self.sd[i])

    def joint_marginal(self, i, j):
        return self.nodes[i], self.nodes[j], np.outer(self.marginal(i)[1], self.marginal(j)[1])


@pytest.fixture(scope="module")
def free_problem():
    return forward.synthetic_problem(density_bounds=(1000.0, 4000.0))


@pytest.fixture(scope="module")
def ridge_reference(default_problem, default_reference, free_problem):
    return RidgeStandIn(default_reference.mean, default_reference.covariance, default_problem.density,
                        free_problem.density_bounds, free_problem.bounds[2])


@pytest.fixture(scope="module")
def ridge_theta(ridge_reference):
    return ridge_reference.sample(4000, np.random.default_rng(5))


@pytest.fixture
def drawn(monkeypatch):
    """The figures the functions save (closed, but still there to inspect)."""
    kept = []
    save = output.save_figure

    def keep_and_save(figure, path, *args, **kwargs):
        kept.append(figure)
        save(figure, path, *args, **kwargs)

    monkeypatch.setattr(output, "save_figure", keep_and_save)
    return kept


def visible_axes(figure):
    return [ax for ax in figure.axes if ax.get_visible() and ax.get_label() != "inset_axes"]


def panel_text(ax):
    return "\n".join(text.get_text() for text in ax.texts)


def test_the_stand_in_ridge_is_the_posterior_the_spec_describes(ridge_reference, ridge_theta):
    # R mean about 2.1 m, sd 0.28; Δρ mean about 2390, sd 870 kg/m³; R and Δρ almost perfectly anti-correlated
    assert ridge_reference.mean[2:] == pytest.approx([2.10, 2390.0], rel=0.01)
    assert ridge_reference.sd[2:] == pytest.approx([0.28, 870.0], rel=0.02)
    assert ridge_reference.correlation[2, 3] < -0.95
    for i in range(4):
        x, density = ridge_reference.marginal(i)
        assert np.trapezoid(density, x) == pytest.approx(1.0, abs=1e-3)
        assert ridge_theta[:, i].mean() == pytest.approx(ridge_reference.mean[i], abs=4 * ridge_reference.sd[i] / math.sqrt(4000))
    for i, j in style._pairs(4):
        a, b, density = ridge_reference.joint_marginal(i, j)
        assert np.trapezoid(np.trapezoid(density, b), a) == pytest.approx(1.0, abs=2e-3)


# ---------------------------------------------------------------------------------------------
# every figure is drawn from the problem's parameters


def test_default_figures_keep_their_three_panels(tmp_path, drawn, default_problem, default_reference, theta):
    figures.plot_marginals(tmp_path / "marginals.png", theta, default_reference, default_problem.truth)
    figures.plot_pairs(tmp_path / "pairs.png", theta, default_reference, default_problem.truth)
    marginals, pairs = (visible_axes(figure) for figure in drawn)
    assert [ax.get_xlabel() for ax in marginals] == ["x0 (m)", "z (m)", "R (m)"]
    assert [ax.get_title() for ax in marginals] == ["horizontal position x0", "depth of centre z", "radius R"]
    assert marginals[0].get_ylabel() == "probability density (1/m)"
    assert "± 0.0094 m" in panel_text(marginals[2])
    assert [ax.get_title() for ax in pairs] == ["x0 – z", "x0 – R", "z – R"]
    assert all(ax.collections[1:] for ax in pairs), "every pair has its exact contours"


def test_four_unknowns_give_four_marginals_in_their_own_units(tmp_path, drawn, free_problem, ridge_reference, ridge_theta):
    figures.plot_marginals(tmp_path / "marginals.png", ridge_theta, ridge_reference, free_problem.truth,
                           parameters=free_problem.parameters, bounds=free_problem.bounds)
    assert_png(tmp_path / "marginals.png")
    axes = visible_axes(drawn[0])
    assert [ax.get_xlabel() for ax in axes] == ["x0 (m)", "z (m)", "R (m)", "Δρ (kg/m³)"]
    assert axes[3].get_title() == "density contrast Δρ"
    assert axes[3].get_ylabel() == "probability density (m³/kg)"
    assert "exact:   2390 ± 870 kg/m³" in panel_text(axes[3])  # two digits of the sd, not 2389.55 ± 870.30
    assert "± 0.28 m" in panel_text(axes[2])
    # R and Δρ zoomed to the ridge, never beyond the prior box
    radius_view, contrast_view = axes[2].get_xlim(), axes[3].get_xlim()
    assert contrast_view == pytest.approx((1000.0, 4000.0))
    radius_nodes, radius_density = ridge_reference.marginal(2)
    held = radius_nodes[radius_density > 1e-3 * radius_density.max()]
    assert radius_view[0] < held[0] and held[-1] < radius_view[1]
    assert radius_view[1] - radius_view[0] < 1.3 * (held[-1] - held[0])  # not mean ± 5 sd = 0.7 to 3.5 m


def test_four_unknowns_give_six_pairs_and_the_ridge_against_its_exact_density(tmp_path, drawn, free_problem,
                                                                                 ridge_reference, ridge_theta):
    figures.plot_pairs(tmp_path / "pairs.png", ridge_theta, ridge_reference, free_problem.truth,
                       parameters=free_problem.parameters, bounds=free_problem.bounds)
    assert_png(tmp_path / "pairs.png")
    figure = drawn[0]
    axes = visible_axes(figure)
    assert [ax.get_title() for ax in axes] == ["x0 – z", "x0 – R", "x0 – Δρ", "z – R", "z – Δρ", "R – Δρ  (the mass ridge)"]
    ridge = axes[5]
    assert (ridge.get_xlabel(), ridge.get_ylabel()) == ("R (m)", "Δρ (kg/m³)")
    low, high = ridge.get_ylim()
    assert 1000.0 <= low and high <= 4000.0
    assert len(ridge.collections) >= 2, "samples and the exact contours"
    # the curve of equal mass passes through the truth's Δρ R³ (the data fix the mass)
    (curve,) = [line for line in ridge.lines if line.get_color() == style.MASS_CURVE_COLOUR]
    radius, contrast = curve.get_data()
    product = contrast * radius**3
    assert np.ptp(product) < 1e-9 * product[0]
    assert product[0] == pytest.approx(free_problem.truth[3] * free_problem.truth[2] ** 3, rel=0.03)
    # the magnified piece of the ridge shows its thickness: a window of ± 6 sd across it
    (inset,) = ridge.child_axes
    across = math.sqrt(ridge_reference.cov[2, 2]) / ridge_reference._s(ridge_reference.mean[3])  # sd of R = r / s at fixed Δρ
    assert np.diff(inset.get_xlim())[0] == pytest.approx(2 * posterior.RIDGE_INSET_SDS * across, rel=0.05)
    assert inset.collections, "samples and contours in the magnified window"


def test_chain_figures_with_four_unknowns(tmp_path, drawn, free_problem, ridge_reference):
    rng = np.random.default_rng(6)
    state = np.tile([5.5, 8.5, 4.5, 1500.0], (2, 1))
    steps = []
    for _ in range(600):
        state = ridge_reference.mean + 0.9 * (state - ridge_reference.mean) + math.sqrt(1 - 0.81) * rng.normal(size=(2, 4)) * ridge_reference.sd
        steps.append(state)
    chains = np.array(steps)
    figures.plot_trace(tmp_path / "trace.png", chains, burn_in=100, parameters=free_problem.parameters)
    assert_png(tmp_path / "trace.png")
    figures.plot_autocorrelation(tmp_path / "acf.png", chains[100:], parameters=free_problem.parameters)
    assert_png(tmp_path / "acf.png")
    trace, acf = drawn
    assert [ax.get_ylabel() for ax in trace.axes[::2]] == ["x0 (m)", "z (m)", "R (m)", "Δρ (kg/m³)"]
    assert [ax.get_title() for ax in acf.axes] == ["x0", "z", "R", "Δρ"]


def test_marginals_grid_with_four_unknowns(tmp_path, drawn, free_problem, ridge_reference, ridge_theta):
    gaussian = ridge_reference.mean + np.random.default_rng(7).normal(size=(3000, 4)) * ridge_reference.sd
    figures.plot_marginals_grid(tmp_path / "grid.png", [("exact", ridge_theta, ridge_reference), ("Gaussian", gaussian, ridge_reference)],
                                free_problem.truth, parameters=free_problem.parameters, bounds=free_problem.bounds)
    assert_png(tmp_path / "grid.png")
    axes = np.array(drawn[0].axes).reshape(2, 4)
    assert axes[0, 3].get_title() == "density contrast Δρ (kg/m³)"
    assert axes[1, 3].get_xlabel() == "Δρ (kg/m³)"
    assert 1000.0 <= axes[1, 3].get_xlim()[0] and axes[1, 3].get_xlim()[1] <= 4000.0
    assert "off view" in panel_text(axes[1, 2])  # a Gaussian spills past the ridge's ends


def test_parameters_that_do_not_match_the_samples_are_refused(tmp_path, ridge_theta, default_problem):
    with pytest.raises(ValueError, match="4 columns but 3 parameters .*pass parameters=problem.parameters"):
        figures.plot_marginals(tmp_path / "marginals.png", ridge_theta)
    with pytest.raises(ValueError, match="3 columns but 4 parameters"):
        figures.plot_trace(tmp_path / "trace.png", ridge_theta[:, :3], parameters=forward.SPHERE_FREE_DENSITY)


@pytest.mark.parametrize("value, sd, text", [(2389.55, 870.3, "2390"), (2.97885, 0.0303, "2.979"), (1.99822, 0.0094, "1.9982"),
                                             (56.4, 12.0, "56"), (3.0000000439, 6.4e-9, "3.0000000439")])
def test_values_are_shown_to_two_digits_of_their_uncertainty(value, sd, text):
    assert style._fixed(value, style._decimals(sd)) == text


def test_view_never_leaves_the_prior_box(ridge_reference, ridge_theta, free_problem):
    for i in range(4):
        low, high = style._view_limits(ridge_theta[:, i], ridge_reference, i, free_problem.truth[i], free_problem.bounds[i])
        assert free_problem.bounds[i, 0] <= low < high <= free_problem.bounds[i, 1]
    # without the box the view of Δρ would reach below zero (mean - 5 sd = -1960 kg/m³) or past the grid
    low, high = style._view_limits(np.empty(0), ridge_reference, 3)
    assert low > 900.0 and high < 4100.0


# ---------------------------------------------------------------------------------------------
# very precise data: a posterior narrower than the grid of its exact density


def count_contour_warnings(records):
    return sum("exact contour not drawn" in str(record.message) for record in records)


def test_figures_of_data_with_noise_of_a_millionth_of_a_microgal(tmp_path):
    problem = forward.synthetic_problem(noise_sd=1e-6)
    exact = reference.compute_reference(problem)
    samples = exact.sample(1000, np.random.default_rng(8))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        figures.plot_pairs(tmp_path / "pairs.png", samples, exact, problem.truth)
        assert count_contour_warnings(records) <= 1  # one line for the figure, whichever pairs it names
        figures.plot_marginals(tmp_path / "marginals.png", samples, exact, problem.truth)
        figures.plot_predictive_check(tmp_path / "predictive.png", problem, samples, np.random.default_rng(9), n_draws=200)
    for name in ("pairs", "marginals", "predictive"):
        assert_png(tmp_path / f"{name}.png")
    assert len(records) == count_contour_warnings(records), [str(record.message) for record in records]


@pytest.mark.parametrize("scale", [1.0, 0.0], ids=["all mass in one cell", "zero density"])
def test_pairs_of_a_posterior_narrower_than_one_grid_cell(tmp_path, drawn, default_problem, scale):
    exact = TinyGaussianStandIn(default_problem.truth, [1e-4, 2e-4, 5e-5], spacing=0.1, scale=scale)
    samples = exact.mean + np.random.default_rng(10).normal(size=(500, 3)) * exact.sd
    with pytest.warns(UserWarning, match="exact contour not drawn for x0–z, x0–R, z–R: posterior narrower") as records:
        figures.plot_pairs(tmp_path / "pairs.png", samples, exact, default_problem.truth)
    assert count_contour_warnings(records) == 1
    assert_png(tmp_path / "pairs.png")
    for ax in visible_axes(drawn[0]):  # what can be drawn is: the samples, the exact mean, the truth
        assert "exact region narrower than its grid" in panel_text(ax)
        assert any(line.get_marker() == "P" for line in ax.lines)


def test_only_the_contour_that_exists_is_drawn():
    # a smooth bump whose centre cell holds 60 % of the mass: the 39.3 % region is that one cell (its
    # level is the peak: no contour), while the 86.5 % level lies below the peak and is drawn
    nodes = np.arange(-10.0, 11.0)
    density = np.exp(-0.125 * np.add.outer(nodes**2, nodes**2))
    density[10, 10] = 0.0
    density[10, 10] = 1.5 * density.sum()
    figure, ax = plt.subplots()
    assert not style._draw_exact_contours(ax, nodes, nodes, density)
    (contours,) = ax.collections
    assert len(contours.levels) == 1 and 0 < contours.levels[0] < density.max()
    plt.close(figure)


def test_credible_levels_of_a_density_without_mass_are_nan():
    assert np.isnan(predictive.credible_levels(np.zeros((4, 4)), 1.0)).all()
    assert np.isnan(predictive.credible_levels(np.full((4, 4), np.nan), 1.0)).all()


# ---------------------------------------------------------------------------------------------
# predictive check: the signal's band beside the noise's


def test_signal_band_lies_inside_the_predictive_band_and_is_much_narrower(default_problem, theta):
    bands = predictive.predictive_bands(default_problem, theta, np.random.default_rng(11))
    assert np.all(np.diff(bands.stations) > 0)
    assert np.all(bands.predictive_low <= bands.signal_low) and np.all(bands.signal_high <= bands.predictive_high)
    assert np.all(bands.signal_low <= bands.mean) and np.all(bands.mean <= bands.signal_high)
    signal_width = bands.signal_high - bands.signal_low
    predictive_width = bands.predictive_high - bands.predictive_low
    assert signal_width.max() < 0.2 * predictive_width.min()  # 1000 stations pin the signal far below the noise
    # the signal band of the exact posterior holds the true signal nearly everywhere
    truth = default_problem.predict(default_problem.truth)
    assert np.mean((bands.signal_low <= truth) & (truth <= bands.signal_high)) > 0.5


def test_predictive_band_of_one_parameter_set_is_the_noise_alone(default_problem):
    bands = predictive.predictive_bands(default_problem, default_problem.truth[None, :], np.random.default_rng(12))
    np.testing.assert_array_equal(bands.signal_low, bands.signal_high)
    width = bands.predictive_high - bands.predictive_low
    assert width.mean() == pytest.approx(2 * 1.6449 * default_problem.noise_sd, rel=0.01)  # N(0, σ²) 5–95 %


def test_predictions_use_each_samples_density_contrast(free_problem, ridge_theta):
    doubled = np.array([[3.0, 6.0, 2.0, 5000.0]])
    bands = predictive.predictive_bands(free_problem, doubled, np.random.default_rng(13))
    at_2500 = forward.sphere_anomaly(bands.stations, doubled[0, :3], 2500.0)
    np.testing.assert_allclose(bands.mean, 2.0 * at_2500, rtol=1e-12)
    # along the ridge the mass, and so the signal, is fixed: the band is as narrow as with Δρ known
    ridge = predictive.predictive_bands(free_problem, ridge_theta, np.random.default_rng(14))
    assert np.max(ridge.signal_high - ridge.signal_low) < 0.5


def test_predictive_check_shows_the_signal_band_magnified(tmp_path, drawn, default_problem, theta):
    figures.plot_predictive_check(tmp_path / "predictive.png", default_problem, theta, np.random.default_rng(15), n_draws=500)
    assert_png(tmp_path / "predictive.png")
    top, middle, bottom = drawn[0].axes
    labels = top.get_legend_handles_labels()[1]
    assert any(label.startswith("90 % predictive band: signal + noise") for label in labels)
    assert any(label.startswith("90 % credible band of the signal: parameters only") for label in labels)
    # the magnified panel is scaled to the signal band, not to the noise: the band fills it
    half_range = bottom.get_ylim()[1]
    assert half_range < 0.5 * default_problem.noise_sd
    band = bottom.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() > 0.3 * half_range
    assert bottom.get_ylabel() == "signal − mean (µGal)"


# ---------------------------------------------------------------------------------------------
# misfit: what is plotted is what the axis says


def reference_line(ax, label_start):
    handles, labels = ax.get_legend_handles_labels()
    (handle,) = [h for h, label in zip(handles, labels) if label.startswith(label_start)]
    return handle.get_ydata()[0]


def test_misfit_with_sigma_per_station_is_drawn_in_units_of_sigma(tmp_path, drawn):
    sigma = np.linspace(0.5, 2.0, 100)
    chi = 1.0 + np.exp(-np.arange(400) / 30.0)[:, None] * np.array([[40.0, 60.0]])  # sqrt(mean((r/σ)²)) per step
    figures.plot_misfit(tmp_path / "misfit.png", chi, sigma, burn_in=100, noise_weighted=True)
    assert_png(tmp_path / "misfit.png")
    whole, zoom = drawn[0].axes
    for ax in (whole, zoom):
        assert "µGal" not in ax.get_ylabel() and "in units of σ" in ax.get_ylabel()
    assert reference_line(whole, "fit to the noise") == 1.0
    np.testing.assert_allclose(zoom.lines[0].get_ydata(), chi[100:, 0][: zoom.lines[0].get_ydata().size])
    assert "σ" in zoom.get_title() and "µGal" not in drawn[0].get_suptitle()


def test_misfit_with_one_sigma_is_drawn_in_microgal(tmp_path, drawn):
    chi = 1.0 + np.exp(-np.arange(300) / 30.0) * 20.0
    figures.plot_misfit(tmp_path / "misfit.png", chi, 2.0, noise_weighted=True)
    (ax,) = drawn[0].axes
    assert ax.get_ylabel() == "RMS misfit (µGal)"
    assert reference_line(ax, "noise level") == 2.0
    assert ax.lines[0].get_ydata()[-1] == pytest.approx(2.0 * chi[-1])


def test_plain_rms_misfit_with_sigma_per_station_is_compared_with_the_rms_sigma(tmp_path, drawn):
    sigma = np.array([1.0, 3.0] * 50)
    rms = np.full(50, math.sqrt(5.0))  # sqrt(mean(r²)) of a fit to the noise: sqrt(mean(σ²)) = sqrt(5)
    figures.plot_misfit(tmp_path / "misfit.png", rms, sigma)
    (ax,) = drawn[0].axes
    assert ax.get_ylabel() == "RMS misfit (µGal)"
    assert reference_line(ax, "noise level: RMS of the per-station σ") == pytest.approx(math.sqrt(5.0))
