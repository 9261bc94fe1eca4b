"""Amortized posteriors: one conditional flow q(theta | d) for a whole survey (neural posterior estimation).

A survey fixes the stations, the noise sd of each station, the prior box and the density (known, or
free with its bounds); only the anomaly changes from profile to profile. The conditional flow

    eps ~ N(0, I)  ->  flow layers, conditioned on c = S(d)  ->  y
                   ->  u = m(c) + L(c) y                     (the context's affine map, into u-space)
                   ->  theta = lo + (hi - lo) sigmoid(u)     (the prior box, forward.BoxBijection)

is the same six flow types as the per-profile scripts, made with a context (``layers``: the
conditioners, the planar (u, w, b), the coupling of a Glow step take c as extra input), with

    log q(theta | d) = log N(eps) - log|det d(layers)/d eps| - sum_i log L_ii(c) - log|det dtheta/du|.

Where the layers act. A posterior can be 300 times narrower than the prior box, and a spline's bins
(on [-B, B]) resolve only what is about their size. So the layers come first and the context's affine
map last: m(c) and L(c) are an amortized Gaussian in u-space (the analogue of the per-profile flows'
Laplace standardisation, learnt for every profile at once), and the layers work in units of each
profile's own posterior, where B = 5 means five posterior sd whatever the profile. L(c) =
diag(sigma(c)) (I + R(c)), R strictly lower-triangular and scale-free, log sigma soft-clipped to
(-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT) (STYLE lesson 3), so the correlations are learnt apart from the
widths, which span orders of magnitude from profile to profile.

Training: maximum likelihood on fresh simulations, i.e. minimising the forward KL divergence
E_{p(d)} KL(p(theta | d) || q(theta | d)) = -E_{p(theta, d)} log q(theta | d) + const, with
theta ~ prior box and d = g(theta) + sigma eps at the survey's stations (Papamakarios & Murray 2016;
Greenberg, Nonnenmacher & Macke 2019; the sbi package). The forward KL covers the posterior's mass,
which is what an importance-sampling proposal needs (DINGO-IS, Dax et al. 2023). Every step draws new
simulations, so the network never sees a profile twice and cannot overfit. Evaluating log q at a
simulated theta needs the layers' inverse: one pass for couplings, dim passes for the
inverse-autoregressive layers, a one-dimensional root per planar layer
(``Planar.numerical_inverse``, with exact implicit gradients).

Applying it to a profile (:func:`corrected_posterior`): draws of q(theta | d), exact log weights
log p(d, theta) - log q(theta | d) with the profile's likelihood, Pareto-smoothed importance resampling
(``refine.importance_resample``), drawing more until the effective sample size of the smoothed weights
reaches its target or a cap; the result is ``trustworthy`` only when the PSIS k-hat is at most 0.7 *and*
the effective sample size reached its target.
"""

import math
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import forward
from gravity_flows.flows.layers import FlowSequence, soft_clip
from gravity_flows.inference import refine
from gravity_flows.inference.vi import TrainingDiverged
from gravity_flows.scoring import convergence, diagnostics
from gravity_flows.scoring.reference import compute_reference, score

#: The network's size (measured, see the module docstring's last section): the context's length, and
#: the summary network's hidden width and number of layers.
CONTEXT = 64
SUMMARY_HIDDEN = 256
SUMMARY_LAYERS = 3

#: The context's log-scales log L_ii(c) are soft-clipped to (-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT):
#: widths from 5e-5 to 2e4 in u, around every posterior a survey can hold (the default problem's: 5e-3 to 1).
LOG_SCALE_LIMIT = 10.0


class SummaryNetwork(nn.Module):
    """A profile's N station values -> a context of ``context`` numbers: c = MLP(asinh(d / sigma)).

    Input scaling. Over the default box the anomaly's peak spans six orders of magnitude (about
    0.01 to 9000 µGal); fed raw, the few strongest profiles would dominate the first layer and the
    weak ones would vanish below its resolution. d / sigma (the stations' sigma, fixed for a
    survey: the model refuses other ones) puts every station in units of its noise, and asinh keeps
    that scale where it matters: asinh(x) = x within the noise (|x| < 1, where a weak anomaly must
    still be told from noise) and log(2x) above it, where what identifies the body is the shape and
    the ratio of values, not their size. The whole profile enters, so nothing is assumed about
    where the anomaly lies.

    Architecture: ``layers`` fully connected layers (N -> hidden -> ... -> context) with SiLU
    activations. The profile's stations are fixed for a survey, so a dense first layer can learn
    which stations carry what (a convolution would be an assumption about their spacing).
    """

    def __init__(self, noise_sd, *, hidden, context, layers=3):
        super().__init__()
        noise_sd = torch.as_tensor(np.array(noise_sd, dtype=float))
        self.register_buffer("noise_sd", noise_sd)
        sizes = [noise_sd.numel()] + [hidden] * (layers - 1) + [context]
        modules = []
        for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            modules.append(nn.Linear(n_in, n_out))
            if k < len(sizes) - 2:
                modules.append(nn.SiLU())
        self.network = nn.Sequential(*modules)

    def forward(self, data):
        return self.network(torch.asinh(data / self.noise_sd.to(data.dtype)))


class AmortizedPosterior(nn.Module):
    """q(theta | d): a summary network, conditional flow layers, the context's affine map and the prior box.

    ``layers`` are the flow's layers made with ``context=context`` (a script's
    ``build_layers(args, dim, context)``); ``bounds`` (dim, 2) the prior box; ``noise_sd`` (N,) the
    survey's sigma per station. ``summary_hidden`` and ``summary_layers`` size the
    :class:`SummaryNetwork`. The affine head is zeroed, so q starts as the layers' push-forward of
    N(0, I) in u (each layer the identity at the start): a logistic-like spread over the box.
    """

    def __init__(self, layers, bounds, noise_sd, *, context, summary_hidden, summary_layers=3):
        super().__init__()
        dim = len(bounds)
        self.dim = dim
        self.context_size = context
        self.summary = SummaryNetwork(noise_sd, hidden=summary_hidden, context=context, layers=summary_layers)
        self.location_scale = nn.Linear(context, 2 * dim + dim * (dim - 1) // 2)
        nn.init.zeros_(self.location_scale.weight)
        nn.init.zeros_(self.location_scale.bias)
        self.flow = FlowSequence(layers)
        self.box = forward.BoxBijection(bounds)
        self.register_buffer("lower_index", torch.tril_indices(dim, dim, offset=-1))
        # planar layers have no closed-form inverse: log q at given theta then needs their numerical one
        self.numerical_inverse = any(hasattr(module, "numerical_inverse") for module in self.flow.modules())

    def context(self, data):
        """The context c = S(d) of profiles ``data`` (n, N) (or (N,): one profile, then (1, C))."""
        data = torch.as_tensor(data, dtype=self.location_scale.weight.dtype, device=self.location_scale.weight.device)
        return self.summary(data if data.dim() == 2 else data[None])

    def affine(self, context):
        """m(c) (n, dim), the unit-lower factor I + R(c) (n, dim, dim), and log sigma(c) (n, dim)."""
        raw = self.location_scale(context)
        dim = self.dim
        location = raw[:, :dim]
        log_scale = soft_clip(raw[:, dim:2 * dim], LOG_SCALE_LIMIT)
        unit_lower = torch.eye(dim, dtype=raw.dtype, device=raw.device).expand(raw.shape[0], dim, dim)
        unit_lower = unit_lower.index_put((torch.arange(raw.shape[0], device=raw.device)[:, None],
                                           self.lower_index[0], self.lower_index[1]), raw[:, 2 * dim:])
        return location, unit_lower, log_scale

    def log_prob(self, theta, context):
        """log q(theta | c) for theta (n, dim) inside the box and contexts (n, C) or (1, C)."""
        u, log_det_box = self.box.inverse(theta)  # log|du/dtheta|
        location, unit_lower, log_scale = self.affine(context)
        scaled = ((u - location) * torch.exp(-log_scale))[..., None]
        y = torch.linalg.solve_triangular(unit_lower.expand(u.shape[0], -1, -1), scaled, upper=False,
                                          unitriangular=True)[..., 0]
        eps, log_det_flow = self.flow.inverse(y, context, numerical=self.numerical_inverse)
        log_normal = -0.5 * eps.square().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return log_normal + log_det_flow - log_scale.sum(-1) + log_det_box

    def sample(self, n, context, generator=None):
        """``n`` draws theta (n, dim) of q(theta | c) for one context c (1, C), and their log q (n,)."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=context.dtype, device=context.device)
        log_q = -0.5 * eps.square().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        y, log_det_flow = self.flow(eps, context)
        location, unit_lower, log_scale = self.affine(context)
        u = location + (y @ unit_lower[0].T) * torch.exp(log_scale)
        theta, log_det_box = self.box(u)
        return theta, log_q - log_det_flow - log_scale.sum(-1) - log_det_box


def build_model(build_layers, options, survey, seed):
    """The :class:`AmortizedPosterior` of a script's ``build_layers(args, dim, context)`` for ``survey``.

    ``options`` (a dict) holds what ``build_layers`` reads (``flows``, ``hidden``, ``bins``,
    ``tail_bound``: whichever the script has) and ``context``, ``summary_hidden``, ``summary_layers``.
    The initial weights are drawn from ``seed`` (the global generator is restored afterwards).
    Returned in float64 on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = build_layers(SimpleNamespace(**options), survey.dim, options["context"])
        model = AmortizedPosterior(layers, survey.bounds, survey.noise_sd_array, context=options["context"],
                                   summary_hidden=options["summary_hidden"], summary_layers=options["summary_layers"])
    return model.double()


class ConditionedPosterior(nn.Module):
    """q(theta | d) for one profile d: the amortized flow with its context fixed, as an unconditional posterior.

    It has the interface of ``vi.FlowPosterior`` (``sample(n, generator) -> (theta, log q)``, one
    differentiable pass), so ``vi.train`` can refine the amortized q of a profile by that profile's
    ELBO and ``vi.evaluate`` can draw from it (a per-profile fit that starts from the amortized
    posterior). The context is computed once and kept as a buffer: the summary network gets no
    gradient; the flow's layers and the context's affine map do.
    """

    def __init__(self, model, data):
        super().__init__()
        self.posterior = model
        with torch.no_grad():
            self.register_buffer("context", model.context(data))

    @property
    def dim(self):
        return self.posterior.dim

    def sample(self, n, generator=None):
        return self.posterior.sample(n, self.context, generator)


# ----------------------------------------------------------------------------------------------
# The survey and its simulator


def survey_of(problem):
    """What a survey fixes, from a problem (its data are not used): stations, sigma per station, box, density."""
    return forward.Problem(stations=np.asarray(problem.stations, dtype=float), g_obs=np.zeros(problem.n_stations),
                           noise_sd=np.array(problem.noise_sd_array, dtype=float), density=float(problem.density),
                           bounds=np.array(problem.bounds, dtype=float), parameters=problem.parameters,
                           source={"kind": "survey"})


class Simulator:
    """Fresh simulations of a survey: theta ~ uniform on the prior box, d = g(theta) + sigma eps.

    ``survey`` is a :class:`forward.Problem` (its stations, per-station ``noise_sd_array``, bounds,
    density or free density; its data unused). ``__call__(n, generator)`` returns (theta (n, dim),
    d (n, N)) as torch tensors of ``dtype`` on ``device``, from ``generator`` alone. Draws of theta are
    kept strictly inside the box (fractions in [eps, 1 - eps]), where log q is finite.
    """

    def __init__(self, survey, device="cpu", dtype=torch.float64):
        self.survey = survey
        self.dtype = dtype
        self.device = torch.device(device)
        self.low = torch.as_tensor(survey.bounds[:, 0], dtype=dtype, device=self.device)
        self.width = torch.as_tensor(survey.bounds[:, 1] - survey.bounds[:, 0], dtype=dtype, device=self.device)
        self.noise_sd = torch.as_tensor(np.array(survey.noise_sd_array), dtype=dtype, device=self.device)
        self.stations = torch.as_tensor(survey.stations, dtype=dtype, device=self.device)

    def prior(self, n, generator):
        eps = torch.finfo(self.dtype).eps
        fraction = torch.rand(n, self.survey.dim, generator=generator, dtype=self.dtype, device=self.device)
        return self.low + self.width * fraction.clamp(eps, 1 - eps)

    def anomaly(self, theta):
        density = theta[..., 3:4] if self.survey.free_density else self.survey.density
        return forward.sphere_anomaly(self.stations, theta, density)

    def __call__(self, n, generator):
        theta = self.prior(n, generator)
        noise = torch.randn(n, self.stations.numel(), generator=generator, dtype=self.dtype, device=self.device)
        return theta, self.anomaly(theta) + self.noise_sd * noise


# ----------------------------------------------------------------------------------------------
# Training


#: A step whose loss is not finite is skipped; training stops as diverged after this many in a row.
MAX_SKIPPED_IN_A_ROW = 20


def train_amortized(model, simulator, *, iterations, simulations, lr, clip_norm=None, generator=None,
                    progress=True, stop=None):
    """Maximum likelihood on fresh simulations: minimise -mean log q(theta_i | S(d_i)) by Adam.

    Parameters
    ----------
    model : AmortizedPosterior
    simulator : callable (n, generator) -> (theta (n, dim), d (n, N)), e.g. :class:`Simulator`
    iterations, simulations : steps, and simulated profiles per step (fresh at every step)
    lr : Adam's initial learning rate, decayed to 0 by a cosine (as the per-profile training)
    clip_norm : clip the gradient's norm (None: no clipping)
    generator : torch generator of the simulations (the only randomness)
    progress, stop : a tqdm bar with the running loss; ``stop.interrupted`` ends training early

    A step whose loss or gradient is not finite (a rare simulation q cannot yet place: the prototype
    diverged to NaN at step 9000 without this) is skipped; :class:`TrainingDiverged` after
    :data:`MAX_SKIPPED_IN_A_ROW` in a row, or if a parameter becomes non-finite.

    Returns ``(history, seconds, skipped)``: the loss of every step done (NaN where skipped), the
    training time, and the number of skipped steps.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=iterations, eta_min=0.0)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    history = np.full(iterations, np.nan)
    bar = tqdm(range(iterations), desc="training", disable=not progress, mininterval=0.5, file=sys.stderr)
    clock = convergence.Clock(lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None)
    skipped = in_a_row = 0
    done = iterations
    for iteration in bar:
        theta, data = simulator(simulations, generator)
        theta, data = theta.to(dtype), data.to(dtype)
        loss = -model.log_prob(theta, model.summary(data)).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(parameters, math.inf if clip_norm is None else clip_norm)
        if torch.isfinite(loss) and torch.isfinite(norm):  # one host sync per step: cheap next to the step
            optimiser.step()
            history[iteration] = loss.item()
            in_a_row = 0
        else:
            skipped += 1
            in_a_row += 1
            if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise TrainingDiverged(f"training diverged at iteration {iteration + 1} of {iterations}: "
                                       f"{in_a_row} steps in a row had a non-finite loss or gradient")
        schedule.step()
        if (iteration + 1) % 100 == 0:
            bar.set_postfix_str(f"-log q {np.nanmean(history[iteration - 99:iteration + 1]):.3f}", refresh=False)
        if stop is not None and stop.interrupted:
            done = iteration + 1
            break
    bar.close()
    seconds = clock.seconds()
    if not all(torch.isfinite(p).all() for p in parameters):
        raise TrainingDiverged(f"training diverged by iteration {done}: some parameters are not finite")
    return history[:done], seconds, skipped


# ----------------------------------------------------------------------------------------------
# Applying the model to a profile: draws, exact weights, Pareto-smoothed resampling


#: The effective sample size (of the Pareto-smoothed weights) a corrected posterior must reach to be
#: trusted, for as many draws as asked up to this cap. The W1/sd of n exact draws from a Gaussian is
#: about 1.3 / sqrt(n) (measured: 0.041 at n = 1000, 0.021 at 4000, its 90th percentile 0.030), and a
#: run's error is the largest over 3 or 4 parameters: with 4000 effective draws the resampling noise
#: alone stays below the error goal of 0.05 on nearly every profile, with 1000 it would not.
ESS_TARGET = 4000
#: Draws of q in the first round, and the most drawn for one profile (then it is not trustworthy).
FIRST_DRAWS = 8192
MAX_DRAWS = 131_072
#: Draws per pass of the flow, and per pass of the likelihood: the likelihood of 256 draws at 1000
#: stations stays in the CPU's cache, and is ten times faster than that of 20000 at once (measured:
#: 0.08 s against 0.80 s for 20000 draws); the flow is fastest a few thousand draws at a time.
FLOW_CHUNK = 4096
LIKELIHOOD_CHUNK = 256


@torch.no_grad()
def draw_with_weights(model, context, log_likelihood, log_prior, n, generator):
    """n draws of q(theta | c) and their log weights log p(d, theta) - log q(theta | c), numpy."""
    thetas, log_weights = [], []
    for start in range(0, n, FLOW_CHUNK):
        theta, log_q = model.sample(min(FLOW_CHUNK, n - start), context, generator)
        log_like = torch.cat([log_likelihood(part) for part in theta.split(LIKELIHOOD_CHUNK)])
        thetas.append(theta.cpu().numpy())
        log_weights.append((log_like + log_prior - log_q).cpu().numpy())
    return np.concatenate(thetas), np.concatenate(log_weights)


#: Adapting the proposal (:class:`DefensiveMixture`): at most ADAPT_ROUNDS rounds of moment matching, of
#: ADAPT_DRAWS draws each, stopping once a round's normalised ESS reaches ADAPTED_ENOUGH; the flow's share
#: of the mixture; the Student-t's degrees of freedom (its variance is 5/3 of its scale's: wider than the fit).
ADAPT_ROUNDS = 4
ADAPT_DRAWS = 4096
ADAPTED_ENOUGH = 0.25
DEFENSIVE_SHARE = 0.1
T_DEGREES = 5


class FlowProposal:
    """The flow itself as the importance proposal: ``draw(n, generator)`` -> (theta, log weights), numpy."""

    def __init__(self, model, context, log_likelihood, log_prior):
        self.model, self.context = model, context
        self.log_likelihood, self.log_prior = log_likelihood, log_prior

    def draw(self, n, generator):
        return draw_with_weights(self.model, self.context, self.log_likelihood, self.log_prior, n, generator)


class DefensiveMixture(FlowProposal):
    """r(theta) = a q(theta | d) + (1 - a) t_nu(u(theta); m, S) |du/dtheta|: the flow, and a Student-t in u.

    A defensive mixture (Hesterberg 1995) whose t component is moment-matched to the weighted draws
    of the previous round, as in population Monte Carlo (Cappé, Guillin, Marin & Robert 2004): the
    flow's location is a learnt function of d, fitted to about 1 % of the prior box, so where a
    profile's posterior is far narrower than that (a strong anomaly) q covers it but wastes most of
    its draws; the t concentrates them, and the flow's share a keeps every region q covers covered
    (r >= a q, so p/r <= p/(a q)). Draws are stratified, round(a n) from q and the rest from the t,
    which keeps the self-normalised estimator consistent (Owen & Zhou 2000). The weights p/r are exact:
    the flow's density at the t's draws comes from its inverse (``AmortizedPosterior.log_prob``).
    """

    def __init__(self, model, context, log_likelihood, log_prior, location, scale_tril, share=DEFENSIVE_SHARE,
                 degrees=T_DEGREES):
        super().__init__(model, context, log_likelihood, log_prior)
        parameter = next(model.parameters())
        self.location = torch.as_tensor(location, dtype=parameter.dtype, device=parameter.device)
        self.scale_tril = torch.as_tensor(scale_tril, dtype=parameter.dtype, device=parameter.device)
        self.share, self.degrees = share, degrees

    def _log_t(self, u):
        """log of the multivariate Student-t density in u (scale S S^T, location m, nu degrees of freedom)."""
        dim, nu = u.shape[-1], float(self.degrees)
        z = torch.linalg.solve_triangular(self.scale_tril, (u - self.location).T, upper=False).T
        return (math.lgamma((nu + dim) / 2) - math.lgamma(nu / 2) - 0.5 * dim * math.log(nu * math.pi)
                - torch.log(torch.diagonal(self.scale_tril)).sum() - 0.5 * (nu + dim) * torch.log1p(z.square().sum(-1) / nu))

    def _log_mixture(self, log_q, log_t_theta):
        return torch.logaddexp(math.log(self.share) + log_q, math.log1p(-self.share) + log_t_theta)

    @torch.no_grad()
    def draw(self, n, generator):
        model, box = self.model, self.model.box
        n_flow = int(round(self.share * n))
        thetas, log_weights = [], []
        for start in range(0, n, FLOW_CHUNK):
            size = min(FLOW_CHUNK, n - start)
            from_flow = min(max(n_flow - start, 0), size)
            parts = []
            if from_flow:
                theta, log_q = model.sample(from_flow, self.context, generator)
                u, log_du_dtheta = box.inverse(theta)
                parts.append((theta, log_q, self._log_t(u) + log_du_dtheta))
            if size - from_flow:
                m = size - from_flow
                normal = torch.randn(m, model.dim, generator=generator, dtype=self.location.dtype, device=self.location.device)
                chi2 = torch.randn(m, self.degrees, generator=generator, dtype=self.location.dtype,
                                   device=self.location.device).square().sum(-1)
                u = self.location + (normal @ self.scale_tril.T) * torch.sqrt(self.degrees / chi2)[:, None]
                theta, log_dtheta_du = box(u)
                # where theta rounds onto the box's edge (u beyond ~37) the flow's inverse is not finite: q is 0 there
                log_q = torch.nan_to_num(model.log_prob(theta, self.context), nan=-math.inf, posinf=-math.inf)
                parts.append((theta, log_q, self._log_t(u) - log_dtheta_du))
            theta = torch.cat([part[0] for part in parts])
            log_r = self._log_mixture(torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts]))
            log_like = torch.cat([self.log_likelihood(chunk) for chunk in theta.split(LIKELIHOOD_CHUNK)])
            thetas.append(theta.cpu().numpy())
            log_weights.append((log_like + self.log_prior - log_r).cpu().numpy())
        return np.concatenate(thetas), np.concatenate(log_weights)


def moment_matched(model, theta, log_weights):
    """Location and Cholesky factor of the weighted mean and covariance of u = box^-1(theta), numpy.

    The weights are Pareto-smoothed; their covariance is shrunk toward the draws' own by 1/ESS,
    C = C_w + C_draws / ESS, so that a round with few effective draws cannot collapse the t."""
    smoothed, _ = diagnostics.pareto_smoothed_log_weights(log_weights)
    weights = np.exp(smoothed - smoothed.max())
    weights /= weights.sum()
    parameter = next(model.parameters())
    with torch.no_grad():
        u = model.box.inverse(torch.as_tensor(theta, dtype=parameter.dtype, device=parameter.device))[0].cpu().numpy()
    finite = np.all(np.isfinite(u), axis=1)
    u, weights = u[finite], weights[finite] / weights[finite].sum()
    location = weights @ u
    centred = u - location
    covariance = (weights[:, None] * centred).T @ centred
    ess = 1.0 / np.sum(weights**2)
    covariance = covariance + np.cov(u.T) / ess + 1e-12 * np.eye(u.shape[1])
    return location, np.linalg.cholesky(covariance)


def corrected_posterior(model, data, log_likelihood, log_prior, n_samples, *, generator, rng, ess_target=None,
                        first_draws=None, max_draws=None, adapt=True):
    """The importance-corrected posterior of one profile ``data`` (N,): ``n_samples`` draws and a report.

    ``log_likelihood`` is the profile's exact log-likelihood, a torch function of theta (n, dim) (for
    a gravity profile ``forward.TorchLikelihood(problem)``, see :func:`corrected_profile_posterior`),
    ``log_prior`` the log prior density on the box (a number).

    The first ``first_draws`` (default :data:`FIRST_DRAWS`) draws are the flow's own (DINGO-IS): their
    weights give the flow's diagnostics. If their effective sample size (of the Pareto-smoothed
    weights) falls short of ``ess_target`` (default: ``n_samples``, at most :data:`ESS_TARGET`) and
    ``adapt``, the proposal becomes a :class:`DefensiveMixture` fitted to the latest weighted draws,
    refitted to its own :data:`ADAPT_DRAWS` draws until their normalised ESS reaches
    :data:`ADAPTED_ENOUGH` or the ESS target (:data:`ADAPT_ROUNDS` times at most). The pool is then
    drawn from the last proposal alone (the adaptation's draws are not reused but for its last round), in rounds
    whose size the normalised ESS of the previous ones says the target needs (at least doubling the
    pool, up to ``max_draws``, default :data:`MAX_DRAWS`), and ``n_samples`` are resampled by the
    smoothed weights (``refine.importance_resample``).

    Returns ``(theta (n_samples, dim), q_draws (<= n_samples, dim), report)``: the corrected draws,
    the flow's own first draws, and a JSON-ready report with ``khat`` (of the pool's raw weights),
    ``is_ess`` (normalised ESS of the smoothed weights), ``ess`` (effective draws), ``draws`` (in the
    pool), ``distinct``, ``proposal`` ("flow" or "flow + t"), ``vi_is_ess``, ``vi_khat`` and ``vi_elbo``
    (of the flow's own first draws), ``trustworthy`` (k-hat <= 0.7 and ESS >= target) and ``warning``
    (None, or one line).
    """
    ess_target = min(n_samples, ESS_TARGET) if ess_target is None else ess_target
    first_draws = FIRST_DRAWS if first_draws is None else first_draws
    max_draws = MAX_DRAWS if max_draws is None else max_draws
    with torch.no_grad():
        context = model.context(data)
    proposal = FlowProposal(model, context, log_likelihood, log_prior)
    pool_theta, pool_log_weights = proposal.draw(first_draws, generator)
    flow_theta, first_round = pool_theta, pool_log_weights
    rounds = 0
    while adapt and rounds < ADAPT_ROUNDS and diagnostics.importance_ess(pool_log_weights) * pool_log_weights.size < ess_target:
        location, scale_tril = moment_matched(model, pool_theta, pool_log_weights)
        proposal = DefensiveMixture(model, context, log_likelihood, log_prior, location, scale_tril)
        pool_theta, pool_log_weights = proposal.draw(ADAPT_DRAWS, generator)
        rounds += 1
        if diagnostics.importance_ess(pool_log_weights) >= ADAPTED_ENOUGH:
            break
    while True:
        smoothed, _ = diagnostics.pareto_smoothed_log_weights(pool_log_weights)
        fraction = diagnostics.importance_ess(smoothed)
        size = pool_log_weights.size
        if fraction * size >= ess_target or size >= max_draws:
            break
        wanted = int(math.ceil(1.1 * ess_target / max(fraction, 1e-12))) - size
        more = min(max(wanted, size), max_draws - size)
        theta, log_weights = proposal.draw(more, generator)
        pool_theta = np.concatenate([pool_theta, theta])
        pool_log_weights = np.concatenate([pool_log_weights, log_weights])
    theta, info = refine.importance_resample(pool_theta, pool_log_weights, n_samples, rng)
    ess = info["is_ess"] * pool_log_weights.size
    report = {
        "khat": float(info["khat"]),
        "is_ess": float(info["is_ess"]),
        "ess": float(ess),
        "ess_target": int(ess_target),
        "draws": int(pool_log_weights.size),
        "distinct": int(info["distinct"]),
        "proposal": f"flow + t ({rounds} adaptations)" if rounds else "flow",
        "vi_khat": float(diagnostics.psis_khat(first_round)),
        "vi_is_ess": float(diagnostics.importance_ess(first_round)),
        "vi_elbo": float(np.mean(first_round)) if np.all(np.isfinite(first_round)) else -math.inf,
    }
    problems = []
    if not report["khat"] <= diagnostics.PSIS_KHAT_LIMIT:
        problems.append(f"k-hat {report['khat']:.2f} > {diagnostics.PSIS_KHAT_LIMIT}")
    if ess < ess_target:
        problems.append(f"effective sample size {ess:.0f} < {ess_target} after {report['draws']} draws")
    report["trustworthy"] = not problems
    report["warning"] = None if not problems else (
        "this profile lies outside what the network learned (" + "; ".join(problems) + "): its corrected "
        "posterior cannot be trusted; run a per-profile fit for it")
    return theta, flow_theta[:n_samples], report


def corrected_profile_posterior(model, problem, n_samples, **options):
    """:func:`corrected_posterior` of a gravity profile (a :class:`forward.Problem`), with its exact likelihood."""
    parameter = next(model.parameters())
    log_likelihood = forward.TorchLikelihood(problem).to(device=parameter.device, dtype=parameter.dtype)
    return corrected_posterior(model, problem.g_obs, log_likelihood, problem.log_prior_density, n_samples, **options)


# ----------------------------------------------------------------------------------------------
# Held-out test profiles, each scored against its exact reference


#: The test profiles' random stream is (seed, TEST_STREAM): never the training simulations' (a torch generator).
TEST_STREAM = 20
#: Draws of q alone per test profile for the SBC ranks (ranks 0 .. SBC_DRAWS; Talts et al. 2018).
SBC_DRAWS = 99


def simulated_profiles(survey, n, seed):
    """``n`` held-out test profiles of the survey: theta ~ prior box, d = g(theta) + sigma eps, numpy.

    Their own stream, ``numpy.random.default_rng([seed, TEST_STREAM])``, shares nothing with training.
    Returns a list of :class:`forward.Problem` with ``truth`` set."""
    rng = np.random.default_rng([seed, TEST_STREAM])
    low, high = survey.bounds[:, 0], survey.bounds[:, 1]
    profiles = []
    for index in range(n):
        truth = rng.uniform(low, high)
        g_obs = survey.predict(truth) + survey.noise_sd_array * rng.standard_normal(survey.n_stations)
        profiles.append(forward.Problem(
            stations=survey.stations, g_obs=g_obs, noise_sd=survey.noise_sd, density=survey.density,
            bounds=survey.bounds, truth=truth, parameters=survey.parameters,
            source={"kind": "simulated test profile", "index": index, "seed": int(seed), "truth": truth.tolist()}))
    return profiles


def signal_to_noise(problem, theta):
    """The anomaly's signal-to-noise ratio over the profile, sqrt(sum (g(theta) / sigma)^2)."""
    return float(np.sqrt(np.sum((problem.predict(np.asarray(theta)) / problem.noise_sd_array) ** 2)))


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
