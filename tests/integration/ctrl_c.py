"""Ctrl-C at a chosen moment of a run, for the interrupt tests (tests/integration/test_faults.py).

:func:`after_writing` wraps ``output.atomic_path`` so that the process sends itself SIGINT right after
a chosen file has been renamed into place: the moment is exact, not a guess of how long a run takes.
Run as a script, this module runs a script as ``__main__`` with that wrapper in place, in a real
process whose Ctrl-C handlers (cli.quit_now, cli.interruptible) and ``os._exit`` are the real ones:

    python tests/integration/ctrl_c.py FILE SCRIPT [OPTIONS...]     # Ctrl-C right after SCRIPT has written FILE
"""

import os
import runpy
import signal
import sys
from contextlib import contextmanager
from pathlib import Path


def after_writing(names, atomic_path):
    """``atomic_path`` that sends SIGINT to this process as soon as a file named in ``names`` is in place."""
    names = {names} if isinstance(names, str) else set(names)

    @contextmanager
    def atomic_path_then_ctrl_c(path):
        with atomic_path(path) as temporary:
            yield temporary
        if Path(path).name in names:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line of Python

    return atomic_path_then_ctrl_c


if __name__ == "__main__":
    name, script, *options = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    sys.argv = [script, *options]

    from gravity_flows.reporting import output

    output.atomic_path = after_writing(name, output.atomic_path)
    runpy.run_path(script, run_name="__main__")
