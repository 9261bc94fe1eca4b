"""What every script shares on the command line: options, input checks, interrupts.

Bad input never produces a traceback: it raises :class:`forward.DataError` (or argparse rejects an
option), and ``runner.run`` prints one line, ``<script>: error: <what is wrong>``, on stderr and exits
with status 2. A first Ctrl-C during training or sampling asks the loop to stop and keep what it has;
a second one, or one at any other moment, exits at once (status 130), leaving no half-written file
and no part of a result (output.py: a folder holds a complete result or nothing of the run).

:class:`Parser` records every option it is given, so that other modules (sweep.py) look options up
by name through :meth:`Parser.option` instead of argparse's internals.
"""

import argparse
import hashlib
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import forward
from gravity_flows.reporting import output
from gravity_flows.scoring import reference
from forward import DataError

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (no usage block) and exit status 2; and a
    record of every option added, to the parser or to any of its groups, for :meth:`option`.

    (Options copied from ``parents=`` parsers are not recorded; no script uses them.)
    """

    def __init__(self, *args, **kwargs):
        self._recorded = []  # before argparse's __init__, which adds --help
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")

    # add_argument returns the action it made, on the parser and on its groups alike: keep it.
    def _record(self, action):
        self._recorded.append(action)
        return action

    def _recording(self, group):
        """Make ``group`` (an argument or mutually exclusive group of this parser) record what is added to it."""
        add_argument = group.add_argument
        add_argument_group = group.add_argument_group
        add_exclusive_group = group.add_mutually_exclusive_group
        group.add_argument = lambda *args, **kwargs: self._record(add_argument(*args, **kwargs))
        group.add_argument_group = lambda *args, **kwargs: self._recording(add_argument_group(*args, **kwargs))
        group.add_mutually_exclusive_group = lambda **kwargs: self._recording(add_exclusive_group(**kwargs))
        return group

    def add_argument(self, *args, **kwargs):
        return self._record(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args, **kwargs):
        return self._recording(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        return self._recording(super().add_mutually_exclusive_group(**kwargs))

    def actions(self):
        """Every option (argparse action) added to this parser and its groups, in the order they were added."""
        return tuple(self._recorded)

    def option(self, name):
        """The action of the option ``name`` (``"--flows"`` or ``"flows"``), or None if this parser has no such option."""
        wanted = name if name.startswith("-") else f"--{name}"
        return next((action for action in self._recorded if wanted in action.option_strings), None)


def _number(kind, low=None, low_inclusive=False, high=None):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {'whole ' if kind is int else ''}number: {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low if low_inclusive else value <= low):
            raise argparse.ArgumentTypeError(f"must be {'≥' if low_inclusive else '>'} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be ≤ {high}, got {text}")
        return value

    return convert


positive_int = _number(int, 1, low_inclusive=True)
nonnegative_int = _number(int, 0, low_inclusive=True)
positive_float = _number(float, 0.0)
finite_float = _number(float)
seed_int = _number(int, 0, low_inclusive=True, high=2**64 - 1)  # what numpy and torch both accept
fraction = _number(float, 0.0, low_inclusive=True, high=1.0)


def _nonzero_float(text):
    value = finite_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("the density contrast must not be 0 (no anomaly at all)")
    return value


def common_parser(doc, method, default_samples):
    """The options every script has (SPEC, 'Command line'). ``doc`` is the script's docstring."""
    first, _, rest = (doc or method).strip().partition("\n")
    parser = Parser(
        description=first,
        epilog=rest.strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(method=method)
    data = parser.add_argument_group("data and prior")
    data.add_argument("--data", metavar="CSV", help="profile to invert: header 'x,g[,sigma]' (m, µGal, µGal); default: the synthetic profile")
    data.add_argument("--noise", metavar="SIGMA", type=positive_float, default=forward.DEFAULT_NOISE_SD,
                      help="noise standard deviation in µGal (synthetic noise, and --data without a sigma column) (default: %(default)s)")
    data.add_argument("--density", metavar="RHO", type=_nonzero_float, default=forward.DEFAULT_DENSITY,
                      help="density contrast in kg/m³ (default: %(default)s)")
    data.add_argument("--bounds", metavar=("X0LO", "X0HI", "ZLO", "ZHI", "RLO", "RHI"), nargs=6, type=finite_float,
                      default=[v for pair in forward.DEFAULT_BOUNDS for v in pair],
                      help="uniform prior box in m (default: %(default)s)")
    data.add_argument("--density-bounds", metavar=("LO", "HI"), nargs=2, type=finite_float,
                      help="make the density contrast a fourth unknown with a uniform prior on [LO, HI] kg/m³ "
                           "(both positive or both negative); --density is then the true contrast of the synthetic "
                           "data (default: the density is known, --density)")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=seed_int, default=0, help="random seed; same seed, same results on CPU (default: %(default)s)")
    run.add_argument("--samples", type=_number(int, 2, low_inclusive=True), default=default_samples,
                     help="posterior samples kept (default: %(default)s)")
    run.add_argument("--init", choices=("auto", "laplace", "prior"), default="auto",
                     help="start from the Laplace approximation, or from the prior as the original did; auto "
                          "(default): from the Laplace approximation where its importance diagnostics against the "
                          "posterior say it describes it, from the prior otherwise (see start.py)")
    run.add_argument("--out", metavar="DIR", default=str(Path("figures") / method),
                     help="output folder (default: %(default)s)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--sweep", metavar="NAME=V1,V2,...",
                     help="repeat the run for each value of one option (e.g. iterations=2000,5000) into "
                          "OUT/sweep-NAME/, and write a table and a small-multiples figure there")
    return parser


# ----------------------------------------------------------------------------------------------
# Checks that need more than one option, and the data


def load_problem(args):
    """The Problem the options describe: the synthetic profile or the user's CSV, and the prior box
    (with ``--density-bounds``, the density contrast is a fourth unknown)."""
    bounds = forward.check_bounds(args.bounds)
    density_bounds = forward.check_density_bounds(args.density_bounds, args.density if args.data is None else None)
    if args.data is None:
        return forward.synthetic_problem(noise_sd=args.noise, density=args.density, bounds=bounds,
                                         density_bounds=density_bounds)
    stations, g_obs, sigma = forward.read_profile(args.data)
    digest = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()
    box, parameters = forward.prior_box(bounds, density_bounds)
    return forward.Problem(
        stations=stations,
        g_obs=g_obs,
        noise_sd=float(args.noise) if sigma is None else sigma,
        density=float(args.density),
        bounds=box,
        source={"kind": "file", "path": str(Path(args.data).resolve()), "sha256": digest,
                "noise": "per-station sigma column" if sigma is not None else f"--noise {args.noise}"},
        parameters=parameters,
    )


def check_start(start, problem):
    """``--start`` must give one value per unknown, strictly inside the prior box."""
    if start is None:
        return
    if len(start) != problem.dim:
        raise DataError(f"--start takes {problem.dim} values ({' '.join(problem.names)}), got {len(start)}")
    bounds = problem.bounds
    if not np.all((np.asarray(start) > bounds[:, 0]) & (np.asarray(start) < bounds[:, 1])):
        raise DataError(f"--start {' '.join(f'{v:g}' for v in start)} lies outside the prior box (--bounds, --density-bounds)")


def prepare_output(folder):
    """Create the output folder, prove it is writable, and make it this run's (:func:`output.begin_result`:
    an earlier run's result files there are removed, and what this run writes is recorded until its
    result is complete). DataError naming the path if it cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        output.begin_result(folder)
    except OSError as error:
        raise DataError(f"cannot write to the output folder {folder}: {error.strerror or error}") from None
    return folder


#: Every file a run, a comparison or a sweep writes into its output folder (SPEC, 'What each script writes').
RESULT_FILES = output.RESULT_FILES


def fail_without_results(folder, message):
    """Report a failed run: one line on stderr, and no result files left behind that could be taken
    for this run's. (An earlier run's files were removed when the run began, :func:`prepare_output`;
    any found here, in a folder not prepared that way, are removed now.) Returns EXIT_DIVERGED."""
    removed = [name for name in RESULT_FILES if (Path(folder) / name).exists()]
    for name in removed:
        (Path(folder) / name).unlink()
    note = f" (removed an earlier run's results from {folder})" if removed else ""
    print(f"{Path(sys.argv[0]).name}: error: {message}. Nothing was written{note}.", file=sys.stderr)
    return EXIT_DIVERGED


def setup_run(args, check=None, timing=None):
    """What every method needs before it starts: the problem, the output folder, the Laplace
    approximation (a warning if its mode sits on a prior bound, or if the data barely constrain the
    body) and the exact reference posterior (a warning if its self-check fails). ``check(problem)``, if given, validates the options that
    need the problem (e.g. ``--start``) before anything costly runs. ``timing``, a dict if given,
    gets ``load_s``: the seconds to read the data and check them (with the Laplace approximation's
    own ``seconds`` and the start's choice, a method's setup: :func:`setup_seconds`)."""
    began = time.perf_counter()
    problem = load_problem(args)
    if check is not None:
        check(problem)
    if timing is not None:
        timing["load_s"] = time.perf_counter() - began
    out = prepare_output(args.out)
    laplace = forward.laplace_approximation(problem)
    warn_if_on_bound(laplace)
    weak = forward.weak_data_warning(laplace)
    if weak:
        print(weak, file=sys.stderr)
    exact = exact_reference(problem, laplace)
    unchecked = reference.check_warning(exact)
    if unchecked:
        print(unchecked, file=sys.stderr)
    return problem, out, laplace, exact


#: The latest exact reference, by what it is computed from: a process that runs several methods on one
#: problem (compare.py) computes it once. It judges a run and is never counted in a method's time.
_LATEST_REFERENCE = {}


def _reference_key(problem, laplace):
    def raw(value):
        return np.ascontiguousarray(np.asarray(value, dtype=float)).tobytes()

    return (raw(problem.stations), raw(problem.g_obs), raw(problem.noise_sd), float(problem.density),
            raw(problem.bounds), tuple(problem.parameters), raw(laplace.theta_map), raw(laplace.theta_cov),
            raw(laplace.u_map), raw(laplace.u_cov), bool(laplace.theta_peak))


def exact_reference(problem, laplace):
    """:func:`reference.compute_reference` of ``problem``, reused when the same problem and Laplace
    approximation come again in this process."""
    key = _reference_key(problem, laplace)
    if _LATEST_REFERENCE.get("key") != key:
        _LATEST_REFERENCE.clear()
        _LATEST_REFERENCE.update(key=key, reference=reference.compute_reference(problem, laplace))
    return _LATEST_REFERENCE["reference"]


def setup_seconds(timing, laplace, start_seconds):
    """The setup a user pays for before a method's own work (``setup_time_s``): reading the data, the
    MAP/Laplace approximation and the choice of start; not the exact reference that judges the run."""
    return timing["load_s"] + laplace.seconds + start_seconds


def warn_if_on_bound(laplace):
    if laplace.on_bound:
        print(
            f"warning: the posterior mode of {', '.join(laplace.on_bound)} sits on its prior bound: "
            "the box is too tight for these data; widen --bounds",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------------------------
# Interrupts (runner.run installs quit_now for the whole run)


def quit_now(signum=None, frame=None):
    """Ctrl-C where nothing can stop early, or a second one: exit 130 at once, leaving nothing unfinished.

    Half-written files are removed, and so is every file of a result not yet complete (its
    summary.json or table.md not written): the output folder holds a complete result or nothing of
    this run. Raising KeyboardInterrupt instead is not reliable: it can land in a finaliser or a
    weakref callback (matplotlib has many), where Python prints a traceback, ignores it and carries on.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C must not cut the clean-up short
    output.discard_temporaries()
    output.discard_unfinished()
    os.write(2, f"\n{Path(sys.argv[0]).name}: interrupted\n".encode())
    os._exit(EXIT_INTERRUPTED)


@contextmanager
def interruptible(what="the run"):
    """Within the block a first Ctrl-C only sets ``state.interrupted``; a second one exits at once."""
    state = SimpleNamespace(interrupted=False)

    def handler(signum, frame):
        if state.interrupted:
            quit_now(signum, frame)
        state.interrupted = True
        print(f"\ninterrupted: stopping {what} and writing what it has (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


class Timer:
    """Wall-clock time of a block, in seconds, as ``timer.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
