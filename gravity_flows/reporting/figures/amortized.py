"""The figures of amortized posteriors: a trained model on its held-out test profiles, and a survey.

- :func:`plot_amortized` (``amortized.png`` of ``--amortize``): the error of every test profile
  against the anomaly's signal-to-noise ratio, corrected and of the flow alone, marked where the
  result is not trustworthy; the coverage of the flow alone (for each credible level, the share of
  test truths inside q's central interval of that level: the calibration curve of sbi and
  BayesFlow); and simulation-based calibration rank histograms (Talts et al. 2018), one per unknown.
- :func:`plot_survey` (``survey.png`` of ``--model`` with several profiles): the bodies along the
  survey, each unknown's corrected posterior mean ± sd per profile beside its exact reference.
"""

import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from gravity_flows.inference.correction import SBC_DRAWS
from gravity_flows.reporting import output
from gravity_flows.reporting.figures.style import REFERENCE_COLOUR, SAMPLE_COLOUR, TRUTH_COLOUR, _heading, _plain_log_axis

FLAGGED_COLOUR = "tab:red"
ALONE_COLOUR = "0.55"
#: Bins of the SBC rank histograms, and the probability of the band each bin's count should fall in.
SBC_BINS = 10
SBC_BAND = 0.99


def coverage_curve(cdf_at_truth, levels):
    """Share of truths inside the central credible interval of each level: |F_q(truth) - 1/2| <= level / 2.

    ``cdf_at_truth`` (profiles, dim): per profile and unknown, the share of q's draws below the truth.
    Returns (len(levels), dim). A calibrated q gives the diagonal."""
    distance = np.abs(np.asarray(cdf_at_truth, dtype=float) - 0.5)
    return np.array([np.mean(distance <= level / 2, axis=0) for level in levels])


def plot_amortized(path, rows, parameters, title="", error_goal=0.05, loss=None):
    """``amortized.png``: error against signal-to-noise, coverage of q alone, SBC ranks (module docstring).

    ``rows``: the scored test rows (``correction.score_profile``: ``error``, ``vi.error``, ``snr``,
    ``trustworthy``, ``q_cdf_at_truth``, ``sbc_rank``). ``loss``: the training loss per step (its
    own panel). With no rows the figure says so.
    """
    dim = len(parameters)
    figure = plt.figure(figsize=(17, 8.6))
    grid = figure.add_gridspec(2, 12, height_ratios=[1.25, 1], hspace=0.42, wspace=1.4)
    errors_ax = figure.add_subplot(grid[0, :5])
    coverage_ax = figure.add_subplot(grid[0, 5:9])
    loss_ax = figure.add_subplot(grid[0, 9:])
    rank_axes = [figure.add_subplot(grid[1, 12 * i // dim:12 * (i + 1) // dim]) for i in range(dim)]
    figure.suptitle(_heading(title, f"{len(rows)} held-out simulated test profiles, each against its exact posterior"))
    if not rows:
        for ax in [errors_ax, coverage_ax, loss_ax, *rank_axes]:
            ax.text(0.5, 0.5, "no test profiles", ha="center", va="center", transform=ax.transAxes)
        output.save_figure(figure, path)
        return

    snr = np.array([max(row["snr"], 1e-3) for row in rows])
    corrected = np.array([row["error"] for row in rows])
    alone = np.array([row["vi"]["error"] for row in rows])
    trusted = np.array([row["trustworthy"] for row in rows])
    errors_ax.scatter(snr, alone, s=14, color=ALONE_COLOUR, label=f"flow alone (median {np.median(alone):.2f})")
    errors_ax.scatter(snr[trusted], corrected[trusted], s=22, color=SAMPLE_COLOUR,
                      label=f"corrected, trustworthy ({trusted.sum()})")
    errors_ax.scatter(snr[~trusted], corrected[~trusted], s=40, marker="x", color=FLAGGED_COLOUR,
                      label=f"corrected, flagged not trustworthy ({(~trusted).sum()})")
    errors_ax.axhline(error_goal, color=REFERENCE_COLOUR, ls="--", lw=1,
                      label=f"error goal {error_goal} ({100 * np.mean(corrected <= error_goal):.0f} % of profiles below)")
    _plain_log_axis(errors_ax, snr, axis="x")
    _plain_log_axis(errors_ax, np.concatenate([corrected, alone]))
    errors_ax.set_xlabel("anomaly's signal-to-noise ratio, sqrt(Σ (g/σ)²)")
    errors_ax.set_ylabel("error against the exact posterior (max W1/sd)")
    errors_ax.set_title(f"error per profile: corrected median {np.median(corrected):.3f}, "
                        f"90th percentile {np.percentile(corrected, 90):.3f}", fontsize=10)
    errors_ax.legend(fontsize=8, loc="upper left")

    levels = np.linspace(0.0, 1.0, 41)
    coverage = coverage_curve([row["q_cdf_at_truth"] for row in rows], levels)
    n = len(rows)
    low, high = stats.binom.interval(0.95, n, levels) if n else (levels, levels)
    coverage_ax.fill_between(levels, low / max(n, 1), high / max(n, 1), color="0.88", label=f"95 % band for {n} calibrated profiles")
    coverage_ax.plot([0, 1], [0, 1], color=REFERENCE_COLOUR, lw=1, ls="--", label="calibrated")
    for i, parameter in enumerate(parameters):
        coverage_ax.plot(levels, coverage[:, i], lw=1.6, label=parameter.symbol)
    coverage_ax.set_xlim(0, 1)
    coverage_ax.set_ylim(0, 1)
    coverage_ax.set_xlabel("credible level of q's central interval (flow alone)")
    coverage_ax.set_ylabel("share of test truths inside")
    coverage_ax.set_title("coverage of the flow alone: below the diagonal = overconfident", fontsize=10)
    coverage_ax.legend(fontsize=8, loc="upper left")

    ranks = np.array([row["sbc_rank"] for row in rows])
    edges = np.linspace(-0.5, SBC_DRAWS + 0.5, SBC_BINS + 1)
    expected = n / SBC_BINS
    band = stats.binom.interval(SBC_BAND, n, 1.0 / SBC_BINS)
    for i, (ax, parameter) in enumerate(zip(rank_axes, parameters)):
        ax.axhspan(band[0], band[1], color="0.88", label=f"{100 * SBC_BAND:.0f} % band if uniform")
        ax.axhline(expected, color=REFERENCE_COLOUR, lw=1, ls="--")
        ax.hist(ranks[:, i], bins=edges, color=SAMPLE_COLOUR, alpha=0.8)
        ax.set_xlabel(f"rank of the true {parameter.symbol} among {SBC_DRAWS} draws of q")
        ax.set_ylabel("profiles" if i == 0 else "")
        ax.set_title(f"SBC ranks, {parameter.symbol}", fontsize=10)
        if i == 0:
            ax.legend(fontsize=8, loc="upper right")
    if loss is not None and len(loss) > 1:
        history = np.asarray(loss, dtype=float)
        window = max(1, history.size // 100)
        filled = np.where(np.isfinite(history), history, np.nanmean(history))
        smooth = np.convolve(filled, np.ones(window) / window, mode="valid")
        steps = np.arange(smooth.size) + window
        loss_ax.plot(np.arange(1, history.size + 1), history, color=SAMPLE_COLOUR, lw=0.4, alpha=0.3)
        loss_ax.plot(steps, smooth, color=SAMPLE_COLOUR, lw=1.5, label=f"running mean over {window} steps")
        late = smooth[smooth.size // 10:] if smooth.size > 10 else smooth
        loss_ax.set_ylim(np.min(late) - 0.1 * np.ptp(late) - 0.05, np.max(late) + 0.1 * np.ptp(late) + 0.05)
        loss_ax.set_xlabel("training step (fresh simulations each)")
        loss_ax.set_ylabel("-log q(θ | d), nats")
        loss_ax.set_title("training loss (first 10 % off scale)", fontsize=10)
        loss_ax.legend(fontsize=8)
    else:
        loss_ax.set_axis_off()
    output.save_figure(figure, path)


def plot_survey(path, rows, parameters, title=""):
    """``survey.png``: each unknown's corrected posterior mean ± sd along the survey, against the exact reference.

    ``rows``: one per profile, in survey order, with ``name``, ``mean``, ``sd``, ``reference_mean``,
    ``reference_sd``, ``trustworthy`` and optionally ``truth``. Flagged profiles are drawn in red."""
    n = len(rows)
    dim = len(parameters)
    figure, axes = plt.subplots(dim, 1, figsize=(max(7.0, 0.45 * n + 3.0), 2.3 * dim + 0.8), sharex=True, squeeze=False)
    position = np.arange(n)
    trusted = np.array([row["trustworthy"] for row in rows])
    flagged = [row["name"] for row in rows if not row["trustworthy"]]
    figure.suptitle(_heading(title, f"{n} profiles along the survey" +
                             (f"; flagged not trustworthy: {', '.join(flagged)}" if flagged else "; all trustworthy")),
                    fontsize=11)
    for i, (ax, parameter) in enumerate(zip(axes[:, 0], parameters)):
        mean = np.array([row["mean"][i] for row in rows])
        sd = np.array([row["sd"][i] for row in rows])
        exact = np.array([row["reference_mean"][i] for row in rows])
        exact_sd = np.array([row["reference_sd"][i] for row in rows])
        ax.errorbar(position - 0.12, exact, yerr=exact_sd, fmt="o", mfc="none", color=REFERENCE_COLOUR, ms=5, lw=1,
                    label="exact posterior, mean ± sd")
        ax.errorbar(position[trusted] + 0.12, mean[trusted], yerr=sd[trusted], fmt="o", color=SAMPLE_COLOUR, ms=4,
                    lw=1.2, label="amortized, corrected, mean ± sd")
        if (~trusted).any():
            ax.errorbar(position[~trusted] + 0.12, mean[~trusted], yerr=sd[~trusted], fmt="x", color=FLAGGED_COLOUR,
                        ms=6, lw=1.2, label="not trustworthy")
        truths = [row.get("truth") for row in rows]
        if all(t is not None for t in truths):
            ax.scatter(position, [t[i] for t in truths], marker="_", s=120, color=TRUTH_COLOUR, label="truth", zorder=3)
        ax.set_ylabel(parameter.label)
        ax.grid(axis="y", color="0.92")
        if i == 0:
            ax.legend(fontsize=7, loc="best", ncol=2)
    axes[-1, 0].set_xticks(position)
    axes[-1, 0].set_xticklabels([row["name"] for row in rows], rotation=60 if n > 8 else 0, ha="right" if n > 8 else "center",
                                fontsize=8)
    axes[-1, 0].set_xlabel("profile")
    figure.tight_layout()
    output.save_figure(figure, path)
