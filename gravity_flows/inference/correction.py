"""Applying an amortized posterior to a profile: importance correction with the exact likelihood, and its scores.

The flow q(theta | d) of :mod:`gravity_flows.inference.amortized` is only an approximation of each
profile's posterior; its draws are corrected by importance weights with the profile's exact
likelihood, log w = log p(d, theta) - log q(theta | d), Pareto-smoothed and resampled (PSIS,
``refine.importance_resample``) — the correction and its diagnostic together, as in DINGO-IS (Dax et
al. 2023). Where the flow's own draws waste most of their weight (a strong anomaly, whose posterior is
far narrower than the precision the network's location reaches), the proposal is adapted
(:class:`AdaptedProposal`; where the flow found almost nothing, from the profile's Laplace fit too).
Every draw of every round stays in the pool, weighed as a draw of the proposals' deterministic
mixture (:class:`MixturePool`), and draws continue until the effective sample size reaches its
target or a cap; a result is ``trustworthy`` only when the PSIS k-hat is at most 0.7 and the
effective sample size reached its target. :func:`score_profile` scores one profile against its exact reference, the
row of a survey table or of the held-out test set; :func:`aggregate` sums the test set up.

Measured (the same 50 held-out test profiles of the default survey, the previous release's 10000-step
models of ``python compare.py --amortized``, each profile against its exact reference; ``--proposal
flow`` against the default ``adaptive``, before the pool's log-coordinate t and the Laplace search's
new starts):

| flow | proposal | share error <= 0.05 | trustworthy | 90th pct error | median draws |
|---|---|---:|---:|---:|---:|
| coupling_NSF | flow | 78 % | 70 % | 0.337 | 56195 |
| coupling_NSF | adaptive | 100 % | 100 % | 0.032 | 12288 |
| auto_NSF | flow | 74 % | 64 % | 0.485 | 30698 |
| auto_NSF | adaptive | 100 % | 100 % | 0.036 | 12288 |

No profile was a silent failure (error > 0.1 yet trustworthy) either way.
"""

import math
import time
from contextlib import contextmanager

import numpy as np
import torch
from scipy.special import logsumexp

import forward
from gravity_flows.inference import refine
from gravity_flows.inference.amortized import signal_to_noise, standard_normal_log_density
from gravity_flows.scoring import convergence, diagnostics
from gravity_flows.scoring.reference import compute_reference, score

#: Draws of q alone per test profile for the SBC ranks (ranks 0 .. SBC_DRAWS; Talts et al. 2018).
SBC_DRAWS = 99


#: The effective sample size (of the Pareto-smoothed weights) a corrected posterior must reach to be
#: trusted, for as many draws as asked up to this cap. The W1/sd of n exact draws from a Gaussian is
#: about 1.3 / sqrt(n) (measured: 0.041 at n = 1000, 0.021 at 4000, its 90th percentile 0.030), and a
#: run's error is the largest over 3 or 4 parameters: with 4000 effective draws the resampling noise
#: alone stays below the error goal of 0.05 on nearly every profile, with 1000 it would not.
ESS_TARGET = 4000
#: Draws of q in the first round, and the most drawn for one profile (then it is not trustworthy).
FIRST_DRAWS = 8192
MAX_DRAWS = 131_072
#: The Laplace rescue's search for the mode starts from this many of the pool's best draws, near the posterior
#: already, instead of the box centre and seven random points (measured: coupling_Affine's 2000-step ridge
#: model, 20 test profiles, 9 of them rescued, machine loaded: median posterior 0.42 s -> 0.33 s).
LAPLACE_STARTS = 2
#: The fewest draws added to the pool at once.
MIN_ROUND = 1024
#: Draws per pass of the flow, and per pass of the likelihood: the likelihood of 256 draws at 1000
#: stations stays in the CPU's cache, and is ten times faster than that of 20000 at once (measured:
#: 0.08 s against 0.80 s for 20000 draws); the flow is fastest a few thousand draws at a time.
FLOW_CHUNK = 4096
LIKELIHOOD_CHUNK = 256


#: Adapting the proposal (:class:`AdaptedProposal`): at most ADAPT_ROUNDS rounds of moment matching, of
#: ADAPT_DRAWS draws each, kept only while each improves the normalised ESS; the share of the flow's own
#: base in the mixture; the Student-t's degrees of freedom (its variance is 5/3 of its scale's).
#: (Rounds of 2048 draws, measured on the 50 test profiles of each problem, two random streams: the same
#: time and errors with the density known (Glow), and on the ridge (coupling_Affine) 0.092 s against
#: 0.072 s, median error 0.033 against 0.031, 87 % within 0.05 against 89 %.)
ADAPT_ROUNDS = 4
ADAPT_DRAWS = 4096
DEFENSIVE_SHARE = 0.1
T_DEGREES = 5

#: The precision the correction draws and weighs in: the flow's draws, its density, the Student-t and the
#: exact likelihood; the log weights are then smoothed and resampled in float64. Rounding moves a log
#: weight by about 1e-4 nats on a typical profile (a log-likelihood near -1400 at 1000 stations), and
#: near the posterior of the strongest anomaly in the default box (x0 = 5, z = 1, R = 5 m, an 8700 µGal
#: peak at sigma 1) by 0.02 nats (sd) in the arithmetic and 0.04 in theta's own rounding: weights off by
#: a few per cent at random, far less than they spread. The draws cost less than half as much as in
#: float64 (the likelihood's pass over the stations and the flow's layers): on the ridge's 50 test profiles
#: (coupling_Affine, three random streams) the median posterior took 0.093-0.099 s against 0.23-0.34 s in
#: float64, median error 0.030-0.033 against 0.031, share with error <= 0.05 0.72-0.82 against 0.76-0.86
#: (one profile in 50 is 0.02), no silent failure against one. The model is trained in float32 too.
PRECISION = torch.float32


def _host(tensor):
    """A tensor of the correction (PRECISION, any device) as a float64 numpy array, for the weights' bookkeeping."""
    return tensor.detach().cpu().double().numpy()


class FlowProposal:
    """The flow itself as the importance proposal, q(theta | d): base points eps ~ N(0, I) pushed through
    the flow's map T(.; c) (``AmortizedPosterior.push``).

    Every proposal here is such a push-forward of a base density b, so r(theta) = b(eps) / |det
    dtheta/deps| needs no inverse. ``draw_record(n, generator)`` returns the draws with what the pool
    needs of them; a draw's own log weight is log w = log p(d, theta) - log r(theta)."""

    def __init__(self, model, context, log_likelihood, log_prior):
        self.model, self.context = model, context
        self.log_likelihood, self.log_prior = log_likelihood, log_prior
        parameter = next(model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device

    def base_sample(self, n, start, generator):
        """n base points (the draws ``start`` .. ``start + n`` of a round: a stratified base may care)."""
        return torch.randn(n, self.model.dim, generator=generator, dtype=self.dtype, device=self.device)

    def base_log_density(self, eps):
        return standard_normal_log_density(eps)

    def log_density(self, record):
        """log r at the draws of a record of any proposal of this flow (:meth:`draw_record`), from their
        base points: log b(eps) - log|det dtheta/deps| (minus infinity where a base point is not finite)."""
        with torch.no_grad():
            eps = torch.as_tensor(record["eps"], dtype=self.dtype, device=self.device)
            log_b = _host(self.base_log_density(eps))
        with np.errstate(invalid="ignore"):  # a base point that is not finite: q is 0 there
            return np.nan_to_num(log_b - record["log_det"], nan=-np.inf, posinf=-np.inf)

    @torch.no_grad()
    def draw_record(self, n, generator):
        """n draws and what the pool needs of them, a dict of numpy arrays: ``theta``, ``eps`` (base points),
        ``log_det`` (log|det dtheta/deps|), ``log_joint`` (log p(d, theta)) and ``log_r`` (this proposal's
        log density)."""
        parts = []
        for start in range(0, n, FLOW_CHUNK):
            eps = self.base_sample(min(FLOW_CHUNK, n - start), start, generator)
            theta, log_det = self.model.push(eps, self.context)
            log_r = self.base_log_density(eps) - log_det
            parts.append({"theta": theta, "eps": eps, "log_det": log_det, "log_joint": self.log_joint(theta),
                          "log_r": log_r})
        return _joined(parts)

    def log_joint(self, theta):
        """log p(d, theta), the likelihood :data:`LIKELIHOOD_CHUNK` draws at a time."""
        return torch.cat([self.log_likelihood(part) for part in theta.split(LIKELIHOOD_CHUNK)]) + self.log_prior


def _joined(parts):
    """The chunks of a record (dicts of tensors) as one record of float64 numpy arrays."""
    return {key: np.concatenate([_host(part[key]) for part in parts]) for key in parts[0]}


class _Mixture(FlowProposal):
    """A defensive mixture r = a q + (1 - a) t of the flow and a Student-t, its draws stratified: round(a n)
    of each round from q, the rest from the t (which keeps the self-normalised estimator consistent, Owen &
    Zhou 2000). Subclasses place the t: in the flow's base space or in u."""

    def __init__(self, model, context, log_likelihood, log_prior, location, scale_tril, share=None, degrees=None):
        super().__init__(model, context, log_likelihood, log_prior)
        self.location = torch.as_tensor(location, dtype=self.dtype, device=self.device)
        self.scale_tril = torch.as_tensor(scale_tril, dtype=self.dtype, device=self.device)
        self.share = DEFENSIVE_SHARE if share is None else share
        self.degrees = T_DEGREES if degrees is None else degrees

    def log_t(self, x):
        """log of the multivariate Student-t density (location m, scale S S^T, nu degrees of freedom)."""
        dim, nu = x.shape[-1], float(self.degrees)
        z = torch.linalg.solve_triangular(self.scale_tril, (x - self.location).T, upper=False).T
        return (math.lgamma((nu + dim) / 2) - math.lgamma(nu / 2) - 0.5 * dim * math.log(nu * math.pi)
                - torch.log(torch.diagonal(self.scale_tril)).sum() - 0.5 * (nu + dim) * torch.log1p(z.square().sum(-1) / nu))

    def sample_t(self, n, generator):
        normal = torch.randn(n, self.model.dim, generator=generator, dtype=self.dtype, device=self.device)
        chi2 = torch.randn(n, self.degrees, generator=generator, dtype=self.dtype, device=self.device).square().sum(-1)
        return self.location + (normal @ self.scale_tril.T) * torch.sqrt(self.degrees / chi2)[:, None]

    def log_mixture(self, log_q, log_t):
        return torch.logaddexp(math.log(self.share) + log_q, math.log1p(-self.share) + log_t)

    def from_flow(self, n, start):
        """How many of the ``n`` draws from ``start`` on in this round are the flow's (the first round(a n) are)."""
        return min(max(self._round - start, 0), n)

    def draw_record(self, n, generator):
        self._round = int(round(self.share * n))
        return super().draw_record(n, generator)


class AdaptedProposal(_Mixture):
    """The flow's map applied to a base mixture b = a N(0, I) + (1 - a) t_nu(m, S): adapted to one profile.

    The flow's location is a learnt function of d, fitted to about 1 % of the prior box; where a
    profile's posterior is far narrower (a strong anomaly), q covers it but wastes most of its draws.
    Pulled back through the flow's map, the posterior is then a compact blob in the base space — the
    layers have already bent it into shape (on the mass ridge too, which is curved in theta and in u) —
    so a Student-t moment-matched to the weighted base points of the previous round, as in population
    Monte Carlo (Cappé, Guillin, Marin & Robert 2004), concentrates the draws where the posterior is,
    and the flow's own base, with share a, keeps every region q covers covered: r >= a q, so
    p / r <= p / (a q) (a defensive mixture, Hesterberg 1995). The weights are exact and need no
    inverse: r(theta) = b(eps) / |det dtheta/deps|.
    """

    space = "base"

    def base_log_density(self, eps):
        return self.log_mixture(standard_normal_log_density(eps), self.log_t(eps))

    def base_sample(self, n, start, generator):
        from_flow = self.from_flow(n, start)
        normal = torch.randn(from_flow, self.model.dim, generator=generator, dtype=self.dtype, device=self.device)
        return torch.cat([normal, self.sample_t(n - from_flow, generator)])


class UnconstrainedProposal(_Mixture):
    """The mixture r = a q + (1 - a) t_nu(u; m, S) |du/dtheta| with the Student-t in u, the flow's unconstrained space.

    Where the flow's own draws found the posterior only far out in its tails (a profile the network
    barely learned: they hold a few effective draws), its map there says little about the posterior's
    shape, and a t fitted in u, where the posterior of a strong anomaly is close to Gaussian, does
    better than one in the base space (measured: at signal-to-noise above 3000 on the default survey).
    Only there: on the mass ridge a proposal that covers part of the ridge can reach a higher ESS than
    one that covers all of it, and a t in u, chosen by its ESS on every profile, left 70 % of the ridge
    test profiles with error <= 0.05 against 86 % with the base-space t alone (coupling spline, 50
    profiles). The flow's density at the t's draws needs its inverse (``AmortizedPosterior.pull``).
    With ``coordinates`` set (a bijection v -> theta such as :class:`LogCoordinates`) the t is in v
    instead; its draws outside the box have prior density 0.
    """

    def __init__(self, *args, coordinates=None, fit=None, **options):
        """``coordinates``: the bijection v -> theta the t lives in (``forward(v) -> (theta, log|dtheta/dv|)``,
        ``inverse``), None for the box's u; ``fit``: what placed the t, for the report (None: the pool)."""
        super().__init__(*args, **options)
        self.coordinates = None if coordinates is None else coordinates.to(device=self.device)
        name = "u" if coordinates is None else coordinates.name
        self.space = name if fit is None else f"{name} at {fit}"

    def _to_t_space(self):
        return self.model.box if self.coordinates is None else self.coordinates

    def _log_mixture_at(self, eps, log_det, u, log_du_dtheta):
        """log r from a draw's base point and its u: where eps is not finite q is 0, and where theta rounds onto
        the box's edge (u infinite: there the t's density in u is 0 and |du/dtheta| infinite) the t's is taken as 0."""
        log_q = torch.nan_to_num(standard_normal_log_density(eps) - log_det, nan=-math.inf, posinf=-math.inf)
        log_t = torch.nan_to_num(self.log_t(u) + log_du_dtheta, nan=-math.inf, posinf=-math.inf)
        return self.log_mixture(log_q, log_t)

    def log_density(self, record):
        """log r at the draws of a record of any proposal of this flow: a q(theta) + (1 - a) t(u) |du/dtheta|."""
        with torch.no_grad():
            as_tensor = lambda array: torch.as_tensor(array, dtype=self.dtype, device=self.device)
            u, log_du_dtheta = self._to_t_space().inverse(as_tensor(record["theta"]))
            log_r = _host(self._log_mixture_at(as_tensor(record["eps"]), as_tensor(record["log_det"]), u, log_du_dtheta))
        return np.nan_to_num(log_r, nan=-np.inf, posinf=-np.inf)

    @torch.no_grad()
    def draw_record(self, n, generator):
        self._round = int(round(self.share * n))
        model, box = self.model, self.model.box
        parts = []
        for start in range(0, n, FLOW_CHUNK):
            size = min(FLOW_CHUNK, n - start)
            from_flow = self.from_flow(size, start)
            eps = torch.randn(from_flow, model.dim, generator=generator, dtype=self.dtype, device=self.device)
            theta_flow, log_det_flow = model.push(eps, self.context)
            u_flow, log_du_dtheta = self._to_t_space().inverse(theta_flow)
            u = self.sample_t(size - from_flow, generator)
            theta_t, log_dtheta_du = self._to_t_space()(u)
            # where theta rounds onto the box's edge (|u| beyond ~37) the flow's inverse is not finite: q is 0 there;
            # outside the box (a t in other coordinates than u) q and the prior are 0
            inside = ((theta_t >= box.low.to(theta_t.dtype)) & (theta_t <= box.high.to(theta_t.dtype))).all(-1)
            safe = torch.where(inside[:, None], theta_t, box.low.to(theta_t.dtype) + 0.5 * box.width.to(theta_t.dtype))
            eps_t, log_deps_dtheta = model.pull(safe, self.context)
            eps_t = torch.where(inside[:, None], eps_t, torch.full_like(eps_t, math.nan))
            log_deps_dtheta = torch.where(inside, log_deps_dtheta, torch.full_like(log_deps_dtheta, math.nan))
            eps_all, log_det = torch.cat([eps, eps_t]), torch.cat([log_det_flow, -log_deps_dtheta])
            theta = torch.cat([theta_flow, theta_t])
            log_r = self._log_mixture_at(eps_all, log_det, torch.cat([u_flow, u]),
                                         torch.cat([log_du_dtheta, -log_dtheta_du]))
            log_joint = self.log_joint(theta)
            log_joint[from_flow:] = torch.where(inside, log_joint[from_flow:], torch.full_like(log_joint[from_flow:], -math.inf))
            parts.append({"theta": theta, "eps": eps_all, "log_det": log_det, "log_joint": log_joint, "log_r": log_r})
        return _joined(parts)


class LogCoordinates(torch.nn.Module):
    """phi_i = log|theta_i| for the ``logged`` parameters (a box on one side of zero), phi_i = theta_i for the
    others: ``forward(phi) -> (theta, log|dtheta/dphi|)``, ``inverse(theta) -> (phi, log|dphi/dtheta|)``.
    On the mass ridge of a free density the curve drho R^3 = m is a straight line in phi. The torch
    counterpart of ``forward.SamplingCoordinates`` (the MCMC's), which says which parameters are logged."""

    name = "log coordinates"

    def __init__(self, logged, sign):
        super().__init__()
        self.register_buffer("logged", torch.as_tensor(np.asarray(logged, dtype=bool)))
        self.register_buffer("sign", torch.as_tensor(np.asarray(sign, dtype=float)))

    def forward(self, phi):
        sign = self.sign.to(phi.dtype)
        theta = torch.where(self.logged, sign * torch.exp(torch.where(self.logged, phi, 0.0)), phi)
        return theta, torch.where(self.logged, phi, 0.0).sum(-1)

    def inverse(self, theta):
        phi = torch.where(self.logged, torch.log(torch.abs(torch.where(self.logged, theta, 1.0))), theta)
        return phi, -torch.where(self.logged, phi, 0.0).sum(-1)


class MixturePool:
    """Every draw of one profile's correction, from every proposal tried, weighed as draws of their
    deterministic mixture (the balance heuristic, Veach & Guibas 1995; adaptive multiple importance
    sampling, Cornuet, Marin, Mira & Robert 2012): with n_j draws from proposal r_j, N in all,

        log w_i = log p(d, theta_i) - log sum_j (n_j / N) r_j(theta_i).

    No draw is wasted when the proposal is adapted, and each weight is bounded by the best-fitting
    proposal's, p / r_j * N / n_j. Every proposal is a map of the same flow, so r_j at another's draws
    needs only their base points (:meth:`FlowProposal.log_density`)."""

    def __init__(self):
        self.proposals, self.counts, self.records, self.log_densities = [], [], [], []

    def add(self, proposal, record):
        if not any(known is proposal for known in self.proposals):
            self.proposals.append(proposal)
            self.counts.append(0)
            for record_index, known in enumerate(self.records):
                self.log_densities[record_index].append(proposal.log_density(known))
        index = next(j for j, known in enumerate(self.proposals) if known is proposal)
        self.counts[index] += record["theta"].shape[0]
        self.records.append(record)
        self.log_densities.append([record["log_r"] if known is proposal else known.log_density(record)
                                   for known in self.proposals])

    @property
    def size(self):
        return sum(self.counts)

    def concatenated(self, key):
        return np.concatenate([record[key] for record in self.records])

    def log_weights(self):
        log_shares = np.log(np.asarray(self.counts, dtype=float) / self.size)[:, None]
        log_mixture = np.concatenate([logsumexp(log_shares + np.stack(densities), axis=0)
                                      for densities in self.log_densities])
        return self.concatenated("log_joint") - log_mixture


def moment_matched(points, log_weights):
    """Location and Cholesky factor of the weighted mean and covariance of ``points`` (n, dim), numpy.

    The weights are Pareto-smoothed; the covariance is shrunk toward the points' own by 1/ESS,
    C = C_w + C_points / ESS, so that a round with few effective draws cannot collapse the t.
    Points that are not finite (a base point of theta on the box's edge) are left out."""
    finite = np.all(np.isfinite(points), axis=1) & np.isfinite(log_weights)
    points, log_weights = points[finite], log_weights[finite]
    smoothed, _ = diagnostics.pareto_smoothed_log_weights(log_weights)
    weights = np.exp(smoothed - smoothed.max())
    weights /= weights.sum()
    location = weights @ points
    centred = points - location
    covariance = (weights[:, None] * centred).T @ centred + np.cov(points.T) * np.sum(weights**2)
    return location, np.linalg.cholesky(covariance + 1e-12 * np.eye(points.shape[1]))


def _unconstrained(model, theta):
    return _in_coordinates(model.box, model, theta)


def _in_coordinates(coordinates, model, theta):
    """numpy theta (n, dim) in the coordinates of a bijection ``coordinates`` (v -> theta; its ``inverse``)."""
    with torch.no_grad():
        parameter = next(model.parameters())
        coordinates = coordinates.to(device=parameter.device)
        return _host(coordinates.inverse(torch.as_tensor(theta, dtype=parameter.dtype, device=parameter.device))[0])


@contextmanager
def one_thread():
    """torch on one CPU thread within the block, restored after (also a decorator).

    The correction's tensors are small (a few thousand draws at a time), where a second thread gains
    nothing on an idle machine and loses much on a busy one (measured, the 20 lines of the example
    survey: median 0.145 s per line on one thread and 0.156 s on two when idle; with two other
    processes running, 0.43 s against 3.4 s per profile of the default survey)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def corrected_posterior(model, data, log_likelihood, log_prior, n_samples, *, generator, rng, ess_target=None,
                        first_draws=None, max_draws=None, adapt=True, gaussian_fit=None, pool_coordinates=None):
    """The importance-corrected posterior of one profile ``data`` (N,): ``n_samples`` draws and a report.

    ``log_likelihood`` is the profile's exact log-likelihood, a torch function of theta (n, dim) (for
    a gravity profile ``forward.TorchLikelihood(problem)``, see :func:`corrected_profile_posterior`),
    ``log_prior`` the log prior density on the box (a number).

    The first ``first_draws`` (default :data:`FIRST_DRAWS`) draws are the flow's own (DINGO-IS): their
    weights give the flow's diagnostics. If their effective sample size (of the Pareto-smoothed
    weights) falls short of ``ess_target`` (default: ``n_samples``, at most :data:`ESS_TARGET`) and
    ``adapt``, an :class:`AdaptedProposal` (t in the base space) is fitted to the pool and tried on
    :data:`ADAPT_DRAWS` draws — and where the flow's own draws held fewer than dim (dim + 3)
    effective draws, an :class:`UnconstrainedProposal` (t in u) beside it, and in the first round a
    second one placed by ``gaussian_fit(theta, log_joint)`` (a callable of the pool's draws so far and
    their log p(d, theta), returning None or the mean, covariance and
    coordinates of a Gaussian approximation of the posterior: coordinates None for u, or a bijection
    such as :class:`LogCoordinates`; for a gravity profile its Laplace fit,
    :func:`corrected_profile_posterior`) — and, with ``pool_coordinates`` (a bijection such as
    :class:`LogCoordinates`) where the flow's own draws did find enough, a t fitted to the pool in those
    coordinates beside the t in the base space (on the mass ridge, where the latter alone can cover part
    of the ridge with a good ESS, which the weights cannot reveal) — and fitted again
    (:data:`ADAPT_ROUNDS` times at most), for as long as the pool falls short of the target and each
    round's own normalised ESS beats the best so far. The best proposal (the flow itself where no
    adaptation beats it, as on a profile whose q is merely a little wide) then draws on, in rounds
    as large as its normalised ESS says the target needs (at least :data:`MIN_ROUND`, up to
    ``max_draws`` in the pool, default :data:`MAX_DRAWS`), and ``n_samples`` are resampled by the
    smoothed weights (``refine.importance_resample``). Every round, the flow's own and the
    adaptations' included, stays in the pool (:class:`MixturePool`): no draw is spent on adapting
    alone. Measured on the previous release's 10000-step models against the correction that kept only the best
    proposal's rounds (``python compare.py --amortized [--density-bounds 1000 4000] --models ...``, 50
    test profiles): the median posterior time per profile 0.058-0.142 s against 0.081-0.205 s with
    the density known, 0.065-0.212 s against 0.097-0.297 s on the ridge, with the shares within 0.05
    unchanged within a few profiles either way (96-100 % against 94-98 %; 74-88 % against 64-86 %).

    Returns ``(theta (n_samples, dim), q_draws (<= n_samples, dim), report)``: the corrected draws,
    the flow's own first draws, and a JSON-ready report with ``khat`` (of the pool's raw weights),
    ``is_ess`` (normalised ESS of the smoothed weights), ``ess`` (effective draws), ``draws`` (in the
    pool), ``distinct``, ``proposal`` ("flow", or "flow + t in base|u (k adaptations)"), ``vi_is_ess``, ``vi_khat``
    and ``vi_elbo`` (of the flow's own first draws), ``trustworthy`` and ``warning`` (None, or one line).

    Trustworthy: k-hat <= 0.7, ESS >= target, and, where the proposal was adapted, at least
    dim (dim + 3) effective draws among the flow's own (twice the numbers of the mean and covariance
    the adaptation fits) or a Gaussian of ``gaussian_fit`` in the pool. The last rule is measured: a
    proposal adapted from the flow's draws alone can only refine what they found, and on one ridge
    profile of 50 (signal-to-noise 2260, about 10 effective draws of the flow's 8192) it missed the
    end of the mass ridge against R's upper bound — 5 % of the posterior — with k-hat 0.56 and ESS
    5414: error 0.12, which no weight could reveal (MCMC and the exact reference agree on that
    profile to 0.02). The rule flagged it, and with it, on the default survey, 6 of 50 profiles that
    were right (all with errors <= 0.05). Those are the strong anomalies the network places too
    coarsely, and for them the Laplace fit is an independent search (BFGS from several starts) that
    needs no help from the flow: with it in the pool, the default survey's 10000-step models of the
    previous release (``python compare.py --amortized --models DIR``) were trustworthy on 96-100 % of the
    50 profiles against 72-82 % without, within 0.05 on 98-100 % against 96-100 %, and no silent
    failure either way. The t is in u only where the Laplace fit describes a peak
    (``forward.Laplace.theta_peak``). On the mass ridge (``--density-bounds 1000 4000``) a t in u
    rescued none of the profiles it joined (k-hat 0.8-2.5, all still flagged, a poor fit to the
    curved ridge of a strong anomaly), brought the strongest from errors of 1.4-7.3 to 0.7-0.9, and
    five others, right before though flagged, from 0.03-0.12 to 0.15-0.32. In the log coordinates
    (:class:`LogCoordinates`, the MCMC's), where the ridge is a straight line, every ridge profile it
    joined (2 to 10 per flow, the strongest anomalies among them, 1.5-7.3 off before) ended within
    0.056 and trustworthy: 76-92 % of the 50 within 0.05 against 74-88 % without it, trustworthy
    90-96 % against 62-84 %, silent failures 3 against 2 (on other profiles: the random streams differ).

    The t fitted to the pool in log coordinates (``pool_coordinates``, on the ridge where the flow's own
    draws found enough) is measured on the comparison's 2000-step ridge models (``python compare.py
    --amortized --density-bounds 1000 4000 --models DIR``, 50 test profiles): of the profiles off by more
    than 0.05 with the base-space t alone, on which the flow had found enough (2-11 per flow), 0-2 per
    flow stayed off; 92-100 % of the 50 within 0.05 against 78-96 %, trustworthy 98-100 % against
    86-100 %, silent failures 0 against 0-3 per flow, the median posterior time -2 to +11 %. In place of the t
    in u also where the flow found too little, it made those profiles far worse (the pool's few effective
    draws place it badly, and its ESS then beat the Laplace fit's): errors up to 14, trustworthy 38-66 %.
    """
    ess_target = min(n_samples, ESS_TARGET) if ess_target is None else ess_target
    first_draws = FIRST_DRAWS if first_draws is None else first_draws
    max_draws = MAX_DRAWS if max_draws is None else max_draws
    with torch.no_grad():
        context = model.context(data)
    proposal = FlowProposal(model, context, log_likelihood, log_prior)
    first = proposal.draw_record(first_draws, generator)
    first_round = first["log_joint"] - first["log_r"]
    pool = MixturePool()
    pool.add(proposal, first)
    best = diagnostics.importance_ess(first_round)
    dim = first["theta"].shape[1]
    flow_found_enough = best * first_draws >= dim * (dim + 3)
    rounds, spaces, laplace_drawn = 0, [], False

    def pool_ess():
        log_weights = pool.log_weights()
        smoothed, _ = diagnostics.pareto_smoothed_log_weights(log_weights)
        return diagnostics.importance_ess(smoothed) * log_weights.size, log_weights

    ess, pool_log_weights = pool_ess()
    while adapt and rounds < ADAPT_ROUNDS and ess < ess_target:
        # a t in the flow's base space, fitted to the pool, and one in the pool's coordinates if given; where the
        # flow's own draws found too little for its map to be a guide, a t in u instead, and in the first round
        # one at the Gaussian given (the Laplace fit); every round joins the pool, and the best grows it
        pool_theta = pool.concatenated("theta")
        candidates = [AdaptedProposal(model, context, log_likelihood, log_prior,
                                      *moment_matched(pool.concatenated("eps"), pool_log_weights))]
        if pool_coordinates is not None and flow_found_enough:
            candidates.append(UnconstrainedProposal(model, context, log_likelihood, log_prior,
                                                    *moment_matched(_in_coordinates(pool_coordinates, model, pool_theta),
                                                                    pool_log_weights), coordinates=pool_coordinates))
        if not flow_found_enough:
            candidates.append(UnconstrainedProposal(model, context, log_likelihood, log_prior,
                                                    *moment_matched(_unconstrained(model, pool_theta), pool_log_weights)))
            gaussian = (gaussian_fit(pool_theta, pool.concatenated("log_joint"))
                        if rounds == 0 and gaussian_fit is not None else None)
            if gaussian is not None:
                location, covariance, coordinates = gaussian
                candidates.append(UnconstrainedProposal(model, context, log_likelihood, log_prior, location,
                                                        np.linalg.cholesky(covariance), coordinates=coordinates,
                                                        fit="the Laplace fit"))
                laplace_drawn = True
        tried = []
        for candidate in candidates:
            record = candidate.draw_record(ADAPT_DRAWS, generator)
            pool.add(candidate, record)
            tried.append((candidate, diagnostics.importance_ess(record["log_joint"] - record["log_r"])))
        ess, pool_log_weights = pool_ess()
        candidate, fraction = max(tried, key=lambda pair: pair[1])
        if not fraction > best:
            break  # no better than the proposal they were fitted from: grow with that one
        proposal, best, rounds = candidate, fraction, rounds + 1
        spaces.append(candidate.space)
    while ess < ess_target and pool.size < max_draws:
        wanted = int(math.ceil(1.1 * (ess_target - ess) / max(best, 1e-12)))
        pool.add(proposal, proposal.draw_record(min(max(wanted, MIN_ROUND), max_draws - pool.size), generator))
        ess, pool_log_weights = pool_ess()
    theta, info = refine.importance_resample(pool.concatenated("theta"), pool_log_weights, n_samples, rng)
    ess = info["is_ess"] * pool_log_weights.size
    report = {
        "khat": float(info["khat"]),
        "is_ess": float(info["is_ess"]),
        "ess": float(ess),
        "ess_target": int(ess_target),
        "draws": int(pool_log_weights.size),
        "distinct": int(info["distinct"]),
        "proposal": f"flow + t in {spaces[-1]} ({rounds} adaptations)" if rounds else "flow",
        "vi_khat": float(diagnostics.psis_khat(first_round)),
        "vi_is_ess": float(diagnostics.importance_ess(first_round)),
        "vi_elbo": float(np.mean(first_round)) if np.all(np.isfinite(first_round)) else -math.inf,
    }
    problems = []
    flow_ess = report["vi_is_ess"] * first_round.size
    if rounds and not flow_found_enough and not laplace_drawn:
        problems.append(f"the flow's own draws found too little of the posterior (ESS {flow_ess:.0f} < {dim * (dim + 3)}) "
                        "for the proposal adapted from them to be relied on")
    if not report["khat"] <= diagnostics.PSIS_KHAT_LIMIT:
        problems.append(f"k-hat {report['khat']:.2f} > {diagnostics.PSIS_KHAT_LIMIT}")
    if ess < ess_target:
        problems.append(f"effective sample size {ess:.0f} < {ess_target} after {report['draws']} draws")
    report["trustworthy"] = not problems
    report["warning"] = None if not problems else (
        "this profile lies outside what the network learned (" + "; ".join(problems) + "): its corrected "
        "posterior cannot be trusted; run a per-profile fit for it")
    return theta, first["theta"][:n_samples], report


def corrected_profile_posterior(model, problem, n_samples, **options):
    """:func:`corrected_posterior` of a gravity profile (a :class:`forward.Problem`), with its exact likelihood."""
    parameter = next(model.parameters())
    log_likelihood = forward.TorchLikelihood(problem).to(device=parameter.device, dtype=parameter.dtype)

    # the MCMC's log coordinates, where the mass ridge of a free density is a straight line
    sampling = forward.SamplingCoordinates(problem, "log")
    log_coordinates = LogCoordinates(sampling.logged, sampling.sign)

    def laplace_fit(theta, log_joint):
        # its search starts from the pool's best draws, near the posterior already, not from eight points of the box
        best = np.argsort(np.where(np.isnan(log_joint), -np.inf, log_joint))[::-1][:LAPLACE_STARTS]
        starts = [u for u in _unconstrained(model, theta[best]) if np.all(np.isfinite(u))]
        try:
            laplace = forward.laplace_approximation(problem, starts_u=starts or None)
        except forward.DataError:  # data no posterior explains: the flow's draws are all there is
            return None
        if laplace.theta_peak:
            return laplace.u_map, laplace.u_cov, None
        # elsewhere (the mass ridge) the Laplace fit in the log coordinates: theta_map and theta_cov are then u's
        # mode and covariance on the box, by the delta method
        return (sampling.from_theta(laplace.theta_map),
                sampling.covariance_from_theta(laplace.theta_map, laplace.theta_cov), log_coordinates)

    # on the mass ridge a t fitted to the pool in log coordinates too (the t in the base space alone can cover
    # part of the ridge with a good ESS)
    return corrected_posterior(model, problem.g_obs, log_likelihood, problem.log_prior_density, n_samples,
                               gaussian_fit=laplace_fit,
                               pool_coordinates=log_coordinates if problem.free_density else None, **options)



def score_profile(model, problem, n_samples, *, generator, rng, reference=None, adapt=True):
    """Apply the model to one profile and score it: the row of a survey table.

    ``reference`` is the profile's exact posterior (computed here when None; never counted in the
    time). ``posterior_time_s`` is the time from the profile's data to the corrected draws: summary
    network, draws, exact weights, smoothing and resampling. Returns ``(theta, q_draws, row)``: the
    corrected draws, the flow's own draws and a JSON-ready dict with ``error`` (corrected), ``vi``
    (``error``, ``khat``, ``is_ess``, ``elbo`` and ``kl`` = log Z - ELBO of the flow's own draws), ``khat``, ``is_ess``, ``ess``,
    ``draws``, ``proposal``, ``trustworthy``, ``warning``, ``posterior_time_s`` (and ``posterior_cpu_s``, the
    process's CPU time for it: what an idle machine would take), ``mean``, ``sd``, ``w1_over_sd``;
    and where the profile's truth is known (simulated) ``truth``, ``snr``, ``q_cdf_at_truth`` (per
    parameter, the share of q's draws below the truth: its coverage) and ``sbc_rank`` (per parameter,
    how many of q's first :data:`SBC_DRAWS` draws lie below the truth).
    """
    if reference is None:
        reference = compute_reference(problem, forward.laplace_approximation(problem))
    clock, cpu_start = convergence.Clock(lambda: None), time.process_time()
    theta, q_draws, report = corrected_profile_posterior(model, problem, n_samples, generator=generator, rng=rng,
                                                         adapt=adapt)
    seconds, cpu_seconds = clock.seconds(), time.process_time() - cpu_start
    corrected, alone = score(theta, reference), score(q_draws, reference)
    row = {
        "error": corrected["error"],
        "w1_over_sd": corrected["w1_over_sd"],
        "vi": {"error": alone["error"], "khat": report["vi_khat"], "is_ess": report["vi_is_ess"],
               "elbo": report["vi_elbo"], "kl": float(reference.log_evidence - report["vi_elbo"])},
        **{key: report[key] for key in ("khat", "is_ess", "ess", "draws", "distinct", "proposal", "trustworthy",
                                        "warning")},
        "posterior_time_s": seconds,
        "posterior_cpu_s": cpu_seconds,
        "mean": theta.mean(axis=0).tolist(),
        "sd": theta.std(axis=0, ddof=1).tolist(),
    }
    if problem.truth is not None:
        truth = np.asarray(problem.truth, dtype=float)
        row.update(truth=truth.tolist(), snr=signal_to_noise(problem, truth),
                   q_cdf_at_truth=np.mean(q_draws < truth, axis=0).tolist(),
                   sbc_rank=np.sum(q_draws[:SBC_DRAWS] < truth, axis=0).astype(int).tolist())
    return theta, q_draws, row


def aggregate(rows, error_goal=0.05):
    """Aggregates of scored test rows: median and 90th percentile of the corrected error, the share with
    error <= ``error_goal``, with k-hat <= 0.7, trustworthy, median posterior_time_s, median error of q alone,
    and the silent failures (error > 2 error_goal yet trustworthy)."""
    errors = np.array([row["error"] for row in rows])
    khats = np.array([row["khat"] for row in rows])
    return {
        "profiles": len(rows),
        "median_error": float(np.median(errors)),
        "p90_error": float(np.percentile(errors, 90)),
        f"share_error_le_{error_goal}": float(np.mean(errors <= error_goal)),
        "share_khat_le_0.7": float(np.mean(khats <= diagnostics.PSIS_KHAT_LIMIT)),
        "share_trustworthy": float(np.mean([row["trustworthy"] for row in rows])),
        "silent_failures": int(sum(row["error"] > 2 * error_goal and row["trustworthy"] for row in rows)),
        "median_posterior_time_s": float(np.median([row["posterior_time_s"] for row in rows])),
        "median_posterior_cpu_s": float(np.median([row.get("posterior_cpu_s", math.nan) for row in rows])),
        "median_vi_error": float(np.median([row["vi"]["error"] for row in rows])),
    }
