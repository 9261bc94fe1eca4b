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

Applying it to a profile, with the importance correction that makes its draws exact and says when
they cannot be, is :mod:`gravity_flows.inference.correction`.

Choices, and what they were measured against (``python Gravity_<flow>.py --amortize``: 50 held-out
test profiles of the default survey, each scored against its exact reference; on a 2-core machine
shared with other work, so CPU seconds are quoted beside wall seconds):

- Budget: 10000 steps x 256 fresh simulations (2.56 million simulated profiles), Adam from a
  learning rate of 1e-3 with a cosine decay to 0. With the coupling spline, 4000 steps left the flow
  alone off by a median 3.0 posterior sd (2 of 3 profiles with a corrected error <= 0.05, by the
  flow's own draws); 10000 steps, 1.6 sd (78 %; 94 % with the adapted proposal of
  ``correction``). The loss still falls at 10000 steps: more steps would sharpen q and shorten each
  posterior, but 10000 already take about 3 CPU-minutes (15 minutes of wall time on the busy machine).
  On the ridge (``--density-bounds 1000 4000``, coupling_Affine, the 50 test profiles, the pooled
  float32 correction with its Laplace rescue) 2000 / 4000 / 10000 / 20000 steps took 33 / 68 / 158 /
  339 s and left 94 / 86 / 92 / 94 % of the profiles within 0.05, the flow alone 2.6 / 1.6 / 1.1 /
  0.7 sd off, the posterior 0.164 / 0.099 / 0.058 / 0.045 s: the correction makes up for a coarse q,
  at the price of more draws (and Laplace fits) per profile. (Without the Laplace rescue: 64 / 74 /
  88 / 86 %.) With this release's correction (its log-coordinate t on the ridge) 2000 / 4000 / 10000
  steps left 98 / 100 / 98 %, the posterior 0.169 / 0.104 / 0.078 s, and every flow at 2000 steps
  92-100 % on the ridge and 96-100 % with the density known (README): ``compare.py --amortized``
  trains 2000 steps (its ``AMORTIZED_ITERATIONS``, the smallest survey that repays a model), while
  ``--amortize`` keeps 10000, whose cheaper posterior pays off on surveys of more than about 1400
  profiles.
- Conditioners: ``--hidden`` 32 (the scripts' default) and 64 scored alike at 4000 steps (73 % and
  67 % of 30 profiles, within their noise), so the scripts' own options stand; the layer counts are
  the per-profile defaults from the Laplace start (``flow_parser(amortized_defaults=...)``).
- Precision: training runs in float32 (40 ms a step against 70 ms in float64, 256 simulations, one
  thread), and it is applied in float32 too (``correction.PRECISION``: half the time per profile, the
  same accuracy); only the log weights' smoothing and resampling run in float64. A per-profile fit from
  the model (``--init amortized``) trains in float64, as every per-profile flow does.
- Summary network and context: 3 layers of 256 SiLU units into a context of 64 (the prototype's size,
  not varied here); the input scaling is measured by what it has to span (:class:`SummaryNetwork`).
"""

import math
import sys
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import forward
from gravity_flows.flows.layers import FlowSequence, soft_clip
from gravity_flows.inference import vi
from gravity_flows.inference.vi import TrainingDiverged, lower_triangular
from gravity_flows.scoring import convergence

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
    which stations carry what (a convolution would be an assumption about their spacing). Its cost
    is that first layer: 12.6 of a training step's 23.5 ms at N = 1000, hidden 256, 256 profiles
    (measured, float32, one thread).

    What it cannot do: its output, and so q's location, is a smooth function of d fitted to about
    1 % of the prior box, whatever the profile. A strong anomaly's posterior is far narrower than
    that (the flow alone is off by 5-60 posterior sd at a signal-to-noise ratio above 3000, against
    0.2-2 sd below 100: ``amortized.png``), which is what the importance correction, and its
    adapted proposal, repair.
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
        # R(c) into zeros, then I added: the same numbers as writing R into an expanded identity, which
        # torch.compile's inductor (torch 2.13, CPU) got wrong, as if every row were one (R off by 2.0)
        strictly_lower = raw.new_zeros(raw.shape[0], dim, dim).index_put(
            (torch.arange(raw.shape[0], device=raw.device)[:, None], self.lower_index[0], self.lower_index[1]),
            raw[:, 2 * dim:])
        unit_lower = strictly_lower + torch.eye(dim, dtype=raw.dtype, device=raw.device)
        return location, unit_lower, log_scale

    def pull(self, theta, context):
        """eps = T^-1(theta; c), the base points of theta (n, dim) inside the box, and log|det deps/dtheta| (n,);
        contexts (n, C) or (1, C)."""
        u, log_det_box = self.box.inverse(theta)  # log|du/dtheta|
        location, unit_lower, log_scale = self.affine(context)
        scaled = ((u - location) * torch.exp(-log_scale))[..., None]
        y = torch.linalg.solve_triangular(unit_lower.expand(u.shape[0], -1, -1), scaled, upper=False,
                                          unitriangular=True)[..., 0]
        eps, log_det_flow = self.flow.inverse(y, context, numerical=self.numerical_inverse)
        return eps, log_det_flow - log_scale.sum(-1) + log_det_box

    def log_prob(self, theta, context):
        """log q(theta | c) for theta (n, dim) inside the box and contexts (n, C) or (1, C)."""
        eps, log_det = self.pull(theta, context)
        return standard_normal_log_density(eps) + log_det

    def push(self, eps, context):
        """theta = T(eps; c), the map of base points eps (n, dim) for one context c (1, C), and log|det dtheta/deps| (n,)."""
        y, log_det_flow = self.flow(eps, context)
        location, unit_lower, log_scale = self.affine(context)
        u = location + (y @ unit_lower[0].T) * torch.exp(log_scale)
        theta, log_det_box = self.box(u)
        return theta, log_det_flow + log_scale.sum(-1) + log_det_box

    def sample(self, n, context, generator=None):
        """``n`` draws theta (n, dim) of q(theta | c) for one context c (1, C), and their log q (n,)."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=context.dtype, device=context.device)
        theta, log_det = self.push(eps, context)
        return theta, standard_normal_log_density(eps) - log_det


def standard_normal_log_density(eps):
    """log N(eps; 0, I) of each row of eps (n, dim)."""
    return -0.5 * eps.square().sum(-1) - 0.5 * eps.shape[-1] * math.log(2 * math.pi)


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
    posterior: ``--init amortized``).

    What is trained. The context c = S(d) is computed once, and with it the context's affine map:
    u = m(c) + L(c) y becomes a fixed standardisation (the Laplace start's, learnt), as in
    ``FlowPosterior``. In its place a learnable affine correction in the layers' output space,

        y' = a + A y,   A lower-triangular with a positive diagonal, a = 0 and A = I at the start,
        u  = m(c) + L(c) y',   log q gains -log|det A|,

    is trained with the flow's layers (``train_layers``; False: the correction alone). So q starts
    exactly as the amortized q of d, and one Adam step of size lr on a moves q by lr of its own
    posterior sd. Training the head's weights instead (the first version) moved m(c) by
    lr * ||c||_1 on the first step (Adam's steps have one size for every weight, and those of a
    constant input all point the same way): on the survey model of examples/survey the error rose
    from 1.4 to 13.9 in 5 steps at lr 1e-3. The summary network and the head are frozen
    (``requires_grad`` off, not counted as the fit's weights).
    """

    def __init__(self, model, data, *, train_layers=True):
        super().__init__()
        self.posterior = model
        model.summary.requires_grad_(False)
        model.location_scale.requires_grad_(False)
        model.flow.requires_grad_(train_layers)
        if train_layers:
            for module in model.flow.modules():
                if getattr(module, "context_size", 0) and hasattr(module, "freeze_context"):
                    module.freeze_context()
        with torch.no_grad():
            context = model.context(data)
            location, unit_lower, log_scale = model.affine(context)
        self.register_buffer("context", context)
        self.register_buffer("location", location[0])
        self.register_buffer("scale_tril", torch.exp(log_scale[0])[:, None] * unit_lower[0])  # L = diag(sigma)(I + R)
        self.log_det_scale = float(log_scale.sum())
        dim = model.dim
        dtype, device = location.dtype, location.device
        self.loc = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        self.raw_diagonal = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        self.raw_lower = nn.Parameter(torch.zeros(dim * (dim - 1) // 2, dtype=dtype, device=device))
        self.register_buffer("lower_index", torch.tril_indices(dim, dim, offset=-1, device=device))

    @property
    def dim(self):
        return self.posterior.dim

    def push(self, eps):
        """theta = T(eps) for base points eps (n, dim), and log|det dtheta/deps| (n,)."""
        y, log_det_flow = self.posterior.flow(eps, self.context)
        correction = lower_triangular(self.raw_diagonal, self.raw_lower, self.lower_index)
        y = torch.addmm(self.loc, y, correction.T)
        theta, log_det_box = self.posterior.box(torch.addmm(self.location, y, self.scale_tril.T))
        return theta, log_det_flow + torch.log(torch.diagonal(correction)).sum() + self.log_det_scale + log_det_box

    def sample(self, n, generator=None):
        """``n`` draws theta (n, dim) of q(theta | d) and their log q (n,), in one differentiable pass."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.location.dtype, device=self.location.device)
        theta, log_det = self.push(eps)
        return theta, standard_normal_log_density(eps) - log_det


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
                    progress=True, stop=None, compile=False):
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
    compile : compile the loss and its gradient with ``torch.compile`` (``vi.CompiledStep``: where it
        cannot compile, a warning and the step uncompiled); the simulations stay uncompiled

    A step whose loss or gradient is not finite (a rare simulation q cannot yet place: the prototype
    diverged to NaN at step 9000 without this) is skipped; :class:`TrainingDiverged` after
    :data:`MAX_SKIPPED_IN_A_ROW` in a row, or if a parameter becomes non-finite.

    Returns ``(history, seconds, skipped, compiled)``: the loss of every step done (NaN where skipped),
    the training time, the number of skipped steps, and whether the step ran compiled.
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

    def loss_terms(theta, data):
        return (-model.log_prob(theta, model.summary(data)).mean(),)

    step = vi.CompiledStep(loss_terms, parameters=parameters) if compile else vi.EagerStep(loss_terms)
    for iteration in bar:
        theta, data = simulator(simulations, generator)
        optimiser.zero_grad(set_to_none=True)
        (loss,) = step(theta.to(dtype), data.to(dtype))
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
    return history[:done], seconds, skipped, step.compiled


# ----------------------------------------------------------------------------------------------
# Held-out test profiles (scored by correction.score_profile)


#: The test profiles' random stream is (seed, TEST_STREAM): never the training simulations' (a torch generator).
TEST_STREAM = 20


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
