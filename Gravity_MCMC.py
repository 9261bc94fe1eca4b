"""Random-walk Metropolis–Hastings for the buried-sphere gravity inversion.

Each step proposes ``theta' = theta + L xi`` with ``xi ~ N(0, I)`` — a symmetric Gaussian proposal,
so the acceptance probability is the posterior ratio ``min(1, p(theta' | d) / p(theta | d))``.
Proposals outside the prior box have zero prior density and are rejected; they are never reflected
back into the box (reflection by ``abs``, as the original did, breaks the symmetry of the proposal
near zero and biases the sampler).

Two starts (``--init``):

* ``laplace`` (default): the chains start over-dispersed around the MAP and propose with the Laplace
  covariance scaled by 2.38²/d (the optimal random-walk scale for a Gaussian target in d dimensions,
  Gelman, Roberts & Gilks 1996);
* ``prior``: the original's settings: start (5.5, 8.5, 4.5), isotropic proposal of scale 0.01 m.

``--chains N`` runs N chains at once, vectorised over chains (one numpy operation per step for all
of them). Diagnostics: acceptance rate, integrated autocorrelation time and ESS per parameter
(Sokal's automatic window), split R-hat with two or more chains.

References: Metropolis et al. (1953); Hastings (1970); Gelman et al., Bayesian Data Analysis (2013).
"""

import sys

import numpy as np
from tqdm import tqdm

import cli
import diagnostics
import figures
import forward
import report

ORIGINAL_START = (5.5, 8.5, 4.5)
ORIGINAL_PROPOSAL_SCALE = 0.01


def optimal_scale(dim):
    """Factor on a Gaussian target's covariance for the random-walk proposal: 2.38² / d (Gelman et al. 1996)."""
    return 2.38**2 / dim


def metropolis_hastings(problem, starts, proposal_chol, n_steps, rng, progress=False, stop=None):
    """Run ``len(starts)`` chains of random-walk Metropolis–Hastings together.

    ``starts``: (n_chains, dim) inside the box; ``proposal_chol``: (dim, dim) Cholesky factor of the
    proposal covariance. Returns ``(chains (n_done, n_chains, dim), log_posterior (n_done, n_chains),
    accepted (n_chains,))``, where ``n_done < n_steps`` if ``stop.interrupted`` was set.
    """
    current = np.array(starts, dtype=float)
    n_chains, dim = current.shape
    current_log_post = problem.log_posterior(current)
    if not np.all(np.isfinite(current_log_post)):
        raise forward.DataError("a chain's start has zero posterior density (outside the prior box)")
    chains = np.empty((n_steps, n_chains, dim))
    log_posterior = np.empty((n_steps, n_chains))
    accepted = np.zeros(n_chains)
    bar = tqdm(total=n_steps, desc="sampling", disable=not progress, mininterval=0.5, file=sys.stderr)
    for step in range(n_steps):
        proposal = current + rng.standard_normal((n_chains, dim)) @ proposal_chol.T
        proposal_log_post = problem.log_posterior(proposal)  # -inf outside the box: always rejected
        accept = np.log(rng.uniform(size=n_chains)) < proposal_log_post - current_log_post
        if accept.any():
            current[accept] = proposal[accept]
            current_log_post[accept] = proposal_log_post[accept]
            accepted += accept
        chains[step] = current
        log_posterior[step] = current_log_post
        if step % 1000 == 999:
            bar.update(1000)
            if stop is not None and stop.interrupted:
                bar.close()
                return chains[: step + 1], log_posterior[: step + 1], accepted
    bar.close()
    return chains, log_posterior, accepted


def initial_states(args, problem, laplace, rng):
    """The chains' starts and the proposal's Cholesky factor for ``--init``."""
    dim = problem.dim
    if args.init == "prior":
        # the original's start; a free density starts at the centre of its prior range
        first = np.array(args.start if args.start is not None else ORIGINAL_START + tuple(problem.bounds[3:].mean(axis=1)),
                         dtype=float)
        others = rng.uniform(problem.bounds[:, 0], problem.bounds[:, 1], size=(args.chains - 1, dim))
        # isotropic in m; a free density's step is the same fraction of its prior range as 0.01 m is of R's
        widths = np.ones(dim)
        widths[3:] = np.diff(problem.bounds[3:], axis=1).ravel() / np.diff(problem.bounds[2])
        proposal_chol = args.proposal_scale * np.diag(widths)
        return np.vstack([first, others]), proposal_chol
    proposal_chol = np.linalg.cholesky(laplace.theta_cov * optimal_scale(dim)) * args.proposal_scale
    starts = []
    dispersed = np.linalg.cholesky(laplace.theta_cov) * 3.0  # over-dispersed: three Laplace sd
    while len(starts) < args.chains:
        candidate = laplace.theta_map + dispersed @ rng.standard_normal(dim)
        if problem.inside(candidate):
            starts.append(candidate)
    if args.start is not None:
        starts[0] = np.array(args.start, dtype=float)
    return np.array(starts), proposal_chol


#: Defaults by --init: "prior" is the original's run exactly; "laplace" keeps the original's 100000
#: kept iterations in all, spread over four chains so that split R-hat can be computed.
DEFAULTS = {
    "prior": {"chains": 1, "iterations": 100_000, "burn_in": 20_000, "proposal_scale": ORIGINAL_PROPOSAL_SCALE},
    "laplace": {"chains": 4, "iterations": 25_000, "burn_in": 2_000, "proposal_scale": 1.0},
}


def build_parser():
    parser = cli.common_parser(__doc__, "MCMC", default_samples=10_000)
    group = parser.add_argument_group("sampler (defaults depend on --init: laplace | prior)")
    group.add_argument("--chains", type=cli.positive_int, help="chains run together (default: 4 | 1)")
    group.add_argument("--iterations", type=cli.positive_int, help="kept iterations per chain (default: 25000 | 100000)")
    group.add_argument("--burn-in", type=cli.nonnegative_int, help="iterations discarded at the start of each chain (default: 2000 | 20000)")
    group.add_argument("--proposal-scale", type=cli.positive_float, metavar="SCALE",
                       help="laplace: a factor on the Laplace proposal covariance's Cholesky factor, already scaled by "
                            f"2.38/sqrt(d) (default 1); prior: the isotropic proposal sd in m (default {ORIGINAL_PROPOSAL_SCALE})")
    group.add_argument("--start", type=cli.finite_float, nargs="+", metavar="VALUE",
                       help=f"start of the first chain, one value per unknown: X0 Z R [DRHO] "
                            f"(default: near the MAP | {ORIGINAL_START} and the centre of --density-bounds)")
    return parser


def parse_args(argv):
    """The options, with the defaults that depend on --init filled in."""
    args = build_parser().parse_args(argv)
    for name, value in DEFAULTS[args.init].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.samples = min(args.samples, args.iterations * args.chains)
    return args


def main(argv=None):
    args = parse_args(argv)
    with cli.Timer() as total:
        cli.check_start(args.start, cli.load_problem(args))
        problem, out, laplace, reference = cli.setup_run(args)

        rng = np.random.default_rng(args.seed)
        starts, proposal_chol = initial_states(args, problem, laplace, rng)
        with cli.interruptible("sampling") as stop, cli.Timer() as sampling:
            chains, log_posterior, _ = metropolis_hastings(problem, starts, proposal_chol, args.burn_in + args.iterations,
                                                        rng, progress=not args.quiet, stop=stop)
        burn_in = min(args.burn_in, chains.shape[0] // 2)  # an interrupted run keeps its second half at least
        kept = chains[burn_in:]
        tau, reliable = diagnostics.integrated_time(kept, warn=False)
        ess = diagnostics.effective_sample_size(kept, tau=tau)
        rhat = diagnostics.split_rhat(kept) if kept.shape[1] > 1 else None
        if not reliable:
            print(f"warning: the chains are short for their autocorrelation time (τ up to {np.max(tau):.0f}, "
                  f"{kept.shape[0]} kept iterations): ESS and τ are rough; run more --iterations", file=sys.stderr)

        # acceptance of the kept steps: a step was accepted exactly when the state moved (a proposal
        # equal to the current state has probability zero)
        moved = np.any(np.diff(kept, axis=0) != 0, axis=-1)
        acceptance = moved.mean(axis=0) if moved.size else np.full(kept.shape[1], np.nan)
        pooled = kept.reshape(-1, problem.dim)
        theta = pooled[np.linspace(0, pooled.shape[0] - 1, min(args.samples, pooled.shape[0])).round().astype(int)]
        results = {
            "iterations": int(kept.shape[0]),
            "burn_in": int(burn_in),
            "chains": int(kept.shape[1]),
            "acceptance": float(np.mean(acceptance)),
            "acceptance_per_chain": acceptance.tolist(),
            "tau": tau.tolist(),
            "tau_reliable": bool(reliable),
            "ess": ess.tolist(),
            "rhat": None if rhat is None else np.asarray(rhat).tolist(),
            "sampling_time_s": sampling.seconds,
            "ess_per_s": float(np.min(ess) / sampling.seconds),
            "time_per_iteration_ms": 1e3 * sampling.seconds / chains.shape[0],
        }
        # RMS misfit in µGal from the log-likelihood: sum((r/sigma)^2) = -2 misfit (exact for one sigma;
        # with per-station sigma it is the noise-weighted RMS, in units of the RMS sigma)
        noise_level = float(np.sqrt(np.mean(problem.noise_sd_array**2)))
        misfit = log_posterior - problem.log_prior_density - problem.log_likelihood_constant
        rms = noise_level * np.sqrt(np.maximum(-2.0 * misfit, 0.0) / problem.n_stations)
    figures.plot_trace(out / "trace.png", chains, burn_in=burn_in, title=args.method, parameters=problem.parameters)
    figures.plot_autocorrelation(out / "autocorrelation.png", kept, title=args.method, tau=(tau, reliable),
                                 parameters=problem.parameters)
    figures.plot_misfit(out / "misfit.png", rms, noise_level, burn_in=burn_in, title=args.method)
    summary = report.write_results(out, args, problem, reference, theta, results, total.seconds, stop.interrupted)
    report.print_summary(summary, [
        f"{kept.shape[1]} chain{'s' if kept.shape[1] > 1 else ''} × {kept.shape[0]} kept iterations (burn-in {burn_in}), "
        f"acceptance after burn-in {100 * results['acceptance']:.1f} %",
        "τ " + ", ".join(f"{t:.1f}" for t in tau) + "; ESS " + ", ".join(f"{e:.0f}" for e in ess)
        + f"; min ESS per second of sampling {results['ess_per_s']:.0f}",
        "split R-hat " + ("n/a (one chain)" if rhat is None else ", ".join(f"{r:.4f}" for r in rhat)),
    ])
    print(f"wrote {out}/", file=sys.stderr)
    return cli.EXIT_INTERRUPTED if stop.interrupted else 0


if __name__ == "__main__":
    cli.run(main)
