"""Sampling diagnostics: autocorrelation, effective sample size, split R-hat, and PSIS k-hat.

Markov chains (MCMC):

- Integrated autocorrelation time ``tau = 1 + 2 sum_{t>=1} rho(t)`` with the ACF ``rho`` computed by
  FFT and Sokal's automatic window: the sum stops at the smallest lag M with ``M >= c * tau(M)``
  (A. Sokal, *Monte Carlo Methods in Statistical Mechanics: Foundations and New Algorithms*, 1997;
  the ACF is averaged over chains before summing, as emcee does: Foreman-Mackey et al. 2013,
  ``emcee.autocorr``). The estimate is trusted only when the chain is at least 50 tau long.
- Effective sample size ``n_steps * n_chains / tau``.
- Split R-hat (Gelman, Carlin, Stern, Dunson, Vehtari & Rubin, *Bayesian Data Analysis*, 3rd ed.,
  2013, sec. 11.4): every chain is cut in halves, and the pooled variance estimate
  ``var+ = (n-1)/n W + B/n`` is compared with the mean within-half variance W:
  ``R = sqrt(var+ / W)``; values near 1 mean the halves agree.

Importance weights ``w = p/q`` (variational fits):

- Normalised importance-sampling ESS ``(sum w)^2 / sum w^2 / S`` (Kong 1992), in [1/S, 1].
- Pareto k-hat of Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman, Yao & Gabry,
  *Pareto Smoothed Importance Sampling*, JMLR 2024; arXiv:1507.02646): a generalized Pareto
  distribution is fitted to the M = min(0.2 S, 3 sqrt(S)) largest weights, as exceedances over the
  next largest weight, with the profile-likelihood empirical-Bayes estimator of Zhang & Stephens
  (*Technometrics* 51, 2009). :func:`psis_khat` then applies the PSIS paper's weakly informative
  prior, shrinking k toward 0.5 as if by 10 extra observations, ``k = (M k + 5) / (M + 10)``
  (switch it off with ``prior_adjustment=False``). k < 0.5: the importance weights have finite
  variance and q is a good proposal; 0.5–0.7: usable; > 0.7: q misses mass of p (too narrow).
- Pareto-smoothed weights (:func:`pareto_smoothed_log_weights`, same paper): the M largest weights
  are replaced by the expected order statistics of that same fit, truncated at the largest raw
  weight; one fit (``_fit_pareto_tail``) serves both k-hat and the smoothing.
"""

import math
import warnings
from typing import NamedTuple

import numpy as np

#: Chains shorter than this many autocorrelation times give an unreliable tau (emcee's default).
RELIABLE_LENGTH_IN_TAU = 50

#: Split R-hat above which chains have not mixed (Vehtari, Gelman, Simpson, Carpenter & Buerkner,
#: *Rank-normalization, folding, and localization: an improved R-hat*, Bayesian Analysis 16, 2021).
RHAT_LIMIT = 1.01


def autocorrelation(x):
    """Normalised autocorrelation function rho(t), t = 0 .. n-1, of a 1-D series, by FFT.

    The mean-removed series is zero-padded to a power of two of at least twice its length, so the
    circular correlation equals the linear one. rho(0) = 1. A constant series (a stuck chain) has
    no variance; it is reported as perfectly correlated at every lag (all ones).
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"autocorrelation expects a 1-D series, got shape {x.shape}")
    n = x.size
    if n == 0:
        return np.zeros(0)
    centred = x - x.mean()
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(centred, n=size)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=size)[:n]
    if not acov[0] > 0:
        return np.ones(n)
    return acov / acov[0]


def as_chains(chains):
    """(n_steps, n_chains, dim) float array from (n_steps, n_chains, dim) or (n_steps, dim)."""
    chains = np.asarray(chains, dtype=float)
    if chains.ndim == 1:
        chains = chains[:, None, None]
    elif chains.ndim == 2:
        chains = chains[:, None, :]
    if chains.ndim != 3:
        raise ValueError(f"chains must be shaped (n_steps, n_chains, dim) or (n_steps, dim), got {chains.shape}")
    return chains


def mean_autocorrelation(chains):
    """ACF per parameter averaged over chains: (n_steps, dim)."""
    chains = as_chains(chains)
    n_steps, n_chains, dim = chains.shape
    acf = np.zeros((n_steps, dim))
    for k in range(n_chains):
        for d in range(dim):
            acf[:, d] += autocorrelation(chains[:, k, d])
    return acf / n_chains


def _sokal_window(acf, c):
    """(tau, window found?) from one ACF: tau(M) = 2 sum_{t<=M} rho(t) - 1, smallest M >= c tau(M)."""
    taus = 2.0 * np.cumsum(acf) - 1.0
    lags = np.arange(taus.size)
    found = lags >= c * taus
    if np.any(found):
        return float(taus[np.argmax(found)]), True
    return float(taus[-1]), False


def integrated_time(chains, c=5.0, warn=True):
    """Integrated autocorrelation time per parameter, with Sokal's automatic window.

    ``chains``: (n_steps, n_chains, dim), or (n_steps, dim) for one chain. Returns ``(tau, reliable)``:
    ``tau`` a (dim,) array in steps; ``reliable`` False when the chain is shorter than
    ``RELIABLE_LENGTH_IN_TAU`` times the largest tau, or the window never closed. Unreliable
    estimates are returned (and a warning issued when ``warn``), never raised. A parameter that
    never moves in any chain has tau = inf.
    """
    chains = as_chains(chains)
    n_steps, _, dim = chains.shape
    if n_steps < 2:
        if warn:
            warnings.warn(f"autocorrelation time of a chain with {n_steps} step(s) is undefined", stacklevel=2)
        return np.full(dim, np.nan), False
    acf = mean_autocorrelation(chains)
    tau = np.empty(dim)
    closed = np.empty(dim, dtype=bool)
    for d in range(dim):
        if np.all(chains[:, :, d] == chains[0, 0, d]):
            tau[d], closed[d] = np.inf, False
        else:
            tau[d], closed[d] = _sokal_window(acf[:, d], c)
    reliable = bool(np.all(closed) and n_steps >= RELIABLE_LENGTH_IN_TAU * np.max(tau))
    if warn and not reliable:
        warnings.warn(
            f"autocorrelation time unreliable: the chain has {n_steps} steps, fewer than "
            f"{RELIABLE_LENGTH_IN_TAU} x the estimated tau (max {np.max(tau):.1f} steps); run longer chains",
            stacklevel=2,
        )
    return tau, reliable


def effective_sample_size(chains, c=5.0, warn=True, tau=None):
    """Effective number of independent draws per parameter, n_steps * n_chains / tau: (dim,).

    ``tau``: the chains' integrated time if already known (from :func:`integrated_time`)."""
    chains = as_chains(chains)
    n_steps, n_chains, _ = chains.shape
    if tau is None:
        tau, _ = integrated_time(chains, c=c, warn=warn)
    with np.errstate(divide="ignore", invalid="ignore"):
        return n_steps * n_chains / tau


def split_rhat(chains):
    """Split R-hat per parameter (BDA3 sec. 11.4), (dim,) array; None for a single chain.

    Each chain is cut into two halves (the middle step is dropped when n_steps is odd), giving
    m = 2 n_chains sequences of length n; W is the mean within-sequence variance, B/n the
    variance of the sequence means, and R = sqrt(((n-1)/n W + B/n) / W). NaN where fewer than 4
    steps or all sequences are constant.
    """
    chains = as_chains(chains)
    n_steps, n_chains, dim = chains.shape
    if n_chains < 2:
        return None
    half = n_steps // 2
    if half < 2:
        return np.full(dim, np.nan)
    halves = np.concatenate([chains[:half], chains[n_steps - half :]], axis=1)  # (half, 2 n_chains, dim)
    within = halves.var(axis=0, ddof=1).mean(axis=0)
    between_over_n = halves.mean(axis=0).var(axis=0, ddof=1)
    pooled = (half - 1) / half * within + between_over_n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(pooled / within)


def fit_generalized_pareto(x, min_grid=30):
    """Fit a generalized Pareto distribution to exceedances x > 0: returns (k, sigma).

    Density ``(1/sigma) (1 + k x / sigma)^(-1/k - 1)``; k > 0 is a heavy tail, whose moments of
    order >= 1/k are infinite. Zhang & Stephens (2009): with ``b = k / sigma``, the likelihood
    maximised over k for fixed b is at ``k(b) = mean(log(1 + b x))``, giving the profile
    log-likelihood ``l(b) = n (log(b / k(b)) - k(b) - 1)``. The estimate of b is the posterior mean
    of b over a grid of ``m = min_grid + floor(sqrt(n))`` points spread by their quantile rule
    (``b_j = -1/x_max + (sqrt(m / (j - 1/2)) - 1) / (3 x_q)``, x_q the first quartile), weighted by
    exp(l(b_j)); then ``k = k(b)`` and ``sigma = k / b``. No prior toward 0.5 is applied here.
    """
    x = np.sort(np.asarray(x, dtype=float))
    x = x[np.isfinite(x)]
    n = x.size
    if n < 2 or x[-1] <= 0:
        return math.nan, math.nan
    m = min_grid + int(math.sqrt(n))
    quartile = x[max(int(math.floor(n / 4 + 0.5)) - 1, 0)]
    if quartile <= 0:
        quartile = x[x > 0][0]
    j = np.arange(1, m + 1)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # exceedances spanning hundreds of decades (one weight dominating) overflow the grid
        b = -1.0 / x[-1] + (np.sqrt(m / (j - 0.5)) - 1.0) / (3.0 * quartile)
        b = b[np.isfinite(b)]
        k_of_b = np.mean(np.log1p(b[:, None] * x[None, :]), axis=1)
        profile = n * (np.log(b / k_of_b) - k_of_b - 1.0)
    profile = np.where(np.isfinite(profile), profile, -np.inf)
    if not np.any(np.isfinite(profile)):
        return math.inf, math.nan  # a tail too heavy to fit: k is beyond any useful value
    weights = np.exp(profile - profile.max())
    weights /= weights.sum()
    b_hat = float(np.sum(weights * b))
    k_hat = float(np.mean(np.log1p(b_hat * x)))
    sigma_hat = k_hat / b_hat if b_hat != 0 else float(np.mean(x))
    return k_hat, sigma_hat


def generalized_pareto_quantile(probability, k, sigma):
    """Quantile function of the generalized Pareto distribution (location 0) at ``probability`` in [0, 1).

    ``F^-1(p) = sigma / k ((1 - p)^(-k) - 1)``, written ``sigma / k expm1(-k log1p(-p))`` so that it
    tends smoothly to the exponential's ``-sigma log(1 - p)`` as k -> 0 (used exactly at k = 0).
    """
    probability = np.asarray(probability, dtype=float)
    if k == 0:
        return -sigma * np.log1p(-probability)
    with np.errstate(over="ignore"):  # a very heavy tail's top quantiles overflow to inf: callers truncate
        return sigma / k * np.expm1(-k * np.log1p(-probability))


#: exp(x) of float64 is zero (or denormal) below about -708.
_LOG_UNDERFLOW = -700.0

#: Pareto k-hat above which importance sampling from q cannot be trusted (Vehtari et al. 2024, sec. 3:
#: the pre-asymptotic error then falls too slowly with the number of draws to be useful).
PSIS_KHAT_LIMIT = 0.7


class _ParetoTail(NamedTuple):
    """The generalized Pareto fit to the largest importance weights, shared by k-hat and smoothing.

    ``k`` is the raw Zhang-Stephens estimate (no prior), or a flag where no fit was made: NaN (too few
    or NaN weights), -inf (the tail's weights are all equal), inf (too few positive weights, or a tail
    that underflows). ``sigma`` is the fitted scale in units of the largest weight, exp(``top``);
    ``index`` holds the positions of the ``size`` largest weights in ascending order of weight;
    ``threshold`` is the log of the next largest weight, over which the tail is fitted.
    """

    k: float
    sigma: float = math.nan
    index: np.ndarray = None
    size: int = 0
    threshold: float = math.nan
    top: float = math.nan


def _fit_pareto_tail(log_weights):
    """Fit the M = min(floor(0.2 S), ceil(3 sqrt(S))) largest of S weights as exceedances over the next one."""
    size = log_weights.size
    if size < 25 or np.any(np.isnan(log_weights)) or np.any(log_weights == np.inf):
        return _ParetoTail(math.nan)
    tail_size = int(min(math.floor(0.2 * size), math.ceil(3.0 * math.sqrt(size))))
    # the tail_size + 1 largest weights in increasing order: a partition, then a sort of those alone
    largest = np.argpartition(log_weights, size - tail_size - 1)[size - tail_size - 1:]
    order = largest[np.argsort(log_weights[largest], kind="stable")]
    index = order[1:]
    tail, threshold = log_weights[index], log_weights[order[0]]
    if not np.isfinite(threshold):
        return _ParetoTail(math.inf)
    top = tail[-1]
    if tail[0] - top < _LOG_UNDERFLOW:
        # The tail's weights span more than ~300 decades: most exceedances underflow to zero and
        # could not be fitted, but such a tail is as heavy as any k-hat can say.
        return _ParetoTail(math.inf)
    exceedances = np.exp(tail - top) - np.exp(threshold - top)
    if not np.any(exceedances > 0):
        return _ParetoTail(-math.inf)
    k, sigma = fit_generalized_pareto(exceedances)
    return _ParetoTail(k, sigma, index, tail_size, threshold, top)


def _reported_k(tail, prior_adjustment):
    """k-hat as reported: with the PSIS prior toward 0.5 as if by 10 more observations, (M k + 5) / (M + 10)."""
    if prior_adjustment and math.isfinite(tail.k):
        return float((tail.size * tail.k + 10 * 0.5) / (tail.size + 10))
    return float(tail.k)


def psis_khat(log_weights, prior_adjustment=True):
    """Pareto k-hat of the importance weights exp(log_weights) (PSIS, Vehtari et al. 2024).

    The M = min(floor(0.2 S), ceil(3 sqrt(S))) largest weights, minus the next largest one, are fitted
    with :func:`fit_generalized_pareto`; weights are rescaled by their maximum first, so huge log
    weights do not overflow. Zero weights (log weight -inf) count in S but never enter the tail.
    With ``prior_adjustment`` k is shrunk toward 0.5 as in the PSIS paper, ``(M k + 5) / (M + 10)``.
    Returns -inf when the tail weights are all equal (q proportional to p there; the loo package's
    convention), inf when fewer than M + 1 weights are positive or the tail spans so many decades
    that it underflows (one weight dominating), NaN for fewer than 25 weights or
    NaN input.
    """
    log_weights = np.asarray(log_weights, dtype=float).ravel()
    return _reported_k(_fit_pareto_tail(log_weights), prior_adjustment)


def pareto_smoothed_log_weights(log_weights, prior_adjustment=True):
    """Pareto-smoothed log importance weights and their k-hat (PSIS, Vehtari et al. 2024, sec. 3).

    The M largest weights are replaced by the expected order statistics of the generalized Pareto
    fitted to them (the fit of :func:`psis_khat`, with the same k-hat), approximated as in the paper
    by the quantiles at (z - 1/2) / M,

        w_(S-M+z) <- w_(S-M) + F^-1((z - 1/2) / M),   z = 1 .. M,

    w_(S-M) the largest weight outside the tail, and then truncated at the largest raw weight. The
    smoothed weights keep the order of the raw ones (ties may be split), the S - M others are
    returned unchanged, and log weights stay on their own scale (not normalised). Where no fit was
    made (k-hat NaN, -inf or inf: see :func:`psis_khat`) the weights are returned as they are. Like
    the loo package, k is the reported k-hat and sigma the scale of the unadjusted fit.

    Returns ``(smoothed_log_weights (S,), khat)``.
    """
    log_weights = np.asarray(log_weights, dtype=float).ravel()
    tail = _fit_pareto_tail(log_weights)
    khat = _reported_k(tail, prior_adjustment)
    smoothed = log_weights.copy()
    if not math.isfinite(khat):
        return smoothed, khat
    probability = (np.arange(1, tail.size + 1) - 0.5) / tail.size
    exceedances = generalized_pareto_quantile(probability, khat, tail.sigma)
    with np.errstate(divide="ignore"):
        tail_log_weights = tail.top + np.log(np.exp(tail.threshold - tail.top) + exceedances)
    # Quantiles are >= 0, so the smoothed tail lies above the threshold up to rounding; the upper
    # clip is the PSIS truncation at the largest raw weight.
    smoothed[tail.index] = np.clip(tail_log_weights, tail.threshold, tail.top)
    return smoothed, khat


def importance_ess(log_weights):
    """Normalised effective sample size of self-normalised importance weights, (sum w)^2 / sum w^2 / S.

    1 when all weights are equal, 1/S when one weight dominates; 0 when every weight is zero.
    """
    log_weights = np.asarray(log_weights, dtype=float).ravel()
    if log_weights.size == 0 or np.any(np.isnan(log_weights)):
        return math.nan
    top = np.max(log_weights)
    if not np.isfinite(top):
        return 0.0 if top == -np.inf else math.nan
    weights = np.exp(log_weights - top)
    return float(weights.sum() ** 2 / np.sum(weights**2) / log_weights.size)
