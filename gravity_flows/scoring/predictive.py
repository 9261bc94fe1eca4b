"""What the figures compute: credible levels of a gridded density, and the bands of the posterior predictive check.

These are numbers, not drawings, so they live with the scores; the figures in
:mod:`gravity_flows.reporting.figures` draw them.
"""

import math
from dataclasses import dataclass

import numpy as np

import forward


#: Probability mass inside the 1-sigma and 2-sigma ellipses of a 2-D Gaussian: 1 - exp(-r^2 / 2).
ONE_SIGMA_MASS = 1.0 - math.exp(-0.5)
TWO_SIGMA_MASS = 1.0 - math.exp(-2.0)
#: Central probability of the bands of the predictive check.
BAND_MASS = 0.90


def check_dim(dim, parameters, what="theta"):
    if dim != len(parameters):
        names = ", ".join(p.name for p in parameters)
        raise ValueError(f"{what} has {dim} columns but {len(parameters)} parameters ({names}) were given; "
                         "pass parameters=problem.parameters")


def finite_rows(theta, parameters=forward.SPHERE):
    """The rows of samples ``theta`` (n, dim) that are finite everywhere, and the number of rows given."""
    theta = np.asarray(theta, dtype=float)
    if theta.size:  # no samples at all is drawn as such; samples of the wrong width are refused
        check_dim(theta.shape[-1], parameters)
    theta = theta.reshape(-1, len(parameters))
    return theta[np.all(np.isfinite(theta), axis=1)], theta.shape[0]


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
    theta, _ = finite_rows(theta, problem.parameters)
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
