"""The flow scripts' amortized runs: ``--amortize`` (train once for a survey) and ``--model`` (apply to profiles).

``python Gravity_<flow>.py --amortize --out DIR [problem options]`` trains the script's flow with a
context, q(theta | d), on fresh simulations of the survey that the problem options describe (the
stations and sigma of ``--data``, or of the synthetic profile with ``--noise``; the prior box; the
density, or its bounds), writes ``DIR/model.pt``, scores it on ``--test-profiles`` held-out simulated
profiles against their exact references, and writes ``DIR/summary.json`` and ``DIR/amortized.png``.

``python Gravity_<flow>.py --model DIR/model.pt --data A.csv [B.csv ...] --out OUT`` applies it: for
each profile the importance-corrected posterior (:func:`correction.corrected_posterior`) with the
usual outputs of a run, in OUT for one profile and in ``OUT/<csv stem>/`` for several, plus
``OUT/survey.csv``, ``survey.md`` and ``survey.png``. Everything is checked before anything is
written: the model file, its script, the prior options, and every profile's stations and sigma.

``python Gravity_<flow>.py --init amortized --model DIR/model.pt [--data A.csv] --out OUT`` is a
per-profile run instead (``flow.run_flow_method``): the model's q(theta | d) of this one profile,
its context fixed (``inference.amortized.ConditionedPosterior``), is the start that the profile's
own ELBO refines. The model is checked as for applying it (:func:`load_model`,
:func:`check_start_profile`): made by this script, for this prior and this profile's survey.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import forward
from gravity_flows.command import cli
from gravity_flows.command.sweep import markdown_table, write_csv
from gravity_flows.inference import amortized, correction, model_file
from gravity_flows.inference.vi import TrainingDiverged
from gravity_flows.reporting import output, report
from gravity_flows.reporting.figures.amortized import plot_amortized, plot_survey
from gravity_flows.scoring.reference import ERROR_GOAL, compute_reference

#: The options this module adds, removed from a per-profile run's settings so that its summary is unchanged.
OPTIONS = ("amortize", "model", "test_profiles", "simulations", "no_figures", "proposal")
#: The test profiles' draws come from the seed plus this (training's simulations use the seed itself).
TEST_SEED_OFFSET = 1


class _Profiles(argparse.Action):
    """``--data`` with one or more files: one file is stored as its path (as before), several as a list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def add_options(parser, defaults):
    """The amortized options of a flow script; ``defaults`` holds its amortized iterations, flows and lr."""
    data = parser.option("data")
    data.nargs, data.metavar = "+", "CSV"
    data.__class__ = _Profiles  # the same option, now also taking several files (for --model)
    data.help += "; with --model, one or more profiles of the model's survey"
    parser.set_defaults(amortized_defaults=dict(defaults))
    group = parser.add_argument_group(
        "amortized posteriors: one conditional flow q(theta | d) for a whole survey (SPEC, 'Amortized posteriors')")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--amortize", action="store_true",
                      help="train the flow with a context on fresh simulations of the survey (the stations and sigma "
                           "of --data or of the synthetic profile, the prior box and density options), write "
                           "OUT/model.pt, and score it on --test-profiles held-out simulated profiles (defaults with "
                           f"--amortize: --iterations {defaults['iterations']}, --flows {defaults['flows']}, "
                           f"--lr {defaults['lr']:g})")
    mode.add_argument("--model", metavar="FILE",
                      help="apply a model made by --amortize to the profiles of --data: each one's posterior from "
                           "the flow, corrected by Pareto-smoothed importance weights with the exact likelihood; "
                           "with --init amortized, a per-profile fit of one profile starting from the model's "
                           "posterior of it instead")
    group.add_argument("--test-profiles", type=cli.nonnegative_int, default=50, metavar="N",
                       help="with --amortize: held-out simulated profiles scored against their exact references "
                            "(default: %(default)s)")
    group.add_argument("--simulations", type=cli.positive_int, default=256, metavar="N",
                       help="with --amortize: fresh simulated profiles per training step (default: %(default)s)")
    group.add_argument("--proposal", choices=("adaptive", "flow"), default="adaptive",
                       help="importance proposal of each profile: flow = the flow's own draws (DINGO-IS); adaptive = "
                            "the same, and where their effective sample size falls short, a defensive mixture of the "
                            "flow and a Student-t fitted to the weighted draws (and at the profile's Laplace peak where "
                            "the flow found almost nothing), every round's draws kept (default: %(default)s)")
    group.add_argument("--no-figures", action="store_true",
                       help="with --model: no per-profile figures (the survey table and figure are always written)")


def wanted(args):
    """Whether the command line asks for an amortized run; for a per-profile run, drop this module's options
    (all but ``--model`` with ``--init amortized``: the per-profile run's start, kept in its settings)."""
    start_from_model = getattr(args, "init", None) == "amortized"
    if start_from_model and not getattr(args, "model", None):
        raise forward.DataError("--init amortized needs --model FILE: a model of this script made by --amortize for "
                                "this profile's survey")
    if start_from_model and isinstance(args.data, list):
        raise forward.DataError(f"--init amortized fits one profile, got {len(args.data)}; to apply the model to "
                                "several, drop --init amortized")
    if not start_from_model and (getattr(args, "amortize", False) or getattr(args, "model", None)):
        return True
    if isinstance(args.data, list):
        raise forward.DataError(f"--data takes one profile, got {len(args.data)}; several profiles need --model "
                                "(a model made by --amortize)")
    for name in OPTIONS + ("amortized_defaults",):
        if hasattr(args, name) and not (start_from_model and name == "model"):
            delattr(args, name)
    return False


def resolve_defaults(args):
    """--iterations, --flows and --lr of an amortized run, where not given."""
    defaults = args.amortized_defaults
    for name in ("iterations", "flows", "lr"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    for name in ("start_defaults", "amortized_defaults"):
        if hasattr(args, name):
            delattr(args, name)
    return args


def flow_options(args):
    """What rebuilds the network: the script's flow options and the summary network's size."""
    options = {name: getattr(args, name) for name in ("flows", "hidden", "bins", "tail_bound") if hasattr(args, name)}
    options.update(context=amortized.CONTEXT, summary_hidden=amortized.SUMMARY_HIDDEN,
                   summary_layers=amortized.SUMMARY_LAYERS)
    return options


def _remove_stale(folder, names=output.AMORTIZED_FILES):
    for name in names:
        (Path(folder) / name).unlink(missing_ok=True)


def _save_model(path, record):
    with output.atomic_path(path) as temporary:
        torch.save(record, temporary)


# ----------------------------------------------------------------------------------------------
# --amortize


def train_run(args, build_layers, device):
    """Train, save, and score on held-out test profiles (module docstring). Returns the exit status."""
    with cli.Timer() as total:
        resolve_defaults(args)
        if isinstance(args.data, list):
            raise forward.DataError(f"--amortize takes one --data profile (its stations and sigma define the survey), "
                                    f"got {len(args.data)}")
        survey = amortized.survey_of(cli.load_problem(args))  # its stations, sigma, box and density; not its data
        out = cli.prepare_output(args.out)
        _remove_stale(out, (output.MODEL_FILE, *output.AMORTIZED_FILES))
        options = flow_options(args)
        model = amortized.build_model(build_layers, options, survey, args.seed).to(device=device, dtype=torch.float32)
        simulator = amortized.Simulator(survey, device=device, dtype=torch.float32)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        n_parameters = int(sum(p.numel() for p in model.parameters()))
        print(f"amortize: {args.iterations} steps x {args.simulations} fresh simulations of a survey of "
              f"{survey.n_stations} stations, {survey.dim} unknowns; {n_parameters} weights"
              + ("; the training step compiled" if args.compile else ""), file=sys.stderr)
        cpu_start = time.process_time()  # the process's own CPU time: on a busy machine, what an idle one would take
        with cli.interruptible("training") as stop:
            try:
                history, train_seconds, skipped, compiled = amortized.train_amortized(
                    model, simulator, iterations=args.iterations, simulations=args.simulations, lr=args.lr,
                    clip_norm=args.clip_norm, generator=generator, progress=not args.quiet, stop=stop,
                    compile=args.compile)
            except TrainingDiverged as error:
                return cli.fail_without_results(out, f"{error}; try a smaller --lr (now {args.lr:g}) or --clip-norm 10")
        training = {"iterations": int(history.size), "simulations_per_step": args.simulations,
                    "simulations": int(history.size) * args.simulations, "skipped_steps": skipped,
                    "train_time_s": train_seconds, "train_cpu_s": time.process_time() - cpu_start, "compiled": compiled,
                    "lr": args.lr, "seed": args.seed,
                    "final_loss": float(np.nanmean(history[-min(500, history.size):])), "device": str(device),
                    "interrupted": bool(stop.interrupted)}
        record = model_file.model_record(model, method=args.method, flow=options, survey=survey, training=training,
                                         versions=report.versions())
        _save_model(out / output.MODEL_FILE, record)
        print(f"wrote {out / 'model.pt'} ({history.size} steps in {train_seconds:.0f} s)", file=sys.stderr)

        rows, scoring_interrupted = score_test_set(model.to(correction.PRECISION), survey, args)
    plot_amortized(out / "amortized.png", rows, survey.parameters, title=f"{args.method}, amortized",
                   error_goal=ERROR_GOAL, loss=history)
    results = {**training, "n_parameters": n_parameters, "loss_history_every_100": history[::100].tolist(),
               "test": {"seed": args.seed, **(correction.aggregate(rows, ERROR_GOAL) if rows else {}), "rows": rows}}
    summary = {
        "method": args.method,
        "mode": "amortize",
        "settings": {key: value for key, value in sorted(vars(args).items()) if key != "method"},
        "data": report.data_description(survey),
        "parameters": list(survey.names),
        "units": [p.unit for p in survey.parameters],
        "model": str(out / "model.pt"),
        "amortized": results,
        "train_time_s": train_seconds,
        "wall_time_s": total.seconds,
        "versions": report.versions(),
    }
    output.write_json(out / "summary.json", summary)
    print(_test_report(args.method, results), file=sys.stdout)
    print(f"wrote {out}/", file=sys.stderr)
    return cli.EXIT_INTERRUPTED if stop.interrupted or scoring_interrupted else 0


def score_test_set(model, survey, args):
    """The held-out test profiles, each applied and scored against its exact reference: (rows, interrupted).

    A first Ctrl-C stops after the profile in hand; the rows so far are kept."""
    profiles = amortized.simulated_profiles(survey, args.test_profiles, args.seed)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed + TEST_SEED_OFFSET)
    rng = np.random.default_rng([args.seed, amortized.TEST_STREAM + 1])
    rows = []
    with cli.interruptible("scoring the test profiles") as stop:
        for index, problem in enumerate(tqdm(profiles, desc="test profiles", disable=args.quiet, file=sys.stderr)):
            try:
                laplace = forward.laplace_approximation(problem)
            except forward.DataError as error:  # no posterior to score against: say so, never drop it silently
                print(f"warning: test profile {index}: no exact reference ({error})", file=sys.stderr)
                continue
            reference = compute_reference(problem, laplace)
            _, _, row = correction.score_profile(model, problem, args.samples, generator=generator, rng=rng,
                                                reference=reference, adapt=args.proposal == "adaptive")
            rows.append({"profile": index, **row})
            if stop.interrupted:
                break
    return rows, stop.interrupted


def _test_report(method, results):
    test = results["test"]
    if not test.get("profiles"):
        return (f"{method} amortized: trained {results['iterations']} steps in {results['train_time_s']:.0f} s "
                f"({results['train_cpu_s']:.0f} s of CPU); no test profiles")
    return (f"{method} amortized: {results['iterations']} steps x {results['simulations_per_step']} simulations in "
            f"{results['train_time_s']:.0f} s ({results['train_cpu_s']:.0f} s of CPU)\n"
            f"  {test['profiles']} held-out test profiles: corrected error median {test['median_error']:.4f}, "
            f"90th percentile {test['p90_error']:.4f}, {100 * test[f'share_error_le_{ERROR_GOAL}']:.0f} % <= {ERROR_GOAL}; "
            f"k-hat <= 0.7 on {100 * test['share_khat_le_0.7']:.0f} %, trustworthy {100 * test['share_trustworthy']:.0f} %, "
            f"silent failures (error > {2 * ERROR_GOAL} yet trustworthy) {test['silent_failures']}\n"
            f"  q alone: median error {test['median_vi_error']:.3f}; median posterior time {test['median_posterior_time_s']:.3f} s")


# ----------------------------------------------------------------------------------------------
# --model


def load_model(args, build_layers, device, dtype=correction.PRECISION):
    """The model record of ``--model``, checked against this script and the prior options, and its network
    in ``dtype``: the correction's precision for applying it, float64 for a per-profile fit (``--init amortized``)."""
    path = args.model
    record = model_file.read_model(path)
    model_file.check_method(record, args.method, path)
    bounds = forward.check_bounds(args.bounds)
    density_bounds = forward.check_density_bounds(args.density_bounds)
    model_file.check_prior(record, bounds, args.density, density_bounds, path)
    survey = model_file.survey_from_record(record)
    model = amortized.build_model(build_layers, record["flow"], survey, seed=0)
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError:
        raise forward.DataError(f"{path}: its weights do not fit Gravity_{args.method}.py's flow with the options it "
                                "records (made by another version?): train it again with --amortize") from None
    made_with = {name: version for name, version in record["versions"].items()
                 if name in ("torch", "numpy") and version != report.versions()[name]}
    if made_with:  # the weights load on any version and device (plain tensors); say what differs, in one line
        print(f"warning: {path} was made with " + ", ".join(f"{name} {version}" for name, version in made_with.items())
              + "; this is " + ", ".join(f"{name} {report.versions()[name]}" for name in made_with), file=sys.stderr)
    return record, model.to(device=device, dtype=dtype)


def check_start_profile(record, problem, args):
    """``--init amortized``: DataError unless the profile (``--data``, or the synthetic one) is of the model's survey."""
    model_file.check_profile(record, problem, args.model, args.data or "the synthetic profile")


def start_options(args, record):
    """``--init amortized``: the flow options (``--flows``, ``--hidden``, ...) set to the model's, whose network it is.

    DataError if ``--flows`` was given and differs (the other options have defaults: they are replaced)."""
    if getattr(args, "flows", None) is not None and args.flows != record["flow"].get("flows"):
        raise forward.DataError(f"--flows {args.flows} differs from the model's {record['flow'].get('flows')} "
                                f"({args.model}): with --init amortized the flow is the model's; drop --flows")
    for name, value in record["flow"].items():
        if hasattr(args, name):
            setattr(args, name, value)
    return args


def read_profiles(args, record):
    """Every ``--data`` profile as a Problem with the model's prior, checked against the model's survey."""
    paths = [args.data] if isinstance(args.data, str) else list(args.data or [])
    if not paths:
        raise forward.DataError("--model needs --data: the profile(s) to apply it to")
    stems = [Path(path).stem for path in paths]
    duplicated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if len(paths) > 1 and duplicated:
        raise forward.DataError(f"two profiles would share the output folder {duplicated[0]}/: give the CSV files different names")
    profiles = []
    for path in paths:
        with cli.Timer() as reading:
            problem = cli.load_problem(argparse.Namespace(**{**vars(args), "data": path}))
            model_file.check_profile(record, problem, args.model, path)
        profiles.append((path, problem, reading.seconds))
    return profiles


def apply_run(args, build_layers, device):
    """Apply ``--model`` to every ``--data`` profile (module docstring). Returns the exit status."""
    with cli.Timer() as total:
        record, model = load_model(args, build_layers, device)
        profiles = read_profiles(args, record)
        out = cli.prepare_output(args.out)
        _remove_stale(out)
        several = len(profiles) > 1
        generator = torch.Generator(device=device).manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        rows, flagged = [], []
        for path, problem, read_seconds in tqdm(profiles, desc="profiles", disable=args.quiet or not several, file=sys.stderr):
            folder = cli.prepare_output(out / Path(path).stem) if several else out
            with cli.Timer() as profile_clock:
                laplace = forward.laplace_approximation(problem)
                reference = compute_reference(problem, laplace)
                theta, _, row = correction.score_profile(model, problem, args.samples, generator=generator, rng=rng,
                                                        reference=reference, adapt=args.proposal == "adaptive")
            row["posterior_time_s"] += read_seconds  # from the profile read to the corrected draws
            results = {"mode": "model", "model": {"path": str(Path(args.model).resolve()), "method": record["method"],
                                                  "training": record["training"], "versions": record["versions"]},
                       **{key: row[key] for key in ("vi", "khat", "is_ess", "ess", "draws", "distinct", "proposal",
                                                    "trustworthy", "warning", "posterior_time_s")}}
            summary = write_profile(folder, args, problem, reference, theta, results, profile_clock.seconds + read_seconds)
            rows.append({"file": str(path), "name": Path(path).stem, **row, "error": summary["error"],
                         "reference_mean": summary["reference"]["mean"], "reference_sd": summary["reference"]["sd"]})
            if not row["trustworthy"]:
                flagged.append(Path(path).stem)
                print(f"warning: {path}: {row['warning']} (python Gravity_{args.method}.py --data {path})", file=sys.stderr)
            if not several:
                report.print_summary(summary, _profile_lines(row))
        if several:
            write_survey(out, rows, model_parameters(record), args.method)
    print(f"{len(rows)} profile(s), {len(flagged)} not trustworthy{': ' + ', '.join(flagged) if flagged else ''}; "
          f"total {total.seconds:.1f} s", file=sys.stderr)
    print(f"wrote {out}/", file=sys.stderr)
    return 0


def model_parameters(record):
    return model_file.survey_from_record(record).parameters


def _profile_lines(row):
    return [f"flow alone: error {row['vi']['error']:.4f}, k-hat {row['vi']['khat']:.2f}, importance ESS "
            f"{100 * row['vi']['is_ess']:.1f} %; corrected by PSIS: k-hat {row['khat']:.2f}, ESS {row['ess']:.0f} of "
            f"{row['draws']} draws" + ("" if row["trustworthy"] else " (NOT TRUSTWORTHY)"),
            f"posterior time (profile read to corrected draws): {row['posterior_time_s']:.3f} s"]


def write_profile(folder, args, problem, reference, theta, results, wall_time_s):
    """A profile's run outputs (``report.write_results``: summary.json, samples.npz, and unless
    ``--no-figures`` its figures)."""
    return report.write_results(folder, args, problem, reference, theta, results, wall_time_s,
                                draw_figures=not args.no_figures)


def survey_columns(parameters):
    """(key, header, format) of the survey table: file, mean and sd of every unknown, scores, time."""
    columns = [("name", "profile", "{}")]
    for p in parameters:
        digits = 4 if p.unit == "m" else 1
        columns += [(f"{p.name}_mean", f"{p.name} mean ({p.unit})", f"{{:.{digits}f}}"),
                    (f"{p.name}_sd", f"{p.name} sd ({p.unit})", f"{{:.{digits}f}}")]
    return columns + [("error", "error (max W1/sd)", "{:.4f}"), ("vi_error", "flow alone", "{:.3f}"),
                      ("khat", "k-hat", "{:.2f}"), ("ess", "ESS", "{:.0f}"), ("draws", "draws", "{}"),
                      ("proposal", "proposal", "{}"),
                      ("trustworthy", "trustworthy", "{}"), ("posterior_time_s", "time (s)", "{:.3f}"),
                      ("file", "file", "{}")]


def write_survey(out, rows, parameters, method):
    """``survey.csv``, ``survey.png`` and (last) ``survey.md``: one row per profile."""
    table = []
    for row in rows:
        entry = {"name": row["name"], "file": row["file"], "error": row["error"], "vi_error": row["vi"]["error"],
                 "khat": row["khat"], "ess": row["ess"], "draws": row["draws"], "proposal": row["proposal"],
                 "trustworthy": "yes" if row["trustworthy"] else "NO", "posterior_time_s": row["posterior_time_s"]}
        for i, p in enumerate(parameters):
            entry[f"{p.name}_mean"], entry[f"{p.name}_sd"] = row["mean"][i], row["sd"][i]
        table.append(entry)
    columns = survey_columns(parameters)
    write_csv(out / "survey.csv", columns, table)
    plot_survey(out / "survey.png", rows, parameters, title=f"{method}, amortized")
    flagged = [entry["name"] for entry in table if entry["trustworthy"] != "yes"]
    times = [row["posterior_time_s"] for row in rows]
    notes = [f"- {len(rows)} profiles; posterior time (profile read to corrected draws) median {np.median(times):.3f} s, "
             f"total {np.sum(times):.2f} s.",
             "- error: the corrected draws against each profile's exact reference (largest W1/sd); flow alone: "
             "the flow's own draws, before the importance correction.",
             "- not trustworthy (k-hat > 0.7, or the effective sample size short of its target): "
             + (", ".join(flagged) + f" — these lie outside what the network learned; run a per-profile fit "
                f"(python Gravity_{method}.py --data FILE)." if flagged else "none.")]
    text = (f"# Survey: {method}, amortized\n\n{markdown_table(columns, table)}\n\n" + "\n".join(notes) + "\n")
    with output.atomic_path(out / "survey.md") as temporary:
        temporary.write_text(text)
