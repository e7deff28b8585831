"""The contract between stage 1 and stage 2, in the one module both may import.

``iis.extract`` writes feature stores and ``iis.analyze`` reads them; neither imports the other.
What they must agree on lives here: the store's format marker and schema versions, its part
names, its feature dtypes, the one :class:`StoreError` both raise, and the one atomic-write
helper every writer of a finished file (tables, libraries, HDF5 exports, reports) goes through.
The layout itself is documented in the README ("The store format") and in ``extract/store.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

FORMAT = "iis-feature-store"
SCHEMA_VERSION = 1  # what stage 1 writes
SUPPORTED_SCHEMAS = (1,)  # what stage 2 reads
SPLITS = ("train", "val", "test")
ELEMENTS = "elements"
PARTS = (*SPLITS, ELEMENTS)
FEATURE_DTYPES = ("float16", "float32")
# The arrays every part holds, which readers index without asking (a store missing one is damaged).
SPLIT_ARRAYS = ("features", "labels", "ids", "valid", "done")
ELEMENT_ARRAYS = ("features", "done")


def missing_arrays(group, part: str) -> list[str]:
    """The arrays of :data:`SPLIT_ARRAYS` (or :data:`ELEMENT_ARRAYS`) that ``group[part]`` lacks."""
    needed = ELEMENT_ARRAYS if part == ELEMENTS else SPLIT_ARRAYS
    return [name for name in needed if name not in group[part]]
# A CLIP store's concept words and their text features (iis.extract.clip) live in this group; its
# ``format`` attribute, written last, is the finished marker that readers must find.
TEXT_GROUP = "text"
TEXT_FORMAT = "iis-clip-text"
# Rows per block (= Zarr chunk along N) when no one says otherwise: the one default that the
# pipeline schema, the extraction runner, store creation and import-h5 share.
BLOCK_ROWS = 1024
# The attribute that stage 1 adds once the last block lands; every other attribute is fixed at creation.
SUMMARY_KEY = "summary"


class StoreError(Exception):
    """A store that cannot be used (missing, foreign, of another schema, inconsistent or
    incomplete); the message names the store and the reason."""


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Readers never see a half-written file, and a failure (an exception, Ctrl-C) removes the
    temporary file and leaves the old ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a finished file should read like any other
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Model, pipeline and library names become file names (`<store>/<model>.zarr`, library files under
# the results folder), so a name from any source (pipelines.yaml, a store attribute, an HDF5 file)
# passes this rule before it touches a path. '@' and '+' join generated names (`r10@e2`, a
# checkpoint; `r10+ft1`, a fine-tuned copy).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


def check_name(value: str, *, what: str = "name") -> str:
    """Return ``value`` if it is safe as one path component, else raise :class:`ValueError`.

    Safe: letters, digits, '.', '_', '-', '@' and '+', starting with a letter or digit, no '..'.
    So ``"../../x"``, ``"a/b"`` and ``""`` are refused.
    """
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} is not a safe name: use letters, digits, '.', '_', '-', '@' and '+', "
                         "starting with a letter or digit")
    return value


# Why a row is invalid, stored per row in `<part>/reason` (int8) beside `valid`. Stage 1 writes it;
# a reader needs only `valid`, but the codes let a store say how many rows are unreadable images
# and how many hold non-finite features (the store's `summary` counts each).
ROW_OK = 0
ROW_UNREADABLE = 1  # the image could not be read or decoded (or an imported file marked the row invalid)
ROW_NONFINITE = 2  # the backbone (or an imported file) gave NaN or inf features
ROW_OVERFLOW = 3  # finite features that overflow the store's dtype (float16: |x| > 65504)
ROW_REASONS = {ROW_OK: "ok", ROW_UNREADABLE: "unreadable", ROW_NONFINITE: "nonfinite", ROW_OVERFLOW: "overflow"}


def check_labels(labels, num_classes: int | None, *, where: str, first_row: int = 0):
    """Return ``labels`` as ``(N,)`` int64 if each is an integral class index in ``[0, num_classes)``.

    Float labels must be whole numbers (``0.7`` is refused, never truncated); negative labels and,
    when ``num_classes`` is given, labels ``>= num_classes`` are refused. The :class:`ValueError`
    names ``where`` (a file, a split), the offending value and its row (counted from ``first_row``).
    """
    import numpy as np  # this module stays importable without numpy for `iis --help`

    values = np.asarray(labels)
    if values.ndim != 1:
        raise ValueError(f"{where}: labels must be one-dimensional, got shape {values.shape}")
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    if values.dtype.kind not in "iuf":
        raise ValueError(f"{where}: labels must be integers, got dtype {values.dtype}")
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            row = int(bad[0])
            raise ValueError(f"{where}: label {float(values[row])!r} at row {first_row + row} is not a whole number "
                             f"({bad.size} such labels); labels are class indices")
    if values.size and values.min() < 0:
        row = int(np.argmin(values))
        raise ValueError(f"{where}: label {values[row]:g} at row {first_row + row} is negative; "
                         "labels are class indices 0..C-1")
    if num_classes is not None and values.size and values.max() >= num_classes:
        row = int(np.argmax(values))
        raise ValueError(f"{where}: label {values[row]:g} at row {first_row + row} is out of range for {num_classes} classes "
                         f"(0..{num_classes - 1})")
    return values.astype(np.int64)
