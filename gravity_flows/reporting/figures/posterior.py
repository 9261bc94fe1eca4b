"""The posterior figures of every run: a histogram per parameter over the exact marginal, and the pairs.

With the density contrast unknown the R–Δρ panel shows the equal-mass ridge against its exact
density, with a magnified inset across the ridge.
"""

import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

import forward
from gravity_flows.reporting import output
from gravity_flows.reporting.figures.style import (MASS_CURVE_COLOUR, MAX_SCATTER_POINTS, REFERENCE_COLOUR,
    SAMPLE_COLOUR, TRUTH_COLOUR, _all_view_limits, _cell_areas, _decimals, _draw_exact_contours, _fit_ticks,
    _fixed, _heading, _listing, _padded_marginal, _pairs, _per_unit, _plain_ticks, _scores)
from gravity_flows.scoring.predictive import ONE_SIGMA_MASS, TWO_SIGMA_MASS, finite_rows


def plot_marginals(path, theta, reference=None, truth=None, title="", scores=None, parameters=forward.SPHERE, bounds=None):
    """Histogram of each parameter's samples, the exact marginal density over it, and the true value.

    ``theta``: (n, dim) samples, columns in the order of ``parameters`` (tuple of
    :class:`forward.Parameter`, default :data:`forward.SPHERE`: x0, z, R in m); ``reference``:
    :class:`reference.Reference` or None; ``truth``: the true values or None; ``bounds``: the
    (dim, 2) prior box or None (no axis reaches beyond it). Each panel states the samples'
    mean ± sd, the exact one, and W1/sd against the reference (``scores``: those of
    :func:`reference.score`, if the caller has them already), in the parameter's unit.
    """
    theta, n_total = finite_rows(theta, parameters)
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
    theta, n_total = finite_rows(theta, parameters)
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
