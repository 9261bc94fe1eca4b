"""Figures every script writes: posterior marginals and pairs, predictive check, chain and training diagnostics.

Each function draws one figure and writes it as a PNG with :func:`output.save_figure` (atomic, and
the figure is closed). Units: every parameter axis in its own unit (:class:`forward.Parameter`:
m for x0, z, R; kg/m³ for the density contrast Δρ), anomalies and misfits in µGal, ELBO and KL in
nats.

The figures work from the problem's unknowns, ``parameters`` (a tuple of
:class:`forward.Parameter`, :data:`forward.SPHERE` by default, :data:`forward.SPHERE_FREE_DENSITY`
when Δρ is free): one marginal per parameter, one panel per pair i < j.

The posterior of the default problem is about a hundred times narrower than the prior box, so
every parameter axis is zoomed to the posterior: the exact reference's mean ± ``VIEW_SDS`` sd
(cut to where its marginal density is not negligible, which matters for a skewed or bounded
marginal such as R along the mass ridge), widened to hold the central 99 % (0.5–99.5 %
quantiles) of the samples, and never beyond the prior box when ``bounds`` are given. Samples
outside the view are counted on the figure, never silently dropped, so a run that missed the
posterior still gives a readable figure that says so. Offset tick labels ("+2.97") are switched
off everywhere.

Chains are passed as arrays shaped (n_steps, n_chains, dim) (or (n_steps, dim) for one chain);
:func:`plot_trace` and :func:`plot_misfit` take the *full* run including burn-in, with ``burn_in``
the number of initial steps that are discarded; :func:`plot_autocorrelation` takes the kept steps.
"""

import math
import warnings
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from gravity_flows.scoring import diagnostics  # noqa: E402
import forward  # noqa: E402
from gravity_flows.reporting import output  # noqa: E402
from gravity_flows.scoring.reference import score  # noqa: E402

#: Half-width of the parameter view in reference standard deviations.
VIEW_SDS = 5.0
#: The view holds the reference marginal where its density exceeds this fraction of its peak
#: (a Gaussian's density falls to it at ± 5.3 sd, just outside ± VIEW_SDS sd).
VIEW_DENSITY_FLOOR = 1e-6
#: Central fraction of the samples the view is widened to hold.
SAMPLE_QUANTILES = (0.005, 0.995)
#: Probability mass inside the 1-sigma and 2-sigma ellipses of a 2-D Gaussian: 1 - exp(-r^2 / 2).
ONE_SIGMA_MASS = 1.0 - math.exp(-0.5)
TWO_SIGMA_MASS = 1.0 - math.exp(-2.0)
#: Central probability of the bands of the predictive check.
BAND_MASS = 0.90
#: Points drawn per chain in trace and misfit plots, and per panel in scatter plots.
MAX_LINE_POINTS = 5000
MAX_SCATTER_POINTS = 3000

SAMPLE_COLOUR = "tab:blue"
REFERENCE_COLOUR = "black"
TRUTH_COLOUR = "tab:red"
SIGNAL_COLOUR = "tab:orange"
MASS_CURVE_COLOUR = "tab:orange"


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


#: Characters of tick labels that fit across one parameter panel (about 4 inches at 10 pt).
PANEL_TICK_CHARACTERS = 46


def _fit_ticks(ax, n_bins=6, characters=PANEL_TICK_CHARACTERS):
    """Fewer x ticks when plain labels are long (a posterior a billionth of a metre wide reads
    "2.999999992"), so that they never run into each other. Call after the limits are set."""
    low, high = ax.get_xlim()
    step = (high - low) / n_bins
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 and np.isfinite(step) else 0
    length = max(len(f"{value:.{decimals}f}") for value in (low, high))
    ax.xaxis.set_major_locator(MaxNLocator(int(np.clip(characters // (length + 3), 2, n_bins))))


def _decimals(scale):
    """Decimals that show a value to about two significant digits of its uncertainty ``scale``.

    Negative for a large scale: -1 rounds to tens (a density of 2388 ± 866 kg/m³ reads 2390 ± 870).
    """
    if not np.isfinite(scale) or scale <= 0:
        return 3
    return int(np.clip(1 - math.floor(math.log10(scale)), -8, 12))


def _fixed(value, decimals):
    """``value`` with ``decimals`` decimals; a negative count rounds to tens, hundreds, … and shows none."""
    if decimals >= 0:
        return f"{value:.{decimals}f}"
    return f"{round(value, decimals):.0f}"


def _listing(words):
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _per_unit(unit):
    """The unit of a probability density over a quantity in ``unit``."""
    return {"m": "1/m", "kg/m³": "m³/kg"}.get(unit, f"1/({unit})")


def _pairs(dim):
    """Every pair of parameter indices i < j, in reading order: (0, 1), (0, 2), …, (dim - 2, dim - 1)."""
    return [(i, j) for i in range(dim) for j in range(i + 1, dim)]


def _check_dim(dim, parameters, what="theta"):
    if dim != len(parameters):
        names = ", ".join(p.name for p in parameters)
        raise ValueError(f"{what} has {dim} columns but {len(parameters)} parameters ({names}) were given; "
                         "pass parameters=problem.parameters")


def _finite_rows(theta, parameters=forward.SPHERE):
    """The rows of samples ``theta`` (n, dim) that are finite everywhere, and the number of rows given."""
    theta = np.asarray(theta, dtype=float)
    if theta.size:  # no samples at all is drawn as such; samples of the wrong width are refused
        _check_dim(theta.shape[-1], parameters)
    theta = theta.reshape(-1, len(parameters))
    return theta[np.all(np.isfinite(theta), axis=1)], theta.shape[0]


def _reference_view(reference, i):
    """(low, high): the reference mean ± VIEW_SDS sd, cut to where its marginal exceeds VIEW_DENSITY_FLOOR of its peak.

    For a near-Gaussian marginal the cut does nothing; for a bounded one (R along the mass ridge,
    whose ± 5 sd reaches far past where the ridge ends) it keeps the view on the density.
    """
    centre, sd = reference.mean[i], reference.sd[i]
    low, high = centre - VIEW_SDS * sd, centre + VIEW_SDS * sd
    nodes, density = (np.asarray(a, dtype=float) for a in reference.marginal(i))
    density = np.where(np.isfinite(density), density, 0.0)
    if density.size and density.max() > 0:
        index = np.flatnonzero(density > VIEW_DENSITY_FLOOR * density.max())
        support_low = nodes[max(index[0] - 1, 0)]
        support_high = nodes[min(index[-1] + 1, nodes.size - 1)]
        if max(low, support_low) < min(high, support_high):
            low, high = max(low, support_low), min(high, support_high)
    return low, high


def _view_limits(values, reference=None, i=None, truth=None, bounds=None):
    """(low, high) of the axis for parameter i: the reference's view (:func:`_reference_view`) ∪ the samples' central 99 %.

    The true value joins the view only if that does not more than double it (otherwise it is
    reported as off view). A degenerate range (identical samples, no reference) gets a small width.
    ``bounds``: the parameter's prior (low, high), or None; the view never reaches beyond it.
    """
    limits = []
    if reference is not None:
        limits += list(_reference_view(reference, i))
    if values.size:
        limits += list(np.quantile(values, SAMPLE_QUANTILES))
    if not limits:
        limits = [0.0, 1.0]
    low, high = min(limits), max(limits)
    if truth is not None and np.isfinite(truth):
        width = max(high - low, 1e-12)
        if low - width <= truth <= high + width:
            low, high = min(low, truth), max(high, truth)
    if high - low <= 0:
        half = max(abs(low) * 1e-3, 1e-6)
        low, high = low - half, high + half
    pad = (0.03 if reference is not None else 0.08) * (high - low)
    low, high = low - pad, high + pad
    if bounds is not None:
        box_low, box_high = (float(b) for b in bounds)
        clipped_low, clipped_high = max(low, box_low), min(high, box_high)
        if clipped_low < clipped_high:  # a view entirely outside the box (samples that left it) stays as it is
            low, high = clipped_low, clipped_high
    return low, high


def _all_view_limits(theta, reference, truth, bounds=None):
    return [_view_limits(theta[:, i], reference, i, None if truth is None else truth[i], None if bounds is None else bounds[i])
            for i in range(theta.shape[1])]


def credible_levels(density, cell_area, masses=(ONE_SIGMA_MASS, TWO_SIGMA_MASS)):
    """Density thresholds whose super-level sets {density >= level} hold the given probability masses.

    ``density``: values on a grid; ``cell_area``: the area each value stands for (scalar or the same
    shape). Cells are sorted by density, highest first, and their masses accumulated; each level is
    interpolated where the normalised cumulative mass crosses the requested fraction. For a 2-D
    Gaussian the 1 - exp(-1/2) = 39.3 % level is its density on the Mahalanobis radius-1 ellipse.
    Returns an array of levels in the order of ``masses``; NaN when the density holds no mass
    (zero or non-finite everywhere). When one grid cell holds more than a mass, the level is that
    cell's density: levels can then coincide, and a level can equal the peak (see
    :func:`_draw_exact_contours`).
    """
    density = np.asarray(density, dtype=float)
    area = np.broadcast_to(np.asarray(cell_area, dtype=float), density.shape).ravel()
    density = density.ravel()
    usable = np.isfinite(density) & np.isfinite(area)
    density, area = np.where(usable, density, 0.0), np.where(usable, area, 0.0)
    order = np.argsort(density)[::-1]
    sorted_density = density[order]
    cumulative = np.cumsum(sorted_density * area[order])
    if not cumulative.size or not cumulative[-1] > 0:
        return np.full(len(masses), np.nan)
    cumulative /= cumulative[-1]
    # cumulative is non-decreasing: interpolate the density at which each mass is reached
    return np.array([float(np.interp(m, cumulative, sorted_density)) for m in masses])


def _cell_areas(nodes_i, nodes_j):
    return np.outer(np.gradient(nodes_i), np.gradient(nodes_j))


def _draw_exact_contours(ax, nodes_i, nodes_j, joint):
    """Draw the exact 39.3 % (solid) and 86.5 % (dashed) credible contours; True when both could be drawn.

    A contour can be drawn only at a level strictly between 0 and the grid's peak density, and two
    contours only at distinct levels. A posterior narrower than one cell of the reference's grid
    puts all its mass in one or a few cells, and its levels coincide with the peak: then only what
    can be drawn is drawn (perhaps nothing), and the caller says so.
    """
    joint = np.asarray(joint, dtype=float)
    one, two = credible_levels(joint, _cell_areas(nodes_i, nodes_j))
    finite = joint[np.isfinite(joint)]
    peak = finite.max() if finite.size else math.nan
    drawable = []  # increasing levels, as contour() needs them
    for level, style, width in ((two, "--", 1.0), (one, "-", 1.8)):
        if np.isfinite(level) and 0.0 < level < peak and (not drawable or level > drawable[-1][0]):
            drawable.append((level, style, width))
    if drawable:
        levels, styles, widths = zip(*drawable)
        ax.contour(nodes_i, nodes_j, joint.T, levels=list(levels), colors=REFERENCE_COLOUR,
                   linewidths=widths, linestyles=styles)
    return len(drawable) == 2


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


def _scores(theta, reference):
    """W1/sd per parameter against the reference (:func:`reference.score`)."""
    return score(theta, reference)["w1_over_sd"]


def plot_marginals(path, theta, reference=None, truth=None, title="", scores=None, parameters=forward.SPHERE, bounds=None):
    """Histogram of each parameter's samples, the exact marginal density over it, and the true value.

    ``theta``: (n, dim) samples, columns in the order of ``parameters`` (tuple of
    :class:`forward.Parameter`, default :data:`forward.SPHERE`: x0, z, R in m); ``reference``:
    :class:`reference.Reference` or None; ``truth``: the true values or None; ``bounds``: the
    (dim, 2) prior box or None (no axis reaches beyond it). Each panel states the samples'
    mean ± sd, the exact one, and W1/sd against the reference (``scores``: those of
    :func:`reference.score`, if the caller has them already), in the parameter's unit.
    """
    theta, n_total = _finite_rows(theta, parameters)
    dim = len(parameters)
    if scores is None and reference is not None and len(theta):
        scores = _scores(theta, reference)
    limits = _all_view_limits(theta, reference, truth, bounds)
    n_columns = dim if dim <= 3 else math.ceil(dim / math.ceil(dim / 3))  # four unknowns: two rows of two
    n_rows = math.ceil(dim / n_columns)
    height = 4.6 if n_rows == 1 else 4.0 * n_rows + 0.6
    figure, axes = plt.subplots(n_rows, n_columns, figsize=(max(14 * n_columns / 3, 11.0), height), squeeze=False)
    for ax in axes.ravel()[dim:]:
        ax.set_visible(False)
    axes = axes.ravel()[:dim]
    for i, (ax, parameter) in enumerate(zip(axes, parameters)):
        low, high = limits[i]
        unit = parameter.unit
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
            lines.append(f"samples: {_fixed(mean, digits)} ± {_fixed(sd, digits)} {unit}")
            if reference is not None:
                lines.append(f"exact:   {_fixed(reference.mean[i], digits)} ± {_fixed(reference.sd[i], digits)} {unit}")
                if scores is not None:
                    lines.append(f"W1/sd = {scores[i]:.3f}")
        if truth is not None:
            if low <= truth[i] <= high:
                ax.axvline(truth[i], color=TRUTH_COLOUR, ls="--", lw=1.5, label="true value")
            else:
                lines.append(f"true value {truth[i]:g} {unit} (off view)")
        n_out = n_total - int(inside.sum())
        if n_out:
            lines.append(f"{n_out} of {n_total} samples off view")
        ax.text(0.02, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=8.5,
                family="monospace", bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))
        ax.set_xlim(low, high)
        ax.set_ylim(0, 1.45 * peak if peak > 0 else 1.0)
        ax.set_xlabel(parameter.label)
        if i % n_columns == 0 or unit != parameters[i - 1].unit:  # a density's unit changes with its parameter's
            ax.set_ylabel(f"probability density ({_per_unit(unit)})")
        ax.set_title(parameter.description)
        _plain_ticks(ax, 6)
        _fit_ticks(ax, 6)
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.03))
    names = [p.description.removesuffix(f" {p.symbol}") for p in parameters]  # "depth of centre z" -> "depth of centre"
    what = f"posterior marginals of the sphere's {_listing(names)} ({n_total} samples)"
    if len(what) > 90:  # four unknowns: the panels' titles say what the symbols are
        what = f"posterior marginals of {_listing(p.symbol for p in parameters)} ({n_total} samples)"
    figure.suptitle(_heading(title, what))
    figure.tight_layout(rect=(0, 0.23 / height, 1, 1))
    output.save_figure(figure, path)


def _mass_ridge(parameters):
    """(index of R, index of Δρ) when both are unknowns (the data see only Δρ R³), else None."""
    if forward.RADIUS in parameters and forward.DENSITY in parameters:
        return parameters.index(forward.RADIUS), parameters.index(forward.DENSITY)
    return None


def _draw_mass_curve(ax, radius_limits, mass_product, radius_on_x):
    """The curve Δρ R³ = ``mass_product`` (kg) across the panel: where the data put the R–Δρ ridge."""
    radius = np.linspace(*radius_limits, 400)
    radius = radius[radius > 0]
    density = mass_product / radius**3
    x, y = (radius, density) if radius_on_x else (density, radius)
    ax.plot(x, y, color=MASS_CURVE_COLOUR, lw=1.0, ls=(0, (5, 3)), zorder=1.5)


#: Half-width of the magnified window on the mass ridge, in standard deviations of R across the ridge.
RIDGE_INSET_SDS = 6.0


def _ridge_inset(ax, theta, exact, ridge, radius_on_x, mass_product, centre_density, truth_xy, radius_limits):
    """Magnify a short piece of the R–Δρ ridge, where the panel shows it as a line, so its thickness can be seen.

    ``exact``: (nodes_i, nodes_j, density) of the panel, or None; ``ridge``: (index of R, index of
    Δρ) in ``theta``; ``mass_product``: the Δρ R³ of the curve; ``centre_density``: the Δρ at the
    window's centre, on that curve. The ridge's thickness is the sd of R across it at that Δρ
    (exact where the density is given, else from the samples). The window spans ±
    ``RIDGE_INSET_SDS`` of it in R, and in Δρ what the ridge's slope dΔρ/dR = −3 Δρ / R crosses in
    that span, so the ridge runs corner to corner. Nothing is drawn when the ridge is wide enough
    to see without it.
    """
    radius_index, density_index = ridge
    centre_radius = float(np.cbrt(mass_product / centre_density)) if centre_density else math.nan
    across = math.nan
    if exact is not None:
        nodes_i, nodes_j, joint = exact
        radius_nodes, density_nodes, table = (nodes_i, nodes_j, joint) if radius_on_x else (nodes_j, nodes_i, np.transpose(joint))
        column = np.asarray(table, dtype=float)[:, int(np.argmin(np.abs(np.asarray(density_nodes) - centre_density)))]
        weights = np.where(np.isfinite(column), column, 0.0) * np.gradient(radius_nodes)
        if weights.sum() > 0:
            mean = np.sum(weights * radius_nodes) / weights.sum()
            across = math.sqrt(np.sum(weights * (radius_nodes - mean) ** 2) / weights.sum())
    elif len(theta) > 2:
        with np.errstate(invalid="ignore", divide="ignore"):
            offsets = theta[:, radius_index] - np.cbrt(mass_product / theta[:, density_index])
        across = float(np.std(offsets[np.isfinite(offsets)])) if np.isfinite(offsets).sum() > 2 else math.nan
    half_radius = RIDGE_INSET_SDS * across
    if not (np.isfinite(half_radius) and half_radius > 0 and np.isfinite(centre_radius) and centre_radius > 0):
        return
    if 2 * half_radius > 0.25 * (radius_limits[1] - radius_limits[0]):
        return  # the ridge is wide enough to see as it is
    half_density = 3.0 * abs(centre_density) * half_radius / centre_radius
    radius_window = (centre_radius - half_radius, centre_radius + half_radius)
    density_window = (centre_density - half_density, centre_density + half_density)
    # the ridge falls to the right for a positive contrast (top right is empty), rises for a negative one
    inset = ax.inset_axes([0.6, 0.4, 0.37, 0.46] if centre_density > 0 else [0.6, 0.08, 0.37, 0.46])
    radius, density = theta[:, radius_index], theta[:, density_index]
    inside = ((radius >= radius_window[0]) & (radius <= radius_window[1])
              & (density >= density_window[0]) & (density <= density_window[1]))
    points = np.flatnonzero(inside)[:MAX_SCATTER_POINTS]
    x, y = (radius, density) if radius_on_x else (density, radius)
    inset.scatter(x[points], y[points], s=5, color=SAMPLE_COLOUR, alpha=0.45, lw=0, rasterized=True)
    if exact is not None:
        _draw_exact_contours(inset, *exact)
    _draw_mass_curve(inset, radius_window, mass_product, radius_on_x)
    if truth_xy is not None:
        inset.plot(*truth_xy, marker="*", ms=11, color=TRUTH_COLOUR, mec="white", mew=0.8, ls="none")
    x_window, y_window = (radius_window, density_window) if radius_on_x else (density_window, radius_window)
    inset.set_xlim(*x_window)
    inset.set_ylim(*y_window)
    inset.tick_params(labelsize=7)
    _plain_ticks(inset, 3, 3)
    inset.set_title("magnified", fontsize=8, pad=2)
    x_text, align = (0.04, "left") if (centre_density > 0) == radius_on_x else (0.96, "right")  # the empty corner
    inset.text(x_text, 0.04, f"across the ridge\n{forward.RADIUS.symbol} ± {across:.2g} {forward.RADIUS.unit} (1 sd)",
               transform=inset.transAxes, ha=align, va="bottom", fontsize=7,
               bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1))
    ax.indicate_inset_zoom(inset, edgecolor="0.35")


def _excess_mass_text(mass_product):
    """(4/3) π Δρ R³ in kg, to three significant digits, with thousands separators."""
    mass = 4.0 / 3.0 * math.pi * mass_product
    if not np.isfinite(mass) or mass == 0:
        return f"{mass:g} kg"
    return f"{round(mass, 2 - math.floor(math.log10(abs(mass)))):,.0f} kg" if abs(mass) >= 100 else f"{mass:.3g} kg"


def _pair_panel(ax, theta, shown, n_total, i, j, reference, truth, limits, parameters):
    """One panel of :func:`plot_pairs`: parameters i (x) and j (y). Returns ``(drawn, mass_product)``:
    whether the exact contours could be drawn, and the Δρ R³ of the ridge's curve (None off the ridge)."""
    (low_i, high_i), (low_j, high_j) = limits[i], limits[j]
    ridge = _mass_ridge(parameters)
    mass_product = None
    drawn = True
    ax.scatter(shown[:, i], shown[:, j], s=3, color=SAMPLE_COLOUR, alpha=0.25, lw=0, rasterized=True)
    lines = []
    on_ridge = ridge is not None and {i, j} == set(ridge)
    if reference is not None:
        nodes_i, nodes_j, joint = reference.joint_marginal(i, j)
        if not _draw_exact_contours(ax, nodes_i, nodes_j, joint):
            drawn = False
            ax.plot(reference.mean[i], reference.mean[j], marker="P", ms=11, color=REFERENCE_COLOUR, mec="white",
                    mew=0.8, ls="none", zorder=3)
            lines.append("exact region narrower than its grid")
        lines.append(f"exact correlation   {reference.correlation[i, j]:+.2f}")
        if on_ridge:  # the exact posterior mean of Δρ R³
            grid_i, grid_j = np.meshgrid(nodes_i, nodes_j, indexing="ij")
            radius, density = (grid_i, grid_j) if i == ridge[0] else (grid_j, grid_i)
            mass = np.where(np.isfinite(joint), joint, 0.0) * _cell_areas(nodes_i, nodes_j)
            if mass.sum() > 0:
                mass_product = float(np.sum(mass * density * radius**3) / mass.sum())
    if on_ridge and mass_product is None and len(theta):
        mass_product = float(np.median(theta[:, ridge[1]] * theta[:, ridge[0]] ** 3))
    if on_ridge and mass_product is not None and np.isfinite(mass_product):
        _draw_mass_curve(ax, limits[ridge[0]], mass_product, radius_on_x=(i == ridge[0]))
        centre = reference.mean[ridge[1]] if reference is not None else float(np.median(theta[:, ridge[1]]))
        _ridge_inset(ax, theta, (nodes_i, nodes_j, joint) if reference is not None else None, ridge, i == ridge[0],
                     mass_product, centre, None if truth is None else (truth[i], truth[j]), limits[ridge[0]])
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
                family="monospace", bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"), zorder=4)
    ax.set_xlim(low_i, high_i)
    ax.set_ylim(low_j, high_j)
    ax.set_xlabel(parameters[i].label)
    ax.set_ylabel(parameters[j].label)
    ax.set_title(f"{parameters[i].symbol} – {parameters[j].symbol}" + ("  (the mass ridge)" if on_ridge else ""))
    _plain_ticks(ax, 6, 6)
    _fit_ticks(ax, 6)
    return drawn, mass_product


def plot_pairs(path, theta, reference=None, truth=None, title="", parameters=forward.SPHERE, bounds=None):
    """The 2-D joint posteriors of every pair of parameters: samples (scatter), exact 39.3 % and 86.5 % contours, truth.

    ``theta`` (n, dim), ``parameters``, ``bounds`` as for :func:`plot_marginals`. Three unknowns
    give one row of three panels (x0–z, x0–R, z–R); four give two rows of three, the last one
    R–Δρ: there the data fix only the mass, so the posterior is a thin curved ridge, drawn with a
    thin line of constant Δρ R³ (the posterior mean of it). Where an exact contour cannot be drawn
    (a posterior narrower than one cell of the reference's grid), the exact mean is marked
    instead and one warning names the pairs.
    """
    theta, n_total = _finite_rows(theta, parameters)
    dim = len(parameters)
    pairs = _pairs(dim)
    limits = _all_view_limits(theta, reference, truth, bounds)
    rng = np.random.default_rng(0)  # which points are drawn only; never the global generator
    shown = theta if len(theta) <= MAX_SCATTER_POINTS else theta[rng.choice(len(theta), MAX_SCATTER_POINTS, replace=False)]
    n_columns = min(3, len(pairs))
    n_rows = math.ceil(len(pairs) / n_columns)
    figure, axes = plt.subplots(n_rows, n_columns, figsize=(14, 4.0 * n_rows + 0.8), squeeze=False)
    ridge = _mass_ridge(parameters)
    mass_product = None
    not_drawn = []
    for ax, (i, j) in zip(axes.ravel(), pairs):
        drawn, product = _pair_panel(ax, theta, shown, n_total, i, j, reference, truth, limits, parameters)
        if not drawn:
            not_drawn.append(f"{parameters[i].symbol}–{parameters[j].symbol}")
        mass_product = product if product is not None else mass_product
    for ax in axes.ravel()[len(pairs):]:
        ax.set_visible(False)
    if not_drawn:
        warnings.warn(f"exact contour not drawn for {', '.join(not_drawn)}: posterior narrower than the reference's grid "
                      "(its exact mean is marked instead)", stacklevel=2)
    handles = [Line2D([], [], marker="o", ls="none", color=SAMPLE_COLOUR, alpha=0.5, label=f"samples ({len(shown)} of {n_total} drawn)")]
    if reference is not None:
        handles += [
            Line2D([], [], color=REFERENCE_COLOUR, lw=1.8, label=f"exact posterior, {100 * ONE_SIGMA_MASS:.1f} % (1σ) region"),
            Line2D([], [], color=REFERENCE_COLOUR, lw=1.0, ls="--", label=f"exact posterior, {100 * TWO_SIGMA_MASS:.1f} % (2σ) region"),
        ]
        if not_drawn:
            handles.append(Line2D([], [], marker="P", ms=10, ls="none", color=REFERENCE_COLOUR, label="exact posterior mean"))
    if ridge is not None and mass_product is not None and np.isfinite(mass_product):
        source = "exact posterior mean" if reference is not None else "median of the samples"
        handles.append(Line2D([], [], color=MASS_CURVE_COLOUR, lw=1.0, ls=(0, (5, 3)),
                              label=f"equal excess mass (4/3)πΔρR³ = {_excess_mass_text(mass_product)} ({source})"))
    if truth is not None:
        handles.append(Line2D([], [], marker="*", ms=11, ls="none", color=TRUTH_COLOUR, label="true value"))
    legend_rows = 1 if len(handles) <= 4 else 2
    figure.legend(handles=handles, loc="lower center", ncol=math.ceil(len(handles) / legend_rows), frameon=False,
                  bbox_to_anchor=(0.5, -0.03))
    if ridge is not None:
        what = "joint posteriors of pairs of parameters (radius and density contrast trade off along a ridge of equal mass)"
    else:
        what = "joint posteriors of pairs of parameters (depth and radius trade off through the mass)"
    figure.suptitle(_heading(title, what))
    legend_height = 0.24 + 0.3 * (legend_rows - 1)  # inches
    figure.tight_layout(rect=(0, legend_height / figure.get_figheight(), 1, 1))
    output.save_figure(figure, path)


@dataclass(frozen=True)
class PredictiveBands:
    """The bands of the predictive check, at the stations sorted by position (all in µGal but ``stations``, m).

    ``signal_low``/``signal_high``: the central ``BAND_MASS`` credible band of the predicted signal
    g(theta) — the parameters' uncertainty only; ``predictive_low``/``predictive_high``: that of
    new data, g(theta) + noise. ``mean``: the posterior mean prediction; ``n_draws``: parameter
    sets used.
    """

    stations: np.ndarray
    mean: np.ndarray
    signal_low: np.ndarray
    signal_high: np.ndarray
    predictive_low: np.ndarray
    predictive_high: np.ndarray
    noise_sd: np.ndarray
    n_draws: int


def predictive_bands(problem, theta, rng, n_draws=2000):
    """The signal and posterior predictive bands of ``problem`` for samples ``theta`` (n, problem.dim).

    ``n_draws`` parameter sets are drawn from ``theta`` without replacement (with ``rng``). The
    signal band is the 5–95 % range of their predictions; the predictive band that of their
    predictions plus Gaussian noise of the data's sd, with several noise draws per parameter set
    (about 4000 values per station) so that its edges are not ragged with sampling noise.
    """
    theta, _ = _finite_rows(theta, problem.parameters)
    if len(theta) == 0:
        raise ValueError("the predictive check needs at least one finite parameter set")
    order = np.argsort(problem.stations)
    noise_sd = problem.noise_sd_array[order]
    draws = theta[rng.choice(len(theta), size=min(n_draws, len(theta)), replace=False)]
    predictions = problem.predict(draws)[:, order]
    tails = [50.0 * (1.0 - BAND_MASS), 50.0 * (1.0 + BAND_MASS)]
    signal_low, signal_high = np.percentile(predictions, tails, axis=0)
    replicates = max(1, math.ceil(4000 / len(draws)))
    noisy = np.concatenate([predictions + rng.normal(size=predictions.shape) * noise_sd for _ in range(replicates)])
    predictive_low, predictive_high = np.percentile(noisy, tails, axis=0)
    return PredictiveBands(
        stations=np.asarray(problem.stations, dtype=float)[order],
        mean=predictions.mean(axis=0),
        signal_low=signal_low,
        signal_high=signal_high,
        predictive_low=predictive_low,
        predictive_high=predictive_high,
        noise_sd=noise_sd,
        n_draws=len(draws),
    )


def _microgal(value):
    """A value in µGal to a thousandth of a µGal, or to three significant digits when smaller."""
    return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.3g}"


def plot_predictive_check(path, problem, theta, rng, title="", n_draws=2000):
    """Data, true signal, posterior mean prediction, and two 90 % bands; residuals; the signal band magnified.

    ``theta``: (n, problem.dim) samples. The *predictive* band (signal + noise, where new data
    would fall) is almost all noise when the data are many and precise; the *signal* band (the
    parameters' uncertainty only) is then far narrower than the noise, so the bottom panel shows it
    magnified, minus the posterior mean, with the true signal where it is known: a geophysicist
    sees at a glance how well the data pin the anomaly down. See :func:`predictive_bands`.
    """
    bands = predictive_bands(problem, theta, rng, n_draws)
    order = np.argsort(problem.stations)
    x = bands.stations
    observed = np.asarray(problem.g_obs, dtype=float)[order]
    truth_signal = None if problem.truth is None else problem.predict(np.asarray(problem.truth, dtype=float))[order]
    residual = observed - bands.mean
    rms = float(np.sqrt(np.mean(residual**2)))
    noise_rms = float(np.sqrt(np.mean(bands.noise_sd**2)))
    covered = float(np.mean((observed >= bands.predictive_low) & (observed <= bands.predictive_high)))
    percent = f"{100 * BAND_MASS:.0f} %"
    signal_width = float(np.max(bands.signal_high - bands.signal_low))

    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9.6), sharex=True,
                                                 gridspec_kw=dict(height_ratios=(3, 1.4, 1.6)))
    top.fill_between(x, bands.predictive_low, bands.predictive_high, color=SAMPLE_COLOUR, alpha=0.25, lw=0,
                     label=f"{percent} predictive band: signal + noise (holds {100 * covered:.0f} % of the data)")
    top.fill_between(x, bands.signal_low, bands.signal_high, color=SIGNAL_COLOUR, alpha=0.8, lw=0,
                     label=f"{percent} credible band of the signal: parameters only (magnified below)")
    top.plot(x, observed, ".", ms=2.5, color="0.45", alpha=0.6, label="observed data")
    top.plot(x, bands.mean, color=REFERENCE_COLOUR, lw=1.6, label=f"posterior mean prediction ({bands.n_draws} draws)")
    if truth_signal is not None:
        top.plot(x, truth_signal, color=TRUTH_COLOUR, ls="--", lw=1.3, label="true signal")
    top.set_ylabel("gravity anomaly (µGal)")
    top.legend(loc="upper left", fontsize=9)
    _plain_ticks(top, 9)

    middle.plot(x, residual, ".", ms=2.5, color="0.35", alpha=0.6, label="data − posterior mean")
    middle.axhline(0.0, color=REFERENCE_COLOUR, lw=0.8)
    middle.plot(x, bands.noise_sd, color=TRUTH_COLOUR, lw=1.0, label="± noise sd")
    middle.plot(x, -bands.noise_sd, color=TRUTH_COLOUR, lw=1.0)
    middle.set_ylabel("residual (µGal)")
    middle.text(0.01, 0.95, f"RMS residual {_microgal(rms)} µGal, noise sd {_microgal(noise_rms)} µGal",
                transform=middle.transAxes, va="top", fontsize=9, bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))
    middle.legend(loc="upper right", fontsize=9, ncol=2)
    _plain_ticks(middle, 9, 5)

    bottom.fill_between(x, bands.signal_low - bands.mean, bands.signal_high - bands.mean, color=SIGNAL_COLOUR, alpha=0.8,
                        lw=0, label=f"{percent} credible band of the signal − posterior mean")
    bottom.axhline(0.0, color=REFERENCE_COLOUR, lw=0.8)
    extent = np.abs(np.concatenate([bands.signal_low - bands.mean, bands.signal_high - bands.mean]))
    if truth_signal is not None:
        bottom.plot(x, truth_signal - bands.mean, color=TRUTH_COLOUR, ls="--", lw=1.3, label="true signal − posterior mean")
        extent = np.concatenate([extent, np.abs(truth_signal - bands.mean)])
    half = float(np.max(extent)) if extent.size and np.isfinite(extent).all() else 0.0
    half = half if half > 0 else max(0.01 * noise_rms, 1e-12)
    bottom.set_ylim(-1.3 * half, 1.3 * half)
    bottom.set_ylabel("signal − mean (µGal)")
    predictive_width = float(np.max(bands.predictive_high - bands.predictive_low))
    if signal_width > 0:
        widths = (f"signal band at most {signal_width:.2g} µGal wide, predictive band {predictive_width:.2g} µGal "
                  f"({predictive_width / signal_width:.0f} × wider)")
    else:
        widths = "signal band of zero width (every draw the same parameters)"
    bottom.text(0.01, 0.95, widths, transform=bottom.transAxes, va="top", fontsize=9,
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))
    bottom.legend(loc="upper right", fontsize=9)
    bottom.set_title("how well the data determine the signal (magnified)", fontsize=10)
    bottom.set_xlabel("station position x (m)")
    bottom.set_xlim(x[0], x[-1])
    _plain_ticks(bottom, 9, 5)
    figure.suptitle(_heading(title, "posterior predictive check of the gravity profile"))
    figure.tight_layout()
    output.save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# Markov chain figures


def plot_trace(path, chains, burn_in=0, title="", parameters=forward.SPHERE):
    """Trace of each parameter against iteration, every chain in its own colour.

    ``chains``: the full run (n_steps, n_chains, dim), burn-in included, columns in the order of
    ``parameters``; ``burn_in``: how many initial steps are discarded. With a burn-in, a second
    column zooms on the kept steps, since the walk in from the start would otherwise squash them
    flat. At most ``MAX_LINE_POINTS`` points per chain are drawn (regular thinning).
    """
    chains = diagnostics.as_chains(chains)
    n_steps, n_chains, dim = chains.shape
    _check_dim(dim, parameters, "chains")
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
        label = parameters[d].label
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


def plot_autocorrelation(path, chains, title="", tau=None, parameters=forward.SPHERE):
    """Autocorrelation function of each parameter (averaged over chains), with tau and the ESS.

    ``chains``: the kept steps (n_steps, n_chains, dim), columns in the order of ``parameters``;
    ``tau``: ``(tau, reliable)`` from :func:`diagnostics.integrated_time` if the caller has it already. Lags are shown up to 5 times
    the largest integrated autocorrelation time (at least 20, at most the chain length).
    """
    chains = diagnostics.as_chains(chains)
    n_steps, n_chains, dim = chains.shape
    _check_dim(dim, parameters, "chains")
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
        ax.set_title(parameters[d].symbol)
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


def plot_misfit(path, rms_history, noise_sd, burn_in=0, title="", noise_weighted=False):
    """Data misfit of the chain's current state per iteration, against the misfit of a fit to the noise.

    ``rms_history``: (n_steps, n_chains) or (n_steps,), the full run including burn-in, one of

    - ``noise_weighted=False``: the RMS misfit sqrt(mean(r²)) in µGal, r = data − prediction. A fit
      to the noise sits at the RMS of ``noise_sd`` (a float, or an array per station).
    - ``noise_weighted=True``: the noise-weighted RMS misfit sqrt(mean((r/σ)²)) = sqrt(χ²/n),
      dimensionless, as the log-likelihood gives it. A fit to the noise sits at 1. With one σ at
      every station (``noise_sd`` a float, or an array of equal values) it is drawn in µGal
      (times σ), exactly as the first; with σ per station it is drawn in units of σ, since no
      single µGal value stands for it.

    ``burn_in``: initial steps discarded. The whole run has a log scale when the misfit spans more
    than a decade; with a burn-in a second panel zooms on the kept steps, where the misfit should
    hover just below the noise level.
    """
    history = np.asarray(rms_history, dtype=float)
    if history.ndim == 1:
        history = history[:, None]
    n_steps, n_chains = history.shape
    sigma = np.asarray(noise_sd, dtype=float).ravel()
    one_sigma = bool(sigma.size) and np.all(sigma == sigma[0])
    in_sigma_units = noise_weighted and not one_sigma
    if in_sigma_units:
        noise_level, unit = 1.0, "σ"
        quantity = "noise-weighted RMS misfit"
        axis_label = "noise-weighted RMS misfit √(mean((r/σ)²))\n(in units of σ)"
        level_label = "fit to the noise (residuals of one σ at each station)"
        what = "noise-weighted RMS data misfit of the Markov chain (σ per station), against the noise"
    else:
        if noise_weighted:  # one sigma: sqrt(mean((r/σ)²)) σ is the RMS misfit in µGal
            history = history * sigma[0]
        noise_level, unit = float(np.sqrt(np.mean(sigma**2))), "µGal"
        quantity = "RMS misfit"
        axis_label = "RMS misfit (µGal)"
        level_label = (f"noise level ({noise_level:.3g} µGal)" if one_sigma or not sigma.size
                       else f"noise level: RMS of the per-station σ ({noise_level:.3g} µGal)")
        what = "RMS data misfit of the Markov chain, against the noise level"
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
    whole.axhline(noise_level, color=REFERENCE_COLOUR, ls="--", lw=1.2, label=level_label)
    if spans_decades:
        _plain_log_axis(whole, positive)
        _plain_log_axis(whole, [1, n_steps], axis="x")
        whole.set_xlabel("iteration (log scale)")
    else:
        _plain_ticks(whole, 6, integer_x=True)
        whole.set_xlabel("iteration" + _thinning_note(_thinned_steps(n_steps)[1]))
    whole.set_xlim(1, max(n_steps, 2))
    whole.set_ylabel(axis_label)
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
        zoom.set_ylabel(axis_label)
        zoom.set_title(f"kept steps: median {quantity} {final:.4g} {unit}")
        _plain_ticks(zoom, 6, 6, integer_x=True)
    else:
        whole.set_title(f"median {quantity} {final:.4g} {unit}")
    handles, labels = whole.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.02))
    figure.suptitle(_heading(title, what))
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    output.save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# variational training figure


def plot_elbo(path, elbo_history, log_evidence=None, title="", final_kl=None, anneal_end=0):
    """ELBO per training iteration (raw and running mean), and KL(q||p) = log Z - ELBO when log Z is known.

    ``elbo_history``: (n_iterations,) Monte Carlo ELBO estimates in nats; ``log_evidence``: the
    exact log Z (:attr:`reference.Reference.log_evidence`) or None. The ELBO axis is zoomed on the
    iterations after the first 10 %: the first ones (from a poor start) can be orders of magnitude
    lower and are left off scale, as the panel says. The KL panel shows the running mean on a log
    scale clipped at 1e-3 nats (Monte Carlo noise can make the estimate dip below zero).
    ``final_kl``: (kl, n_samples) from the evaluation after training, quoted instead of the
    (noisier) mean of the last training iterations. ``anneal_end``: the iteration at which an
    annealed likelihood reached beta = 1; the annealing phase is shaded, and the ELBO axis zooms on
    the iterations after it. The ELBO drawn is always the untempered one (beta = 1), so the KL
    curve is the true KL(q||p) of the current q throughout; the final KL is quoted at beta = 1.
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
    annealed = 0 < anneal_end < n
    for ax in axes[:, 0]:
        if annealed:
            ax.axvspan(1, anneal_end, color="0.88", zorder=0,
                       label=f"annealing: loss tempers the likelihood (β < 1) until iteration {anneal_end}" if ax is top else None)
    late = slice(max(n // 10, anneal_end if annealed else 0), None)
    finite_late = elbo[late][np.isfinite(elbo[late])]
    if finite_late.size:
        low, high = np.quantile(finite_late, [0.005, 0.995])
        if log_evidence is not None:
            high = max(high, log_evidence)
        span = max(high - low, 1e-6 * max(abs(high), 1.0))
        low, high = low - 0.08 * span, high + 0.08 * span
        top.set_ylim(low, high)
        if np.nanmin(elbo) < low:
            top.text(0.99, 0.5, "earlier iterations below the view" if annealed else "first iterations below the view", transform=top.transAxes, ha="right", fontsize=9, color="0.3")
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


def plot_marginals_grid(path, rows, truth=None, title="", error_goal=None, parameters=forward.SPHERE, bounds=None):
    """Small multiples: one row per run, one column per parameter, the run's samples over the exact marginal.

    ``rows``: a list of ``(label, theta, reference)``, where ``label`` names the run (a method, or
    "iterations = 2000"), ``theta`` is its (n, dim) samples, columns in the order of
    ``parameters``, and ``reference`` its :class:`reference.Reference` (or None). ``bounds``: the
    (dim, 2) prior box shared by the rows, or None; no axis reaches beyond it. When every row has
    the same reference object, each column shares one x axis, zoomed to the exact posterior
    (mean ± ``VIEW_SDS`` sd, see :func:`_reference_view`), so the rows
    can be compared by eye; otherwise (a sweep over the data, the noise or the prior) each panel
    zooms to its own posterior. Samples outside the view are counted on the panel. Each panel
    states W1/sd against its reference, in red when it exceeds ``error_goal``.
    """
    shared = all(row[2] is rows[0][2] for row in rows) and rows[0][2] is not None
    n_rows = len(rows)
    dim = len(parameters)
    figure, axes = plt.subplots(n_rows, dim, figsize=(13 * dim / 3, 1.35 * n_rows + 1.4), squeeze=False,
                                sharex="col" if shared else False)
    for r, (label, theta, reference) in enumerate(rows):
        theta, n_total = _finite_rows(theta, parameters)
        scores = _scores(theta, reference) if reference is not None and len(theta) else None
        for i, parameter in enumerate(parameters):
            ax = axes[r, i]
            truth_i = None if truth is None else truth[i]
            bounds_i = None if bounds is None else bounds[i]
            if reference is not None:  # the posterior's view, never widened by samples that missed it
                low, high = _view_limits(np.empty(0), reference, i, truth_i, bounds_i)
            else:
                low, high = _view_limits(theta[:, i], None, i, truth_i, bounds_i)
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
                notes.append(f"samples {_fixed(values.mean(), digits)} ± {_fixed(values.std(), digits)} {parameter.unit}")
            if not n_total:
                notes.append("no samples")
            ax.text(0.98, 0.93, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=8.5,
                    color=colour, bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
            ax.set_xlim(low, high)
            ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)
            ax.set_yticks([])
            _plain_ticks(ax, 6)
            _fit_ticks(ax, 6)
            if r == 0:
                ax.set_title(f"{parameter.description} ({parameter.unit})", fontsize=10)
            if r == n_rows - 1 or not shared:
                ax.set_xlabel(parameter.label if r == n_rows - 1 else "")
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


def plot_convergence(path, runs, level=None, title=""):
    """How each method's error falls as it runs: error against seconds and against likelihood evaluations, log–log.

    ``runs``: a list of dicts with ``label`` and ``points``, the checkpoints of :mod:`convergence`
    (dicts with ``seconds``, ``evaluations``, ``error`` and optionally ``stage``: "training" /
    "sampling" for the checkpoints along the run, "trained" for a flow's final draws, "refined" for
    them after refinement). One line per method through its checkpoints; a flow's final and refined
    results are marked (circle, star). ``level``: the error goal, drawn dashed, with each method's
    cost to reach it (the first checkpoint after which the error stays below) marked by a vertical tick.
    """
    from gravity_flows.scoring import convergence

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(1, 2, figsize=(14, 5.4), sharey=True)
    errors, costs = [], {"seconds": [], "evaluations": []}
    handles = []
    for k, run in enumerate(runs):
        colour = cycle[k % len(cycle)]
        points = [p for p in run["points"] if p.get("error") is not None and math.isfinite(p["error"]) and p["seconds"] > 0]
        if not points:
            continue
        handles.append(Line2D([], [], color=colour, lw=1.8, marker="o", ms=4, label=run["label"]))
        along = [p for p in points if p.get("stage") not in ("trained", "refined")]
        reached = convergence.cost_to_reach(points, level) if level is not None else (None, None)
        for ax, key, cost in ((axes[0], "seconds", reached[0]), (axes[1], "evaluations", reached[1])):
            ax.plot([p[key] for p in along], [p["error"] for p in along], color=colour, lw=1.6, marker="o", ms=3.5)
            for stage, marker, size in (("trained", "o", 8), ("refined", "*", 13)):
                final = [p for p in points if p.get("stage") == stage]
                if final:
                    ax.plot([final[-1][key]], [final[-1]["error"]], marker=marker, ms=size, color=colour, mec="black",
                            mew=0.7, ls="none")
            if cost is not None:
                ax.axvline(cost, color=colour, lw=1.0, ls=":", alpha=0.9)
            costs[key] += [p[key] for p in points]
        errors += [p["error"] for p in points]
    if not errors:
        for ax in axes:
            ax.text(0.5, 0.5, "no checkpoints recorded (run with --checkpoints N)", transform=ax.transAxes,
                    ha="center", color="0.4")
    else:
        shown = errors + ([level] if level is not None else [])
        for ax, key in ((axes[0], "seconds"), (axes[1], "evaluations")):
            _plain_log_axis(ax, costs[key], axis="x")
            ax.set_xlim(min(costs[key]) / 1.5, max(costs[key]) * 1.5)
            if level is not None:
                ax.axhline(level, color=TRUTH_COLOUR, ls="--", lw=1.2)
            ax.grid(True, which="both", color="0.9", lw=0.6)
        _plain_log_axis(axes[0], shown)
        axes[0].set_ylim(max(min(shown) / 1.5, 1e-3), max(shown) * 1.5)
    axes[0].set_xlabel("seconds of the method's own work (training or sampling; scoring not counted)")
    axes[1].set_xlabel("likelihood evaluations (one per parameter set; independent of the machine)")
    axes[0].set_ylabel("error: largest W1 / posterior sd (log scale)")
    axes[0].set_title("error against wall-clock time")
    axes[1].set_title("error against likelihood evaluations")
    extra = [Line2D([], [], marker="o", ms=7, ls="none", color="0.6", mec="black", label="flow: final draws"),
             Line2D([], [], marker="*", ms=11, ls="none", color="0.6", mec="black", label="flow: refined draws")]
    if level is not None:
        extra += [Line2D([], [], color=TRUTH_COLOUR, ls="--", label=f"goal: error {level:g}"),
                  Line2D([], [], color="0.4", ls=":", label="cost to stay below the goal")]
    handles += extra
    ncol = min(len(handles), 5)
    figure.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, fontsize=9)
    figure.suptitle(_heading(title, "accuracy against cost as each method runs (lower left is better)"))
    figure.tight_layout(rect=(0, 0.05 + 0.045 * math.ceil(len(handles) / ncol), 1, 1))
    output.save_figure(figure, path)


def plot_pair_grid(path, rows, truth=None, title="", parameters=forward.SPHERE, bounds=None):
    """Small multiples of one pair of parameters, one panel per run: the R–Δρ ridge when the density
    is unknown, else z–R (the depth–radius trade-off). ``rows``: ``(label, theta, reference)`` as for
    :func:`plot_marginals_grid`; every panel has the same axes (those of the first row's reference)."""
    ridge = _mass_ridge(parameters)
    i, j = ridge if ridge is not None else (parameters.index(forward.DEPTH), parameters.index(forward.RADIUS))
    n_columns = min(4, len(rows))
    n_rows = math.ceil(len(rows) / n_columns)
    figure, axes = plt.subplots(n_rows, n_columns, figsize=(4.3 * n_columns, 3.9 * n_rows + 0.9), squeeze=False)
    rng = np.random.default_rng(0)
    first_reference = rows[0][2]
    limits = _all_view_limits(np.empty((0, len(parameters))), first_reference, truth, bounds) if first_reference is not None else None
    not_drawn = []
    for ax, (label, theta, reference) in zip(axes.ravel(), rows):
        theta, n_total = _finite_rows(theta, parameters)
        shown = theta if len(theta) <= MAX_SCATTER_POINTS else theta[rng.choice(len(theta), MAX_SCATTER_POINTS, replace=False)]
        drawn, _ = _pair_panel(ax, theta, shown, n_total, i, j, reference, truth,
                               limits or _all_view_limits(theta, reference, truth, bounds), parameters)
        if not drawn:
            not_drawn.append(label.splitlines()[0])
        ax.set_title(label, fontsize=10)
    for ax in axes.ravel()[len(rows):]:
        ax.set_visible(False)
    if not_drawn:
        warnings.warn(f"exact contour not drawn for {', '.join(not_drawn)}: posterior narrower than the reference's grid",
                      stacklevel=2)
    handles = [Line2D([], [], marker="o", ls="none", color=SAMPLE_COLOUR, alpha=0.5, label="samples"),
               Line2D([], [], color=REFERENCE_COLOUR, lw=1.8, label=f"exact posterior, {100 * ONE_SIGMA_MASS:.1f} % region"),
               Line2D([], [], color=REFERENCE_COLOUR, lw=1.0, ls="--", label=f"exact posterior, {100 * TWO_SIGMA_MASS:.1f} % region")]
    if truth is not None:
        handles.append(Line2D([], [], marker="*", ms=11, ls="none", color=TRUTH_COLOUR, label="true value"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    what = (f"the {parameters[i].symbol}–{parameters[j].symbol} joint posterior of every method"
            + (" (the mass ridge)" if ridge is not None else ""))
    figure.suptitle(_heading(title, what))
    figure.tight_layout(rect=(0, 0.5 / figure.get_figheight(), 1, 1))
    output.save_figure(figure, path)
