"""Figures drawn but not rendered, for end-to-end runs that check numbers and files, not pictures.

Rendering is most of a short run's time, and the figures' own tests (tests/reporting) and one
end-to-end run per script render every figure. :func:`rendered_only_in` (a context manager, in the
test process; conftest.py's fixtures ``unrendered_figures`` and ``figures_rendered_only_in``) replaces
``output.save_figure``: a figure written straight into one of the given folders is rendered as
usual; any other is closed and a stand-in file written in its place, atomically. A figure's
``tight_layout`` (text measured on every axis: as costly as rendering) is kept until the figure is
saved and done only if it is rendered; every figure function calls it just before ``save_figure``,
so a rendered figure is laid out exactly as without this context.

Run as a script, this module runs a script as ``__main__`` in a real process with no figure rendered:

    python tests/integration/unrendered.py SCRIPT [OPTIONS...]
"""

import contextlib
import runpy
import sys
from pathlib import Path

#: What a figure that was not rendered is written as (it begins with the PNG signature).
STAND_IN = b"\x89PNG not rendered"


@contextlib.contextmanager
def rendered_only_in(*folders):
    """Within the block only the figures written into ``folders`` are rendered (none when no folder is given)."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    from gravity_flows.reporting import output

    rendered = {Path(folder).resolve() for folder in folders}
    save, tight_layout = output.save_figure, matplotlib.figure.Figure.tight_layout

    def keep_tight_layout(figure, *args, **kwargs):
        figure._suite_tight_layout = (args, kwargs)

    def save_figure(figure, path, *args, **kwargs):
        layout = figure.__dict__.pop("_suite_tight_layout", None)
        if Path(path).resolve().parent in rendered:
            if layout is not None:
                tight_layout(figure, *layout[0], **layout[1])
            return save(figure, path, *args, **kwargs)
        with output.atomic_path(path) as temporary:
            temporary.write_bytes(STAND_IN)
        plt.close(figure)

    output.save_figure, matplotlib.figure.Figure.tight_layout = save_figure, keep_tight_layout
    try:
        yield
    finally:
        output.save_figure, matplotlib.figure.Figure.tight_layout = save, tight_layout


if __name__ == "__main__":
    script, *options = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    sys.argv = [script, *options]
    with rendered_only_in():
        runpy.run_path(script, run_name="__main__")
