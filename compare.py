"""Run all seven methods on the same data with the same seed, and compare them against the exact posterior.

Each method runs in this process through its own script's ``main`` (one code path per method),
with the options given here passed on; it prints its usual report and writes its usual outputs into
OUT/<method>/. Then OUT/ gets:

  table.md, table.csv   per method: error (largest W1/sd), KL(q||p), importance ESS and PSIS k-hat
                        (flows), ESS per second and R-hat (MCMC), iterations, wall time, time per
                        iteration, and the per-iteration cost of each flow against the bare flow;
                        table.md also checks the project's speed and accuracy goals (PASS/FAIL);
  marginals.png         every method's three marginals over the exact posterior (small multiples);
  cost_accuracy.png     wall time against error and against KL, log scales.

--quick makes a short smoke run (flows 300 iterations, MCMC 2000 + 200 burn-in per chain): its
numbers are not the methods' accuracy. --methods picks a subset, e.g. the original README's spline
against affine coupling study:

  python compare.py --methods coupling_Affine,coupling_NSF --iterations 1500 --init prior

--sweep NAME=V1,V2,... repeats the comparison for each value of one of these options (see sweep.py).

When does a flow take MCMC's place? ``--amortized`` answers for a survey of many profiles:

  python compare.py --amortized [--density-bounds LO HI] [problem options] --out DIR

Each chosen flow (--methods; default all six) runs its script's ``--amortize`` in this process with the
same settings (--iterations, default 2000 steps; --simulations, --test-profiles, --seed, --samples and the
problem options, the scripts' own defaults where not given) into DIR/<method>/ (model.pt, summary.json, amortized.png),
one progress line per flow. Every flow is scored on the same held-out test profiles (drawn from the
seed alone; checked). Then the default MCMC runs on the first --mcmc-profiles (10) of them, each written
as DIR/mcmc/profile_XX.csv (forward.write_profile: it reads back bit for bit) and run into
DIR/mcmc/profile_XX/ with checkpoints, scored against the same exact reference; its time per profile is
its setup (data, MAP/Laplace, the start's choice: summary.json's setup_time_s) plus its sampling time to
error 0.05 (convergence.cost_to_reach). DIR/ then gets:

  table.md, table.csv   per flow: train_time_s, median_error, p90_error, share_error_le_0.05,
                        share_khat_le_0.7, posterior_time_s (median per profile), mcmc_time_s (median of
                        MCMC's time to error 0.05, setup included), break_even_profiles =
                        ceil(train_time_s / (mcmc_time_s - posterior_time_s)) (empty where never),
                        share_trustworthy, silent_failures, median_vi_error; a row for MCMC (its final
                        errors, its time); table.md checks issue 21's goals (PASS/FAIL);
  cost_vs_survey.png    total time against the number of profiles, 1 to 10 000, log-log (each flow's
                        training plus n posteriors, MCMC's n runs, the break-evens marked), and every
                        flow's test-set errors side by side with MCMC's.

--models DIR0 scores the models of an earlier --amortized run (DIR0/<method>/model.pt) on the same
test profiles instead of training them, keeping their train_time_s. With --amortized, --quick is a
smoke run of every code path: 30 steps of 16 simulations, 3 test profiles, MCMC on 2 with short chains.
"""

import argparse
import importlib
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import forward
from gravity_flows.command import amortized as amortized_command
from gravity_flows.command import cli, runner, sweep
from gravity_flows.command import flow as flow_command
from gravity_flows.inference import amortized, correction, model_file, refine, start
from gravity_flows.reporting import figures, output
from gravity_flows.scoring import convergence
from gravity_flows.scoring.reference import ERROR_GOAL
from forward import DataError

METHODS = ("MCMC", "planar", "auto_Affine", "auto_NSF", "coupling_Affine", "coupling_NSF", "invertible_Affine")
SPLINE_FLOWS = ("auto_NSF", "coupling_NSF")
WHAT = {
    "MCMC": "random-walk Metropolis–Hastings",
    "planar": "planar flow",
    "auto_Affine": "autoregressive affine (IAF)",
    "auto_NSF": "autoregressive spline (NSF)",
    "coupling_Affine": "coupling affine (RealNVP)",
    "coupling_NSF": "coupling spline (NSF)",
    "invertible_Affine": "Glow: ActNorm + 1×1 + coupling",
}

#: Checkpoints per method for the convergence figure (geometrically spaced over each run).
CHECKPOINTS = 12

#: --quick: a smoke run of every code path, not an accurate one.
QUICK_FLOW_ITERATIONS = 300
QUICK_MCMC = ("--iterations", "2000", "--burn-in", "200")

#: The per-iteration cost ratio: time per training iteration at this batch, median over the repeats.
TIMING_BATCH = 64
TIMING = {"iterations": 300, "repeats": 3, "warm_up": 30}
QUICK_TIMING = {"iterations": 30, "repeats": 1, "warm_up": 5}

#: The project's goals, for the default settings on a laptop CPU (README); the error goal is reference.ERROR_GOAL.
MCMC_ERROR_GOAL = 0.03
KL_GOAL = 0.005
TRAIN_TIME_GOAL_S = {"affine": 15.0, "spline": 20.0}
COST_RATIO_GOAL = {"affine": 3.0, "spline": 5.0}
TOTAL_TIME_GOAL_S = 180.0
#: The default MCMC's smallest ESS per second of sampling against the original's settings
#: (--init prior: one chain from (5.5, 8.5, 4.5), isotropic 0.01 m proposal, 100000 + 20000 iterations).
MCMC_SPEEDUP_GOAL = 20.0
#: With the density unknown (--density-bounds): each run's wall time, the whole comparison's, and the
#: best flow's time to error 0.05 as a share of MCMC's.
RIDGE_RUN_GOAL_S = 90.0
RIDGE_TOTAL_TIME_GOAL_S = 360.0
FLOW_TIME_RATIO_GOAL = 0.5
#: The table column with each method's seconds to reach error 0.05 (convergence.cost_to_reach).
TIME_TO_LEVEL = "time_to_error_0.05_s"

#: --amortized: MCMC on this many of the test profiles; its --quick settings (a tiny model, short chains).
MCMC_PROFILES = 10
QUICK_AMORTIZED = {"iterations": 30, "simulations": 16, "test_profiles": 3, "mcmc_profiles": 2}
#: --amortized: the training steps every flow gets where --iterations is not given (the scripts' own --amortize
#: default, 10000, makes each profile's posterior cheaper but the survey that repays it larger). With the
#: correction's rescues a coarse q costs draws, not accuracy; measured for coupling_Affine on the ridge
#: (README, "When does a flow take MCMC's place?"): 2000 steps break even soonest.
AMORTIZED_ITERATIONS = 2000
#: The goals of the amortized comparison (issue 21): on the ridge the best flow cheaper than MCMC from at
#: most this many profiles; everywhere its posterior in at most this share of MCMC's time per profile; the
#: whole comparison, training included, within this many seconds.
BREAK_EVEN_GOAL = 200
POSTERIOR_TIME_SHARE_GOAL = 0.1
AMORTIZED_TOTAL_TIME_GOAL_S = 45 * 60.0
#: (key, markdown header, format) of the amortized table; the CSV headers are the keys (checks read them).
AMORTIZED_COLUMNS = (
    ("method", "method", "{}"),
    ("train_time_s", "training (s)", "{:.1f}"),
    ("median_error", "median error", "{:.4f}"),
    ("p90_error", "90th pct error", "{:.4f}"),
    ("share_error_le_0.05", "share error ≤ 0.05", "{:.2f}"),
    ("share_khat_le_0.7", "share k-hat ≤ 0.7", "{:.2f}"),
    ("posterior_time_s", "posterior per profile (s)", "{:.3f}"),
    ("mcmc_time_s", "MCMC per profile (s)", "{:.3f}"),
    ("break_even_profiles", "break-even (profiles)", "{:d}"),
    ("share_trustworthy", "share trustworthy", "{:.2f}"),
    ("silent_failures", "silent failures", "{:d}"),
    ("median_vi_error", "flow alone, median error", "{:.3f}"),
)


def build_parser():
    parser = cli.common_parser(__doc__, "compare", default_samples=10_000)
    group = parser.add_argument_group("comparison")
    group.add_argument("--methods", default=",".join(METHODS),
                       help="comma-separated methods to run, in this order (default: all seven: %(default)s)")
    group.add_argument("--iterations", type=cli.positive_int,
                       help="training iterations of every flow (default: each flow's own; with --amortized "
                            f"{AMORTIZED_ITERATIONS} steps; MCMC keeps its own)")
    group.add_argument("--quick", action="store_true",
                       help=f"a short smoke run: flows {QUICK_FLOW_ITERATIONS} iterations, MCMC "
                            f"{QUICK_MCMC[1]} + {QUICK_MCMC[3]} burn-in per chain, a short cost-ratio timing")
    group.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the flows train (default: %(default)s)")
    group.add_argument("--coordinates", choices=forward.FLOW_COORDINATES,
                       help="the flows' coordinates (the scripts' --coordinates; default: theirs, mass with "
                            "--density-bounds, box otherwise)")
    group.add_argument("--compile", action="store_true",
                       help="compile every flow's training step (the scripts' --compile); each flow's compilation "
                            "counts in its training time")
    group.add_argument("--checkpoints", type=cli.nonnegative_int, default=CHECKPOINTS, metavar="N",
                       help="score every method against the exact reference at N points of its run, for the "
                            "convergence figure and the cost to reach error 0.05 (default: %(default)s)")
    group.add_argument("--refine", choices=refine.METHODS, default="importance",
                       help="how the flows refine their draws after training; the table gives the error before and "
                            "after (default: %(default)s)")
    group.add_argument("--no-cost-ratio", action="store_true",
                       help="skip timing each flow's training iteration against the bare flow (saves about 20 s)")
    group = parser.add_argument_group("amortized comparison (--amortized: when does a flow take MCMC's place?)")
    group.add_argument("--amortized", action="store_true",
                       help="amortize every chosen flow (--amortize, the same settings for all) and score it on the "
                            "same held-out test profiles; MCMC on the first --mcmc-profiles of them; the table of "
                            "break-even survey sizes and cost_vs_survey.png")
    group.add_argument("--simulations", type=cli.positive_int, metavar="N",
                       help="with --amortized: fresh simulations per training step (default: the scripts' own)")
    group.add_argument("--test-profiles", type=cli.positive_int, metavar="N",
                       help="with --amortized: held-out test profiles (default: the scripts' own)")
    group.add_argument("--mcmc-profiles", type=cli.nonnegative_int, metavar="N",
                       help=f"with --amortized: MCMC on the first N test profiles (default: {MCMC_PROFILES}; "
                            f"--quick {QUICK_AMORTIZED['mcmc_profiles']})")
    group.add_argument("--models", metavar="DIR",
                       help="with --amortized: score the models DIR/<method>/model.pt trained by an earlier "
                            "--amortized run instead of training (their train_time_s from DIR/<method>/summary.json)")
    return parser


def parse_args(argv):
    args = build_parser().parse_args(argv)
    args.methods = _methods(args.methods)
    if not args.amortized:
        given = [f"--{name.replace('_', '-')}" for name in ("simulations", "test_profiles", "mcmc_profiles", "models")
                 if getattr(args, name) is not None]
        if given:
            raise DataError(f"{', '.join(given)} only with --amortized")
    if args.coordinates == "mass" and args.density_bounds is None:
        raise DataError("--coordinates mass needs a free density (--density-bounds LO HI)")
    if args.amortized and args.coordinates:
        raise DataError("--coordinates is a per-profile flow option; the amortized models work in the box's coordinates")
    return args


def _methods(text):
    by_lower = {method.lower(): method for method in METHODS}
    chosen = []
    for name in (part.strip() for part in text.split(",")):
        if name.lower().removeprefix("gravity_").removesuffix(".py") not in by_lower:
            raise DataError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}")
        method = by_lower[name.lower().removeprefix("gravity_").removesuffix(".py")]
        if method not in chosen:
            chosen.append(method)
    return chosen


def _script(method):
    return importlib.import_module(f"Gravity_{method}")


def common_argv(args):
    """The options every method gets alike: the data, the prior, the seed, the start and the samples."""
    argv = ["--noise", repr(args.noise), "--density", repr(args.density), "--bounds", *map(repr, args.bounds),
            "--seed", str(args.seed), "--init", args.init, "--samples", str(args.samples)]
    argv += ["--density-bounds", *map(repr, args.density_bounds)] if args.density_bounds is not None else []
    return argv + (["--data", args.data] if args.data is not None else [])


def method_argv(args, method, folder):
    """The command line that runs ``method`` with the options given to compare.py."""
    argv = common_argv(args) + ["--out", str(folder)]
    if args.quiet:
        argv.append("--quiet")
    argv += ["--checkpoints", str(args.checkpoints)]
    if method == "MCMC":
        return argv + (list(QUICK_MCMC) if args.quick else [])
    iterations = args.iterations or (QUICK_FLOW_ITERATIONS if args.quick else None)
    return (argv + (["--iterations", str(iterations)] if iterations else [])
            + ["--device", args.device, "--refine", args.refine] + (["--compile"] if args.compile else [])
            + (["--coordinates", args.coordinates] if args.coordinates else []))


def call_script(method, argv):
    """Run ``method``'s script's ``main(argv)`` in this process: (exit status, a note on a failure)."""
    note = ""
    try:
        status = _script(method).main(argv) or 0
    except DataError as error:
        status, note = cli.EXIT_USAGE, str(error)
    except SystemExit as stop:  # argparse refused an option
        status = stop.code if isinstance(stop.code, int) else 1
    except Exception as error:  # a bug in one method must not lose the others' results
        traceback.print_exc()
        status, note = 1, f"{type(error).__name__}: {error}"
    return status, note


def run_method(method, argv, folder):
    """Run one method's script in this process. Returns a dict: status, note, summary and theta (None if it failed)."""
    folder = cli.prepare_output(folder)
    started = time.time()
    status, note = call_script(method, argv)
    loaded = sweep.load_run(folder, written_since=started) if status in (0, cli.EXIT_INTERRUPTED) else None
    if loaded is None and status == 0:
        status, note = 1, "it wrote no summary.json"
    summary, theta = loaded if loaded is not None else (None, None)
    return {"method": method, "status": status, "note": note, "summary": summary, "theta": theta}


def _status_text(run):
    if run["status"] == 0:
        return "ok"
    if run["status"] == cli.EXIT_INTERRUPTED:
        return "interrupted"
    what = {cli.EXIT_DIVERGED: "training diverged", cli.EXIT_USAGE: "bad input"}.get(run["status"], "failed")
    return f"FAILED: {what} (exit status {run['status']})" + (f": {run['note']}" if run["note"] else "")


# ----------------------------------------------------------------------------------------------
# The per-iteration cost of each flow against the bare flow


def time_per_iteration(methods, problem, laplace, device_name="cpu", iterations=300, repeats=3, warm_up=30,
                       coordinates=None):
    """Median seconds per training iteration (batch 64) of each flow at its default settings, and of the bare flow.

    The bare flow is the same variational posterior with no layers: the learnable affine base
    (a Gaussian q), so the ratio is what each method's layers add to a training step, whose floor
    is the likelihood of 64 samples at every station. Every flow is built as its script builds it
    (its ``build_layers`` with its default options) and trained by :func:`vi.train`; after a
    warm-up, each repeat times every flow once in turn, so that a busy stretch of the machine slows
    all of them alike, and the median over repeats is kept. Returns ``{method: seconds, "bare": seconds}``.
    """
    import torch

    from gravity_flows.command import flow
    from gravity_flows.inference import vi

    device = flow.device_for(device_name)
    log_likelihood = forward.TorchLikelihood(problem).to(device=device, dtype=torch.float64)
    init = start.choose_start("auto", problem, laplace, coordinates or forward.default_flow_coordinates(problem)).init
    models = {}
    for method in methods:
        script = _script(method)
        given = ["--coordinates", coordinates] if coordinates else []
        args = flow.resolve_defaults(flow.resolve_coordinates(script.build_parser().parse_args(given), problem), init)
        models[method] = (flow.build_flow(args, script.build_layers, laplace, problem, device, init), args)
    if not models:
        return {}
    any_args = next(iter(models.values()))[1]
    models["bare"] = (flow.build_flow(any_args, lambda args, dim: [], laplace, problem, device, init), any_args)
    generator = torch.Generator(device=device).manual_seed(0)

    def train(model, args, n):
        vi.train(model, log_likelihood, problem.log_prior_density, iterations=n, batch=TIMING_BATCH, lr=args.lr,
                 clip_norm=args.clip_norm, clip_value=args.clip_value, generator=generator, progress=False)

    for model, args in models.values():
        train(model, args, warm_up)
    seconds = {name: [] for name in models}
    for _ in range(repeats):
        for name, (model, args) in models.items():
            began = time.perf_counter()
            train(model, args, iterations)
            seconds[name].append((time.perf_counter() - began) / iterations)
    return {name: statistics.median(values) for name, values in seconds.items()}


# ----------------------------------------------------------------------------------------------
# Goals


def _kind(method):
    return "spline" if method in SPLINE_FLOWS else "affine"


def _judge(value, limit, fmt, unit=""):
    if value is None:
        return "— FAIL (no result)", False
    passed = value <= limit
    return f"{fmt.format(value)}{unit} ≤ {limit:g}{unit} {'PASS' if passed else 'FAIL'}", passed


def mcmc_speedup(args, out, runs):
    """Run MCMC at the original's settings beside the default run; (default ESS/s, original ESS/s) or None."""
    default = next((run for run in runs if run["method"] == "MCMC" and run["summary"] is not None), None)
    if (default is None or args.quick or args.init not in ("auto", "laplace") or args.data is not None
            or args.density_bounds is not None):
        return None  # the goal is set for the default problem
    print("compare: MCMC at the original's settings (--init prior), for its ESS per second", file=sys.stderr, flush=True)
    folder = out / "MCMC-original"
    original = run_method("MCMC", method_argv(args, "MCMC", folder) + ["--init", "prior"], folder)
    if original["summary"] is None:
        return None
    return default["summary"]["ess_per_s"], original["summary"]["ess_per_s"]


def check_goals(runs, ratios, total_seconds, why_no_ratio="not measured", speedup=None, ridge=False):
    """The goals table (markdown) and the number of goals passed and checked (``ridge``: the free-density goals)."""
    if ridge:
        return _check_ridge_goals(runs, total_seconds)
    lines = ["| method | error | KL (nats) | training time | cost ratio vs bare flow |", "|:---|:---|:---|:---|:---|"]
    passed = checked = 0
    for run in runs:
        method, summary = run["method"], run["summary"] or {}
        cells = []
        error_limit = MCMC_ERROR_GOAL if method == "MCMC" else ERROR_GOAL
        checks = [(_vi_error(summary) if method != "MCMC" else summary.get("error"), error_limit, "{:.4f}", "")]
        if method != "MCMC":
            checks += [(summary.get("kl"), KL_GOAL, "{:.4f}", ""),
                       (summary.get("train_time_s"), TRAIN_TIME_GOAL_S[_kind(method)], "{:.1f}", " s")]
        for value, limit, fmt, unit in checks:
            text, ok = _judge(value, limit, fmt, unit)
            cells.append(text)
            passed, checked = passed + ok, checked + 1
        if method == "MCMC":
            cells += ["", "", ""]
        elif ratios:
            text, ok = _judge(ratios.get(method), COST_RATIO_GOAL[_kind(method)], "{:.2f}", "×")
            cells.append(text)
            passed, checked = passed + ok, checked + 1
        else:
            cells.append(why_no_ratio)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text, ok = _judge(total_seconds, TOTAL_TIME_GOAL_S, "{:.0f}", " s")
    passed, checked = passed + ok, checked + 1
    lines.append("")
    if speedup is not None:
        default, original = speedup
        ok = default >= MCMC_SPEEDUP_GOAL * original
        passed, checked = passed + ok, checked + 1
        lines.append(f"MCMC speed: smallest ESS per second of sampling {default:.0f} at the defaults against {original:.0f} "
                     f"at the original's settings (`--init prior`, one chain, run in `MCMC-original/`): "
                     f"{default / original:.0f}× ≥ {MCMC_SPEEDUP_GOAL:g}× {'PASS' if ok else 'FAIL'}.")
        lines.append("")
    lines.append(f"Whole comparison (all methods, figures and the cost-ratio timing): {text}.")
    return "\n".join(lines), passed, checked


def _vi_error(summary):
    """A flow's error before any refinement (its own draws)."""
    return (summary.get("vi") or {}).get("error", summary.get("error"))


def _check_ridge_goals(runs, total_seconds):
    """The free-density goals: MCMC and every refined flow error ≤ 0.05, the spline flows also without
    refining, every run within RIDGE_RUN_GOAL_S, the comparison within RIDGE_TOTAL_TIME_GOAL_S."""
    lines = ["| method | error (refined for flows) | flow alone | wall time |", "|:---|:---|:---|:---|"]
    passed = checked = 0
    for run in runs:
        method, summary = run["method"], run["summary"] or {}
        checks = [(summary.get("error"), ERROR_GOAL, "{:.4f}", "")]
        alone = ""
        if method in SPLINE_FLOWS:
            checks.append((_vi_error(summary), ERROR_GOAL, "{:.4f}", ""))
        elif method != "MCMC" and _vi_error(summary) is not None:
            alone = f"{_vi_error(summary):.4f} (not a goal)"
        checks.append((summary.get("wall_time_s"), RIDGE_RUN_GOAL_S, "{:.1f}", " s"))
        cells = []
        for value, limit, fmt, unit in checks:
            text, ok = _judge(value, limit, fmt, unit)
            cells.append(text)
            passed, checked = passed + ok, checked + 1
        if method not in SPLINE_FLOWS:
            cells.insert(1, alone)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text, ok = _judge(total_seconds, RIDGE_TOTAL_TIME_GOAL_S, "{:.0f}", " s")
    passed, checked = passed + ok, checked + 1
    lines += ["", f"Whole comparison (all methods, figures and the cost-ratio timing): {text}."]
    return "\n".join(lines), passed, checked


def flow_against_mcmc(reach, ridge):
    """Lines comparing each flow's seconds to reach error ERROR_GOAL with MCMC's (measured in this run),
    and whether the best flow needs at most FLOW_TIME_RATIO_GOAL of MCMC's time (None: not judged)."""
    level = ERROR_GOAL
    mcmc = reach.pop("MCMC", None)
    lines = [f"Time to reach error {level:g} and stay there (checkpoints of this run; empty: never):", ""]
    if mcmc is None:
        lines.append(f"- MCMC did not reach {level:g}; no ratio.")
    for method, seconds in reach.items():
        if seconds is None:
            lines.append(f"- {method}: never reached {level:g}")
        elif mcmc is not None:
            lines.append(f"- {method}: {seconds:.1f} s, {seconds / mcmc:.2f}× MCMC's {mcmc:.1f} s")
        else:
            lines.append(f"- {method}: {seconds:.1f} s")
    if not ridge or mcmc is None:
        return lines, None
    flows = {method: seconds for method, seconds in reach.items() if seconds is not None}
    if not flows:
        lines += ["", f"Goal: the best flow within {FLOW_TIME_RATIO_GOAL:g}× MCMC's time: FAIL (no flow reached {level:g})."]
        return lines, False
    best = min(flows, key=flows.get)
    ok = flows[best] <= FLOW_TIME_RATIO_GOAL * mcmc
    lines += ["", f"Goal: the best flow ({best}, {flows[best]:.1f} s) within {FLOW_TIME_RATIO_GOAL:g}× MCMC's time "
                  f"({mcmc:.1f} s): {flows[best] / mcmc:.2f}× {'PASS' if ok else 'FAIL'}."]
    return lines, ok


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    if args.amortized:
        return compare_amortized(args, started)
    problem, out, laplace, reference = cli.setup_run(args)

    runs = []
    for k, method in enumerate(args.methods):
        print(f"compare: [{k + 1}/{len(args.methods)}] {method} ({WHAT[method]}) -> {out / method}/", file=sys.stderr, flush=True)
        run = run_method(method, method_argv(args, method, out / method), out / method)
        runs.append(run)
        summary = run["summary"]
        if summary is not None:
            kl = f", KL {summary['kl']:.4f} nats" if summary.get("kl") is not None else ""
            print(f"compare:   error {summary['error']:.4f}{kl}, wall time {summary['wall_time_s']:.1f} s", file=sys.stderr)
        else:
            print(f"compare:   {_status_text(run)}", file=sys.stderr)
        if run["status"] == cli.EXIT_INTERRUPTED:
            print("compare: interrupted; writing the table of the methods done", file=sys.stderr)
            break
    interrupted = any(run["status"] == cli.EXIT_INTERRUPTED for run in runs)
    speedup = None if interrupted else mcmc_speedup(args, out, runs)

    flows = [run["method"] for run in runs if run["method"] != "MCMC" and run["summary"] is not None]
    timing = QUICK_TIMING if args.quick else TIMING
    ratios, bare_ms = {}, None
    if flows and not args.no_cost_ratio and not interrupted:
        print(f"compare: timing a training iteration of each flow against the bare flow "
              f"({timing['repeats']} × {timing['iterations']} iterations each)", file=sys.stderr, flush=True)
        seconds = time_per_iteration(flows, problem, laplace, args.device, **timing, coordinates=args.coordinates)
        bare_ms = 1e3 * seconds["bare"]
        ratios = {method: seconds[method] / seconds["bare"] for method in flows}

    rows = []
    for run in runs:
        row = sweep.summary_row(run["summary"]) if run["summary"] is not None else {"method": run["method"]}
        row["cost_ratio"] = ratios.get(run["method"])
        row["status"] = _status_text(run)
        rows.append(row)
    reach = {row["method"]: row.get(TIME_TO_LEVEL) for row in rows}

    title = f"compare ({'quick smoke run, ' if args.quick else ''}seed {args.seed}, --init {args.init})"
    done = [run for run in runs if run["theta"] is not None]
    if done:
        truth = problem.truth
        figures.plot_marginals_grid(out / "marginals.png", [(f"{run['method']}\n{WHAT[run['method']]}", run["theta"], reference)
                                                            for run in done], truth, title=title, error_goal=ERROR_GOAL,
                                    parameters=problem.parameters, bounds=problem.bounds)
        figures.plot_pair_grid(out / "pairs.png", [(f"{run['method']}: {WHAT[run['method']]}", run["theta"], reference)
                                                   for run in done], truth, title=title, parameters=problem.parameters,
                               bounds=problem.bounds)
        figures.plot_convergence(out / "convergence.png", [
            {"label": run["method"], "points": run["summary"].get("convergence") or []} for run in done],
            level=ERROR_GOAL, title=title)
        figures.plot_cost_accuracy(out / "cost_accuracy.png", [
            {"label": run["method"], "wall_time_s": run["summary"]["wall_time_s"], "error": run["summary"]["error"],
             "kl": run["summary"].get("kl"), "kl_se": run["summary"].get("elbo_se")} for run in done], ERROR_GOAL, KL_GOAL, title=title)

    total = time.perf_counter() - started
    why_no_ratio = "not measured (--no-cost-ratio)" if args.no_cost_ratio else "not measured"
    goals, passed, checked = check_goals(runs, ratios, total, why_no_ratio, speedup, ridge=problem.free_density)
    ratio_lines, ratio_passed = flow_against_mcmc(reach, ridge=problem.free_density)
    goals += "\n\n" + "\n".join(ratio_lines)
    if ratio_passed is not None:
        passed, checked = passed + ratio_passed, checked + 1
    notes = [
        "Every method ran with `" + " ".join(common_argv(args)) + "`" + (", --quick" if args.quick else "")
        + (f", flows --iterations {args.iterations}" if args.iterations else "")
        + (", flows --compile (the training step compiled, its compilation counted)" if args.compile else "")
        + (f", flows --coordinates {args.coordinates}" if args.coordinates else "") + ".",
        "",
        f"- error: the largest, over {', '.join(problem.names)}, Wasserstein-1 distance between the method's samples and the exact "
        "marginal, in posterior sd. KL: KL(q‖p) = log Z − ELBO in nats (flows). IS ESS: effective sample size of the "
        "importance weights p/q, in % of the samples; k-hat: Pareto k of PSIS (below 0.7: q is a reliable proposal).",
        "- MCMC ESS/s: the smallest ESS over the parameters per second of sampling; R-hat: largest split R-hat "
        "over the chains. MCMC iterations are kept steps per chain (the chains run together, vectorised); its "
        "time/iteration is one step of all chains.",
        "- wall time: the method's whole run (data, exact reference, Laplace start, training or sampling, evaluation), "
        "not counting its figures; train/sample time: the training loop or the sampler alone.",
    ]
    if ratios:
        notes.append(
            f"- cost ratio: time of one training iteration at batch {TIMING_BATCH} of the flow at its default settings "
            f"against the bare flow (the learnable affine base alone, a Gaussian q: {bare_ms:.2f} ms per iteration), "
            f"measured in this process: median of {timing['repeats']} interleaved repeats of {timing['iterations']} "
            "iterations each, after a warm-up" + (", uncompiled (the flows' own runs compiled their steps)"
                                                  if args.compile else "") + ".")
    notes.append(f"- error 0.05 reached: seconds of the method's own work (training or sampling and drawing its samples; "
                 "the Laplace approximation, the exact reference and the scoring are not counted) and likelihood "
                 f"evaluations until its error stayed at or below {ERROR_GOAL:g} at every later checkpoint "
                 f"({args.checkpoints} checkpoints per method; flows: {convergence.CHECKPOINT_SAMPLES} draws each, then "
                 "the final and the refined draws; MCMC: the kept states so far, after its burn-in). flow alone: the "
                 f"flow's error before `--refine {args.refine}`; refine k-hat above 0.7: the refined draws cannot be trusted.")
    if problem.free_density:
        goal_text = ("The goals with the density unknown, on a 2-core laptop CPU: MCMC and every flow (refined) error ≤ 0.05, "
                     "the spline flows also without refining, every run within 90 s and the whole comparison within 6 "
                     "minutes, and the best flow at error 0.05 within half of MCMC's time.")
    else:
        goal_text = ("The goals, set for the default settings on a 2-core laptop CPU: every error ≤ 0.05 (MCMC ≤ 0.03; for "
                     "flows before refining), every flow KL ≤ 0.005, flow training ≤ 15 s (spline flows 20 s), a training "
                     "iteration ≤ 3× the bare flow's (spline flows 5×), MCMC's ESS per second ≥ 20× the original's settings, "
                     "and the whole comparison under 3 minutes.")
    notes += ["", f"## Goals: {passed} of {checked} PASS", "",
              goal_text + (" This run is not at the defaults, so its FAILs say nothing about the methods." if args.quick
                           or args.iterations or args.init != "auto" or args.data else ""), "", goals]
    heading = "Seven ways to the same posterior" if len(args.methods) == len(METHODS) else ", ".join(args.methods)
    text = sweep.write_tables(out, sweep.COLUMNS, rows, f"{heading}: {title}", "\n".join(notes))
    print(text)
    print(f"compare: {len(done)} of {len(runs)} methods ran; goals {passed} of {checked} PASS; "
          f"{total:.0f} s in all; wrote {out}/", file=sys.stderr)
    failed = [run["status"] for run in runs if run["status"]]
    return failed[0] if failed else 0


# ----------------------------------------------------------------------------------------------
# --amortized: the six flows amortized, against MCMC per profile (issue 21)


def amortize_argv(args, folder):
    """The command line of a flow script's ``--amortize`` run: the options every flow gets alike."""
    quick = QUICK_AMORTIZED if args.quick else {"iterations": AMORTIZED_ITERATIONS}
    argv = ["--amortize", *common_argv(args), "--out", str(folder), "--device", args.device]
    for name in ("iterations", "simulations", "test_profiles"):
        value = getattr(args, name) or quick.get(name)
        argv += [f"--{name.replace('_', '-')}", str(value)] if value else []
    return argv + (["--quiet"] if args.quiet else []) + (["--compile"] if args.compile else [])


def run_amortized(method, args, folder):
    """Train and score one flow's model in this process (its script's ``--amortize``): run_method's dict,
    its summary the training's summary.json (no samples.npz: read it here)."""
    folder = cli.prepare_output(folder)
    started = time.time()
    status, note = call_script(method, amortize_argv(args, folder))
    path, summary = folder / "summary.json", None
    if status in (0, cli.EXIT_INTERRUPTED) and path.exists() and path.stat().st_mtime >= started - 1.0:
        summary = json.loads(path.read_text())
    elif status == 0:
        status, note = 1, "it wrote no summary.json"
    return {"method": method, "status": status, "note": note, "summary": summary, "theta": None}


def score_models(method, args, survey, models, folder):
    """Score an earlier run's model ``models/<method>/model.pt`` on this run's test profiles, without
    training: run_method's dict, with the earlier summary's training numbers and this run's test set."""
    script = _script(method)
    source = Path(models) / method
    trained = json.loads((source / "summary.json").read_text())
    folder = cli.prepare_output(folder)
    argv = [*common_argv(args), "--model", str(source / "model.pt"), "--out", str(folder)]
    quick = QUICK_AMORTIZED if args.quick else {}
    test_profiles = args.test_profiles or quick.get("test_profiles") or trained["amortized"]["test"].get("profiles")
    model_args = script.build_parser().parse_args(argv + ["--test-profiles", str(test_profiles)]
                                                  + (["--quiet"] if args.quiet else []))
    record, model = amortized_command.load_model(model_args, script.build_layers, flow_command.device_for(args.device))
    model_file.check_profile(record, survey, model_args.model, "this comparison's survey")
    rows, interrupted = amortized_command.score_test_set(model, survey, model_args)
    results = {**trained["amortized"], "test": {"seed": args.seed, **(correction.aggregate(rows) if rows else {}),
                                                "rows": rows}}
    summary = {**trained, "mode": "scored", "models_from": str(source.resolve()), "amortized": results}
    output.write_json(folder / "summary.json", summary)
    return {"method": method, "status": cli.EXIT_INTERRUPTED if interrupted else 0, "note": "", "summary": summary,
            "theta": None}


def check_models(models, flows):
    """DataError, before anything is written, unless every flow has its model and summary in ``models``."""
    for method in flows:
        source = Path(models) / method
        if not ((source / "summary.json").is_file() and (source / "model.pt").is_file()):
            raise DataError(f"--models {models}: no {source}/model.pt and summary.json (made by compare.py --amortized)")


def test_set(run):
    """The held-out test set's results of one flow's run (rows and aggregates); {} where it has none."""
    return ((run["summary"] or {}).get("amortized") or {}).get("test") or {}


def test_profile_key(summary):
    """What identifies the test set a model was scored on: (profile index, truth) of every row."""
    return [(row["profile"], row["truth"]) for row in summary["amortized"]["test"]["rows"]]


def mcmc_on_profiles(args, survey, indices, folder):
    """The default MCMC on test profiles ``indices`` (the same draws as every flow's test set), each
    written as ``folder/profile_XX.csv`` and run into ``folder/profile_XX/`` with checkpoints. Returns one
    dict per profile: profile, status, error (final), time_s (its setup plus its time to error 0.05;
    None: never reached), summary."""
    if not indices:
        return []
    profiles = amortized.simulated_profiles(survey, max(indices) + 1, args.seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for k, index in enumerate(indices):
        profile = profiles[index]
        path = forward.write_profile(folder / f"profile_{index:02d}.csv", profile.stations, profile.g_obs,
                                     profile.noise_sd_array)
        stations, g_obs, sigma = forward.read_profile(path)
        if not (np.array_equal(stations, profile.stations) and np.array_equal(g_obs, profile.g_obs)
                and np.array_equal(sigma, profile.noise_sd_array)):
            raise RuntimeError(f"{path} does not read back as the test profile it was written from")
        run_folder = folder / path.stem
        argv = [*common_argv(argparse.Namespace(**{**vars(args), "data": str(path)})), "--out", str(run_folder),
                "--checkpoints", str(args.checkpoints or CHECKPOINTS)]
        argv += (list(QUICK_MCMC) if args.quick else []) + (["--quiet"] if args.quiet else [])
        run = run_method("MCMC", argv, run_folder)
        summary = run["summary"]
        seconds = None
        if summary is not None:
            to_level, _ = convergence.cost_to_reach(summary.get("convergence") or [])
            seconds = None if to_level is None else summary["setup_time_s"] + to_level
        results.append({"profile": index, "status": _status_text(run), "summary": summary, "time_s": seconds,
                        "error": None if summary is None else summary["error"]})
        reached = "never reached" if seconds is None else f"{seconds:.2f} s to"
        print(f"compare: MCMC [{k + 1}/{len(indices)}] test profile {index}: "
              + (f"error {summary['error']:.4f}, {reached} error {ERROR_GOAL:g} (setup included)"
                 if summary is not None else _status_text(run)), file=sys.stderr, flush=True)
        if run["status"] == cli.EXIT_INTERRUPTED:
            break
    return results


def median_or_none(values):
    """The median of ``values`` where None counts as infinitely large (never reached); None if that median is."""
    values = [math.inf if value is None else value for value in values]
    if not values:
        return None
    middle = float(np.median(values))
    return middle if math.isfinite(middle) else None


def break_even(train_seconds, posterior_seconds, mcmc_seconds):
    """Profiles from which training once and applying is cheaper than MCMC on each:
    ceil(train / (mcmc - posterior)); None where never (MCMC no slower per profile, or a number missing)."""
    if None in (train_seconds, posterior_seconds, mcmc_seconds) or mcmc_seconds <= posterior_seconds:
        return None
    return max(1, math.ceil(train_seconds / (mcmc_seconds - posterior_seconds)))


def amortized_row(run, mcmc_seconds):
    """The table row of one flow's amortized run (AMORTIZED_COLUMNS)."""
    row = {"method": run["method"], "status": _status_text(run)}
    test = test_set(run)
    if not test.get("profiles"):
        return row
    training = run["summary"]["amortized"]
    row.update(train_time_s=training["train_time_s"], posterior_time_s=test["median_posterior_time_s"],
               mcmc_time_s=mcmc_seconds,
               **{key: test[key] for key in ("median_error", "p90_error", f"share_error_le_{ERROR_GOAL}",
                                              "share_khat_le_0.7", "share_trustworthy", "silent_failures",
                                              "median_vi_error")})
    row["break_even_profiles"] = break_even(row["train_time_s"], row["posterior_time_s"], mcmc_seconds)
    return row


def mcmc_row(mcmc_runs, mcmc_seconds):
    """MCMC's own row: its final errors on its profiles, and its median time to error 0.05 (setup included)."""
    errors = np.array([run["error"] for run in mcmc_runs if run["error"] is not None])
    row = {"method": "MCMC", "mcmc_time_s": mcmc_seconds}
    if errors.size:
        row.update(median_error=float(np.median(errors)), p90_error=float(np.percentile(errors, 90)),
                   **{f"share_error_le_{ERROR_GOAL}": float(np.mean(errors <= ERROR_GOAL))})
    return row


def amortized_goals(rows, mcmc_seconds, total_seconds, ridge, trained_elsewhere_s=0.0):
    """The goals of issue 21 as lines, and (passed, checked): the best flow breaks even within
    BREAK_EVEN_GOAL profiles on the ridge, its posterior takes at most POSTERIOR_TIME_SHARE_GOAL of MCMC's
    time per profile, the whole run within AMORTIZED_TOTAL_TIME_GOAL_S. ``trained_elsewhere_s``: with
    ``--models``, the models' training times, which the whole comparison counts beside this run's.

    The best flow: among the flows as accurate as MCMC is timed at (median corrected error <= ERROR_GOAL),
    the one with the fewest break-even profiles (the lowest median error where none breaks even); a
    flow that is cheaper but wrong is no replacement, so with no accurate flow the first two goals FAIL."""
    flows = [row for row in rows if row.get("median_error") is not None and row["method"] != "MCMC"]
    passed, checked, lines = 0, 0, []
    flows = [row for row in flows if row["median_error"] <= ERROR_GOAL]
    text, total_ok = _judge(total_seconds + trained_elsewhere_s, AMORTIZED_TOTAL_TIME_GOAL_S, "{:.0f}", " s")
    total_line = f"- the whole comparison, training included: {text}" + (
        f" ({total_seconds:.0f} s here, scoring the models, and their {trained_elsewhere_s:.0f} s of training)"
        if trained_elsewhere_s else "")
    if not flows:
        return [f"- no flow's median corrected error is ≤ {ERROR_GOAL:g}: no flow takes MCMC's place; break-even "
                "and posterior-time goals FAIL", total_line], int(total_ok), 3 if ridge else 2
    even = [row for row in flows if row.get("break_even_profiles") is not None]
    best = (min(even, key=lambda row: row["break_even_profiles"]) if even
            else min(flows, key=lambda row: row["median_error"]))
    crossing = best.get("break_even_profiles")
    if ridge:
        ok = crossing is not None and crossing <= BREAK_EVEN_GOAL
        passed, checked = passed + ok, checked + 1
        lines.append(f"- the best flow ({best['method']}) cheaper than MCMC on every profile from "
                     + ("no survey size (it never breaks even)" if crossing is None else f"{crossing} profiles")
                     + f" on: ≤ {BREAK_EVEN_GOAL} {'PASS' if ok else 'FAIL'}")
    else:
        lines.append(f"- the best flow ({best['method']}) breaks even at "
                     + ("no survey size" if crossing is None else f"{crossing} profiles")
                     + f" (the ≤ {BREAK_EVEN_GOAL} goal is set for the ridge, `--density-bounds`)")
    if mcmc_seconds is None:
        lines.append(f"- posterior time against MCMC's: FAIL (MCMC's median profile never reached error {ERROR_GOAL:g})")
        checked += 1
    else:
        share = best["posterior_time_s"] / mcmc_seconds
        ok = share <= POSTERIOR_TIME_SHARE_GOAL
        passed, checked = passed + ok, checked + 1
        lines.append(f"- the best flow's posterior per profile {best['posterior_time_s']:.3f} s against MCMC's "
                     f"{mcmc_seconds:.3f} s: {share:.2f}× ≤ {POSTERIOR_TIME_SHARE_GOAL:g}× {'PASS' if ok else 'FAIL'}")
    passed, checked = passed + total_ok, checked + 1
    lines.append(total_line)
    return lines, passed, checked


def compare_amortized(args, started):
    """``--amortized`` (module docstring): every flow amortized and scored on the same test profiles, MCMC
    on the first --mcmc-profiles of them, the table and cost_vs_survey.png. Returns the exit status."""
    problem = cli.load_problem(args)
    survey = amortized.survey_of(problem)
    flows = [method for method in args.methods if method != "MCMC"]
    if not flows:
        raise DataError("--amortized needs at least one flow in --methods")
    if args.models:
        check_models(args.models, flows)
    out = cli.prepare_output(args.out)
    runs = []
    for k, method in enumerate(flows):
        folder = out / method
        what = f"scoring {Path(args.models) / method}/model.pt" if args.models else "amortizing"
        print(f"compare: [{k + 1}/{len(flows)}] {what} {method} ({WHAT[method]}) -> {folder}/", file=sys.stderr, flush=True)
        if args.models:
            run = score_models(method, args, survey, args.models, folder)
        else:
            run = run_amortized(method, args, folder)
        runs.append(run)
        test = test_set(run)
        if test.get("profiles"):
            print(f"compare:   {method}: trained in {run['summary']['amortized']['train_time_s']:.1f} s; "
                  f"{test['profiles']} test profiles, median error {test['median_error']:.4f}, "
                  f"{100 * test[f'share_error_le_{ERROR_GOAL}']:.0f} % ≤ {ERROR_GOAL:g}", file=sys.stderr, flush=True)
        else:
            print(f"compare:   {method}: {_status_text(run)}", file=sys.stderr, flush=True)
        if run["status"] == cli.EXIT_INTERRUPTED:
            print("compare: interrupted; writing the table of the methods done", file=sys.stderr)
            break
    scored = [run for run in runs if test_set(run).get("profiles")]
    key = test_profile_key(scored[0]["summary"]) if scored else []
    if scored:
        for run in scored[1:]:
            if test_profile_key(run["summary"]) != key:  # a different seed, count or survey: nothing to compare
                raise RuntimeError(f"{run['method']} was scored on other test profiles than {scored[0]['method']}")
    interrupted = any(run["status"] == cli.EXIT_INTERRUPTED for run in runs)
    mcmc_profiles = args.mcmc_profiles if args.mcmc_profiles is not None else (
        QUICK_AMORTIZED["mcmc_profiles"] if args.quick else MCMC_PROFILES)
    indices = [index for index, _ in key][:mcmc_profiles] if not interrupted else []
    if indices:
        print(f"compare: MCMC (default settings) on the first {len(indices)} test profiles -> {out / 'mcmc'}/",
              file=sys.stderr, flush=True)
    mcmc_runs = mcmc_on_profiles(args, survey, indices, out / "mcmc")
    mcmc_seconds = median_or_none([run["time_s"] for run in mcmc_runs if run["summary"] is not None])

    rows = [amortized_row(run, mcmc_seconds) for run in runs] + ([mcmc_row(mcmc_runs, mcmc_seconds)] if mcmc_runs else [])
    title = (f"amortized ({'quick smoke run, ' if args.quick else ''}seed {args.seed}"
             + (", density free" if problem.free_density else "") + ")")
    errors_of = {run["method"]: [row["error"] for row in run["summary"]["amortized"]["test"]["rows"]] for run in scored}
    figures.plot_cost_vs_survey(
        out / "cost_vs_survey.png",
        [{"label": row["method"], "train_time_s": row.get("train_time_s"), "posterior_time_s": row.get("posterior_time_s"),
          "break_even": row.get("break_even_profiles"), "errors": errors_of.get(row["method"], [])}
         for row in rows if row["method"] != "MCMC"],
        {"time_s": mcmc_seconds, "errors": [run["error"] for run in mcmc_runs if run["error"] is not None]},
        error_goal=ERROR_GOAL, title=title)

    total = time.perf_counter() - started
    trained_elsewhere = sum(run["summary"]["amortized"]["train_time_s"] for run in scored) if args.models else 0.0
    goal_lines, passed, checked = amortized_goals(rows, mcmc_seconds, total, problem.free_density, trained_elsewhere)
    settings = scored[0]["summary"]["amortized"] if scored else {}
    reached = sum(run["time_s"] is not None for run in mcmc_runs)
    notes = [
        "Every flow: `python Gravity_<flow>.py " + " ".join(amortize_argv(args, "DIR/<flow>")) + "`"
        + (f" (models from `{args.models}`, scored here, not trained)" if args.models else "")
        + (f": {settings.get('iterations')} steps × {settings.get('simulations_per_step')} fresh simulations"
           if settings else "") + f"; {len(key)} held-out test profiles, the same for every flow.",
        f"MCMC: the default MCMC (`python Gravity_MCMC.py --data DIR/mcmc/profile_XX.csv --checkpoints "
        f"{args.checkpoints or CHECKPOINTS}`" + (", --quick chains" if args.quick else "") + f") on the first "
        f"{len(mcmc_runs)} test profiles, written as CSV; it reached error {ERROR_GOAL:g} on {reached} of them.",
        "",
        f"- error: the largest, over {', '.join(problem.names)}, Wasserstein-1 distance between the importance-corrected "
        "draws and the profile's exact posterior, in posterior sd (MCMC: its final draws, against the same exact "
        "reference); median and 90th percentile over the test profiles; flow alone: before the correction.",
        "- trustworthy: k-hat ≤ 0.7 and the effective sample size reached its target; silent failures: error > "
        f"{2 * ERROR_GOAL:g} yet trustworthy.",
        "- training (s): the training loop's wall time; posterior per profile: median seconds from a profile's data "
        "to its corrected draws.",
        f"- MCMC per profile: median over its profiles of its setup (data, MAP/Laplace, the start's choice) plus its "
        f"sampling time until its error stayed ≤ {ERROR_GOAL:g} (checkpoints); a profile that never got there counts "
        "as slower than any other.",
        "- break-even: ⌈training / (MCMC per profile − posterior per profile)⌉, the survey size from which training "
        "once and applying the model is cheaper than MCMC on every profile; empty where never. It counts time only: "
        "read it beside the flow's errors (the goals take the best flow among those with median error ≤ "
        f"{ERROR_GOAL:g}).",
    ]
    failed = [row for row in rows if row.get("status", "ok") != "ok"]
    notes += [f"- {row['method']}: {row['status']}" for row in failed]
    notes += ["", f"## Goals: {passed} of {checked} PASS", "",
              "The goals (issue 21): on the ridge the best flow (median error ≤ 0.05) breaks even within "
              f"{BREAK_EVEN_GOAL} profiles; its posterior per profile within {POSTERIOR_TIME_SHARE_GOAL:g}× MCMC's time "
              "to error 0.05 on both problems; the whole comparison within 45 minutes."
              + (" This is a quick smoke run: its FAILs say nothing about the methods." if args.quick else ""),
              "", *goal_lines]
    text = sweep.write_tables(out, AMORTIZED_COLUMNS, rows, f"When a flow takes MCMC's place: {title}", "\n".join(notes))
    print(text)
    print(f"compare: {len(scored)} of {len(flows)} flows scored, MCMC on {len(mcmc_runs)} profiles; goals {passed} of "
          f"{checked} PASS; {total:.0f} s in all; wrote {out}/", file=sys.stderr)
    statuses = [run["status"] for run in runs if run["status"]]
    return statuses[0] if statuses else 0


if __name__ == "__main__":
    runner.run(main)
