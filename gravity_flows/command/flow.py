"""The command of the six flow scripts: their options, the defaults that depend on the start, and the run.

A flow script names its layers (``build_layers``) and its defaults (``flow_parser``); everything
else a run does — data, exact reference, start, training, evaluation, refinement, figures and
``summary.json`` — is :func:`run_flow_method`, the same for all six. With ``--amortize`` or
``--model`` the run is an amortized one instead (:mod:`gravity_flows.command.amortized`).

Starts (``--init``): the Laplace approximation or the prior (``inference.start``), or, with
``--init amortized --model FILE``, the amortized posterior of this profile: a model made by this
script's ``--amortize`` for this survey, its context fixed to this profile's data
(``ConditionedPosterior``), then refined by this profile's ELBO like any start, without annealing
(the model's q already lies on the posterior; from it, annealing would first spread q over the
prior again). What is trained is ``ConditionedPosterior``'s: the flow's layers and an affine
correction, the summary network and the context's head frozen.

Measured (``--refine none --checkpoints 12``, error = largest W1/sd against the exact reference, on
the 2-core machine while other benchmarks ran):

- density known, examples/survey lines 01 and 02 (``--bounds -10 30 1 15 0.5 5``) with a
  coupling_NSF model of that survey (``--amortize``, 10000 steps): the model's q has error 1.4 and
  1.9; 1000 iterations at lr 1e-3 end at 0.044 and 0.035 (64000-74000 likelihood evaluations,
  against 132000 for the Laplace start's 2000 iterations, its default then, error 0.021); 500 iterations ended at
  0.018 and 0.098. On the default problem the planar model of compare.py --amortized ends at 0.105
  after 1000 iterations (6.7 s), where the Laplace start reaches 0.05 in 3.4 s. The error is no lower on the way (it first
  rises, to 3-8, and wanders): it falls as the cosine schedule ends, so the iteration budget is the
  time to error 0.05. lr 5e-3 ended at 0.23.
- the ridge (``--density-bounds 1000 4000``, the synthetic profile): the spline flows do NOT get
  there. From a coupling_NSF and an auto_NSF model of 2000 steps (q alone: error 1.0, R and drho
  right, x0 and z 3-4 times too wide) the ELBO shrinks q onto part of the ridge (drho sd 144-327
  kg/m³ against 870) and stays at error 0.5-0.85 whatever the rate (1e-4 to 1e-2), the batch (256),
  the gradient clipping or an annealing of 30-60 %: the reverse KL's mode-seeking, as from the
  Laplace start there. So does auto_Affine from its 10000-step model of compare.py --amortized
  (q alone 0.68; 1000 iterations end at 0.41 (lr 1e-3) and 0.45 (5e-3), drho sd 460-510), and
  auto_NSF from its 10000-step model, whose q alone is already at 0.27: the refining makes it worse,
  1.03 (lr 1e-3), 1.11 (5e-3), 0.69 (1e-4), drho sd 195-690. The planar flow (the 10000-step model of compare.py --amortized) keeps the
  ridge and improves steadily, but slowly: error 0.67 -> 0.31 (1000 iterations, lr 1e-3), 0.17 (lr
  5e-3), 0.13 (lr 2e-2), 0.22 (3000 iterations, lr 1e-3). The one exception: coupling_Affine from
  its 10000-step model of compare.py --amortized (q alone 0.42) ends at 0.033 after the default 1000
  iterations, at error 0.05 after 3.8 s against 18.8 s from the prior start (quiet machine). With
  the same models the other five end at 0.30-1.02 (the splines 0.32 and 1.02). The importance-corrected
  amortized posterior (``--model`` alone) is the better answer there.
- tried and not kept: refining by the forward KL instead, maximising the mean log q of 8192 of the
  corrected posterior's draws (mass-covering where the ELBO seeks a mode), from the 2000-step ridge models
  of compare.py --amortized: auto_Affine ended at 0.15-0.19 (batch 64-512, lr 1e-3 to 1e-2, 500-1000
  iterations), auto_NSF at 0.25-0.52 (batch 256, lr 3e-4 and 3e-3, 500 iterations; its first Adam steps
  threw q to errors of 1.6-40 before it recovered), from 0.83 and 0.66 for q alone; the draws it learnt from had 4051-4302 effective draws.
"""

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch

import forward
from gravity_flows.command import amortized, cli
from gravity_flows.flows import splines
from gravity_flows.inference import refine
from gravity_flows.inference.amortized import ConditionedPosterior
from gravity_flows.inference.start import Start, choose_start
from gravity_flows.inference.vi import (FlowPosterior, TrainingDiverged, evaluate, importance_diagnostics,
                                        prior_centre, standardisation, train)
from gravity_flows.reporting import figures, report
from gravity_flows.scoring import convergence
from gravity_flows.scoring.reference import score


#: The share of the iterations over which the likelihood is annealed when a flow starts from the prior.
ANNEAL_FROM_PRIOR = 0.6

#: The annealing's share from the prior in mass coordinates (``--coordinates mass``, the default with a free
#: density), where the scripts' "mass" defaults also hold (1500 iterations): there the ridge is a line
#: along which the posterior is a tilted normal (``forward.MassBijection``), so q has far less to learn than in
#: the box's coordinates (4000 iterations annealed over 60 %). Measured on the ridge (``--density-bounds 1000
#: 4000``, the flow alone against the exact reference, seeds 0/1/2, 1500 iterations annealed over 30 %):
#: planar 0.031/0.034/0.034, auto_Affine 0.022/0.025/0.028, auto_NSF 0.029/0.036/0.032, coupling_Affine
#: 0.023/0.024/0.037, coupling_NSF (3 layers, unclipped) 0.038/0.031/0.050, Glow (4 steps) 0.023/0.047/0.027
#: (Gravity_invertible_Affine.py). With a logit instead of the probit along the ridge (a prototype of the map)
#: coupling_Affine seed 2 ended at 0.21.
ANNEAL_FROM_PRIOR_MASS = 0.3

#: From a Laplace start that already is the posterior, nearly, the default ``--iterations`` is at most
#: CLOSE_LAPLACE_ITERATIONS: where ``--init auto`` found the Laplace Gaussian's importance ESS against the
#: posterior at least CLOSE_LAPLACE_ESS (``Start.is_ess``). Training then only has to keep q there while
#: the cosine-decayed rate settles. Measured, error = largest W1/sd against the exact reference:
#: - the default problem (ESS 99.9 %; the Laplace Gaussian alone: KL 0.0004 nats), all six flows,
#:   seeds 0/1/2: 1000 iterations 0.010-0.024, KL <= 0.0012; 500, 0.010-0.024, KL <= 0.0018; the scripts'
#:   2000-3000, 0.016-0.022 and KL <= 0.0004 (seed 0) at two to three times the time;
#: - the unusual inputs (``bench/unusual_inputs.py``) at 1000 iterations: as good or better in the six
#:   cases with ESS >= 99 % (0.010-0.020 against 0.015-0.024) and in ``sparse-irregular`` (84 %: 0.012-0.033
#:   against 0.017-0.037), worse in ``outside-span`` (59 %: coupling affine 0.070 against 0.029, planar
#:   0.115 against 0.080), where the flows have more to learn;
#: - the mass ridge in mass coordinates (``--density-bounds 1000 4000``: the Laplace Gaussian there has ESS
#:   88.5 %, KL 0.024 nats), all six flows, seeds 0/1/2: 1000 iterations 0.014-0.029, KL <= 0.003, where the
#:   prior start's 1500 annealed iterations gave 0.022-0.050;
#: so the limit, 0.9 until the mass coordinates, is 0.8: it leaves outside-span at the long budget.
CLOSE_LAPLACE_ESS = 0.8
CLOSE_LAPLACE_ITERATIONS = 1000


def _by_start(value):
    """A default that may depend on the start: a number, or ``{"laplace": .., "prior": ..}`` with an optional
    ``"mass"``: the prior start's default in mass coordinates (without it, the prior start's)."""
    value = value if isinstance(value, dict) else {"laplace": value, "prior": value}
    return {"mass": value["prior"], **value}


#: The defaults of an amortized run (``--amortize``) unless a script gives its own (see amortized.py).
AMORTIZED_DEFAULTS = {"iterations": 10_000, "flows": 3, "lr": 1e-3}

#: The defaults of a per-profile fit from the amortized start (``--init amortized --model FILE``), for every
#: flow: no annealing (q already sits on the posterior), and a smaller rate than from the prior (measured:
#: the module docstring; 1000 iterations reached error 0.05 with the density known, not on the ridge).
AMORTIZED_START = {"iterations": 1000, "lr": 1e-3}


def flow_parser(doc, method, iterations, flows, hidden, lr, batch=64, spline=False, amortized_defaults=None,
                clip_norm=None):
    """The common options plus the flow options, with this method's defaults (``hidden=None``: no conditioner).

    ``iterations``, ``flows``, ``lr`` and ``clip_norm`` (None: no clipping) are numbers or ``{"laplace": ..,
    "prior": ..}``: the default then depends on the start that ``--init`` (or ``auto``) chooses;
    :func:`resolve_defaults` fills them in.
    ``amortized_defaults``: this method's ``{"iterations", "flows", "lr"}`` with ``--amortize``
    (default :data:`AMORTIZED_DEFAULTS`).
    """
    parser = cli.common_parser(doc, method, default_samples=10_000)
    init = parser.option("init")
    init.choices = (*init.choices, "amortized")
    init.help += ("; amortized (with --model FILE, a model of this script made by --amortize for this survey): "
                  "from the model's posterior q(theta | d) of this profile, refined by the profile's own ELBO without "
                  "annealing; the flow's options are the model's (defaults then: --iterations "
                  f"{AMORTIZED_START['iterations']}, --lr {AMORTIZED_START['lr']:g}, --anneal 0). On the mass ridge "
                  "(--density-bounds) the ELBO shrinks it onto part of the ridge for every flow but the coupling affine "
                  "one (measured: flow.py); --model alone, corrected by importance weights, is the better answer there")
    iterations, flows, lr, clip_norm = _by_start(iterations), _by_start(flows), _by_start(lr), _by_start(clip_norm)
    parser.set_defaults(start_defaults={"iterations": iterations, "flows": flows, "lr": lr, "clip_norm": clip_norm})

    def by_start(values):
        mass = "" if values["mass"] == values["prior"] else f" ({values['mass']} in mass coordinates)"
        if values["laplace"] == values["prior"]:
            return f"{values['laplace']}{mass}"
        return f"{values['laplace']} from the Laplace start, {values['prior']} from the prior{mass}"

    def clipping(values):
        said = {start: "none" if value is None else f"{value:g}" for start, value in values.items()}
        return "" if said["laplace"] == said["prior"] == said["mass"] == "none" else f" (default: {by_start(said)})"

    group = parser.add_argument_group("flow and training")
    group.add_argument("--flows", type=cli.positive_int, help=f"number of flow layers (default: {by_start(flows)})")
    if hidden is not None:
        group.add_argument("--hidden", type=cli.positive_int, default=hidden, help="hidden units per conditioner layer (default: %(default)s)")
    group.add_argument("--iterations", type=cli.positive_int,
                       help=f"training iterations (default: {by_start(iterations)}; from the Laplace start at most "
                            f"{CLOSE_LAPLACE_ITERATIONS} where --init auto finds its importance ESS >= "
                            f"{100 * CLOSE_LAPLACE_ESS:.0f} %%, q then being the posterior nearly)")
    group.add_argument("--lr", type=cli.positive_float,
                       help=f"Adam's initial learning rate, decayed to 0 by a cosine (default: {by_start(lr)})")
    group.add_argument("--batch", type=cli.positive_int, default=batch, help="Monte Carlo samples per training step (default: %(default)s)")
    group.add_argument("--anneal", type=cli.fraction, metavar="FRACTION",
                       help="anneal the likelihood: beta rises geometrically from 1e-4 to 1 over this share of the "
                            f"iterations; 0: off (default: {ANNEAL_FROM_PRIOR} from the prior start, {ANNEAL_FROM_PRIOR_MASS} "
                            "from the prior in mass coordinates, 0 from the Laplace start)")
    group.add_argument("--anneal-ess", type=_anneal_ess, default=0.0, metavar="ESS",
                       help="adaptive annealing: after each step beta rises as far as the batch's importance weights against "
                            "the tempered target keep this normalised ESS (as tempered SMC chooses its temperatures); it "
                            "ends when beta reaches 1 and the share of --anneal it did not need is not run. 0: beta rises "
                            "geometrically over the whole share (default: %(default)s; on the mass ridge 0.5 halved the "
                            "iterations but the flows then settled on part of the ridge)")
    clip = group.add_mutually_exclusive_group()
    clip.add_argument("--clip-norm", type=cli.positive_float, metavar="X",
                      help=f"clip the gradient's norm to X{clipping(clip_norm)}")
    clip.add_argument("--clip-value", type=cli.positive_float, metavar="X", help="clip every gradient component to [-X, X]")
    group.add_argument("--coordinates", choices=forward.FLOW_COORDINATES,
                       help="the fixed map from the flow's unconstrained u onto the prior box: box = theta = lo + (hi - lo) "
                            "sigmoid(u) per parameter; mass (a free density only) = x0 and z so, then the sphere's mass "
                            "m = |drho| R^3 and, at that mass, log |drho| within the contrasts the box allows, so that the "
                            "mass ridge is a straight line along which the posterior is nearly normal "
                            "(forward.MassBijection; the random walk's log coordinates do the same for the MCMC). Default: "
                            "mass with --density-bounds, box otherwise")
    group.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: %(default)s)")
    group.add_argument("--compile", action="store_true",
                       help="compile the training step with torch.compile (on the CPU it needs a C++ compiler; without "
                            "one: a warning, and the step uncompiled). Measured on a 2-core laptop CPU: 1.5-2.7 times fewer "
                            "ms per step, but the first step compiles, 7-50 s while torch's on-disk cache is empty and "
                            "4-6 s once it holds this flow, counted in the training time: it pays in runs of thousands of "
                            "iterations on a machine that has compiled the flow before (README, 'Compiling the training "
                            "step')")
    if spline:
        group.add_argument("--bins", type=cli.positive_int, default=splines.DEFAULT_BINS, help="spline bins K (default: %(default)s)")
        group.add_argument("--tail-bound", type=cli.positive_float, default=splines.DEFAULT_TAIL_BOUND, metavar="B",
                           help="the spline acts on [-B, B], identity outside (default: %(default)s)")
    group.add_argument("--checkpoints", type=cli.nonnegative_int, default=0, metavar="N",
                       help="score the flow against the exact reference at N iterations spaced geometrically "
                            f"({convergence.CHECKPOINT_SAMPLES} draws each; not counted in the training time), for "
                            "summary.json's 'convergence' and compare.py's convergence figure (default: %(default)s)")
    group.add_argument("--refine", choices=refine.METHODS, default="none",
                       help="after training, correct the flow's draws towards the posterior: importance = Pareto-smoothed "
                            "importance resampling, mh = independence Metropolis-Hastings with the flow as proposal "
                            "(default: %(default)s)")
    amortized.add_options(parser, {**AMORTIZED_DEFAULTS, **(amortized_defaults or {})})
    return parser


def _anneal_ess(text):
    value = cli.fraction(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be < 1 (0: the geometric schedule), got {text}")
    return value


def resolve_coordinates(args, problem):
    """Fill in ``--coordinates`` for ``problem`` (``forward.default_flow_coordinates``), refusing mass coordinates
    where the density is known, and return args. ``--init amortized`` refines the model's q, whose u is the box's."""
    if args.coordinates == "mass" and not problem.free_density:
        raise forward.DataError("--coordinates mass needs a free density (--density-bounds LO HI): with the density "
                                "known the data see R itself")
    if getattr(args, "init", None) == "amortized":
        if args.coordinates == "mass":
            raise forward.DataError("--init amortized refines the model's posterior, whose coordinates are the box's: "
                                    "drop --coordinates mass")
        args.coordinates = "box"
    elif args.coordinates is None:
        args.coordinates = forward.default_flow_coordinates(problem)
    return args


def resolve_defaults(args, init, laplace_is_ess=None):
    """Fill in the defaults that depend on the start (``init``: "laplace", "prior" or "amortized") and return args.

    From the amortized start (the flow's options are then the model's, ``amortized.start_options``)
    the defaults are :data:`AMORTIZED_START` and no annealing, for every flow. From the Laplace start
    with ``laplace_is_ess`` (``Start.is_ess``; None: not judged) at least :data:`CLOSE_LAPLACE_ESS`,
    the default ``--iterations`` is at most :data:`CLOSE_LAPLACE_ITERATIONS`. From the prior in mass
    coordinates (``args.coordinates``, filled by :func:`resolve_coordinates`; None counts as the box's) the
    scripts' "mass" defaults, annealed over :data:`ANNEAL_FROM_PRIOR_MASS`."""
    in_mass = init == "prior" and getattr(args, "coordinates", None) == "mass"
    if init == "amortized":
        defaults = {**AMORTIZED_START, "flows": args.flows, "clip_norm": None}
    else:
        key = "mass" if in_mass else init
        defaults = {name: by_start[key] for name, by_start in args.start_defaults.items()}
    if init == "laplace" and laplace_is_ess is not None and laplace_is_ess >= CLOSE_LAPLACE_ESS:
        defaults["iterations"] = min(defaults["iterations"], CLOSE_LAPLACE_ITERATIONS)
    if args.clip_value is not None:
        defaults["clip_norm"] = None  # one clipping at a time: --clip-value replaces the default --clip-norm
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.anneal is None:
        args.anneal = (ANNEAL_FROM_PRIOR_MASS if in_mass else ANNEAL_FROM_PRIOR) if init == "prior" else 0.0
    del args.start_defaults
    return args


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


def build_flow(args, build_layers, laplace, problem, device, init):
    """The FlowPosterior for these options from the start ``init`` ("laplace" or "prior"), its layer
    weights drawn from ``args.seed``.

    The CPU's global generator is restored afterwards (training and sampling use their own
    generators, so nothing depends on any global random state). Its coordinates are ``args.coordinates``
    (None: the box's)."""
    coordinates = getattr(args, "coordinates", None) or "box"
    shift, scale_tril = standardisation(init, laplace, coordinates, problem.bounds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = FlowPosterior(build_layers(args, problem.dim), problem.bounds, shift, scale_tril, coordinates)
    return model.to(device=device, dtype=torch.float64)


def start_from_model(args, build_layers, device):
    """``--init amortized``: the checked model record, its network, and a check of the profile for ``cli.setup_run``
    (all before anything is written); (None, None, None) for the other starts. Sets the flow options to the model's."""
    if args.init != "amortized":
        return None, None, None
    record, network = amortized.load_model(args, build_layers, device, dtype=torch.float64)  # trained here in float64
    amortized.start_options(args, record)
    return record, network, lambda problem: amortized.check_start_profile(record, problem, args)


def amortized_start(args, record, network, problem):
    """The :class:`Start` of ``--init amortized`` and its posterior: the model's q(theta | d) of this
    profile, its context fixed (``ConditionedPosterior``), which ``train`` refines by the profile's ELBO."""
    training = record["training"]
    chosen = Start("amortized", f"the amortized posterior of {args.model} (Gravity_{record['method']}.py, "
                                f"{training['iterations']} steps of {training['simulations_per_step']} simulations)")
    return chosen, ConditionedPosterior(network, problem.g_obs)


def run_flow_method(args, build_layers):
    """Everything a flow script does after parsing: data, reference, start, training, evaluation, refinement, outputs.

    With ``--amortize`` or ``--model``: the amortized run instead (:mod:`gravity_flows.command.amortized`).
    With ``--init amortized --model FILE``: this per-profile run, its flow the model's conditioned on the
    profile (:func:`amortized_start`); its convergence record then starts at iteration 0, the model's q as it is."""
    if amortized.wanted(args):
        device = device_for(args.device)
        if args.amortize:
            return amortized.train_run(args, build_layers, device)
        return amortized.apply_run(args, build_layers, device)
    with cli.Timer() as total:
        device = device_for(args.device)
        timing = {}
        with cli.Timer() as loading:
            record, network, check = start_from_model(args, build_layers, device)

        def check_options(problem):  # before anything is written: the coordinates, and the model's profile
            resolve_coordinates(args, problem)
            if check is not None:
                check(problem)

        problem, out, laplace, reference = cli.setup_run(args, check=check_options, timing=timing)
        with cli.Timer() as choosing:
            if record is not None:
                chosen, model = amortized_start(args, record, network, problem)
            else:
                chosen = choose_start(args.init, problem, laplace, args.coordinates)
        setup_seconds = cli.setup_seconds(timing, laplace, loading.seconds + choosing.seconds)
        resolve_defaults(args, chosen.init, chosen.is_ess)
        names = forward.MassBijection.NAMES if args.coordinates == "mass" else problem.names
        centred = ([name for name, shift in zip(names, prior_centre(laplace, args.coordinates, problem.bounds))
                    if shift] if chosen.init == "prior" else [])
        if centred:
            chosen = dataclasses.replace(chosen, reason=f"{chosen.reason}; the flow's frame centred on the mode in "
                                                       f"{', '.join(centred)}, whose posterior is pressed on a bound")
        print(f"start: {chosen.init} ({chosen.reason})" + (f"; annealing over {100 * args.anneal:.0f} % of "
              f"{args.iterations} iterations" + (f" at most (adaptive, ESS {args.anneal_ess:g})" if args.anneal_ess else "")
              if args.anneal else f"; {args.iterations} iterations") + ("; in mass coordinates" if args.coordinates == "mass" else "")
              + ("; the training step compiled" if args.compile else ""),
              file=sys.stderr)

        if record is None:
            model = build_flow(args, build_layers, laplace, problem, device, chosen.init)
        log_likelihood = forward.TorchLikelihood(problem).to(device=device, dtype=torch.float64)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        recorder = convergence.Recorder()
        scoring_generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # training's draws stay the same

        def score_now(iteration, seconds):
            theta_now, _ = evaluate(model, log_likelihood, problem.log_prior_density, convergence.CHECKPOINT_SAMPLES,
                                    scoring_generator)
            error = score(theta_now, reference)["error"] if np.all(np.isfinite(theta_now)) else math.inf
            recorder.add(iteration, seconds, chosen.likelihood_evaluations + iteration * args.batch, error, stage="training")

        if record is not None:
            score_now(0, 0.0)  # the amortized q before any refining: time 0 if it is already good enough
        trace = {}
        with cli.interruptible("training") as stop:
            try:
                history, train_seconds = train(
                    model, log_likelihood, problem.log_prior_density, iterations=args.iterations, batch=args.batch,
                    lr=args.lr, clip_norm=args.clip_norm, clip_value=args.clip_value, generator=generator,
                    progress=not args.quiet, stop=stop, anneal=args.anneal, anneal_ess=args.anneal_ess or None, trace=trace,
                    checkpoints=convergence.checkpoint_iterations(args.iterations, args.checkpoints),
                    on_checkpoint=score_now, compile=args.compile)
            except TrainingDiverged as error:
                advice = f"try a smaller --lr (now {args.lr:g}) or gradient clipping (--clip-norm 10)"
                advice += ", or --init laplace" if chosen.init == "prior" else ""
                return cli.fail_without_results(out, f"{error}; {advice}")
        n_draws = refine.draws_needed(args.refine, args.samples) if args.refine != "none" else args.samples
        with cli.Timer() as evaluation:
            theta, log_weights = evaluate(model, log_likelihood, problem.log_prior_density, n_draws, generator)
        if not np.all(np.isfinite(theta)):
            return cli.fail_without_results(out, "the trained flow draws non-finite samples; try a smaller --lr")
        results = importance_diagnostics(log_weights, reference.log_evidence)
        results.update(
            start=chosen.summary() if record is None else {
                **chosen.summary(), "model": {"path": str(Path(args.model).resolve()), "method": record["method"],
                                              "training": record["training"]}},
            coordinates=args.coordinates,
            setup_time_s=setup_seconds,
            iterations=int(history.size),
            anneal=args.anneal,
            anneal_iterations=trace["anneal_iterations"],
            train_time_s=train_seconds,
            compiled=trace["compiled"],
            time_per_iteration_ms=1e3 * train_seconds / history.size,
            n_parameters=int(sum(p.numel() for p in model.parameters() if p.requires_grad)),  # those trained here
            likelihood_evaluations=chosen.likelihood_evaluations + int(history.size) * args.batch + n_draws,
        )
        cost = train_seconds + evaluation.seconds  # the flow's clock: training, then drawing its samples
        vi_scores = score(theta[:args.samples], reference)
        recorder.add(history.size, cost, results["likelihood_evaluations"], vi_scores["error"], stage="trained")
        lines = []
        if args.refine != "none":
            results["vi"] = {**vi_scores, **{key: results[key] for key in ("kl", "is_ess", "khat")}}
            with cli.Timer() as refining:
                theta, refined = refine.refine(args.refine, theta, log_weights, args.samples,
                                               np.random.default_rng(args.seed))
            results["refine"] = {**refined, "time_s": refining.seconds}
            recorder.add(history.size, cost + refining.seconds, results["likelihood_evaluations"],
                         score(theta, reference)["error"], stage="refined")
            lines.append(f"VI alone: error {results['vi']['error']:.4f}; refined by {args.refine}"
                         + ("" if refined["trustworthy"] else " (NOT TRUSTWORTHY)"))
            if not refined["trustworthy"]:
                print(f"warning: {refined['warning']}", file=sys.stderr)
        else:
            theta = theta[:args.samples]
        results["convergence"] = recorder.points
    figures.plot_elbo(out / "elbo.png", history, reference.log_evidence, title=args.method,
                      final_kl=(results["kl"], n_draws), anneal_end=results["anneal_iterations"])
    summary = report.write_results(out, args, problem, reference, theta, results, total.seconds, stop.interrupted)
    report.print_summary(summary, [
        f"ELBO {results['elbo']:.4f} ± {results['elbo_se']:.4f}, KL(q||p) {results['kl']:.4f} nats, "
        f"importance ESS {100 * results['is_ess']:.1f} %, PSIS k-hat {results['khat']:.2f}",
        f"training: {history.size} iterations in {train_seconds:.1f} s "
        f"({results['time_per_iteration_ms']:.2f} ms per iteration)",
        *lines,
    ])
    print(f"wrote {out}/", file=sys.stderr)
    return cli.EXIT_INTERRUPTED if stop.interrupted else 0
