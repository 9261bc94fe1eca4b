"""The Markov chain figures: traces, autocorrelation, and the noise-weighted misfit along the run.

Chains are passed as arrays shaped (n_steps, n_chains, dim) (or (n_steps, dim) for one chain);
:func:`plot_trace` and :func:`plot_misfit` take the *full* run including burn-in, with ``burn_in``
the number of initial steps that are discarded; :func:`plot_autocorrelation` takes the kept steps.
"""

import math

import matplotlib.pyplot as plt
import numpy as np

import forward
from gravity_flows.reporting import output
from gravity_flows.reporting.figures.style import (MAX_LINE_POINTS, REFERENCE_COLOUR, SAMPLE_COLOUR,
    TRUTH_COLOUR, _heading, _plain_log_axis, _plain_ticks)
from gravity_flows.scoring import diagnostics
from gravity_flows.scoring.predictive import check_dim


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


def _thinning_note(stride):
    return f" (1 in {stride} steps drawn)" if stride > 1 else ""


def plot_trace(path, chains, burn_in=0, title="", parameters=forward.SPHERE):
    """Trace of each parameter against iteration, every chain in its own colour.

    ``chains``: the full run (n_steps, n_chains, dim), burn-in included, columns in the order of
    ``parameters``; ``burn_in``: how many initial steps are discarded. With a burn-in, a second
    column zooms on the kept steps, since the walk in from the start would otherwise squash them
    flat. At most ``MAX_LINE_POINTS`` points per chain are drawn (regular thinning).
    """
    chains = diagnostics.as_chains(chains)
    n_steps, n_chains, dim = chains.shape
    check_dim(dim, parameters, "chains")
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
    check_dim(dim, parameters, "chains")
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
