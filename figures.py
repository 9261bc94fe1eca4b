"""Figures every script writes: posterior marginals and pairs, predictive check, chain and training diagnostics.

Each function draws one figure and writes it as a PNG with :func:`output.save_figure` (atomic, and
the figure is closed). Units: positions and sizes in m, anomalies and misfits in µGal, ELBO and KL
in nats.

The posterior of the default problem is about a hundred times narrower than the prior box, so
every parameter axis is zoomed to the posterior: the exact reference's mean ± ``VIEW_SDS`` sd,
widened to hold the central 99 % (0.5–99.5 % quantiles) of the samples. Samples outside the view
are counted on the figure, never silently dropped, so a run that missed the posterior still gives
a readable figure that says so. Offset tick labels ("+2.97") are switched off everywhere.

Chains are passed as arrays shaped (n_steps, n_chains, 3) (or (n_steps, 3) for one chain);
:func:`plot_trace` and :func:`plot_misfit` take the *full* run including burn-in, with ``burn_in``
the number of initial steps that are discarded; :func:`plot_autocorrelation` takes the kept steps.
"""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

import diagnostics  # noqa: E402
import forward  # noqa: E402
import output  # noqa: E402
import reference as reference_module  # noqa: E402

#: Half-width of the parameter view in reference standard deviations.
VIEW_SDS = 5.0
#: Central fraction of the samples the view is widened to hold.
SAMPLE_QUANTILES = (0.005, 0.995)
#: Probability mass inside the 1-sigma and 2-sigma ellipses of a 2-D Gaussian: 1 - exp(-r^2 / 2).
ONE_SIGMA_MASS = 1.0 - math.exp(-0.5)
TWO_SIGMA_MASS = 1.0 - math.exp(-2.0)
#: Points drawn per chain in trace and misfit plots, and per panel in scatter plots.
MAX_LINE_POINTS = 5000
MAX_SCATTER_POINTS = 3000

SAMPLE_COLOUR = "tab:blue"
REFERENCE_COLOUR = "black"
TRUTH_COLOUR = "tab:red"
PAIRS = ((0, 1), (0, 2), (1, 2))
DESCRIPTIONS = ("horizontal position x0", "depth of centre z", "radius R")


# ----------------------------------------------------------------------------------------------
# helpers


def _heading(title, what):
    return f"{title}: {what}" if title else what[:1].upper() + what[1:]


def _plain_ticks(ax, x_bins=5, y_bins=None, integer_x=False):
    """Plain tick labels (no offset, no scientific notation) and few enough ticks not to collide."""
    ax.xaxis.set_major_locator(MaxNLocator(x_bins, integer=integer_x))
    if y_bins:
        ax.yaxis.set_major_locator(MaxNLocator(y_bins))
    for axis in ("x", "y"):
        try:
            ax.ticklabel_format(axis=axis, useOffset=False, style="plain")
        except AttributeError:  # a log or categorical axis has no ScalarFormatter
            pass


def _decimals(scale):
    """Decimals that show a value to about two significant digits of its uncertainty ``scale``."""
    if not np.isfinite(scale) or scale <= 0:
        return 3
    return int(np.clip(1 - math.floor(math.log10(scale)), 0, 8))


def _finite_rows(theta):
    theta = np.asarray(theta, dtype=float).reshape(-1, 3)
    return theta[np.all(np.isfinite(theta), axis=1)], theta.shape[0]


def _view_limits(values, reference=None, i=None, truth=None):
    """(low, high) of the axis for parameter i: reference mean ± VIEW_SDS sd ∪ the samples' central 99 %.

    The true value joins the view only if that does not more than double it (otherwise it is
    reported as off view). A degenerate range (identical samples, no reference) gets a small width.
    """
    bounds = []
    if reference is not None:
        centre, sd = reference.mean[i], reference.sd[i]
        bounds += [centre - VIEW_SDS * sd, centre + VIEW_SDS * sd]
    if values.size:
        bounds += list(np.quantile(values, SAMPLE_QUANTILES))
    if not bounds:
        bounds = [0.0, 1.0]
    low, high = min(bounds), max(bounds)
    if truth is not None and np.isfinite(truth):
        width = max(high - low, 1e-12)
        if low - width <= truth <= high + width:
            low, high = min(low, truth), max(high, truth)
    if high - low <= 0:
        half = max(abs(low) * 1e-3, 1e-6)
        low, high = low - half, high + half
    pad = (0.03 if reference is not None else 0.08) * (high - low)
    return low - pad, high + pad


def _all_view_limits(theta, reference, truth):
    return [_view_limits(theta[:, i], reference, i, None if truth is None else truth[i]) for i in range(3)]


def credible_levels(density, cell_area, masses=(ONE_SIGMA_MASS, TWO_SIGMA_MASS)):
    """Density thresholds whose super-level sets {density >= level} hold the given probability masses.

    ``density``: values on a grid; ``cell_area``: the area each value stands for (scalar or the same
    shape). Cells are sorted by density, highest first, and their masses accumulated; each level is
    interpolated where the normalised cumulative mass crosses the requested fraction. For a 2-D
    Gaussian the 1 - exp(-1/2) = 39.3 % level is its density on the Mahalanobis radius-1 ellipse.
    Returns an array of levels in the order of ``masses``.
    """
    density = np.asarray(density, dtype=float)
    area = np.broadcast_to(np.asarray(cell_area, dtype=float), density.shape).ravel()
    density = density.ravel()
    order = np.argsort(density)[::-1]
    sorted_density = density[order]
    cumulative = np.cumsum(sorted_density * area[order])
    cumulative /= cumulative[-1]
    # cumulative is non-decreasing: interpolate the density at which each mass is reached
    return np.array([float(np.interp(m, cumulative, sorted_density)) for m in masses])


def _cell_areas(nodes_i, nodes_j):
    return np.outer(np.gradient(nodes_i), np.gradient(nodes_j))


def _padded_marginal(reference, i):
    """The reference marginal with zeros appended beyond its grid, so it ends at the axis, not mid-air."""
    nodes, density = reference.marginal(i)
    step = nodes[1] - nodes[0]
    far = 1e3 * (nodes[-1] - nodes[0])
    return (
        np.concatenate([[nodes[0] - far, nodes[0] - step], nodes, [nodes[-1] + step, nodes[-1] + far]]),
        np.concatenate([[0.0, 0.0], density, [0.0, 0.0]]),
    )


def _thinned_steps(n_steps):
    stride = max(1, math.ceil(n_steps / MAX_LINE_POINTS))
    return np.arange(0, n_steps, stride), stride


def _shade_burn_in(ax, burn_in, n_steps, label=True):
    if 0 < burn_in < n_steps:
        ax.axvspan(0, burn_in, color="0.85", zorder=0, label="burn-in (discarded)" if label else None)
        return True
    return False


def _chain_colours(n_chains):
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[k % len(cycle)] for k in range(n_chains)]


def _minor_log_label(value, _):
    leading = value / 10.0 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(leading) in (2, 5) else ""


def _plain_log_axis(ax, values, axis="y"):
    """Log axis labelled 0.01, 1, 100 rather than 10^-2, 10^0, 10^2; below two decades of ``values``
    the minor ticks at 2 and 5 are labelled too, so that the axis never shows a single number."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    decades = math.log10(values.max() / values.min()) if values.size else 0.0
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(FuncFormatter(_minor_log_label) if decades < 2 else NullFormatter())


def _thinning_note(stride):
    return f" (1 in {stride} steps drawn)" if stride > 1 else ""


def _running_mean(values, window):
    """Centred moving mean over ``window`` points (fewer at the ends), ignoring non-finite values."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    index = np.arange(values.size)
    start = np.maximum(0, index - window // 2)
    end = np.minimum(values.size, index + (window + 1) // 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums[end] - sums[start]) / (counts[end] - counts[start])


# ----------------------------------------------------------------------------------------------
# posterior figures


def plot_marginals(path, theta, reference=None, truth=None, title="", scores=None):
    """Histogram of each parameter's samples, the exact marginal density over it, and the true value.

    ``theta``: (n, 3) samples (x0, z, R) in m; ``reference``: :class:`reference.Reference` or None;
    ``truth``: the true (x0, z, R) or None. Each panel states the samples' mean ± sd, the exact
    one, and W1/sd against the reference (``scores``: those of :func:`reference.score`, if the
    caller has them already).
    """
    theta, n_total = _finite_rows(theta)
    if scores is None and reference is not None and len(theta):
        scores = reference_module.score(theta, reference)["w1_over_sd"]
    limits = _all_view_limits(theta, reference, truth)
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    for i, ax in enumerate(axes):
        low, high = limits[i]
        values = theta[:, i]
        inside = (values >= low) & (values <= high)
        n_bins = int(np.clip(math.sqrt(max(inside.sum(), 1)), 10, 80))
        counts, edges = np.histogram(values[inside], bins=n_bins, range=(low, high))
        density = counts / (max(n_total, 1) * np.diff(edges))  # area = fraction of *all* samples in view
        ax.stairs(density, edges, fill=True, color=SAMPLE_COLOUR, alpha=0.45, label="samples (histogram)")
        peak = density.max() if density.size else 0.0
        if reference is not None:
            nodes, exact = _padded_marginal(reference, i)
            ax.plot(nodes, exact, color=REFERENCE_COLOUR, lw=1.8, label="exact posterior")
            peak = max(peak, exact.max())
        lines = []
        if values.size:
            mean, sd = values.mean(), values.std()
            scale = reference.sd[i] if reference is not None else sd
            digits = _decimals(scale)
            lines.append(f"samples: {mean:.{digits}f} ± {sd:.{digits}f} m")
            if reference is not None:
                lines.append(f"exact:   {reference.mean[i]:.{digits}f} ± {reference.sd[i]:.{digits}f} m")
                lines.append(f"W1/sd = {scores[i]:.3f}")
        if truth is not None:
            if low <= truth[i] <= high:
                ax.axvline(truth[i], color=TRUTH_COLOUR, ls="--", lw=1.5, label="true value")
            else:
                lines.append(f"true value {truth[i]:g} m (off view)")
        n_out = n_total - int(inside.sum())
        if n_out:
            lines.append(f"{n_out} of {n_total} samples off view")
        ax.text(0.02, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=8.5,
                family="monospace", bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))
        ax.set_xlim(low, high)
        ax.set_ylim(0, 1.45 * peak if peak > 0 else 1.0)
        ax.set_xlabel(forward.LABELS[i])
        ax.set_ylabel("probability density (1/m)" if i == 0 else "")
        ax.set_title(DESCRIPTIONS[i])
        _plain_ticks(ax, 6)
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.03))
    figure.suptitle(_heading(title, f"posterior marginals of the sphere's position, depth and radius ({n_total} samples)"))
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    output.save_figure(figure, path)


def plot_pairs(path, theta, reference=None, truth=None, title=""):
    """The 2-D joint posteriors x0–z, x0–R, z–R: samples (scatter), exact 39.3 % and 86.5 % contours, truth."""
    theta, n_total = _finite_rows(theta)
    limits = _all_view_limits(theta, reference, truth)
    rng = np.random.default_rng(0)  # which points are drawn only; never the global generator
    shown = theta if len(theta) <= MAX_SCATTER_POINTS else theta[rng.choice(len(theta), MAX_SCATTER_POINTS, replace=False)]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.8))
    for ax, (i, j) in zip(axes, PAIRS):
        (low_i, high_i), (low_j, high_j) = limits[i], limits[j]
        ax.scatter(shown[:, i], shown[:, j], s=3, color=SAMPLE_COLOUR, alpha=0.25, lw=0, rasterized=True)
        lines = []
        if reference is not None:
            nodes_i, nodes_j, joint = reference.joint_marginal(i, j)
            levels = credible_levels(joint, _cell_areas(nodes_i, nodes_j))
            ax.contour(nodes_i, nodes_j, joint.T, levels=sorted(levels), colors=REFERENCE_COLOUR,
                       linewidths=(1.0, 1.8), linestyles=("--", "-"))
            lines.append(f"exact correlation   {reference.correlation[i, j]:+.2f}")
        if len(theta) > 2 and np.std(theta[:, i]) > 0 and np.std(theta[:, j]) > 0:
            lines.append(f"samples correlation {np.corrcoef(theta[:, i], theta[:, j])[0, 1]:+.2f}")
        if truth is not None:
            if low_i <= truth[i] <= high_i and low_j <= truth[j] <= high_j:
                ax.plot(truth[i], truth[j], marker="*", ms=13, color=TRUTH_COLOUR, mec="white", mew=0.8, ls="none")
            else:
                lines.append("true value off view")
        inside = (theta[:, i] >= low_i) & (theta[:, i] <= high_i) & (theta[:, j] >= low_j) & (theta[:, j] <= high_j)
        n_out = n_total - int(inside.sum())
        if n_out:
            lines.append(f"{n_out} of {n_total} samples off view")
        if lines:
            ax.text(0.02, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=8.5,
                    family="monospace", bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))
        ax.set_xlim(low_i, high_i)
        ax.set_ylim(low_j, high_j)
        ax.set_xlabel(forward.LABELS[i])
        ax.set_ylabel(forward.LABELS[j])
        ax.set_title(f"{forward.PARAMETERS[i]} – {forward.PARAMETERS[j]}")
        _plain_ticks(ax, 6, 6)
    handles = [Line2D([], [], marker="o", ls="none", color=SAMPLE_COLOUR, alpha=0.5, label=f"samples ({len(shown)} of {n_total} drawn)")]
    if reference is not None:
        handles += [
            Line2D([], [], color=REFERENCE_COLOUR, lw=1.8, label=f"exact posterior, {100 * ONE_SIGMA_MASS:.1f} % (1σ) region"),
            Line2D([], [], color=REFERENCE_COLOUR, lw=1.0, ls="--", label=f"exact posterior, {100 * TWO_SIGMA_MASS:.1f} % (2σ) region"),
        ]
    if truth is not None:
        handles.append(Line2D([], [], marker="*", ms=11, ls="none", color=TRUTH_COLOUR, label="true value"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, -0.03))
    figure.suptitle(_heading(title, "joint posteriors of pairs of parameters (depth and radius trade off through the mass)"))
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    output.save_figure(figure, path)


def plot_predictive_check(path, problem, theta, rng, title="", n_draws=500):
    """Data, true signal, posterior mean prediction and 90 % posterior predictive band; residuals below.

    ``n_draws`` parameter sets are drawn from ``theta`` without replacement; the band is the 5–95 %
    range of their predictions plus Gaussian noise of the data's sd (drawn with ``rng``), with
    several noise draws per parameter set (about 4000 values per station) so the band's edges are
    not ragged with sampling noise.
    """
    theta, _ = _finite_rows(theta)
    stations = np.asarray(problem.stations, dtype=float)
    order = np.argsort(stations)
    x = stations[order]
    observed = np.asarray(problem.g_obs, dtype=float)[order]
    noise_sd = problem.noise_sd_array[order]
    if len(theta) == 0:
        raise ValueError("plot_predictive_check needs at least one finite parameter set")
    draws = theta[rng.choice(len(theta), size=min(n_draws, len(theta)), replace=False)]
    predictions = forward.sphere_anomaly(x, draws, problem.density)
    mean_prediction = predictions.mean(axis=0)
    replicates = max(1, math.ceil(4000 / len(draws)))
    noisy = np.concatenate([predictions + rng.normal(size=predictions.shape) * noise_sd for _ in range(replicates)])
    band_low, band_high = np.percentile(noisy, [5.0, 95.0], axis=0)
    del noisy
    residual = observed - mean_prediction
    rms = float(np.sqrt(np.mean(residual**2)))
    noise_rms = float(np.sqrt(np.mean(noise_sd**2)))
    covered = float(np.mean((observed >= band_low) & (observed <= band_high)))

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True, gridspec_kw=dict(height_ratios=(3, 1.4)))
    top.fill_between(x, band_low, band_high, color=SAMPLE_COLOUR, alpha=0.25, lw=0,
                     label=f"90 % posterior predictive band (holds {100 * covered:.0f} % of the data)")
    top.plot(x, observed, ".", ms=2.5, color="0.45", alpha=0.6, label="observed data")
    top.plot(x, mean_prediction, color=REFERENCE_COLOUR, lw=1.6, label=f"posterior mean prediction ({len(draws)} draws)")
    if problem.truth is not None:
        top.plot(x, forward.sphere_anomaly(x, np.asarray(problem.truth, dtype=float), problem.density),
                 color=TRUTH_COLOUR, ls="--", lw=1.3, label="true signal")
    top.set_ylabel("gravity anomaly (µGal)")
    top.legend(loc="upper left", fontsize=9)
    _plain_ticks(top, 9)

    bottom.plot(x, residual, ".", ms=2.5, color="0.35", alpha=0.6, label="data − posterior mean")
    bottom.axhline(0.0, color=REFERENCE_COLOUR, lw=0.8)
    bottom.plot(x, noise_sd, color=TRUTH_COLOUR, lw=1.0, label="± noise sd")
    bottom.plot(x, -noise_sd, color=TRUTH_COLOUR, lw=1.0)
    bottom.set_xlabel("station position x (m)")
    bottom.set_ylabel("residual (µGal)")
    bottom.set_xlim(x[0], x[-1])
    bottom.text(0.01, 0.95, f"RMS residual {rms:.3f} µGal, noise sd {noise_rms:.3f} µGal", transform=bottom.transAxes,
                va="top", fontsize=9, bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))
    bottom.legend(loc="upper right", fontsize=9, ncol=2)
    _plain_ticks(bottom, 9, 5)
    figure.suptitle(_heading(title, "posterior predictive check of the gravity profile"))
    figure.tight_layout()
    output.save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# Markov chain figures


def plot_trace(path, chains, burn_in=0, title=""):
    """Trace of each parameter against iteration, every chain in its own colour.

    ``chains``: the full run (n_steps, n_chains, 3), burn-in included; ``burn_in``: how many initial
    steps are discarded. With a burn-in, a second column zooms on the kept steps, since the walk in
    from the start would otherwise squash them flat. At most ``MAX_LINE_POINTS`` points per chain
    are drawn (regular thinning).
    """
    chains = diagnostics.as_chains(chains)
    n_steps, n_chains, dim = chains.shape
    with_burn_in = 0 < burn_in < n_steps
    columns = 2 if with_burn_in else 1
    figure, axes = plt.subplots(dim, columns, figsize=(7 * columns, 2.6 * dim + 0.6), squeeze=False, sharex="col")
    colours = _chain_colours(n_chains)
    steps, stride = _thinned_steps(n_steps)
    kept = np.arange(burn_in, n_steps, max(1, math.ceil((n_steps - burn_in) / MAX_LINE_POINTS))) if with_burn_in else None
    for d in range(dim):
        ax = axes[d, 0]
        _shade_burn_in(ax, burn_in, n_steps, label=(d == 0))
        for k in range(n_chains):
            ax.plot(steps, chains[steps, k, d], color=colours[k], lw=0.6, alpha=0.8, label=f"chain {k + 1}" if d == 0 and n_chains <= 8 else None)
        label = forward.LABELS[d] if d < len(forward.LABELS) else f"parameter {d}"
        ax.set_ylabel(label)
        ax.set_xlim(0, max(n_steps - 1, 1))
        _plain_ticks(ax, 6, 5, integer_x=True)
        if with_burn_in:
            zoom = axes[d, 1]
            for k in range(n_chains):
                zoom.plot(kept, chains[kept, k, d], color=colours[k], lw=0.6, alpha=0.8)
            zoom.set_xlim(burn_in, max(n_steps - 1, burn_in + 1))
            zoom.set_ylabel(label)
            _plain_ticks(zoom, 6, 5, integer_x=True)
    axes[0, 0].set_title("whole run" + (" (burn-in shaded)" if with_burn_in else ""))
    if with_burn_in:
        axes[0, 1].set_title(f"kept steps after the burn-in of {burn_in}")
        kept_stride = kept[1] - kept[0] if kept.size > 1 else 1
        axes[-1, 1].set_xlabel("iteration" + _thinning_note(kept_stride))
    axes[-1, 0].set_xlabel("iteration" + _thinning_note(stride))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.01))
    figure.suptitle(_heading(title, f"Markov chain traces ({n_chains} chain{'s' if n_chains > 1 else ''}, {n_steps} steps)"))
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    output.save_figure(figure, path)


def plot_autocorrelation(path, chains, title="", tau=None):
    """Autocorrelation function of each parameter (averaged over chains), with tau and the ESS.

    ``chains``: the kept steps (n_steps, n_chains, 3); ``tau``: ``(tau, reliable)`` from
    :func:`diagnostics.integrated_time` if the caller has it already. Lags are shown up to 5 times
    the largest integrated autocorrelation time (at least 20, at most the chain length).
    """
    chains = diagnostics.as_chains(chains)
    n_steps, n_chains, dim = chains.shape
    if tau is not None:
        tau, reliable = tau
    elif n_steps >= 2:
        tau, reliable = diagnostics.integrated_time(chains, warn=False)
    else:
        tau, reliable = np.full(dim, np.nan), False
    acf = diagnostics.mean_autocorrelation(chains)
    finite_tau = tau[np.isfinite(tau)]
    max_lag = int(min(n_steps - 1, max(20, 5 * finite_tau.max()) if finite_tau.size else 100))
    lags = np.arange(max_lag + 1)
    figure, axes = plt.subplots(1, dim, figsize=(4.6 * dim, 3.9), sharey=True, squeeze=False)
    for d, ax in enumerate(axes[0]):
        ax.axhline(0.0, color="0.5", lw=0.8)
        style = dict(marker="o", ms=3) if max_lag <= 40 else {}
        ax.plot(lags, acf[: max_lag + 1, d], color=SAMPLE_COLOUR, lw=1.4, **style)
        if np.isinf(tau[d]):
            note = "chain never moves:\nτ = ∞, ESS = 0"
        elif np.isnan(tau[d]):
            note = "too short for τ"
        else:
            ess = n_steps * n_chains / tau[d]
            note = f"τ = {tau[d]:.1f} steps\nESS = {ess:.0f} of {n_steps * n_chains}"
            if tau[d] <= max_lag:
                ax.axvline(tau[d], color=TRUTH_COLOUR, ls="--", lw=1.2, label="integrated time τ")
        ax.text(0.97, 0.95, note, transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox=dict(facecolor="white", alpha=0.85, edgecolor="0.8"))
        ax.set_xlim(0, max(max_lag, 1))
        ax.set_ylim(min(-0.2, np.nanmin(acf[: max_lag + 1]) - 0.05), 1.05)
        ax.set_xlabel("lag (iterations)")
        ax.set_title(forward.PARAMETERS[d] if d < len(forward.PARAMETERS) else f"parameter {d}")
        _plain_ticks(ax, 6, integer_x=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="center right", fontsize=8)
    axes[0, 0].set_ylabel("autocorrelation")
    what = f"autocorrelation of the chains ({n_chains} chain{'s' if n_chains > 1 else ''} × {n_steps} kept steps)"
    if not reliable:
        what += f"\nτ is unreliable: chains shorter than {diagnostics.RELIABLE_LENGTH_IN_TAU} τ"
    figure.suptitle(_heading(title, what))
    figure.tight_layout()
    output.save_figure(figure, path)


def plot_misfit(path, rms_history, noise_sd, burn_in=0, title=""):
    """RMS data misfit (µGal) of the chain's current state per iteration, with the noise level.

    ``rms_history``: (n_steps, n_chains) or (n_steps,), the full run including burn-in;
    ``noise_sd``: float or per-station array (its RMS is drawn); ``burn_in``: initial steps
    discarded. A model that fits the data to the noise sits at the noise level. The whole run has
    a log scale when the misfit spans more than a decade; with a burn-in a second panel zooms on
    the kept steps, where the misfit should hover just below the noise level.
    """
    history = np.asarray(rms_history, dtype=float)
    if history.ndim == 1:
        history = history[:, None]
    n_steps, n_chains = history.shape
    noise_level = float(np.sqrt(np.mean(np.asarray(noise_sd, dtype=float) ** 2)))
    with_burn_in = 0 < burn_in < n_steps
    colours = _chain_colours(n_chains)
    figure, axes = plt.subplots(1, 2 if with_burn_in else 1, figsize=(14 if with_burn_in else 10, 4.6), squeeze=False)
    whole = axes[0, 0]
    positive = history[np.isfinite(history) & (history > 0)]
    spans_decades = bool(positive.size and positive.max() / positive.min() > 10.0)
    # A walk in from a far start spans decades of misfit in few steps: log axes show the descent.
    steps = np.unique(np.geomspace(1, n_steps, MAX_LINE_POINTS).astype(int)) - 1 if spans_decades else _thinned_steps(n_steps)[0]
    if 0 < burn_in < n_steps:
        whole.axvspan(1, burn_in, color="0.85", zorder=0, label="burn-in (discarded)")
    for k, colour in enumerate(colours):
        whole.plot(steps + 1, history[steps, k], color=colour, lw=0.8, alpha=0.85, label=f"chain {k + 1}" if n_chains <= 8 else None)
    whole.axhline(noise_level, color=REFERENCE_COLOUR, ls="--", lw=1.2, label=f"noise level ({noise_level:.3g} µGal)")
    if spans_decades:
        _plain_log_axis(whole, positive)
        _plain_log_axis(whole, [1, n_steps], axis="x")
        whole.set_xlabel("iteration (log scale)")
    else:
        _plain_ticks(whole, 6, integer_x=True)
        whole.set_xlabel("iteration" + _thinning_note(_thinned_steps(n_steps)[1]))
    whole.set_xlim(1, max(n_steps, 2))
    whole.set_ylabel("RMS misfit (µGal)")
    whole.set_title("whole run" + (" (burn-in shaded)" if with_burn_in else ""))
    kept = history[burn_in:] if with_burn_in else history
    final = float(np.nanmedian(kept)) if np.isfinite(kept).any() else math.nan
    if with_burn_in:
        zoom = axes[0, 1]
        kept_steps, kept_stride = _thinned_steps(n_steps - burn_in)
        for k, colour in enumerate(colours):
            zoom.plot(burn_in + kept_steps, kept[kept_steps, k], color=colour, lw=0.8, alpha=0.85)
        zoom.axhline(noise_level, color=REFERENCE_COLOUR, ls="--", lw=1.2)
        zoom.set_xlim(burn_in, max(n_steps - 1, burn_in + 1))
        zoom.set_xlabel("iteration" + _thinning_note(kept_stride))
        zoom.set_ylabel("RMS misfit (µGal)")
        zoom.set_title(f"kept steps: median RMS misfit {final:.4g} µGal")
        _plain_ticks(zoom, 6, 6, integer_x=True)
    else:
        whole.set_title(f"median RMS misfit {final:.4g} µGal")
    handles, labels = whole.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.02))
    figure.suptitle(_heading(title, "RMS data misfit of the Markov chain, against the noise level"))
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    output.save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# variational training figure


def plot_elbo(path, elbo_history, log_evidence=None, title="", final_kl=None):
    """ELBO per training iteration (raw and running mean), and KL(q||p) = log Z - ELBO when log Z is known.

    ``elbo_history``: (n_iterations,) Monte Carlo ELBO estimates in nats; ``log_evidence``: the
    exact log Z (:attr:`reference.Reference.log_evidence`) or None. The ELBO axis is zoomed on the
    iterations after the first 10 %: the first ones (from a poor start) can be orders of magnitude
    lower and are left off scale, as the panel says. The KL panel shows the running mean on a log
    scale clipped at 1e-3 nats (Monte Carlo noise can make the estimate dip below zero).
    ``final_kl``: (kl, n_samples) from the evaluation after training, quoted instead of the
    (noisier) mean of the last training iterations.
    """
    elbo = np.asarray(elbo_history, dtype=float).ravel()
    n = elbo.size
    iterations = np.arange(1, n + 1)
    window = max(1, min(n // 20, 500))
    running = _running_mean(elbo, window)
    panels = 2 if log_evidence is not None else 1
    figure, axes = plt.subplots(panels, 1, figsize=(10, 3.9 * panels + 0.3), sharex=True, squeeze=False)
    top = axes[0, 0]
    top.plot(iterations, elbo, color=SAMPLE_COLOUR, lw=0.5, alpha=0.35, label="ELBO per iteration (Monte Carlo estimate)")
    smoothing = f"running mean over {window} iterations" if window > 1 else "running mean (too few iterations to smooth)"
    top.plot(iterations, running, color=SAMPLE_COLOUR, lw=1.8, label=smoothing)
    if log_evidence is not None:
        top.axhline(log_evidence, color=REFERENCE_COLOUR, ls="--", lw=1.2, label=f"exact log evidence, log Z = {log_evidence:.2f}")
    late = slice(n // 10, None)
    finite_late = elbo[late][np.isfinite(elbo[late])]
    if finite_late.size:
        low, high = np.quantile(finite_late, [0.005, 0.995])
        if log_evidence is not None:
            high = max(high, log_evidence)
        span = max(high - low, 1e-6 * max(abs(high), 1.0))
        low, high = low - 0.08 * span, high + 0.08 * span
        top.set_ylim(low, high)
        if np.nanmin(elbo) < low:
            top.text(0.99, 0.5, "first iterations below the view", transform=top.transAxes, ha="right", fontsize=9, color="0.3")
    top.set_ylabel("ELBO (nats)")
    top.legend(loc="lower right", fontsize=9)
    top.set_title("evidence lower bound (higher is better; it cannot exceed log Z)" if log_evidence is not None else "evidence lower bound (higher is better)")
    _plain_ticks(top, 8, 6, integer_x=True)
    if log_evidence is not None:
        bottom = axes[1, 0]
        floor = 1e-3
        kl_running = log_evidence - running
        shown = np.clip(kl_running, floor, None)
        bottom.plot(iterations, shown, color="tab:purple", lw=1.8, label=smoothing)
        finite = shown[np.isfinite(shown)]
        if finite.size and finite.max() / finite.min() > 10.0:
            _plain_log_axis(bottom, finite)
        else:
            _plain_ticks(bottom, 8, 6, integer_x=True)
        if final_kl is not None:
            final, n_evaluated = final_kl
            last = f"{n_evaluated} samples drawn after training"
        else:
            final = float(np.nanmean((log_evidence - elbo)[-window:])) if n else math.nan
            last = f"mean of the last {window} iterations" if window > 1 else "last iteration"
        final_text = f"{final:.0f}" if abs(final) >= 100 else f"{final:.2g}"
        bottom.text(0.99, 0.95, f"final KL(q‖p) ≈ {final_text} nats\n({last})",
                    transform=bottom.transAxes, ha="right", va="top", fontsize=10,
                    bbox=dict(facecolor="white", alpha=0.85, edgecolor="0.8"))
        bottom.set_ylabel("KL(q‖p) (nats)")
        bottom.set_title("KL divergence to the exact posterior, log Z − ELBO (lower is better; values below 0.001 drawn at 0.001)", fontsize=10)
        bottom.legend(loc="lower left", fontsize=9)
    axes[-1, 0].set_xlabel("training iteration")
    axes[-1, 0].set_xlim(1, max(n, 2))
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(8, integer=True))
    figure.suptitle(_heading(title, "variational training"))
    figure.tight_layout()
    output.save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# figures that compare runs: several methods, or one method over the values of one option


def plot_marginals_grid(path, rows, truth=None, title="", error_goal=None):
    """Small multiples: one row per run, one column per parameter, the run's samples over the exact marginal.

    ``rows``: a list of ``(label, theta, reference)``, where ``label`` names the run (a method, or
    "iterations = 2000"), ``theta`` is its (n, 3) samples in m and ``reference`` its
    :class:`reference.Reference` (or None). When every row has the same reference object, each
    column shares one x axis, zoomed to the exact posterior (mean ± ``VIEW_SDS`` sd), so the rows
    can be compared by eye; otherwise (a sweep over the data, the noise or the prior) each panel
    zooms to its own posterior. Samples outside the view are counted on the panel. Each panel
    states W1/sd against its reference, in red when it exceeds ``error_goal``.
    """
    shared = all(row[2] is rows[0][2] for row in rows) and rows[0][2] is not None
    n_rows = len(rows)
    figure, axes = plt.subplots(n_rows, 3, figsize=(13, 1.35 * n_rows + 1.4), squeeze=False,
                                sharex="col" if shared else False)
    for r, (label, theta, reference) in enumerate(rows):
        theta, n_total = _finite_rows(theta)
        scores = reference_module.score(theta, reference)["w1_over_sd"] if reference is not None and len(theta) else None
        for i in range(3):
            ax = axes[r, i]
            truth_i = None if truth is None else truth[i]
            if reference is not None:  # the posterior's view, never widened by samples that missed it
                low, high = _view_limits(np.empty(0), reference, i, truth_i)
            else:
                low, high = _view_limits(theta[:, i], None, i, truth_i)
            values = theta[:, i]
            inside = (values >= low) & (values <= high)
            counts, edges = np.histogram(values[inside], bins=40, range=(low, high))
            density = counts / (max(n_total, 1) * np.diff(edges))
            ax.stairs(density, edges, fill=True, color=SAMPLE_COLOUR, alpha=0.3, lw=0)
            ax.stairs(density, edges, color=SAMPLE_COLOUR, lw=1.0, label="samples (histogram)")
            top = density.max() if density.size else 0.0
            if reference is not None:
                nodes, exact = _padded_marginal(reference, i)
                ax.plot(nodes, exact, color=REFERENCE_COLOUR, lw=1.4, label="exact posterior")
                top = max(exact.max(), min(top, 2.0 * exact.max()))  # a collapsed q is clipped, not a squashed row
            if truth_i is not None and low <= truth_i <= high:
                ax.axvline(truth_i, color=TRUTH_COLOUR, ls="--", lw=1.1, label="true value")
            notes, colour = [], "black"
            if scores is not None:
                notes.append(f"W1/sd {scores[i]:.3f}" if scores[i] < 10 else f"W1/sd {scores[i]:.1f}")
                if error_goal is not None and scores[i] > error_goal:
                    colour = TRUTH_COLOUR
            n_out = n_total - int(inside.sum())
            if n_out:
                share = 100 * n_out / max(n_total, 1)
                notes.append(f"{share:.0f} % off view" if share >= 1 else "< 1 % off view")
            if n_out > 0.2 * n_total:  # say where the samples are when the view cannot show it
                digits = _decimals(reference.sd[i] if reference is not None else values.std())
                notes.append(f"samples {values.mean():.{digits}f} ± {values.std():.{digits}f} m")
            if not n_total:
                notes.append("no samples")
            ax.text(0.98, 0.93, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=8.5,
                    color=colour, bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
            ax.set_xlim(low, high)
            ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)
            ax.set_yticks([])
            _plain_ticks(ax, 6)
            if r == 0:
                ax.set_title(f"{DESCRIPTIONS[i]} (m)", fontsize=10)
            if r == n_rows - 1 or not shared:
                ax.set_xlabel(forward.LABELS[i] if r == n_rows - 1 else "")
            if i == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9.5)
    handles, labels = [], []
    for ax in axes.ravel():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    height = 1.35 * n_rows + 1.4
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, 0.0))
    what = "posterior marginals over the exact posterior\n(W1/sd: Wasserstein distance to it, in posterior sd)"
    figure.suptitle(_heading(title, what), fontsize=11)
    figure.tight_layout(rect=(0, 0.4 / height, 1, 1), h_pad=0.4)
    output.save_figure(figure, path)


#: KL estimates below this are drawn at it on the log axis (Monte Carlo noise can make them negative).
KL_FLOOR = 1e-4


def plot_cost_accuracy(path, runs, error_goal=None, kl_goal=None, title=""):
    """What each run cost against how accurate it is: wall time (log) against error and against KL (log).

    ``runs``: a list of dicts with ``label``, ``wall_time_s``, ``error`` (largest W1/sd) and
    ``kl`` (KL(q||p) in nats; None for MCMC, which has no q) and optionally ``kl_se``, its Monte
    Carlo standard error (the ELBO's), drawn as a ±2 se bar. Better runs sit lower left. KL
    estimates below ``KL_FLOOR`` (Monte Carlo noise can make them negative) are drawn at the floor.
    Dashed lines mark the goals when given.
    """
    kl_floor = KL_FLOOR
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xhp<>"
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.0))
    times, errors, kls = [], [], []
    handles = []
    for k, run in enumerate(runs):
        style = dict(color=cycle[k % len(cycle)], marker=markers[k % len(markers)], ms=9, ls="none", mec="black", mew=0.6)
        time_s, error, kl = run.get("wall_time_s"), run.get("error"), run.get("kl")
        handles.append(Line2D([], [], label=run["label"], **style))
        if time_s is None or error is None:
            continue
        left.plot(time_s, error, **style)
        times.append(time_s)
        errors.append(error)
        if kl is not None:
            right.plot(time_s, max(kl, kl_floor), **style)
            kls.append(max(kl, kl_floor))
            se = run.get("kl_se")
            if se:
                low_bar, high_bar = max(kl - 2 * se, kl_floor), max(kl + 2 * se, kl_floor)
                right.plot([time_s, time_s], [low_bar, high_bar], color=style["color"], lw=1.5, alpha=0.8)
                kls.append(high_bar)
    for ax, values, goal, name in ((left, errors, error_goal, "error"), (right, kls, kl_goal, "KL")):
        if goal is not None:
            ax.axhline(goal, color=TRUTH_COLOUR, ls="--", lw=1.1, label=f"goal: {name} ≤ {goal:g}")
            ax.legend(loc="upper right", fontsize=9)
        shown = values + ([goal] if goal is not None else [])
        if shown:
            _plain_log_axis(ax, shown)
            low, high = min(shown), max(shown)
            ax.set_ylim(low / 2.0, high * 2.0)
        if times:
            _plain_log_axis(ax, times, axis="x")
            ax.set_xlim(min(times) / 1.4, max(times) * 1.4)
        ax.set_xlabel("wall time of the run (s, log scale)")
        ax.grid(True, which="both", color="0.9", lw=0.6)
    left.set_ylabel("error: largest W1 / posterior sd (log scale)")
    left.set_title("accuracy of the samples (lower is better)")
    right.set_ylabel("KL(q‖p) (nats, log scale)")
    right.set_title(f"flows: KL divergence to the exact posterior, ± 2 Monte Carlo se\n(values below {kl_floor:g} drawn at {kl_floor:g})", fontsize=10)
    if not kls:
        right.text(0.5, 0.5, "no flow in this comparison", transform=right.transAxes, ha="center", color="0.4")
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False, fontsize=9.5)
    figure.suptitle(_heading(title, "cost against accuracy (lower left is better)"))
    rows_of_legend = math.ceil(len(handles) / 4)
    figure.tight_layout(rect=(0, 0.05 + 0.045 * rows_of_legend, 1, 1))
    output.save_figure(figure, path)
