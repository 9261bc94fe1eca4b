"""Writing results: every output file is written whole or not at all.

Each file is first written under a temporary name in the same folder and then renamed over its
final name (``os.replace`` is atomic on one file system), so an interrupted run never leaves a
half-written PNG, JSON or NPZ behind.
"""

import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


#: Temporary files being written now, for :func:`discard_temporaries`.
_WRITING = set()


@contextmanager
def atomic_path(path):
    """Yield a temporary path with the same suffix; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    _WRITING.add(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
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
