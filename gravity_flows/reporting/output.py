"""Writing results: every output file is written whole or not at all, and so is every result.

Each file is first written under a temporary name in the same folder and then renamed over its
final name (``os.replace`` is atomic on one file system), so an interrupted run never leaves a
half-written PNG, JSON or NPZ behind.

A result is a set of files in one folder, and it is whole or absent too. :func:`begin_result`
makes a folder this run's: it removes an earlier run's result files there (:data:`RESULT_FILES`,
by name; nothing else), so that no mix of two runs can arise, and from then on every file written
there is recorded. The result is complete when its last file arrives (:data:`COMPLETING_FILES`:
a run's ``summary.json``, a comparison's or sweep's ``table.md``, each written last); a process
that quits before that calls :func:`discard_unfinished` (``cli.quit_now`` does), which removes the
files of every result begun but not complete. So after any interrupt a folder holds a complete
result or nothing of the run.
"""

import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

#: Every file a run writes into its output folder (SPEC, 'What each script writes').
RUN_FILES = ("summary.json", "samples.npz", "marginals.png", "pairs.png", "predictive_check.png",
             "elbo.png", "trace.png", "autocorrelation.png", "misfit.png")
#: The files an amortized model's training or its survey run adds (test-set figure, survey table and figure).
AMORTIZED_FILES = ("amortized.png", "survey.csv", "survey.md", "survey.png")
#: A trained model: written into an output folder but never removed as an earlier run's result (applying
#: a model with ``--out`` its own folder must not delete it); only retraining there replaces it.
MODEL_FILE = "model.pt"
#: Every file name a result is made of: a run's, an amortized model's or survey's, and a comparison's or a
#: sweep's (compare.py, sweep.py).
RESULT_FILES = RUN_FILES + AMORTIZED_FILES + ("table.md", "table.csv", "cost_accuracy.png", "convergence.png",
                                              "cost_vs_survey.png")
#: The file written last into a result's folder, whose arrival makes the result complete.
COMPLETING_FILES = ("summary.json", "table.md")

#: Temporary files being written now, for :func:`discard_temporaries`.
_WRITING = set()
#: Folders begun (:func:`begin_result`) whose result is not complete yet -> the files written there so far.
_UNFINISHED = {}


def _key(folder):
    return Path(os.path.abspath(folder))


def begin_result(folder):
    """Make ``folder`` this run's: remove an earlier result's files there, and record what is written from now on.

    Only the names in :data:`RESULT_FILES` are removed; subfolders and any other file stay. Returns
    the names removed.
    """
    folder = _key(folder)
    removed = []
    for name in RESULT_FILES:
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            continue
        removed.append(name)
    _UNFINISHED[folder] = set()
    return removed


@contextmanager
def atomic_path(path):
    """Yield a temporary path with the same suffix; rename it to ``path`` if the block succeeds.

    In a folder begun by :func:`begin_result`, ``path`` is recorded (before the rename, so that a
    quit between the two cannot miss it) until the folder's completing file has been written.
    """
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    folder = _key(path.parent)
    _WRITING.add(temporary)
    try:
        yield temporary
        if folder in _UNFINISHED:
            _UNFINISHED[folder].add(folder / path.name)
        os.replace(temporary, path)
        if path.name in COMPLETING_FILES:
            _UNFINISHED.pop(folder, None)  # the result there is whole: nothing of it is discarded any more
    finally:
        if temporary.exists():
            temporary.unlink()
        _WRITING.discard(temporary)


def discard_temporaries():
    """Remove the temporary files of the writes in progress: the process is about to quit without finishing them."""
    for temporary in list(_WRITING):
        try:
            temporary.unlink()
        except OSError:  # already renamed or removed
            pass


def discard_unfinished():
    """Remove every file written into a folder whose result is not complete, and forget those folders.

    For a process about to quit (or a run that failed) before its results were whole: what it
    leaves is then complete results only. Returns the paths removed.
    """
    removed = []
    for folder, paths in list(_UNFINISHED.items()):
        for path in sorted(paths):
            try:
                path.unlink()
            except OSError:  # never renamed into place, or already removed
                continue
            removed.append(path)
        _UNFINISHED.pop(folder, None)
    return removed


def forget_unfinished():
    """Stop recording: what has been written so far stays, whatever happens next (a new run starts in this process)."""
    _UNFINISHED.clear()


def _plain(value):
    """Make numpy scalars and arrays JSON-serialisable."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # strict JSON has no NaN or infinity
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path, content):
    """Write ``content`` as strict JSON (non-finite numbers become null)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(_plain(content), indent=2, allow_nan=False) + "\n")


def write_npz(path, **arrays):
    """Write arrays as an uncompressed .npz that ``np.load`` reads.

    Unlike ``np.savez``, which stamps every member with the current time, the members carry a
    fixed date, so the same arrays always give the same bytes (same --seed, same file).
    """
    with atomic_path(path) as temporary:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(member, "w", force_zip64=True) as handle:
                    np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


def save_figure(figure, path, dpi=130):
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
