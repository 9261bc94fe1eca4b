"""The posterior predictive check: data, true signal, posterior-mean prediction, its bands, and the residuals."""

import matplotlib.pyplot as plt
import numpy as np

from gravity_flows.reporting import output
from gravity_flows.reporting.figures.style import (REFERENCE_COLOUR, SAMPLE_COLOUR, SIGNAL_COLOUR,
    TRUTH_COLOUR, _heading, _plain_ticks)
from gravity_flows.scoring.predictive import BAND_MASS, predictive_bands


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
