"""Adaptive random-walk Metropolis–Hastings for the buried-sphere gravity inversion.

Each step proposes ``phi' = phi + L xi`` with ``xi ~ N(0, I)`` — a symmetric Gaussian proposal in
the sampling coordinates phi, so the acceptance probability is the ratio of the target densities,
``min(1, p(phi' | d) / p(phi | d))``. Proposals whose parameters fall outside the prior box have zero
prior density and are rejected; they are never reflected back into the box (reflection by ``abs``,
as the original did, breaks the symmetry of the proposal near zero and biases the sampler).

Sampling coordinates (``--coordinates``, :class:`SamplingCoordinates`). ``log`` (the default):
phi = (x0, log z, log R[, log |Δρ|]) — the log of every parameter whose box lies on one side of
zero, x0 as it is — with the log-Jacobian in the target,

    log p(phi | d) = log p(theta(phi) | d) + log z + log R [+ log |Δρ|],

and the box kept in theta (Stan and NumPyro transform positive parameters the same way). On the
mass ridge of a free density contrast (``--density-bounds``) the data fix m = Δρ R³, a thin
curve in (R, Δρ) that one Gaussian proposal follows only by rare long jumps (in theta: acceptance
1.7 %, autocorrelation time τ about 500 steps for R and Δρ); in log coordinates it is the straight
line log Δρ + 3 log R = log m, and the adapted proposal runs along it (acceptance 27 %, τ 16). On
the default problem the two coordinates mix alike (τ about 11). ``theta``: the parameters
themselves, as the original did.

Adaptation (Haario, Saksman & Tamminen 2001), during the burn-in only. Every ``ADAPT_EVERY`` steps
the proposal covariance is re-estimated from the chains' states over the second half of the burn-in
so far, pooled over all chains::

    L L^T = s (Cov(states) + eps D),    s = 2.38² / d

(``s``: the optimal random-walk scale for a Gaussian target in d dimensions, Gelman, Roberts & Gilks
1996; ``eps D``: a regulariser, ``REGULARISER`` times the first proposal's variance per coordinate,
that keeps ``L`` defined if the chains have not moved). At the end of the burn-in ``L`` is fixed:
the kept steps are an exact Metropolis–Hastings chain with one symmetric proposal, whatever the
adaptation did (it only chose that proposal). Chains from the prior still on their way in inflate the
chains' covariance; while the last window's acceptance is below ``ACCEPTANCE_FLOOR`` (5 %: the proposal
adapted so far does not work) the burn-in goes on, a window at a time, up to ``MAX_BURN_IN_FACTOR``
times ``--burn-in``.

Starts (``--init``; ``auto``, the default, picks one by the Laplace Gaussian's importance
diagnostics, see ``start.py``), always inside the box, and said on the ``start:`` line:

* ``laplace``: the chains start over-dispersed around the MAP (three Laplace sd) and first propose
  with the Laplace covariance (in the sampling coordinates, by the delta method) scaled by 2.38²/d;
* ``prior``: the first chain starts at the original's (5.5, 8.5, 4.5) (and the centre of the density
  range) where that lies inside the box, at the box's centre where it does not; the others at draws
  from the prior; the first proposal's sd is 3 % of each coordinate's prior range, adapted from
  there. On the original's problem (the default data, density and box) ``--init prior`` is instead
  the original's run exactly: one chain in theta from (5.5, 8.5, 4.5), isotropic 0.01 m proposal, no
  adaptation, 100000 kept + 20000 burn-in iterations. ``auto`` never runs it: its single chain and
  fixed steps mix only on the posterior the original had.

Defaults (:data:`DEFAULTS`, chosen from measurements on both problems and the unusual inputs of
``bench/unusual_inputs.py``): as many kept states as τ times the 10000 posterior samples, so that the
samples are nearly independent draws (their error against the exact posterior is then that of exact
draws, about 0.015), and a burn-in that learns the proposal: from the Laplace start 8 chains × (1000
+ 15000) steps; from the prior 16 chains × (1000 + 10000).

``--chains N`` runs N chains at once, vectorised over chains (one numpy operation per step for all
of them). Diagnostics, of the parameters theta: acceptance rate, integrated autocorrelation time and
ESS per parameter (Sokal's automatic window), split R-hat with two or more chains; a run whose split
R-hat exceeds 1.01 or whose smallest ESS is below 400 is reported as not converged (Vehtari, Gelman,
Simpson, Carpenter & Bürkner 2021).

References: Metropolis et al. (1953); Hastings (1970); Gelman, Roberts & Gilks, Bayesian Statistics 5
(1996) 599–607; Carpenter et al., J. Stat. Softw. 76 (2017) (Stan: unconstraining transforms and their
Jacobians); Haario, Saksman & Tamminen, Bernoulli 7 (2001) 223–242; Roberts & Rosenthal,
J. Comput. Graph. Stat. 18 (2009) 349–367 (examples of adaptive Metropolis); Gelman et al., Bayesian
Data Analysis, 3rd ed. (2013); Vehtari et al., Bayesian Analysis 16 (2021) 667–718 (R-hat, ESS limits).
"""

import argparse
import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import forward
from forward import COORDINATES, SamplingCoordinates
from gravity_flows.command import cli, runner
from gravity_flows.inference.start import choose_start
from gravity_flows.reporting import figures, report
from gravity_flows.scoring import convergence, diagnostics
from gravity_flows.scoring.reference import score

ORIGINAL_START = (5.5, 8.5, 4.5)
ORIGINAL_PROPOSAL_SCALE = 0.01
#: Steps between two re-estimates of the proposal covariance during the burn-in.
ADAPT_EVERY = 200
#: States scored at each checkpoint (thinned evenly from every chain's kept states so far).
CHECKPOINT_DRAWS = 20_000
#: The burn-in goes on (up to MAX_BURN_IN_FACTOR times --burn-in) while the acceptance of its last window is
#: below ACCEPTANCE_FLOOR: the adapted proposal does not work yet. A working one accepts 15-35 % here (also on a
#: posterior pressed on a bound, which rejects many proposals); one adapted from chains still on their way in
#: accepted 1 % (a one-flank profile, seed 0: τ 330 steps instead of 19).
ACCEPTANCE_FLOOR = 0.05
MAX_BURN_IN_FACTOR = 5
#: The regulariser's share of the first proposal's variance, per coordinate (Haario et al.'s epsilon).
REGULARISER = 1e-6
#: A run is reported as not converged above this split R-hat or below this smallest ESS
#: (Vehtari et al. 2021).
ESS_LIMIT = 400


def optimal_scale(dim):
    """Factor on a Gaussian target's covariance for the random-walk proposal: 2.38² / d (Gelman et al. 1996)."""
    return 2.38**2 / dim


@dataclass
class Sampled:
    """A run of :func:`sample`.

    ``chains`` (n_done, n_chains, dim) and ``log_posterior`` (n_done, n_chains): every state, burn-in
    included; ``burn_in``: how many of the steps were burn-in; ``accepted`` (n_chains,): accepted
    proposals of the kept steps; ``proposal_chol``: the Cholesky factor of the proposal used for
    every kept step; ``adapted_covariance``: the chains' covariance it was made from (None without
    adaptation); ``adaptations``: how many times the proposal changed; ``likelihood_evaluations``:
    parameter sets whose likelihood was computed (the starts, and every proposal inside the box).
    """

    chains: np.ndarray
    log_posterior: np.ndarray
    burn_in: int
    accepted: np.ndarray
    proposal_chol: np.ndarray
    adapted_covariance: np.ndarray
    adaptations: int
    likelihood_evaluations: int
    seconds: float = None  # sampling time, less the time spent scoring at checkpoints


def _steps(problem, current, current_log_post, proposal_chol, chains, log_posterior, rng, bar, stop):
    """Advance the chains ``current`` (updated in place) by ``len(chains)`` steps with a fixed proposal,
    writing every state into ``chains`` and ``log_posterior``. Returns (steps done, accepted per chain,
    likelihood evaluations); fewer steps than asked if ``stop.interrupted`` was set."""
    n_chains, dim = current.shape
    accepted = np.zeros(n_chains)
    evaluations = 0
    for step in range(len(chains)):
        proposal = current + rng.standard_normal((n_chains, dim)) @ proposal_chol.T
        proposal_log_post = problem.log_posterior(proposal)  # -inf outside the box: always rejected
        evaluations += np.count_nonzero(proposal_log_post > -np.inf)  # outside the box nothing is computed
        accept = np.log(rng.uniform(size=n_chains)) < proposal_log_post - current_log_post
        if accept.any():
            current[accept] = proposal[accept]
            current_log_post[accept] = proposal_log_post[accept]
            accepted += accept
        chains[step] = current
        log_posterior[step] = current_log_post
        bar.update(1)
        if stop is not None and stop.interrupted:
            return step + 1, accepted, evaluations
    return len(chains), accepted, evaluations


def adapted_proposal(states, scale, regulariser):
    """Cholesky factor of ``scale * (Cov(states) + regulariser)``, the covariance pooled over all
    states (n, n_chains, dim) (Haario et al. 2001); None where that is not positive definite."""
    covariance = np.cov(states.reshape(-1, states.shape[-1]), rowvar=False)
    try:
        return np.linalg.cholesky(scale * (covariance + regulariser)), covariance
    except np.linalg.LinAlgError:
        return None, covariance


def sample(problem, starts, proposal_chol, burn_in, iterations, rng, adapt=True, scale=None, adapt_every=ADAPT_EVERY,
           max_burn_in=None, acceptance_floor=ACCEPTANCE_FLOOR, progress=False, stop=None, checkpoints=(),
           on_checkpoint=None):
    """Run ``len(starts)`` chains of random-walk Metropolis–Hastings together: ``burn_in`` steps, adapting
    the proposal every ``adapt_every`` steps if ``adapt``, then ``iterations`` kept steps with the last
    proposal fixed.

    ``starts``: (n_chains, dim) inside the box; ``proposal_chol``: (dim, dim) Cholesky factor of the
    first proposal covariance; ``scale``: the factor on the chains' covariance (default 2.38²/d).
    ``max_burn_in`` (adapting only; default ``burn_in``): the burn-in goes on, a window at a time, while
    the last window's acceptance is below ``acceptance_floor`` — the proposal it adapted does not work
    yet (chains still on their way in inflate the chains' covariance) — up to this many steps.
    Returns a :class:`Sampled` (its ``burn_in`` the steps the burn-in took); a run stopped by
    ``stop.interrupted`` returns the steps it made. After each number of kept steps listed in
    ``checkpoints``, ``on_checkpoint(kept_chains, seconds, evaluations)`` is called with the kept states
    so far, the sampling time so far (the callback's own time is not counted) and the likelihood
    evaluations so far.
    """
    clock = convergence.Clock()
    current = np.array(starts, dtype=float)
    n_chains, dim = current.shape
    current_log_post = problem.log_posterior(current)
    if not np.all(np.isfinite(current_log_post)):
        raise forward.DataError("a chain's start has zero posterior density (outside the prior box)")
    scale = optimal_scale(dim) if scale is None else scale
    proposal_chol = np.asarray(proposal_chol, dtype=float)
    regulariser = REGULARISER * np.diag(np.sum(proposal_chol**2, axis=1))  # diag(L L^T) of the first proposal
    longest_burn_in = max(burn_in, max_burn_in or 0) if adapt else burn_in
    chains = np.empty((longest_burn_in + iterations, n_chains, dim))
    log_posterior = np.empty((longest_burn_in + iterations, n_chains))
    evaluations = n_chains
    adapted_covariance, adaptations = None, 0
    bar = tqdm(total=burn_in + iterations, desc="sampling", disable=not progress, mininterval=0.5, file=sys.stderr)
    done, window_acceptance = 0, None
    # the burn-in, in windows after each of which the proposal is re-estimated; on while the proposal fails
    while True:
        if done < burn_in:
            window = min(adapt_every, burn_in - done) if adapt else burn_in
        elif window_acceptance is not None and window_acceptance < acceptance_floor and done < longest_burn_in:
            window = min(adapt_every, longest_burn_in - done)
            bar.total += window
        else:
            break
        steps, accepted, count = _steps(problem, current, current_log_post, proposal_chol, chains[done:done + window],
                                        log_posterior[done:done + window], rng, bar, stop)
        done, evaluations = done + steps, evaluations + count
        if steps < window:  # interrupted
            break
        window_acceptance = float(np.mean(accepted)) / steps
        if adapt:
            chol, covariance = adapted_proposal(chains[done // 2:done], scale, regulariser)
            if chol is not None:
                proposal_chol, adapted_covariance, adaptations = chol, covariance, adaptations + 1
    burned = done
    total = burned + iterations
    accepted = np.zeros(n_chains)
    # the kept steps: one fixed proposal, an exact Metropolis–Hastings chain (in segments between checkpoints)
    ends = sorted({burned + k for k in checkpoints if 0 < k < iterations} | {total})
    for end in ends:
        if stop is not None and stop.interrupted:  # interrupted during the burn-in
            break
        steps, segment_accepted, count = _steps(problem, current, current_log_post, proposal_chol, chains[done:end],
                                                log_posterior[done:end], rng, bar, stop)
        done, evaluations, accepted = done + steps, evaluations + count, accepted + segment_accepted
        if done < end:  # interrupted
            break
        if on_checkpoint is not None and done - burned in checkpoints:
            seconds = clock.seconds()
            with clock.paused():
                on_checkpoint(chains[burned:done], seconds, evaluations)
    bar.close()
    return Sampled(chains[:done], log_posterior[:done], burned, accepted, proposal_chol, adapted_covariance,
                   adaptations, int(evaluations), clock.seconds())


def metropolis_hastings(problem, starts, proposal_chol, n_steps, rng, progress=False, stop=None):
    """Plain random-walk Metropolis–Hastings with one fixed proposal (no burn-in, no adaptation):
    ``(chains (n_done, n_chains, dim), log_posterior (n_done, n_chains), accepted (n_chains,))``."""
    run = sample(problem, starts, proposal_chol, 0, n_steps, rng, adapt=False, progress=progress, stop=stop)
    return run.chains, run.log_posterior, run.accepted


def is_original_problem(problem):
    """Whether ``problem`` is the original study's: the default synthetic profile (truth, noise and its seed,
    stations), the density known and the default, and the default box. Only there is ``--init prior`` the
    original's run."""
    source = problem.source
    return (source.get("kind") == "synthetic" and not problem.free_density
            and source.get("noise_seed") == forward.DEFAULT_NOISE_SEED
            and np.allclose(source.get("truth"), forward.DEFAULT_TRUTH)
            and problem.noise_sd == forward.DEFAULT_NOISE_SD and problem.density == forward.DEFAULT_DENSITY
            and np.array_equal(problem.bounds, np.array(forward.DEFAULT_BOUNDS))
            and problem.n_stations == forward.DEFAULT_STATIONS["num"])


def first_start(args, problem):
    """The first chain's start from the prior, in theta, and where it comes from: ``--start``; the original's
    (5.5, 8.5, 4.5) (and the centre of the density range) where it lies strictly inside the box; otherwise the
    centre of the box, which always does (the original's start is only a default inside the default box)."""
    if args.start is not None:
        return np.array(args.start, dtype=float), "--start"
    original = np.array(ORIGINAL_START + tuple(problem.bounds[3:].mean(axis=1)), dtype=float)
    inside = np.all((original > problem.bounds[:, 0]) & (original < problem.bounds[:, 1]))
    if inside:
        return original, "the original's start"
    centre = problem.bounds.mean(axis=1)
    outside = ", ".join(name for name, value, (low, high) in zip(problem.names, original, problem.bounds)
                        if not low < value < high)
    return centre, f"the centre of the box (the original's start lies outside it in {outside})"


def _point(theta):
    """``(5.5, 8.5, 4.5)`` for one parameter set."""
    return "(" + ", ".join(f"{value:.4g}" for value in theta) + ")"


def initial_states(args, problem, laplace, key, coordinates, rng):
    """The chains' starts (n_chains, dim) in the sampling coordinates, the first proposal's Cholesky factor
    there, and a phrase saying where the chains start, for the defaults ``key`` (see :data:`DEFAULTS`).

    - "original": the original's run: one chain from the original's start, isotropic proposal
      ``--proposal-scale`` m in theta (for a free density, the same fraction of its range as of R's);
    - "prior": the first chain at :func:`first_start`, the others at draws from the prior; the first
      proposal's sd is ``--proposal-scale`` times each coordinate's prior range in the sampling coordinates;
    - "laplace": over-dispersed around the MAP (three Laplace sd), the proposal the Laplace covariance
      (in the sampling coordinates by the delta method) times 2.38²/d and ``--proposal-scale``.
    """
    dim = problem.dim
    if key in ("original", "prior"):
        first, origin = first_start(args, problem)
        others = rng.uniform(problem.bounds[:, 0], problem.bounds[:, 1], size=(args.chains - 1, dim))
        starts = coordinates.from_theta(np.vstack([first, others]))
        where = f"first chain at {_point(first)}, {origin}" + (
            f"; {args.chains - 1} more at draws from the prior" if args.chains > 1 else "")
        if key == "original":
            widths = np.ones(dim)
            widths[3:] = np.diff(problem.bounds[3:], axis=1).ravel() / np.diff(problem.bounds[2])
            return starts, args.proposal_scale * np.diag(widths), where
        ranges = np.abs(np.diff(coordinates.from_theta(problem.bounds.T), axis=0)).ravel()
        return starts, args.proposal_scale * np.diag(ranges), where
    phi_map = coordinates.from_theta(laplace.theta_map)
    phi_cov = coordinates.covariance_from_theta(laplace.theta_map, laplace.theta_cov)
    proposal_chol = np.linalg.cholesky(phi_cov * optimal_scale(dim)) * args.proposal_scale
    dispersed = np.linalg.cholesky(phi_cov) * 3.0  # over-dispersed: three Laplace sd
    starts = []
    while len(starts) < args.chains:
        candidate = phi_map + dispersed @ rng.standard_normal(dim)
        if problem.inside(coordinates.to_theta(candidate)):
            starts.append(candidate)
    where = "over-dispersed around the MAP (three Laplace sd)"
    if args.start is not None:
        starts[0] = coordinates.from_theta(np.array(args.start, dtype=float))
        where = "first chain at --start, the others " + where
    return np.array(starts), proposal_chol, where


#: Defaults by kind of run (measured in the README's way: error against the exact reference, several seeds,
#: time and likelihood evaluations to error 0.05 from --checkpoints; see the README's MCMC section).
#:
#: - "laplace": chains over-dispersed around the MAP, proposal from the Laplace covariance refined in the burn-in.
#: - "prior": chains from the prior (the mass ridge of a free density, weak data, a Laplace Gaussian that misses
#:   the posterior, or --init prior on any problem but the original's).
#: - "original": --init prior on the original's problem (:func:`is_original_problem`): the original's run
#:   exactly, in theta, one chain, 100000 kept + 20000 burn-in, isotropic 0.01 m proposal, no adaptation.
DEFAULTS = {
    "laplace": {"chains": 8, "iterations": 15_000, "burn_in": 1_000, "proposal_scale": 1.0, "adapt": True,
                "coordinates": "log"},
    "prior": {"chains": 16, "iterations": 10_000, "burn_in": 1_000, "proposal_scale": 0.03, "adapt": True,
              "coordinates": "log"},
    "original": {"chains": 1, "iterations": 100_000, "burn_in": 20_000, "proposal_scale": ORIGINAL_PROPOSAL_SCALE,
                 "adapt": False, "coordinates": "theta"},
}


def defaults_key(args, chosen, problem):
    """Which :data:`DEFAULTS` a run gets: "laplace" from the Laplace start; "original" only for an explicit
    ``--init prior`` on the original's problem in theta (never for ``auto``, never for other data: its one chain
    and fixed 0.01 m steps mix only where the original's posterior lies); "prior" for every other start from the prior."""
    if chosen.init == "laplace":
        return "laplace"
    if args.init == "prior" and is_original_problem(problem) and args.coordinates in (None, "theta"):
        return "original"
    return "prior"


def _choices(name, unit=""):
    return " | ".join(f"{DEFAULTS[key][name]}{unit}" for key in DEFAULTS)


def build_parser():
    parser = cli.common_parser(__doc__, "MCMC", default_samples=10_000)
    group = parser.add_argument_group(
        "sampler (defaults depend on the run: from the Laplace start | from the prior | --init prior on the "
        "original's problem, which is the original's run)")
    group.add_argument("--coordinates", choices=COORDINATES,
                       help="coordinates of the random walk: log = x0 and the log of z, R and |Δρ| (the Jacobian in "
                            "the target, the box kept in θ), theta = the parameters themselves "
                            f"(default: {_choices('coordinates')})")
    group.add_argument("--chains", type=cli.positive_int, help=f"chains run together (default: {_choices('chains')})")
    group.add_argument("--iterations", type=cli.positive_int,
                       help=f"kept iterations per chain (default: {_choices('iterations')})")
    group.add_argument("--burn-in", type=cli.nonnegative_int,
                       help="iterations discarded at the start of each chain; while adapting, extended "
                            f"{ADAPT_EVERY} at a time (up to {MAX_BURN_IN_FACTOR}×) while the proposal accepts under "
                            f"{100 * ACCEPTANCE_FLOOR:.0f} %% (default: {_choices('burn_in')})")
    group.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=None,
                       help=f"re-estimate the proposal covariance from the chains every {ADAPT_EVERY} burn-in steps "
                            "(Haario et al. 2001), then keep it fixed for the kept steps (default: on | on | off)")
    group.add_argument("--proposal-scale", type=cli.positive_float, metavar="SCALE",
                       help="the first proposal: from the Laplace start a factor on the Laplace covariance's Cholesky "
                            "factor (scaled by 2.38²/d); from the prior the sd as a fraction of each coordinate's "
                            "prior range; in the original's run the sd in m (default: "
                            f"{_choices('proposal_scale')}); the adapted proposal is the chains' covariance scaled by 2.38²/d")
    group.add_argument("--start", type=cli.finite_float, nargs="+", metavar="VALUE",
                       help=f"start of the first chain, one value per unknown: X0 Z R [DRHO] "
                            f"(default: near the MAP | {ORIGINAL_START} and the centre of --density-bounds where "
                            "that lies inside the box, else the box's centre)")
    group.add_argument("--checkpoints", type=cli.nonnegative_int, default=0, metavar="N",
                       help="score the kept states so far against the exact reference at N points spaced geometrically "
                            "over the kept steps (not counted in the sampling time), for summary.json's 'convergence' "
                            "and compare.py's convergence figure (default: %(default)s)")
    return parser


def resolve_defaults(args, key):
    """Fill in the options that depend on the kind of run ``key`` (see :func:`defaults_key`) and return args."""
    for name, value in DEFAULTS[key].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.samples = min(args.samples, args.iterations * args.chains)
    return args


def convergence_warning(rhat, ess, names):
    """The "not converged" line for split R-hat above diagnostics.RHAT_LIMIT or an ESS below ESS_LIMIT; None if neither."""
    problems = []
    if rhat is not None and not np.all(np.asarray(rhat) <= diagnostics.RHAT_LIMIT):
        worst = [name for name, r in zip(names, rhat) if not r <= diagnostics.RHAT_LIMIT]
        finite = np.asarray(rhat, dtype=float)[np.isfinite(rhat)]
        problems.append((f"split R-hat up to {finite.max():.3f}" if finite.size else "split R-hat undefined")
                        + f" > {diagnostics.RHAT_LIMIT} ({', '.join(worst)})")
    if not np.all(np.asarray(ess) >= ESS_LIMIT):
        worst = [name for name, e in zip(names, ess) if not e >= ESS_LIMIT]
        finite = np.asarray(ess, dtype=float)[np.isfinite(ess)]
        problems.append((f"smallest ESS {finite.min():.0f}" if finite.size else "ESS undefined")
                        + f" < {ESS_LIMIT} ({', '.join(worst)})")
    if not problems:
        return None
    return "warning: not converged: " + " and ".join(problems) + "; run more --iterations (or --chains, --burn-in)"


def thin(kept, n):
    """``n`` states evenly spaced through every chain of ``kept`` (n_steps, n_chains, dim), chain after chain."""
    pooled = kept.transpose(1, 0, 2).reshape(-1, kept.shape[-1])  # chain-major: every chain gives its share
    return pooled[np.linspace(0, pooled.shape[0] - 1, min(n, pooled.shape[0])).round().astype(int)]


def main(argv=None):
    args = build_parser().parse_args(argv)
    with cli.Timer() as total:
        timing = {}
        problem, out, laplace, reference = cli.setup_run(args, check=lambda problem: cli.check_start(args.start, problem),
                                                         timing=timing)
        with cli.Timer() as choosing:
            chosen = choose_start(args.init, problem, laplace)
        key = defaults_key(args, chosen, problem)
        resolve_defaults(args, key)
        coordinates = SamplingCoordinates(problem, args.coordinates)
        rng = np.random.default_rng(args.seed)
        starts, proposal_chol, where = initial_states(args, problem, laplace, key, coordinates, rng)
        run_kind = "the original's run" if key == "original" else None
        print(f"start: {chosen.init} ({chosen.reason}); " + (f"{run_kind}; " if run_kind else "")
              + f"coordinates {coordinates.describe()}; {where}; "
              f"{args.chains} chain{'s' if args.chains > 1 else ''}, {args.burn_in} burn-in steps "
              + (f"adapting the proposal every {ADAPT_EVERY}" if args.adapt else "with a fixed proposal")
              + f", {args.iterations} kept", file=sys.stderr)

        scale = optimal_scale(problem.dim) * (args.proposal_scale**2 if key == "laplace" else 1.0)
        recorder = convergence.Recorder()

        def score_now(kept_so_far, seconds, evaluations):
            error = score(coordinates.to_theta(thin(kept_so_far, CHECKPOINT_DRAWS)), reference)["error"]
            recorder.add(kept_so_far.shape[0], seconds, chosen.likelihood_evaluations + evaluations, error, stage="sampling")

        with cli.interruptible("sampling") as stop, np.errstate(over="ignore"):
            run = sample(coordinates.target(problem), starts, proposal_chol, args.burn_in, args.iterations, rng,
                         adapt=args.adapt, max_burn_in=MAX_BURN_IN_FACTOR * args.burn_in, scale=scale,
                         progress=not args.quiet, stop=stop,
                         checkpoints=convergence.checkpoint_iterations(args.iterations, args.checkpoints),
                         on_checkpoint=score_now)
        chains = coordinates.to_theta(run.chains)
        burn_in = min(run.burn_in, chains.shape[0] // 2)  # an interrupted run keeps its second half at least
        kept = chains[burn_in:]
        tau, reliable = diagnostics.integrated_time(kept, warn=False)
        ess = diagnostics.effective_sample_size(kept, tau=tau)
        rhat = diagnostics.split_rhat(kept) if kept.shape[1] > 1 else None
        if not reliable:
            print(f"warning: the chains are short for their autocorrelation time (τ up to {np.max(tau):.0f}, "
                  f"{kept.shape[0]} kept iterations): ESS and τ are rough; run more --iterations", file=sys.stderr)
        not_converged = convergence_warning(rhat, ess, problem.names)
        if not_converged:
            print(not_converged, file=sys.stderr)

        # acceptance of the kept steps: a step was accepted exactly when the state moved (a proposal
        # equal to the current state has probability zero)
        moved = np.any(np.diff(kept, axis=0) != 0, axis=-1)
        acceptance = moved.mean(axis=0) if moved.size else np.full(kept.shape[1], np.nan)
        theta = thin(kept, args.samples)
        results = {
            "start": {**chosen.summary(), "chains": where, "run": key},
            "setup_time_s": cli.setup_seconds(timing, laplace, choosing.seconds),
            "coordinates": {"kind": coordinates.kind, "names": list(coordinates.names)},
            "iterations": int(kept.shape[0]),
            "burn_in": int(burn_in),
            "burn_in_extended": bool(run.burn_in > args.burn_in),
            "chains": int(kept.shape[1]),
            "acceptance": float(np.mean(acceptance)),
            "acceptance_per_chain": acceptance.tolist(),
            "tau": tau.tolist(),
            "tau_reliable": bool(reliable),
            "ess": ess.tolist(),
            "rhat": None if rhat is None else np.asarray(rhat).tolist(),
            "converged": not_converged is None,
            "convergence_warning": not_converged,
            "adapted": run.adaptations > 0,
            "adaptations": run.adaptations,
            # in the sampling coordinates (summary's "coordinates")
            "adapted_covariance": None if run.adapted_covariance is None else run.adapted_covariance.tolist(),
            "proposal_covariance": (run.proposal_chol @ run.proposal_chol.T).tolist(),
            "likelihood_evaluations": chosen.likelihood_evaluations + run.likelihood_evaluations,
            "sampling_time_s": run.seconds,
            "ess_per_s": float(np.min(ess) / run.seconds),
            "time_per_iteration_ms": 1e3 * run.seconds / chains.shape[0],
        }
        recorder.add(kept.shape[0], run.seconds, results["likelihood_evaluations"],
                     score(theta, reference)["error"], stage="final")
        results["convergence"] = recorder.points
        # noise-weighted RMS misfit sqrt(chi²/n) from the log-likelihood: sum((r/sigma)^2) = -2 misfit
        misfit = (run.log_posterior - coordinates.log_jacobian(run.chains) - problem.log_prior_density
                  - problem.log_likelihood_constant)
        rms = np.sqrt(np.maximum(-2.0 * misfit, 0.0) / problem.n_stations)
    figures.plot_trace(out / "trace.png", chains, burn_in=burn_in, title=args.method, parameters=problem.parameters)
    figures.plot_autocorrelation(out / "autocorrelation.png", kept, title=args.method, tau=(tau, reliable),
                                 parameters=problem.parameters)
    figures.plot_misfit(out / "misfit.png", rms, problem.noise_sd, burn_in=burn_in, title=args.method, noise_weighted=True)
    summary = report.write_results(out, args, problem, reference, theta, results, total.seconds, stop.interrupted)
    report.print_summary(summary, [
        f"{kept.shape[1]} chain{'s' if kept.shape[1] > 1 else ''} × {kept.shape[0]} kept iterations in coordinates "
        f"{coordinates.describe()} (burn-in {burn_in}"
        + (f", extended from {args.burn_in} while the adapted proposal accepted under {100 * ACCEPTANCE_FLOOR:.0f} %"
           if results["burn_in_extended"] else "")
        + (f", proposal adapted {run.adaptations} times" if run.adaptations else "") + "), "
        f"acceptance after burn-in {100 * results['acceptance']:.1f} %",
        "τ " + ", ".join(f"{t:.1f}" for t in tau) + "; ESS " + ", ".join(f"{e:.0f}" for e in ess)
        + f"; min ESS per second of sampling {results['ess_per_s']:.0f}",
        "split R-hat " + ("n/a (one chain)" if rhat is None else ", ".join(f"{r:.4f}" for r in rhat))
        + ("; converged" if not_converged is None else "; NOT converged (see the warning)"),
        f"{results['likelihood_evaluations']} likelihood evaluations",
    ])
    print(f"wrote {out}/", file=sys.stderr)
    return cli.EXIT_INTERRUPTED if stop.interrupted else 0


if __name__ == "__main__":
    runner.run(main)
