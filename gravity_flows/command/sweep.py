"""``--sweep NAME=V1,V2,...``: repeat a run over the values of one option, then tabulate and plot the runs.

Any script (and ``compare.py``) accepts ``--sweep``; :func:`runner.run` hands such a command line to
:func:`run_sweep`, which runs the script's ``main`` once per value,

    main(ARGV --NAME Vk --out OUT/sweep-NAME/NAME-Vk)

where ARGV is the command line without ``--sweep`` and OUT its ``--out`` (or the script's default),
and then writes into ``OUT/sweep-NAME/``:

* ``table.md`` and ``table.csv`` — one row per value (per value and method for ``compare.py``):
  error, KL, importance ESS, k-hat, MCMC ESS/s and R-hat, iterations, times;
* ``marginals.png`` — small multiples, one row per run, samples over the exact posterior.

Every value is checked against the script's own option (type, choices, conflicts) before the first
run starts, so a typo costs nothing; the option is looked up by name in the record that
:class:`cli.Parser` keeps of its options (:meth:`cli.Parser.option`). A bad NAME, an empty or repeated value is a
:class:`forward.DataError` (one line, exit status 2).

This module also holds the run tables that ``compare.py`` writes (:func:`summary_row`,
:func:`write_tables`), so that a comparison and a sweep read the same way.
"""

import csv
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from gravity_flows.command import cli
from gravity_flows.reporting import figures, output
from gravity_flows.scoring import convergence
from gravity_flows.scoring.reference import compute_reference
from forward import DataError

# ----------------------------------------------------------------------------------------------
# The script's options, without running it


def script_parser(main):
    """The argument parser of the script whose ``main`` this is: its module's ``build_parser()``.

    Every script (and ``compare.py``) builds its options in ``build_parser()``, so a sweep knows
    the script's options and defaults from the script itself, without running it.
    """
    parser = sys.modules[main.__module__].build_parser()
    if not isinstance(parser, cli.Parser):  # a sweep looks options up in cli.Parser's record of them
        raise TypeError(f"{main.__module__}.build_parser() must return a cli.Parser, not {type(parser).__name__}")
    return parser


# ----------------------------------------------------------------------------------------------
# Run tables, shared with compare.py

#: (key, markdown header, format) of every column a run table can have; CSV headers are the keys.
COLUMNS = (
    ("method", "method", "{}"),
    ("start", "start", "{}"),
    ("error", "error (max W1/sd)", "{:.4f}"),
    ("vi_error", "flow alone, before refining", "{:.4f}"),
    ("refined_khat", "refine k-hat", "{:.2f}"),
    ("kl", "KL (nats)", "{:.4f}"),
    ("is_ess_percent", "IS ESS (%)", "{:.1f}"),
    ("khat", "k-hat", "{:.2f}"),
    ("ess_per_s", "MCMC ESS/s", "{:.0f}"),
    ("rhat_max", "R-hat (max)", "{:.4f}"),
    ("iterations", "iterations", "{:d}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
    ("train_time_s", "train/sample time (s)", "{:.1f}"),
    ("time_per_iteration_ms", "time/iteration (ms)", "{:.2f}"),
    ("cost_ratio", "cost ratio vs bare flow", "{:.2f}"),
    ("time_to_error_0.05_s", "time to error 0.05 (s)", "{:.1f}"),
    ("evaluations_to_error_0.05", "evaluations to error 0.05", "{:d}"),
    ("status", "status", "{}"),
)


def summary_row(summary):
    """The table row of one run, from its summary.json; None where the number does not apply."""
    rhat = summary.get("rhat")
    is_ess = summary.get("is_ess")
    seconds, evaluations = convergence.cost_to_reach(summary.get("convergence") or [])
    return {
        "method": summary["method"],
        "start": (summary.get("start") or {}).get("init"),
        "error": summary.get("error"),
        "vi_error": (summary.get("vi") or {}).get("error"),
        "refined_khat": (summary.get("refine") or {}).get("khat"),
        "time_to_error_0.05_s": seconds,
        "evaluations_to_error_0.05": evaluations,
        "kl": summary.get("kl"),
        "is_ess_percent": None if is_ess is None else 100.0 * is_ess,
        "khat": summary.get("khat"),
        "ess_per_s": summary.get("ess_per_s"),
        "rhat_max": max(rhat) if rhat else None,
        "iterations": summary.get("iterations"),
        "wall_time_s": summary.get("wall_time_s"),
        "train_time_s": summary.get("train_time_s", summary.get("sampling_time_s")),
        "time_per_iteration_ms": summary.get("time_per_iteration_ms"),
        "status": "interrupted" if summary.get("interrupted") else "ok",
    }


def _cell(value, fmt):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return fmt.format(value)


def markdown_table(columns, rows):
    """A markdown table of ``rows`` (dicts) with ``columns`` ((key, header, format), ...); blank cells where None."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join(":---" if fmt == "{}" else "---:" for _, _, fmt in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def write_csv(path, columns, rows):
    """Write ``rows`` (dicts) as a CSV file of ``columns`` ((key, title, format) triples), atomically; None is empty."""
    with output.atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([key for key, _, _ in columns])
            for row in rows:
                writer.writerow(["" if row.get(key) is None else row.get(key) for key, _, _ in columns])


def write_tables(folder, columns, rows, heading, notes=""):
    """Write ``table.csv`` (raw numbers) and ``table.md`` (heading, table, notes) into ``folder``; return the markdown.

    ``table.md`` is written last: its arrival completes the folder's result (output.COMPLETING_FILES).
    """
    folder = Path(folder)
    write_csv(folder / "table.csv", columns, rows)
    text = f"# {heading}\n\n{markdown_table(columns, rows)}\n" + (f"\n{notes.strip()}\n" if notes.strip() else "")
    with output.atomic_path(folder / "table.md") as temporary:
        temporary.write_text(text)
    return text


def load_run(folder, written_since=None):
    """``(summary, theta)`` of the run written into ``folder``, or None if there is none.

    ``written_since`` (a ``time.time()``): ignore a summary.json older than that, left by an
    earlier run, so that a run that failed is never reported with another run's numbers.
    """
    folder = Path(folder)
    summary_path, samples_path = folder / "summary.json", folder / "samples.npz"
    if not (summary_path.exists() and samples_path.exists()):
        return None
    if written_since is not None and summary_path.stat().st_mtime < written_since - 1.0:
        return None
    with np.load(samples_path) as samples:
        theta = np.array(samples["theta"])
    return json.loads(summary_path.read_text()), theta


def load_runs(folder, written_since=None):
    """Every run in ``folder``: the run itself, or (for ``compare.py``) one per method subfolder, in table order."""
    folder = Path(folder)
    single = load_run(folder, written_since)
    if single is not None:
        return [single]
    names = sorted(path.name for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
    if (folder / "table.csv").exists():
        with open(folder / "table.csv", newline="") as handle:
            listed = [row["method"] for row in csv.DictReader(handle)]
        names = [name for name in listed if name in names] + [name for name in names if name not in listed]
    runs = [load_run(folder / name, written_since) for name in names]
    return [run for run in runs if run is not None]


# ----------------------------------------------------------------------------------------------
# The sweep


def split_sweep(argv):
    """``(name, values, argv without --sweep)`` from a command line holding one ``--sweep NAME=V1,V2,...``."""
    argv = list(argv)
    specs, rest = [], []
    k = 0
    while k < len(argv):
        arg = argv[k]
        if arg == "--sweep":
            if k + 1 >= len(argv):
                raise DataError("--sweep needs NAME=V1,V2,... (e.g. --sweep iterations=2000,5000)")
            specs.append(argv[k + 1])
            k += 2
            continue
        if arg.startswith("--sweep="):
            specs.append(arg[len("--sweep="):])
        else:
            rest.append(arg)
        k += 1
    if len(specs) != 1:
        raise DataError(f"give one --sweep at a time (got {len(specs)})")
    name, equals, values = specs[0].partition("=")
    name = name.strip().lstrip("-").replace("_", "-")
    if not equals or not name:
        raise DataError(f"--sweep {specs[0]!r}: expected NAME=V1,V2,... (e.g. --sweep iterations=2000,5000)")
    values = [value.strip() for value in values.split(",")]
    if not any(values):
        raise DataError(f"--sweep {name}=: no values given (e.g. --sweep {name}=V1,V2)")
    if not all(values):
        raise DataError(f"--sweep {specs[0]!r}: an empty value between commas")
    if len(set(values)) != len(values):
        raise DataError(f"--sweep {specs[0]!r}: a value is repeated")
    return name, values, rest


def _sweepable_options(parser):
    return sorted(
        option for action in parser.actions() for option in action.option_strings
        if option.startswith("--") and action.nargs is None and action.dest not in ("out", "sweep", "help")
    )


def check_values(parser, name, values):
    """Each value converted and checked by the script's own option; DataError naming the bad one.

    ``parser`` is a :class:`cli.Parser`: the option is looked up in its record of the options it was given.
    """
    action = parser.option(f"--{name}")
    if action is None or action.dest in ("out", "sweep", "help"):
        raise DataError(f"--sweep: {parser.prog} has no option --{name} to sweep over; options that can be swept: "
                        + ", ".join(option[2:] for option in _sweepable_options(parser)))
    if action.nargs is not None:
        what = "a switch with no value" if action.nargs == 0 else f"an option with {action.nargs} values"
        raise DataError(f"--sweep: --{name} is {what}; a sweep varies an option that takes one value")
    for value in values:
        try:
            converted = action.type(value) if action.type is not None else value
        except Exception as error:  # argparse's own conversions raise ArgumentTypeError or ValueError
            raise DataError(f"--sweep {name}={value}: {error}") from None
        if action.choices is not None and converted not in action.choices:
            raise DataError(f"--sweep {name}={value}: choose from {', '.join(map(str, action.choices))}")


def _folder_name(name, value):
    return f"{name}-" + re.sub(r"[^A-Za-z0-9._+-]", "_", value)


def _script_name(main, parser):
    """The file name of the script whose ``main`` this is (for the command line in the table)."""
    module = sys.modules.get(getattr(main, "__module__", ""), None)
    path = getattr(module, "__file__", None)
    return Path(path).name if path else parser.prog


def _row_label(name, value, method, several_methods):
    return f"{method}\n{name} = {value}" if several_methods else f"{name} = {value}"


def run_sweep(main, argv):
    """Run ``main`` once per value of the swept option, then write the table and the figure; return the exit status."""
    name, values, base_argv = split_sweep(argv)
    parser = script_parser(main)
    check_values(parser, name, values)
    runs = []
    for value in values:
        run_argv = base_argv + [f"--{name}", value]
        args = parser.parse_args(run_argv)  # a conflict (--clip-norm with clip-value=...) stops here, one line, status 2
        runs.append((value, run_argv, args))
    folder = cli.prepare_output(Path(runs[0][2].out) / f"sweep-{name}")
    prog = _script_name(main, parser)

    # The exact posterior of each run: computed once per distinct problem (a sweep of --noise changes it).
    references, problem_of_run = {}, []
    for value, run_argv, args in runs:
        key = json.dumps([args.data, args.noise, args.density, list(args.bounds), args.density_bounds])
        if key not in references:
            problem = cli.load_problem(args)
            references[key] = (problem, compute_reference(problem))
        problem_of_run.append(references[key])

    statuses = []
    for k, (value, run_argv, args) in enumerate(runs):
        run_folder = folder / _folder_name(name, value)
        print(f"sweep {name}: [{k + 1}/{len(runs)}] --{name} {value} -> {run_folder}/", file=sys.stderr, flush=True)
        started = time.time()
        status = main(run_argv + ["--out", str(run_folder)]) or 0
        statuses.append((status, started))
        if status == cli.EXIT_INTERRUPTED:
            print(f"sweep {name}: interrupted; writing the table of the runs done", file=sys.stderr)
            break

    table_rows, figure_rows, notes = [], [], []
    several_methods = False
    collected = []
    for (value, run_argv, args), (status, started), (problem, reference) in zip(runs, statuses, problem_of_run):
        found = load_runs(folder / _folder_name(name, value), written_since=started)
        collected.append((value, status, found, reference))
        several_methods = several_methods or len(found) > 1
    for value, status, found, reference in collected:
        if not found:
            table_rows.append({name: value, "status": f"failed (exit status {status})"})
        if found and status not in (0, cli.EXIT_INTERRUPTED):
            notes.append(f"- {name} = {value}: the run exited with status {status}; see its folder.")
        for summary, theta in found:
            table_rows.append({name: value, **summary_row(summary)})
            figure_rows.append((_row_label(name, value, summary["method"], several_methods), theta, reference))
    columns = ((name, name, "{}"),) + tuple(column for column in COLUMNS if column[0] != "cost_ratio")
    if not several_methods:
        columns = tuple(column for column in columns if column[0] != "method")
    methods = sorted({row.get("method") for row in table_rows if row.get("method")})
    heading = f"{', '.join(methods) or prog}: sweep over --{name}"
    notes.insert(0, "command: `python " + " ".join(shlex.quote(arg) for arg in [prog, *argv]) + "`\n")
    notes.append("error: the largest W1 distance between a run's samples and the exact marginal, in posterior sd. "
                 "Each run's own files are in its folder " + ", ".join(f"`{_folder_name(name, v)}/`" for v in values) + ".")
    if figure_rows:
        truth = problem_of_run[0][0].truth
        figures.plot_marginals_grid(folder / "marginals.png", figure_rows, truth, title=heading,
                                    parameters=problem_of_run[0][0].parameters)
    text = write_tables(folder, columns, table_rows, heading, "\n".join(notes))  # last: it completes the sweep's result
    print(text)
    print(f"wrote {folder}/", file=sys.stderr)
    failed = [status for status, _ in statuses if status]
    return (failed[0] if failed else 0) if len(statuses) == len(runs) else cli.EXIT_INTERRUPTED
