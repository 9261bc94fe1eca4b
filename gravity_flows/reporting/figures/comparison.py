"""The comparison's figures: every method's marginals and pairs over the exact reference, cost against accuracy, convergence."""

import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

import forward
from gravity_flows.reporting import output
from gravity_flows.reporting.figures.posterior import _mass_ridge, _pair_panel
from gravity_flows.reporting.figures.style import (MAX_SCATTER_POINTS, REFERENCE_COLOUR, SAMPLE_COLOUR,
    TRUTH_COLOUR, _all_view_limits, _decimals, _fit_ticks, _fixed, _heading, _padded_marginal,
    _plain_log_axis, _plain_ticks, _scores, _view_limits)
from gravity_flows.scoring.predictive import ONE_SIGMA_MASS, TWO_SIGMA_MASS, finite_rows


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
        theta, n_total = finite_rows(theta, parameters)
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
        theta, n_total = finite_rows(theta, parameters)
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


#: The survey sizes of the cost figure: 1 to 10 000 profiles.
SURVEY_PROFILES = (1, 10_000)
MCMC_COLOUR = "black"


def _seconds(value):
    """Seconds with three significant digits, never in scientific notation: 0.0123 s, 1.23 s, 1234 s."""
    return f"{value:.0f} s" if value >= 100 else f"{value:.3g} s"


def plot_cost_vs_survey(path, flows, mcmc, error_goal=None, title=""):
    """When an amortized flow takes MCMC's place: total time against the number of profiles, and the errors.

    ``flows``: dicts with ``label``, ``train_time_s``, ``posterior_time_s`` (per profile, median),
    ``break_even`` (profiles, or None: never) and ``errors`` (the corrected error of every test
    profile); ``mcmc``: a dict with ``time_s`` (per profile, to error ``error_goal``, its setup
    included; None if it never reached it) and ``errors`` (its final error on each profile it ran).

    Left: total seconds for n profiles, log–log over :data:`SURVEY_PROFILES`: a flow trains once and
    applies its model n times, train + n posterior; MCMC runs n times, n mcmc. A flow's line crosses
    MCMC's at its break-even, marked (its number is in the legend). Right: the test-set errors of every flow (and of
    MCMC on its profiles), one column each: a box (quartiles, median) over the points, log scale,
    the goal dashed.
    """
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xhp<>"
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.8), gridspec_kw={"width_ratios": (1.15, 1)})
    n = np.geomspace(*SURVEY_PROFILES, 200)
    shown = []
    for k, flow in enumerate(flows):
        colour = cycle[k % len(cycle)]
        train, per_profile = flow.get("train_time_s"), flow.get("posterior_time_s")
        if train is None or per_profile is None:
            continue
        total = train + n * per_profile
        crossing = flow.get("break_even")
        # the break-even in the legend: the crossings of the faster flows lie close together, their numbers would overlap
        even = "never cheaper" if crossing is None else f"cheaper from {crossing:d} profiles"
        left.plot(n, total, color=colour, lw=1.8, label=f"{flow['label']}: {_seconds(train)} training + "
                                                        f"{_seconds(per_profile)} per profile; {even}")
        shown += [total.min(), total.max()]
        if crossing is not None and crossing <= SURVEY_PROFILES[1]:
            at = train + crossing * per_profile
            left.plot(crossing, at, marker=markers[k % len(markers)], ms=10, color=colour, mec="black", mew=0.8, ls="none")
    if mcmc.get("time_s") is not None:
        total = n * mcmc["time_s"]
        left.plot(n, total, color=MCMC_COLOUR, lw=2.4, ls="--",
                  label=f"MCMC on every profile: {_seconds(mcmc['time_s'])} per profile")
        shown += [total.min(), total.max()]
    else:
        left.text(0.97, 0.04, f"MCMC did not reach error {error_goal:g}: no break-even", transform=left.transAxes,
                  ha="right", color="0.3")
    left.plot([], [], marker="o", ls="none", color="0.5", mec="black", label="break-even: profiles from which the flow is cheaper")
    left.set_xscale("log")
    _plain_log_axis(left, n, axis="x")
    if shown:
        _plain_log_axis(left, shown)
    left.set_xlim(*SURVEY_PROFILES)
    left.set_xlabel("number of profiles in the survey (log scale)")
    left.set_ylabel("total computing time (s, log scale)")
    left.set_title(f"total time for a survey: train once and apply, or MCMC per profile\n"
                   f"(MCMC: its time to error {error_goal:g}, setup included)", fontsize=10.5)
    left.grid(True, which="both", color="0.9", lw=0.6)
    left.legend(loc="lower right", fontsize=8.5, framealpha=0.9)  # below the lines, which rise to the upper right

    columns = [(flow["label"], flow.get("errors") or [], cycle[k % len(cycle)]) for k, flow in enumerate(flows)]
    columns.append(("MCMC", mcmc.get("errors") or [], MCMC_COLOUR))
    rng = np.random.default_rng(0)  # the jitter only
    values = []
    for k, (label, errors, colour) in enumerate(columns):
        errors = np.asarray(errors, dtype=float)
        errors = errors[np.isfinite(errors) & (errors > 0)]
        if errors.size == 0:
            continue
        right.scatter(k + rng.uniform(-0.18, 0.18, errors.size), errors, s=14, color=colour, alpha=0.7, lw=0, zorder=3)
        right.boxplot([errors], positions=[k], widths=0.55, showfliers=False, zorder=2,
                      medianprops={"color": "black", "lw": 1.6}, boxprops={"color": "0.35"},
                      whiskerprops={"color": "0.35"}, capprops={"color": "0.35"})
        values += errors.tolist()
    if error_goal is not None:
        right.axhline(error_goal, color=TRUTH_COLOUR, ls="--", lw=1.1, label=f"goal: error ≤ {error_goal:g}")
        right.legend(loc="upper right", fontsize=9)
        values.append(error_goal)
    if values:
        _plain_log_axis(right, values)
        right.set_ylim(min(values) / 2.0, max(values) * 2.0)
    right.set_xticks(range(len(columns)))
    right.set_xticklabels([label for label, _, _ in columns], rotation=25, ha="right", fontsize=9)
    right.set_xlim(-0.6, len(columns) - 0.4)
    right.set_ylabel("error against the exact posterior: largest W1 / sd (log scale)")
    right.set_title("accuracy on the held-out test profiles, one point per profile\n"
                    "(flows: importance-corrected draws; MCMC: its final draws, on its profiles)", fontsize=10.5)
    right.grid(True, axis="y", which="both", color="0.9", lw=0.6)
    figure.suptitle(_heading(title, "when does an amortized flow take MCMC's place?"))
    figure.tight_layout()
    output.save_figure(figure, path)
