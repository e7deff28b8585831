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
# passes this rule before it touches a path. '@' joins generated names (`r10@e2`, a checkpoint).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")


def check_name(value: str, *, what: str = "name") -> str:
    """Return ``value`` if it is safe as one path component, else raise :class:`ValueError`.

    Safe: letters, digits, '.', '_', '-' and '@', starting with a letter or digit, no '..'.
    So ``"../../x"``, ``"a/b"`` and ``""`` are refused.
    """
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} is not a safe name: use letters, digits, '.', '_', '-' and '@', "
                         "starting with a letter or digit")
    return value
