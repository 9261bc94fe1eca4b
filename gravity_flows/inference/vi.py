"""Variational inference with a normalizing flow: the flow posterior, its training, and its evaluation.

The variational posterior pushes a standard normal through, in order (SPEC, 'How every flow is
trained'):

1. a learnable affine map ``y = a + A eps`` (A lower-triangular with a positive diagonal), the
   identity at the start;
2. the method's flow layers (each the identity at the start);
3. a *fixed* standardisation ``u = m + S y``: with ``--init laplace`` (default) m is the mode of
   the posterior of u and S the Cholesky factor of its Laplace covariance, so everything learnable
   works in units of the posterior's width; with ``--init prior``, m = 0 (the box centre), S = I;
4. the fixed bijection onto the prior box, ``theta = lo + (hi - lo) sigmoid(u)``.

One pass gives samples and their log-density, ``log q(theta) = log N(eps) - sum of log|det|`` of
every step. Training maximises the evidence lower bound with reparameterised samples,

    ELBO = E_q[ log L(theta) + log p(theta) - log q(theta) ] = log Z - KL(q || p),

by Adam with a cosine learning-rate decay to zero. After training, KL(q||p) = log Z - ELBO against
the exact reference, and importance-sampling diagnostics of the weights p/q (normalised ESS and the
Pareto k-hat of PSIS, Vehtari et al. 2024).
"""

import math
import sys

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
    (dim, dim) are the fixed standardisation u = shift + scale_tril y.
    """

    def __init__(self, layers, bounds, shift, scale_tril):
        super().__init__()
        dim = len(bounds)
        self.dim = dim
        self.loc = nn.Parameter(torch.zeros(dim))
        self.raw_diagonal = nn.Parameter(torch.zeros(dim))
        self.raw_lower = nn.Parameter(torch.zeros(dim * (dim - 1) // 2))
        self.flow = FlowSequence(layers)
        self.box = forward.BoxBijection(bounds)
        self.register_buffer("shift", torch.as_tensor(np.asarray(shift, dtype=float)))
        self.register_buffer("scale_tril", torch.as_tensor(np.asarray(scale_tril, dtype=float)))
        self.register_buffer("lower_index", torch.tril_indices(dim, dim, offset=-1))
        self.log_det_scale = float(np.sum(np.log(np.abs(np.diag(scale_tril)))))

    def base_matrix(self):
        """The learnable lower-triangular A, positive diagonal."""
        diagonal = nn.functional.softplus(self.raw_diagonal + _DIAGONAL_SHIFT) + _DIAGONAL_EPS
        matrix = torch.diag_embed(diagonal)
        return matrix.index_put((self.lower_index[0], self.lower_index[1]), self.raw_lower)

    def sample(self, n, generator=None):
        """``n`` samples theta (n, dim) and their log q(theta) (n,), in one differentiable pass."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        log_q = -0.5 * eps.square().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        matrix = self.base_matrix()
        y = self.loc + eps @ matrix.T
        log_q = log_q - torch.log(torch.diagonal(matrix)).sum()
        y, log_det = self.flow(y)
        log_q = log_q - log_det
        u = self.shift + y @ self.scale_tril.T
        theta, log_det = self.box(u)
        return theta, log_q - self.log_det_scale - log_det


def standardisation(init, laplace):
    """(shift, scale_tril) of the fixed map u = shift + scale_tril y for ``--init``."""
    if init == "laplace":
        return laplace.u_map, np.linalg.cholesky(laplace.u_cov)
    dim = laplace.u_map.size
    return np.zeros(dim), np.eye(dim)


#: Annealing: beta rises geometrically from this to 1 (Rezende & Mohamed 2015 anneal their free energy likewise).
BETA_START = 1e-4
#: How often (iterations) training looks at the loss on the host: a check per step would stall a GPU.
CHECK_EVERY = 100


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


def train(model, log_likelihood, log_prior, *, iterations, batch, lr, clip_norm=None, clip_value=None,
          generator=None, progress=True, stop=None, anneal=0.0, checkpoints=(), on_checkpoint=None):
    """Maximise the (annealed) ELBO with Adam and a cosine decay of the learning rate to zero.

    With ``anneal`` > 0 the likelihood is tempered during the first ``anneal`` share of the
    iterations: the loss is -E_q[beta log L + log p - log q] with beta from :func:`anneal_schedule`,
    so that q first spreads over the prior and then contracts onto the posterior as beta rises to 1.

    Returns ``(history, seconds)``: the ELBO estimate (at beta = 1, whatever the current beta) of
    every iteration done — fewer than ``iterations`` if ``stop`` (an object with an ``interrupted``
    flag) was set — and the training time. After each iteration listed in ``checkpoints`` (1-based)
    ``on_checkpoint(iteration, seconds)`` is called with the training time so far; the time the
    callback takes is not counted. The loss is brought to the host only every ``CHECK_EVERY``
    iterations (a per-step ``.item()`` stalls a GPU); a non-finite ELBO then raises
    :class:`TrainingDiverged` naming the first iteration where it appeared.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=iterations, eta_min=0.0)
    beta = anneal_schedule(iterations, anneal).tolist()
    checkpoints = set(checkpoints)
    device = next(model.parameters()).device
    history = torch.empty(iterations, dtype=torch.float64, device=device)
    bar = tqdm(range(iterations), desc="training", disable=not progress, mininterval=0.5, file=sys.stderr)
    clock = convergence.Clock(lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None)
    done = iterations
    for iteration in bar:
        try:
            theta, log_q = model.sample(batch, generator)
            log_like = log_likelihood(theta)
            elbo = (log_like + log_prior - log_q).mean()
            loss = -elbo if beta[iteration] == 1.0 else -(beta[iteration] * log_like + log_prior - log_q).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            if clip_value is not None:
                nn.utils.clip_grad_value_(model.parameters(), clip_value)
            optimiser.step()
            schedule.step()
        except Exception:
            _check_finite(history, iteration, iterations)  # after a NaN step anything may fail: name the NaN
            raise
        history[iteration] = elbo.detach()
        last = iteration + 1 == iterations or (stop is not None and stop.interrupted)
        if (iteration + 1) % CHECK_EVERY == 0 or last:
            recent = history[max(0, iteration + 1 - CHECK_EVERY):iteration + 1]
            _check_finite(history, iteration + 1, iterations)
            bar.set_postfix_str(f"ELBO {recent.mean().item():.2f}" + (f", beta {beta[iteration]:.2g}" if beta[iteration] < 1 else ""),
                                refresh=False)
        if iteration + 1 in checkpoints and on_checkpoint is not None:
            with clock.paused():
                _check_finite(history, iteration + 1, iterations)
                on_checkpoint(iteration + 1, clock.seconds())
        if stop is not None and stop.interrupted:
            done = iteration + 1
            break
    bar.close()
    seconds = clock.seconds()
    for parameter in model.parameters():
        if not torch.isfinite(parameter).all():
            raise TrainingDiverged(f"training diverged by iteration {done}: some flow parameters are not finite")
    return history[:done].cpu().numpy(), seconds


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
