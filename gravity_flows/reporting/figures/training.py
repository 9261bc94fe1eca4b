"""The training figure of a flow: the ELBO of every iteration, and the KL to the exact posterior."""

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from gravity_flows.reporting import output
from gravity_flows.reporting.figures.style import (REFERENCE_COLOUR, SAMPLE_COLOUR, _heading,
    _plain_log_axis, _plain_ticks, _running_mean)


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
