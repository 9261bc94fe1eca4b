"""The top level of every script: ``runner.run(main)`` runs its ``main`` (or a sweep of it) as a command.

It is the top of the shared modules: only scripts import it. Below it, cli.py (options, checks,
interrupts) is below sweep.py, which runs a script's ``main`` once per value of one option; this
module picks between a run and a sweep from the command line, so no shared module imports one above it.

What a command promises (SPEC, 'Quality bar'): bad input is one line on stderr and exit status 2,
never a traceback; Ctrl-C outside a training or sampling loop (where a first one stops the loop
and keeps what it has, cli.interruptible) quits at once with status 130 (cli.quit_now); and a run
that ends without returning leaves no part of a result behind (output.discard_unfinished).
"""

import signal
import sys
import warnings
from pathlib import Path

from gravity_flows.command import cli, sweep
from gravity_flows.reporting import output
from forward import DataError


def wants_sweep(argv):
    """Whether the command line asks for ``--sweep``."""
    return any(arg == "--sweep" or arg.startswith("--sweep=") for arg in argv)


def run(main, argv=None):
    """Run a script's ``main(argv)`` (or, with ``--sweep``, :func:`sweep.run_sweep`) and exit with its status.

    Bad input is one line on stderr and exit status 2. Ctrl-C quits at once (cli.quit_now) except
    where a loop asks for it (cli.interruptible). A run that raises removes the files of any result
    it had not completed, so that a folder holds a complete result or nothing of this run.
    """
    prog = Path(sys.argv[0]).name
    warnings.simplefilter("default")
    argv = sys.argv[1:] if argv is None else list(argv)
    output.forget_unfinished()  # what an earlier run in this process left is its own
    previous = signal.signal(signal.SIGINT, cli.quit_now)
    try:
        status = sweep.run_sweep(main, argv) if wants_sweep(argv) else main(argv)
    except DataError as error:
        output.discard_unfinished()
        print(f"{prog}: error: {error}", file=sys.stderr)
        status = cli.EXIT_USAGE
    except KeyboardInterrupt:
        output.discard_unfinished()
        print(f"{prog}: interrupted", file=sys.stderr)
        status = cli.EXIT_INTERRUPTED
    except BaseException:  # a bug (its traceback follows) or argparse's exit: no part of a result stays
        output.discard_unfinished()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.exit(status or 0)
