"""Ctrl-C at a chosen moment of a run, for the interrupt tests (tests/integration/test_faults.py).

:func:`after_writing` wraps ``output.atomic_path`` so that the process sends itself SIGINT right after
a chosen file has been renamed into place: the moment is exact, not a guess of how long a run takes.
Run as a script, this module runs a script as ``__main__`` with that wrapper in place, in a real
process whose Ctrl-C handlers (cli.quit_now, cli.interruptible) and ``os._exit`` are the real ones:

    python tests/integration/ctrl_c.py FILE SCRIPT [OPTIONS...]         # Ctrl-C right after SCRIPT has written FILE
    python tests/integration/ctrl_c.py --wait FILE SCRIPT [OPTIONS...]  # after FILE: say so, then wait for a Ctrl-C

With ``--wait`` the process writes ``WAITING`` and the file's name on stderr once FILE is in place and
then waits, doing nothing, for a Ctrl-C from outside: a test sends it at that exact moment, whatever
the machine's load, and the process can only end through the Ctrl-C's handler.
"""

import os
import runpy
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

#: What ``--wait`` writes on stderr (with the file's name) when it begins to wait for a Ctrl-C.
WAITING = "ctrl_c.py: waiting for Ctrl-C after"


def after_writing(names, atomic_path, wait=False):
    """``atomic_path`` that sends SIGINT to this process as soon as a file named in ``names`` is in place
    (``wait``: that says so on stderr and waits for a SIGINT from outside instead)."""
    names = {names} if isinstance(names, str) else set(names)

    @contextmanager
    def atomic_path_then_ctrl_c(path):
        with atomic_path(path) as temporary:
            yield temporary
        if Path(path).name in names:
            if wait:
                print(f"{WAITING} {Path(path).name}", file=sys.stderr, flush=True)
                while True:  # until the handler ends the process
                    time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line of Python

    return atomic_path_then_ctrl_c


if __name__ == "__main__":
    arguments = sys.argv[1:]
    wait = arguments[0] == "--wait"
    name, script, *options = arguments[wait:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    sys.argv = [script, *options]

    from gravity_flows.reporting import output

    output.atomic_path = after_writing(name, output.atomic_path, wait=wait)
    runpy.run_path(script, run_name="__main__")
