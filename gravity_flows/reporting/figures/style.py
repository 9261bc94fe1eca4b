"""What every figure shares: colours, headings, plain ticks, and the view limits that zoom each axis to the posterior.

The posterior of the default problem is about a hundred times narrower than the prior box, so
every parameter axis is zoomed to the posterior: the exact reference's mean ± ``VIEW_SDS`` sd
(cut to where its marginal density is not negligible, which matters for a skewed or bounded
marginal such as R along the mass ridge), widened to hold the central 99 % (0.5–99.5 %
quantiles) of the samples, and never beyond the prior box when ``bounds`` are given. Samples
outside the view are counted on the figure, never silently dropped, so a run that missed the
posterior still gives a readable figure that says so. Offset tick labels ("+2.97") are switched
off everywhere.
"""

import math

import numpy as np
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from gravity_flows.scoring.predictive import credible_levels
from gravity_flows.scoring.reference import score


#: Half-width of the parameter view in reference standard deviations.
VIEW_SDS = 5.0
#: The view holds the reference marginal where its density exceeds this fraction of its peak
#: (a Gaussian's density falls to it at ± 5.3 sd, just outside ± VIEW_SDS sd).
VIEW_DENSITY_FLOOR = 1e-6
#: Central fraction of the samples the view is widened to hold.
SAMPLE_QUANTILES = (0.005, 0.995)
#: Points drawn per chain in trace and misfit plots, and per panel in scatter plots.
MAX_LINE_POINTS = 5000
MAX_SCATTER_POINTS = 3000
SAMPLE_COLOUR = "tab:blue"
REFERENCE_COLOUR = "black"
TRUTH_COLOUR = "tab:red"
SIGNAL_COLOUR = "tab:orange"
MASS_CURVE_COLOUR = "tab:orange"


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


def _scores(theta, reference):
    """W1/sd per parameter against the reference (:func:`reference.score`)."""
    return score(theta, reference)["w1_over_sd"]
