"""Refining a variational fit with its own draws (``--refine {none,importance,mh}``).

A trained flow q(theta) only approximates the posterior p(theta | d) = p(d, theta) / Z. Its draws
theta_s ~ q, s = 1 .. S, with log importance weights (``vi.evaluate``)

    log w_s = log p(d, theta_s) - log q(theta_s),

can be moved toward p without a single new likelihood evaluation, in one of two ways. Neither makes
the draws exact: both are exact only as S grows, and only where q covers p. Where the Pareto k-hat
of the weights exceeds 0.7 (``diagnostics.PSIS_KHAT_LIMIT``) q misses part of the posterior, no
reweighting can recover what q never proposes, and the refined result cannot be trusted.

``importance`` — Pareto-smoothed importance resampling. The raw weights are Pareto-smoothed
(``diagnostics.pareto_smoothed_log_weights``: the M largest replaced by the expected order
statistics of a generalized Pareto fitted to them, truncated at the largest raw weight; Vehtari,
Simpson, Gelman, Yao & Gabry, *Pareto Smoothed Importance Sampling*, JMLR 25, 2024), normalised,
w~_s / sum w~, and n draws are taken from the pool with replacement with those probabilities
(multinomial sampling-importance-resampling, Rubin 1988). Expectations under the result are the
self-normalised PSIS estimates sum w~ f / sum w~ plus resampling noise: consistent, with a bias of
order 1/S, and an accuracy set by the weights' effective sample size. Because draws repeat, the
number of distinct draws kept is reported.

``mh`` — independence Metropolis-Hastings with q as the proposal (Tierney, *Markov chains for
exploring posterior distributions*, Ann. Statist. 22, 1994). A proposal theta' ~ q independent of
the state theta is accepted with probability

    min(1, p(theta') q(theta) / (p(theta) q(theta'))) = min(1, w(theta') / w(theta)),

in which Z cancels: the chain needs only the weights already computed, so the S pre-drawn
proposals are shared out among the chains (chain c's proposal k is draw k n_chains + c) and all
chains advance together, one vectorised step at a time. The chain targets p exactly; it is
uniformly ergodic, ||P^t(theta, .) - p|| <= (1 - 1/w*)^t with w* = sup p/q, exactly when the
weights are bounded (Mengersen & Tweedie, Ann. Statist. 24, 1996). With unbounded weights (q lighter
tailed than p) it sticks for long stretches at any heavy-weight state it reaches: a low acceptance,
a long autocorrelation time and a split R-hat above 1 show it.

How the chains start, and burn-in. Chain c starts at its first draw, theta_c ~ q, and keeps it as
its first state. Any start gives a valid MH chain; a start from q is forgotten quickly, because a
draw of q is on average lighter than a draw of p (E_q[w] = Z <= E_p[w] = E_q[w^2] / Z), so the chain
accepts its way out at once (it is a *heavy* start that would hold it). A start resampled by PSIS
from the same pool would be closer to p but would depend on the proposals the chain then sees (it
is by construction one of their heaviest), and the proposals would no longer be independent of the
state: the chain would not be an exact MH chain. No burn-in is discarded by default; :func:`refine` discards the earliest steps only
when it is given more draws than it returns (see :func:`draws_needed`). Split R-hat compares each
chain's halves, so it flags a start that was not forgotten.

Diagnostics (``diagnostics``): the PSIS k-hat of the raw weights for both; for ``importance`` the
normalised ESS of the smoothed weights and the distinct draws kept; for ``mh`` the acceptance rate,
integrated autocorrelation time (Sokal's window), ESS and split R-hat, computed as for the
random-walk chains of ``Gravity_MCMC``. :func:`refine` adds ``trustworthy`` and a one-line
``warning``: a refined result is never presented as exact.
"""

import math

import numpy as np

from gravity_flows.scoring import diagnostics

#: The ``--refine`` choices.
METHODS = ("none", "importance", "mh")

#: Chains run by ``--refine mh`` unless told otherwise.
DEFAULT_CHAINS = 4


def _check_pool(theta, log_weights):
    """theta as (S, dim) float, log weights as (S,) float; errors for mismatched shapes and NaN or +inf weights."""
    theta = np.asarray(theta, dtype=float)
    log_weights = np.asarray(log_weights, dtype=float)
    if theta.ndim == 1:
        theta = theta[:, None]
    if theta.ndim != 2 or log_weights.shape != (theta.shape[0],):
        raise ValueError(f"theta must be (S, dim) and log_weights (S,); got {theta.shape} and {log_weights.shape}")
    if np.any(np.isnan(log_weights)) or np.any(log_weights == np.inf):
        raise ValueError("log importance weights must not be NaN or +inf")
    if not np.any(np.isfinite(log_weights)):
        raise ValueError("every importance weight is zero: q puts no draw where p has mass")
    return theta, log_weights


def importance_resample(theta, log_weights, n, rng):
    """n draws from the pool ``theta`` (S, dim), with replacement, by the Pareto-smoothed normalised weights.

    ``log_weights`` (S,): log p(d, theta) - log q(theta); ``rng`` a ``numpy.random.Generator``.
    Returns ``(draws (n, dim), info)`` with ``info`` = {``khat``: PSIS k-hat of the raw weights,
    ``is_ess``: normalised ESS of the smoothed weights (a fraction in [1/S, 1]), ``distinct``: how many
    different pool draws were kept}. Where k-hat > 0.7 the draws cannot be trusted.
    """
    theta, log_weights = _check_pool(theta, log_weights)
    smoothed, khat = diagnostics.pareto_smoothed_log_weights(log_weights)
    probability = np.exp(smoothed - np.max(smoothed))
    probability /= probability.sum()
    index = rng.choice(theta.shape[0], size=n, replace=True, p=probability)
    info = {
        "khat": khat,
        "is_ess": diagnostics.importance_ess(smoothed),
        "distinct": int(np.unique(index).size),
    }
    return theta[index], info


def independence_mh(theta, log_weights, n_chains, rng, burn_in=0):
    """Independence Metropolis-Hastings chains whose proposals are the pool of q's draws ``theta`` (S, dim).

    Chain c starts at draw c and its k-th proposal is draw k n_chains + c, k = 1 .. n_steps - 1, with
    n_steps = S // n_chains (the last S mod n_chains draws are unused); a proposal is accepted with
    probability min(1, w'/w). The first ``burn_in`` steps are then dropped from the chains and from
    every diagnostic. Returns ``(chains (n_steps - burn_in, n_chains, dim), info)`` with ``info`` =
    {``acceptance_per_chain`` (n_chains,) array, ``acceptance`` its mean, ``tau`` (dim,) in steps,
    ``tau_reliable``, ``ess`` (dim,), ``rhat`` (dim,) or None for one chain, ``khat`` of the raw
    weights}.
    """
    theta, log_weights = _check_pool(theta, log_weights)
    if n_chains < 1:
        raise ValueError(f"n_chains must be at least 1, got {n_chains}")
    n_steps = theta.shape[0] // n_chains
    if n_steps - burn_in < 2 or burn_in < 0:
        raise ValueError(f"{theta.shape[0]} draws make chains too short for {n_chains} chain(s) after a "
                         f"burn-in of {burn_in} steps: each needs at least 2 steps kept")
    proposals = np.arange(n_steps * n_chains).reshape(n_steps, n_chains)
    log_uniform = np.log(rng.random((n_steps - 1, n_chains)))  # in [-inf, 0): a weight ratio of 1 always accepts
    state = proposals[0].copy()
    path = np.empty((n_steps, n_chains), dtype=int)
    path[0] = state
    accepted = np.zeros((n_steps - 1, n_chains), dtype=bool)
    for step in range(1, n_steps):
        with np.errstate(invalid="ignore"):  # -inf - -inf: a zero-weight state meets a zero-weight proposal; stay
            accept = log_uniform[step - 1] < log_weights[proposals[step]] - log_weights[state]
        state = np.where(accept, proposals[step], state)
        accepted[step - 1] = accept
        path[step] = state
    chains = theta[path[burn_in:]]
    acceptance = accepted[burn_in:].mean(axis=0)
    tau, reliable = diagnostics.integrated_time(chains, warn=False)
    info = {
        "acceptance": float(np.mean(acceptance)),
        "acceptance_per_chain": acceptance,
        "tau": tau,
        "tau_reliable": bool(reliable),
        "ess": diagnostics.effective_sample_size(chains, tau=tau),
        "rhat": diagnostics.split_rhat(chains),
        "khat": diagnostics.psis_khat(log_weights),
    }
    return chains, info


def draws_needed(method, n_out, n_chains=DEFAULT_CHAINS):
    """How many draws of q :func:`refine` needs to return ``n_out``: n_out, or a whole number of mh steps."""
    if method == "mh":
        return n_chains * max(math.ceil(n_out / n_chains), 2)
    return n_out


def _trust(method, info):
    """(trustworthy, one-line warning or None) from k-hat, and for mh from split R-hat too."""
    khat, problems = info["khat"], []
    if math.isnan(khat):
        problems.append("k-hat could not be estimated (fewer than 25 draws)")
    elif khat > diagnostics.PSIS_KHAT_LIMIT:
        problems.append(f"the flow misses part of the posterior (k-hat {khat:.2f} > {diagnostics.PSIS_KHAT_LIMIT})")
    rhat = info.get("rhat")
    if method == "mh" and rhat is not None and not np.all(np.asarray(rhat) <= diagnostics.RHAT_LIMIT):
        problems.append(f"the chains disagree (split R-hat up to {np.max(rhat):.3f} > {diagnostics.RHAT_LIMIT})")
    if not problems:
        return True, None
    return False, "the refined result cannot be trusted: " + "; ".join(problems)


def _plain(value):
    """JSON-ready: arrays to lists, numpy scalars to Python numbers."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def refine(method, theta, log_weights, n_out, rng, n_chains=DEFAULT_CHAINS):
    """Refine q's draws ``theta`` (S, dim) toward p by ``method`` in :data:`METHODS`; return n_out of them and a report.

    ``none``: the first n_out draws unchanged, report {``method``}. ``importance``: n_out PSIS
    resamples of the S draws (any S >= 25 for a k-hat). ``mh``: the states of ``n_chains``
    independence MH chains, step by step (all chains' step k before step k + 1), the last n_out of
    them; needs S >= :func:`draws_needed`, and any draws beyond that serve as burn-in (the earliest
    steps are discarded).

    Returns ``(theta_out (n_out, dim), report)``, the report JSON-ready: ``method``, then for
    importance ``khat``, ``is_ess`` (fraction, of the smoothed weights), ``distinct``; for mh
    ``khat``, ``acceptance``, ``acceptance_per_chain``, ``tau``, ``tau_reliable``, ``ess``, ``rhat``,
    ``chains``, ``iterations``, ``burn_in``; and for both ``trustworthy`` (k-hat <= 0.7, and for mh
    every split R-hat <= 1.01) and ``warning`` (None, or one line saying why the result cannot be
    trusted).
    """
    if method not in METHODS:
        raise ValueError(f"unknown refinement {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        theta = np.asarray(theta, dtype=float)
        if theta.shape[0] < n_out:
            raise ValueError(f"asked for {n_out} draws of a pool of {theta.shape[0]}")
        return theta[:n_out], {"method": "none"}
    theta, log_weights = _check_pool(theta, log_weights)
    if method == "importance":
        refined, info = importance_resample(theta, log_weights, n_out, rng)
    else:
        needed = draws_needed(method, n_out, n_chains)
        if theta.shape[0] < needed:
            raise ValueError(f"--refine mh with {n_chains} chains needs at least {needed} draws of the flow "
                             f"for {n_out} refined draws, got {theta.shape[0]}")
        kept_steps = needed // n_chains
        burn_in = theta.shape[0] // n_chains - kept_steps
        chains, info = independence_mh(theta, log_weights, n_chains, rng, burn_in=burn_in)
        refined = chains.reshape(-1, theta.shape[1])[-n_out:]
        info.update(chains=n_chains, iterations=kept_steps, burn_in=burn_in)
    report = {"method": method, **{key: _plain(value) for key, value in info.items()}}
    report["trustworthy"], report["warning"] = _trust(method, report)
    return refined, report
