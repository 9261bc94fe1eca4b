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

import cli
import diagnostics
import figures
import forward
import report
import splines
from layers import FlowSequence

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


def elbo_terms(model, log_likelihood, log_prior, n, generator=None):
    """Samples and their log importance weights log p(d, theta) - log q(theta)."""
    theta, log_q = model.sample(n, generator)
    return theta, log_likelihood(theta) + log_prior - log_q


def train(model, log_likelihood, log_prior, iterations, batch, lr, clip_norm=None, clip_value=None,
          generator=None, progress=True, stop=None):
    """Maximise the ELBO with Adam and a cosine decay of the learning rate to zero.

    Returns the ELBO estimate of every iteration done (fewer than ``iterations`` if ``stop`` —
    an object with an ``interrupted`` flag — was set). Raises :class:`TrainingDiverged`.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=iterations, eta_min=0.0)
    history = np.empty(iterations)
    bar = tqdm(range(iterations), desc="training", disable=not progress, mininterval=0.5, file=sys.stderr)
    for iteration in bar:
        _, log_weights = elbo_terms(model, log_likelihood, log_prior, batch, generator)
        elbo = log_weights.mean()
        value = elbo.item()
        if not math.isfinite(value):
            bar.close()
            raise TrainingDiverged(f"training diverged at iteration {iteration + 1} of {iterations} (the ELBO is {value})")
        optimiser.zero_grad(set_to_none=True)
        (-elbo).backward()
        if clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        if clip_value is not None:
            nn.utils.clip_grad_value_(model.parameters(), clip_value)
        optimiser.step()
        schedule.step()
        history[iteration] = value
        if iteration % 100 == 0:
            bar.set_postfix_str(f"ELBO {history[max(0, iteration - 99):iteration + 1].mean():.2f}", refresh=False)
        if stop is not None and stop.interrupted:
            bar.close()
            return history[: iteration + 1]
    for parameter in model.parameters():
        if not torch.isfinite(parameter).all():
            raise TrainingDiverged(f"training diverged by iteration {iterations}: some flow parameters are not finite")
    return history


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
# Command line, shared by the six flow scripts


def flow_parser(doc, method, iterations, flows, hidden, lr, batch=64, spline=False):
    """The common options plus the flow options, with this method's defaults (``hidden=None``: no conditioner)."""
    parser = cli.common_parser(doc, method, default_samples=10_000)
    group = parser.add_argument_group("flow and training")
    group.add_argument("--flows", type=cli.positive_int, default=flows, help="number of flow layers (default: %(default)s)")
    if hidden is not None:
        group.add_argument("--hidden", type=cli.positive_int, default=hidden, help="hidden units per conditioner layer (default: %(default)s)")
    group.add_argument("--iterations", type=cli.positive_int, default=iterations, help="training iterations (default: %(default)s)")
    group.add_argument("--lr", type=cli.positive_float, default=lr, help="Adam's initial learning rate, decayed to 0 by a cosine (default: %(default)s)")
    group.add_argument("--batch", type=cli.positive_int, default=batch, help="Monte Carlo samples per training step (default: %(default)s)")
    clip = group.add_mutually_exclusive_group()
    clip.add_argument("--clip-norm", type=cli.positive_float, metavar="X", help="clip the gradient's norm to X")
    clip.add_argument("--clip-value", type=cli.positive_float, metavar="X", help="clip every gradient component to [-X, X]")
    group.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: %(default)s)")
    if spline:
        group.add_argument("--bins", type=cli.positive_int, default=splines.DEFAULT_BINS, help="spline bins K (default: %(default)s)")
        group.add_argument("--tail-bound", type=cli.positive_float, default=splines.DEFAULT_TAIL_BOUND, metavar="B",
                           help="the spline acts on [-B, B], identity outside (default: %(default)s)")
    return parser


def device_for(name):
    """The torch device for ``--device``; on the CPU, one thread (see below)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise forward.DataError("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); "
                                "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    if name == "cpu":
        # A training step is a few dozen operations on 64 x 1000 numbers: splitting each across
        # threads costs more than it saves, and on a busy machine OpenMP's waiting threads made
        # steps 5-10 times slower (measured on 2 cores). One thread is also reproducible.
        torch.set_num_threads(1)
    return torch.device(name)


def build_flow(args, build_layers, laplace, problem, device):
    """The FlowPosterior for these options, its layer weights drawn from ``args.seed``.

    The CPU's global generator is restored afterwards (training and sampling use their own
    generators, so nothing depends on any global random state)."""
    shift, scale_tril = standardisation(args.init, laplace)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = FlowPosterior(build_layers(args, problem.dim), problem.bounds, shift, scale_tril)
    return model.to(device=device, dtype=torch.float64)


def run_flow_method(args, build_layers):
    """Everything a flow script does after parsing: data, reference, training, evaluation, outputs."""
    with cli.Timer() as total:
        device = device_for(args.device)
        problem, out, laplace, reference = cli.setup_run(args)

        model = build_flow(args, build_layers, laplace, problem, device)
        log_likelihood = forward.TorchLikelihood(problem).to(device=device, dtype=torch.float64)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        with cli.interruptible("training") as stop, cli.Timer() as training:
            try:
                history = train(model, log_likelihood, problem.log_prior_density, args.iterations, args.batch,
                                args.lr, args.clip_norm, args.clip_value, generator, not args.quiet, stop)
            except TrainingDiverged as error:
                advice = f"try a smaller --lr (now {args.lr:g}) or gradient clipping (--clip-norm 10)"
                advice += ", or --init laplace" if args.init == "prior" else ""
                return cli.fail_without_results(out, f"{error}; {advice}")
        theta, log_weights = evaluate(model, log_likelihood, problem.log_prior_density, args.samples, generator)
        if not np.all(np.isfinite(theta)):
            return cli.fail_without_results(out, "the trained flow draws non-finite samples; try a smaller --lr")
        results = importance_diagnostics(log_weights, reference.log_evidence)
        results.update(
            iterations=int(history.size),
            train_time_s=training.seconds,
            time_per_iteration_ms=1e3 * training.seconds / history.size,
            n_parameters=int(sum(p.numel() for p in model.parameters())),
        )
    figures.plot_elbo(out / "elbo.png", history, reference.log_evidence, title=args.method,
                      final_kl=(results["kl"], args.samples))
    summary = report.write_results(out, args, problem, reference, theta, results, total.seconds, stop.interrupted)
    report.print_summary(summary, [
        f"ELBO {results['elbo']:.4f} ± {results['elbo_se']:.4f}, KL(q||p) {results['kl']:.4f} nats, "
        f"importance ESS {100 * results['is_ess']:.1f} %, PSIS k-hat {results['khat']:.2f}",
        f"training: {history.size} iterations in {training.seconds:.1f} s "
        f"({results['time_per_iteration_ms']:.2f} ms per iteration)",
    ])
    print(f"wrote {out}/", file=sys.stderr)
    return cli.EXIT_INTERRUPTED if stop.interrupted else 0
