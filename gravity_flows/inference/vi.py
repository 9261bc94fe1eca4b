"""Variational inference with a normalizing flow: the flow posterior, its training, and its evaluation.

The variational posterior pushes a standard normal through, in order (SPEC, 'How every flow is
trained'):

1. a learnable affine map ``y = a + A eps`` (A lower-triangular with a positive diagonal), the
   identity at the start;
2. the method's flow layers (each the identity at the start);
3. a *fixed* standardisation ``u = m + S y``: with ``--init laplace`` (default) m is the mode of
   the posterior of u and S the Cholesky factor of its Laplace covariance, so everything learnable
   works in units of the posterior's width; with ``--init prior``, m = 0 (the box centre), S = I,
   except in a coordinate pressed on a bound (:func:`prior_centre`);
4. the fixed bijection onto the prior box, ``theta = lo + (hi - lo) sigmoid(u)``.

One pass gives samples and their log-density, ``log q(theta) = log N(eps) - sum of log|det|`` of
every step. Training maximises the evidence lower bound with reparameterised samples,

    ELBO = E_q[ log L(theta) + log p(theta) - log q(theta) ] = log Z - KL(q || p),

by Adam with a cosine learning-rate decay to zero. After training, KL(q||p) = log Z - ELBO against
the exact reference, and importance-sampling diagnostics of the weights p/q (normalised ESS and the
Pareto k-hat of PSIS, Vehtari et al. 2024).
"""

import contextlib
import math
import sys
import warnings

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import forward
from gravity_flows.flows.layers import FlowSequence
from gravity_flows.scoring import convergence, diagnostics

#: The base map's diagonal is softplus(raw + _DIAGONAL_SHIFT) + _DIAGONAL_EPS: exactly 1 at raw = 0, never 0.
_DIAGONAL_EPS = 1e-6
_DIAGONAL_SHIFT = math.log(math.expm1(1.0 - _DIAGONAL_EPS))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration and what to change."""


class FlowPosterior(nn.Module):
    """q(theta): standard normal -> learnable affine map -> flow layers -> fixed standardisation -> box.

    ``bounds`` (dim, 2) is the prior box, one row per unknown; ``shift`` (dim,) and ``scale_tril``
    (dim, dim) are the fixed standardisation u = shift + scale_tril y; ``coordinates`` names the fixed
    bijection from u onto the box (``forward.flow_bijection``: "box", or "mass" with a free density).
    """

    def __init__(self, layers, bounds, shift, scale_tril, coordinates="box"):
        super().__init__()
        dim = len(bounds)
        self.dim = dim
        self.coordinates = coordinates
        self.loc = nn.Parameter(torch.zeros(dim))
        self.raw_diagonal = nn.Parameter(torch.zeros(dim))
        self.raw_lower = nn.Parameter(torch.zeros(dim * (dim - 1) // 2))
        self.flow = FlowSequence(layers)
        self.box = forward.flow_bijection(coordinates, bounds)
        self.register_buffer("shift", torch.as_tensor(np.asarray(shift, dtype=float)))
        self.register_buffer("scale_tril", torch.as_tensor(np.asarray(scale_tril, dtype=float)))
        self.register_buffer("lower_index", torch.tril_indices(dim, dim, offset=-1))
        self.log_det_scale = float(np.sum(np.log(np.abs(np.diag(scale_tril)))))

    def base_matrix(self):
        """The learnable lower-triangular A, positive diagonal."""
        return lower_triangular(self.raw_diagonal, self.raw_lower, self.lower_index)

    def sample_u(self, n, generator=None):
        """``n`` draws of u (n, dim), before the box, and their log q(u) (n,), in one differentiable pass."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        matrix = self.base_matrix()
        # log N(eps) - log|A|, one reduction for both
        log_q = -0.5 * eps.square().sum(-1) - (0.5 * self.dim * math.log(2 * math.pi) + self.log_det_scale) \
            - torch.log(torch.diagonal(matrix)).sum()
        y = torch.addmm(self.loc, eps, matrix.T)
        y, log_det = self.flow(y)
        return torch.addmm(self.shift, y, self.scale_tril.T), log_q - log_det

    def sample(self, n, generator=None):
        """``n`` samples theta (n, dim) and their log q(theta) (n,), in one differentiable pass."""
        u, log_q = self.sample_u(n, generator)
        theta, log_det = self.box(u)
        return theta, log_q - log_det


def lower_triangular(raw_diagonal, raw_lower, lower_index):
    """The lower-triangular matrix with diagonal softplus(raw_diagonal + shift) + 1e-6 (exactly the identity
    at raw 0, never singular) and the entries ``raw_lower`` below it, at ``lower_index`` (2, dim (dim - 1) / 2)."""
    diagonal = nn.functional.softplus(raw_diagonal + _DIAGONAL_SHIFT) + _DIAGONAL_EPS
    return torch.diag_embed(diagonal).index_put((lower_index[0], lower_index[1]), raw_lower)


#: From the prior the flow's frame is the box's own (u = y), except in a coordinate whose posterior mode lies
#: beyond this in u (the posterior pressed on a bound: within 4.7 % of the box's width from it), see
#: :func:`prior_centre`.
PRESSED_U = 3.0


def mode_u(laplace, coordinates="box", bounds=None):
    """The Laplace fit's mode in the flows' u of ``coordinates`` on the box ``bounds`` (needed unless "box"),
    and the Jacobian du/du_box there (dim, dim).

    In the box's own coordinates that is the fit's u and the identity; in mass coordinates the mode is
    mapped through the box onto theta and back (``forward.MassBijection.inverse``), and the Jacobian of
    that composite map is what carries the fit's covariance into them (the delta method)."""
    if coordinates == "box":
        return laplace.u_map, np.eye(laplace.u_map.size)
    box = forward.BoxBijection(bounds).double()
    flows_map = forward.flow_bijection(coordinates, bounds).double()

    def to_flows_u(u_box):
        return flows_map.inverse(box(u_box)[0])[0]

    u_box = torch.as_tensor(laplace.u_map, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(to_flows_u, u_box)
    return to_flows_u(u_box).numpy(), jacobian.numpy()


def prior_centre(laplace, coordinates="box", bounds=None):
    """The centre of the flow's frame from the prior start, u = shift + y: 0 (the box's centre) in every
    coordinate, except where the mode of the posterior of u lies beyond ``PRESSED_U``, where it is the mode.

    The spline layers act on y only within their tail bound (±5 by default) and are the identity outside. A
    posterior pressed on a prior bound lies far out in u (examples/profile.csv: x0 = 0.012 ± 0.012 m in
    [0, 10] m, u = -6.7), out of their reach: from u = 0, auto_NSF and coupling_NSF piled up at the tail
    bound (x0 = 0.076 m) and missed by 5.6 posterior sd. Centred on the mode there, they score 0.02-0.035
    (density known and free). Where the mode lies within ``PRESSED_U`` nothing changes: centring every
    coordinate on the mode made coupling_NSF worse on the mass ridge (seeds 0-2: 0.27, 0.30, 0.10 against
    0.11, 0.10, 0.19) and planar too (seeds 1-2: 0.073, 0.079). Where the data barely constrain the body
    (``laplace.weak``) the mode is no guide: 0 everywhere. The mode is the Laplace fit's, in the flows'
    ``coordinates`` (:func:`mode_u`)."""
    if laplace.weak:
        return np.zeros(laplace.u_map.size)
    mode, _ = mode_u(laplace, coordinates, bounds)
    return np.where(np.abs(mode) > PRESSED_U, mode, 0.0)


def standardisation(init, laplace, coordinates="box", bounds=None):
    """(shift, scale_tril) of the fixed map u = shift + scale_tril y for ``--init``, in the flows' ``coordinates``
    on the box ``bounds`` (needed unless "box")."""
    if init == "laplace":
        mode, jacobian = mode_u(laplace, coordinates, bounds)
        return mode, np.linalg.cholesky(jacobian @ laplace.u_cov @ jacobian.T)
    return prior_centre(laplace, coordinates, bounds), np.eye(laplace.u_map.size)


#: Annealing: beta rises geometrically from this to 1 (Rezende & Mohamed 2015 anneal their free energy likewise).
BETA_START = 1e-4
#: How often (iterations) training looks at the loss on the host: a check per step would stall a GPU.
CHECK_EVERY = 100
#: Adaptive annealing looks at beta on the host this often, to end the annealing once beta is 1.
ANNEAL_CHECK_EVERY = 10
#: Candidate temperatures per step of the adaptive schedule (geometric between the current beta and 1).
ANNEAL_CANDIDATES = 64
#: The adaptive schedule starts from this beta (the prior itself, beta = 0, has no geometric neighbours).
ADAPTIVE_BETA_START = 1e-8
#: ``torch.compile``'s backend for ``train(compile=True)`` (inductor: C++ on the CPU, Triton on a GPU).
COMPILE_BACKEND = "inductor"


def elbo_terms(model, log_likelihood, log_prior, n, generator=None):
    """Samples and their log importance weights log p(d, theta) - log q(theta)."""
    theta, log_q = model.sample(n, generator)
    return theta, log_likelihood(theta) + log_prior - log_q


def anneal_schedule(iterations, fraction, beta_start=BETA_START):
    """The inverse temperature beta of every iteration: geometric from ``beta_start`` to 1 over the first
    ``round(fraction * iterations)`` iterations, then 1. ``fraction`` 0: no annealing (beta = 1 throughout)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the annealing fraction must lie in [0, 1], got {fraction}")
    beta = np.ones(iterations)
    n = int(round(fraction * iterations))
    if n > 1:
        beta[:n] = np.geomspace(beta_start, 1.0, n)
    return beta


def normalised_ess(log_weights):
    """(sum w)^2 / (n sum w^2) along the last axis, torch: 1 for equal weights, 1/n for one weight."""
    log_weights = log_weights - log_weights.amax(-1, keepdim=True)
    return torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1)) / log_weights.shape[-1]


def next_temperature(beta, log_likelihood, log_rest, ess, candidates=ANNEAL_CANDIDATES):
    """The adaptive annealing step (as tempered SMC chooses its next temperature, Del Moral et al. 2012;
    Jasra et al. 2011): the largest beta' in [beta, 1] at which the draws of q, weighted against the
    tempered target p_beta'(theta) ∝ L(theta)^beta' p(theta), keep a normalised ESS of at least ``ess``,

        w_s(beta') = L(theta_s)^beta' p(theta_s) / q(theta_s),   ESS(beta') = (sum w)^2 / (n sum w^2) >= ess;

    ``beta`` itself where even that fails (q has not yet caught up with p_beta). ``log_likelihood`` and
    ``log_rest`` (= log p - log q) are the batch's, detached; ``beta`` a 0-d tensor. Searched on a
    geometric grid of ``candidates`` values from beta to 1, on the device (no host sync)."""
    steps = torch.linspace(1.0, 0.0, candidates + 1, dtype=log_likelihood.dtype, device=log_likelihood.device)
    grid = torch.exp(torch.log(beta) * steps)  # beta ... 1 (exactly), geometric
    ess_of = normalised_ess(grid[:, None] * log_likelihood + log_rest)
    allowed = torch.where(ess_of >= ess, grid, beta)
    return torch.maximum(allowed.amax(), beta)


def _cosine(lr, step, total):
    """Adam's learning rate at ``step`` (0-based) of a cosine decay from ``lr`` to 0 over ``total`` steps."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / total))


def train(model, log_likelihood, log_prior, *, iterations, batch, lr, clip_norm=None, clip_value=None,
          generator=None, progress=True, stop=None, anneal=0.0, anneal_ess=None, beta_start=BETA_START,
          checkpoints=(), on_checkpoint=None, trace=None, compile=False):
    """Maximise the (annealed) ELBO with Adam and a cosine decay of the learning rate to zero.

    Arguments
    ---------
    model, log_likelihood, log_prior : the FlowPosterior, a torch function theta -> log L, log p (a number).
    iterations, batch, lr : training iterations (at most, with ``anneal_ess``), draws per step, Adam's rate.
    clip_norm, clip_value : gradient clipping by norm or by value (None: off).
    generator : the torch generator of the draws; ``progress`` a progress bar on stderr; ``stop`` an
        object whose ``interrupted`` flag ends training early.
    anneal : the share of the iterations over which the likelihood is tempered (0: never): the loss is
        -E_q[beta log L + log p - log q] with beta rising from near 0 to 1, so that q first spreads over
        the prior and then contracts onto the posterior.
    anneal_ess : None: beta rises geometrically over exactly that share (:func:`anneal_schedule`), and
        the learning rate decays by a cosine over all the iterations. A fraction in (0, 1): the adaptive
        schedule — after each step beta rises as far as the importance weights of the batch against the
        tempered target allow (:func:`next_temperature`), annealing ends when beta reaches 1 (or at the
        end of its share), and the iterations of the share it did not need are not run; the learning
        rate stays at ``lr`` while annealing and then decays by a cosine over the ``(1 - anneal)``
        share of the iterations that follows.
    checkpoints, on_checkpoint : after each iteration listed (1-based) ``on_checkpoint(iteration,
        seconds)`` is called with the training time so far; the time it takes is not counted.
    trace : a dict, or None; receives ``beta`` (numpy, every iteration done), ``anneal_iterations``
        (the iterations annealing took, those of its share: the iteration at which beta became 1 for good)
        and ``compiled`` (whether the step ran compiled).
    compile : compile the step's forward and backward pass (draws, likelihood, loss) with
        ``torch.compile`` (:class:`CompiledStep`); its compilation happens in the first iteration and
        counts in the training time. Where it cannot compile (no C++ compiler, an unsupported
        backend), a warning and the step as it is.

    Returns ``(history, seconds)``: the ELBO estimate (at beta = 1, whatever the current beta) of every
    iteration done, and the training time. The loss is brought to the host only every ``CHECK_EVERY``
    iterations (a per-step ``.item()`` stalls a GPU); a non-finite ELBO then raises
    :class:`TrainingDiverged` naming the first iteration where it appeared.
    """
    adaptive = anneal_ess is not None and anneal > 0
    if adaptive and not 0.0 < anneal_ess < 1.0:
        raise ValueError(f"the annealing ESS must lie in (0, 1), got {anneal_ess}")
    anneal_budget = int(round(anneal * iterations))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    optimiser = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    # beta is a 0-d tensor, so that a compiled step is compiled once, not once per temperature
    one = torch.ones((), dtype=dtype, device=device)
    if adaptive:
        beta = torch.tensor(ADAPTIVE_BETA_START, dtype=dtype, device=device)
        post_anneal = iterations - anneal_budget
    else:
        fixed_beta = torch.as_tensor(anneal_schedule(iterations, anneal, beta_start), dtype=dtype, device=device)

    def loss_terms(step_beta):
        theta, log_q = model.sample(batch, generator)
        log_like = log_likelihood(theta)
        log_rest = log_prior - log_q
        # the ELBO is only recorded, never differentiated: formed from detached terms, autograd records nothing for it
        elbo = (log_like.detach() + log_rest.detach()).mean()
        return -(step_beta * log_like + log_rest).mean(), elbo, log_like, log_rest

    step = CompiledStep(loss_terms, generator, model.parameters()) if compile else EagerStep(loss_terms)
    anneal_end = None if anneal_budget > 0 else 0  # the iteration at which annealing ended (None: not yet)
    checkpoints = set(checkpoints)
    history = torch.empty(iterations, dtype=torch.float64, device=device)
    betas = torch.ones(iterations, dtype=torch.float64, device=device) if trace is not None else None
    bar = tqdm(total=iterations, desc="training", disable=not progress, mininterval=0.5, file=sys.stderr)
    clock = convergence.Clock(lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None)
    iteration = 0
    while iteration < iterations:
        # the learning rate: constant while adaptive annealing runs, then a cosine to 0
        if adaptive:
            step_lr = lr if anneal_end is None else _cosine(lr, iteration - anneal_end, post_anneal)
        else:
            step_lr = _cosine(lr, iteration, iterations)
        for group in optimiser.param_groups:
            group["lr"] = step_lr
        step_beta = (beta if anneal_end is None else one) if adaptive else fixed_beta[iteration]
        try:
            optimiser.zero_grad(set_to_none=True)
            _, elbo, log_like, log_rest = step(step_beta)
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            if clip_value is not None:
                nn.utils.clip_grad_value_(model.parameters(), clip_value)
            optimiser.step()
        except Exception:
            _check_finite(history, iteration, iterations)  # after a NaN step anything may fail: name the NaN
            raise
        history[iteration] = elbo
        if betas is not None:
            betas[iteration] = step_beta
        iteration += 1
        bar.update()
        if adaptive and anneal_end is None:
            beta = next_temperature(beta, log_like, log_rest, anneal_ess)
            if iteration == anneal_budget or (iteration % ANNEAL_CHECK_EVERY == 0 and bool(beta >= 1.0)):
                anneal_end = iteration
                iterations = min(iterations, anneal_end + post_anneal)  # the share annealing did not need is not run
                bar.total = iterations
        elif not adaptive and anneal_end is None and iteration == anneal_budget:
            anneal_end = iteration
        last = iteration == iterations or (stop is not None and stop.interrupted)
        if iteration % CHECK_EVERY == 0 or last:
            recent = history[max(0, iteration - CHECK_EVERY):iteration]
            _check_finite(history, iteration, iterations)
            note = "" if anneal_end is not None else f", beta {float(step_beta):.2g}"
            bar.set_postfix_str(f"ELBO {recent.mean().item():.2f}{note}", refresh=False)
        if iteration in checkpoints and on_checkpoint is not None:
            so_far = clock.seconds()  # read before the pause, so that no later reading can be smaller
            with clock.paused():
                _check_finite(history, iteration, iterations)
                on_checkpoint(iteration, so_far)
        if stop is not None and stop.interrupted:
            break
    bar.close()
    seconds = clock.seconds()
    done = iteration
    for parameter in model.parameters():
        if not torch.isfinite(parameter).all():
            raise TrainingDiverged(f"training diverged by iteration {done}: some flow parameters are not finite")
    if trace is not None:
        trace["beta"] = betas[:done].cpu().numpy()
        trace["anneal_iterations"] = int(done if anneal_end is None else anneal_end)
        trace["compiled"] = step.compiled
    return history[:done].cpu().numpy(), seconds


class EagerStep:
    """A training step's differentiable part as it is: ``step(*inputs)`` evaluates ``loss_terms(*inputs) ->
    (loss, ...)``, back-propagates the loss and returns everything ``loss_terms`` returned, detached."""

    compiled = False

    def __init__(self, loss_terms):
        self.loss_terms = loss_terms

    def __call__(self, *inputs):
        outputs = self.loss_terms(*inputs)
        outputs[0].backward()
        return tuple(output.detach() for output in outputs)


class CompiledStep(EagerStep):
    """:class:`EagerStep` with ``loss_terms`` compiled by ``torch.compile`` (its forward and, by AOTAutograd,
    its backward pass), for one shape and dtype (``dynamic=False``: the batch never changes).

    Why: a training step is a few hundred operations on 64 x 1000 numbers, and on a CPU most of its
    time is the dispatch of each operation, not arithmetic; compiled, the operations are fused into a
    few loops. Measured on the 2-core machine, one thread, float64 (``bench/flow_step.py --compile``;
    README, 'Compiling the training step'): on the mass ridge 1.5-2.7 times fewer ms per step (2.1-3.5
    against 3.1-7.8), but the first step compiles: 7-50 s while torch's on-disk cache
    (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temporary folder) is empty, about
    4-6 s in a new process once it holds this flow's kernels.

    The first step is tried compiled; if compiling fails (no C++ compiler, a backend torch lacks) a
    warning names why, ``generator`` (the one ``loss_terms`` draws from, if any) is put back where it
    was, any gradient of ``parameters`` the failed try left is dropped, and every step runs eagerly
    (``compiled`` is then False)."""

    def __init__(self, loss_terms, generator=None, parameters=()):
        super().__init__(loss_terms)
        self.compiled = True
        self.eager = loss_terms
        with _quiet_compiler():
            self.loss_terms = torch.compile(loss_terms, dynamic=False, backend=COMPILE_BACKEND)
        self.generator = generator
        self.parameters = list(parameters)
        self.first = True

    def __call__(self, *inputs):
        if not self.first:
            return super().__call__(*inputs)
        self.first = False
        state = None if self.generator is None else self.generator.get_state()
        try:
            with _quiet_compiler():
                return super().__call__(*inputs)
        except Exception as error:  # compiling failed: nothing was stepped yet, so train eagerly instead
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            print(f"warning: --compile: torch.compile could not compile the training step ({type(error).__name__}: "
                  f"{reason}); training without compiling", file=sys.stderr)
            if state is not None:
                self.generator.set_state(state)
            for parameter in self.parameters:
                parameter.grad = None
            self.compiled = False
            self.loss_terms = self.eager
            return super().__call__(*inputs)


@contextlib.contextmanager
def _quiet_compiler():
    """No warnings from torch's compiler about its own internals (deprecations it raises on itself), nor
    dynamo's about tracing through ``functools.lru_cache``: the splines' cached gather offsets are one
    constant tensor per bin count, which tracing puts into the graph, as the cache intends."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lru_cache.*", category=UserWarning)
        for internal in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=internal, module="torch")
        yield


def _check_finite(history, done, iterations):
    """Raise TrainingDiverged naming the first of the ``done`` iterations whose ELBO is not finite (one host sync)."""
    finite = torch.isfinite(history[:done])
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise TrainingDiverged(f"training diverged at iteration {first + 1} of {iterations} "
                               f"(the ELBO is {history[first].item()})")


@torch.no_grad()
def evaluate(model, log_likelihood, log_prior, n, generator=None, chunk=10_000):
    """Draw n samples; return theta (n, dim) and their log weights log p(d, theta) - log q(theta), numpy."""
    thetas, log_weights = [], []
    for start in range(0, n, chunk):
        theta, log_weight = elbo_terms(model, log_likelihood, log_prior, min(chunk, n - start), generator)
        thetas.append(theta.cpu().numpy())
        log_weights.append(log_weight.cpu().numpy())
    return np.concatenate(thetas), np.concatenate(log_weights)


def importance_diagnostics(log_weights, log_evidence=None):
    """ELBO with its Monte Carlo standard error, KL(q||p) if log Z is known, ESS of p/q and PSIS k-hat."""
    finite = np.isfinite(log_weights)
    elbo = float(np.mean(log_weights)) if finite.all() else -math.inf
    result = {
        "elbo": elbo,
        "elbo_se": float(np.std(log_weights, ddof=1) / math.sqrt(log_weights.size)) if finite.all() else math.inf,
        "kl": None if log_evidence is None else float(log_evidence - elbo),
        "is_ess": float(diagnostics.importance_ess(log_weights)),
        "khat": float(diagnostics.psis_khat(log_weights)),
    }
    return result


# ----------------------------------------------------------------------------------------------
