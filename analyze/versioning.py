"""Which code computed a table row: ``analysis_version``.

`iis analyze` and `iis run` skip a (store, seed) whose rows are already in the tables
(``skip_complete``). Judged by rows alone, rows fitted by an older head trainer or library
builder would be kept after an upgrade, beside new rows, and correlated with them: numbers from
two methods in one table, with nothing to tell them apart. So every ``accuracy`` and ``iis`` row
carries the version of the code that computed it, the package version plus a digest of the
source of the modules that decide its numbers; a row of another version counts as missing.

The digest is of source bytes, so any edit to those modules (a comment too) refits: erring
towards a refit costs minutes, erring the other way costs a silently wrong table.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from iis import __version__

log = logging.getLogger(__name__)

# The modules of this package (paths relative to it, globs allowed) whose code runs inside an
# analysis task and decides the numbers of its rows: the features read, the concept activations,
# the libraries, the heads and their fitting, the split grid and IIS itself. Tables, reports,
# scheduling and the CLI are left out: editing them changes no number.
NUMERIC_SOURCES = ("activations.py", "heads*.py", "libraries/*.py", "metrics.py", "parts.py", "store.py",
                   "summary.py", "tasks.py")


def source_digest(root: Path, patterns: Iterable[str] = NUMERIC_SOURCES) -> str:
    """The sha256 (hex) over the files under ``root`` that match ``patterns``, in path order.

    Each file enters as its path relative to ``root`` and its bytes, so a renamed or moved
    module changes the digest too. A pattern that matches nothing raises :class:`FileNotFoundError`
    (a module list that no longer matches the package would otherwise stop tracking it).
    """
    root = Path(root)
    files: set[Path] = set()
    for pattern in patterns:
        found = [p for p in root.glob(pattern) if p.is_file()]
        if not found:
            raise FileNotFoundError(f"{root}: no file matches {pattern!r}")
        files.update(found)
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(4, "little") + rel)
        data = path.read_bytes()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


@functools.cache
def analysis_version() -> str:
    """``"<package version>+<first 12 hex digits of the numeric sources' digest>"``, e.g.
    ``"0.1.0+3f9a1c2e04b7"``: the same for every process that runs the same installed code.
    An install without the modules' source (byte code only) gets ``"<package version>+nosource"``."""
    try:
        return f"{__version__}+{source_digest(Path(__file__).parent)[:12]}"
    except FileNotFoundError as err:
        log.warning("analysis version: %s; rows are marked with the package version alone", err)
        return f"{__version__}+nosource"


def version_caveat(versions: Iterable[object]) -> str | None:
    """The caveat of a row computed from rows of several analysis versions (nulls: tables written
    before the column existed), or None when they are all one version."""
    seen = sorted({"unknown" if v is None or v != v else str(v) for v in versions})  # v != v: NaN
    if len(seen) <= 1:
        return None
    return f"rows from {len(seen)} analysis versions ({', '.join(seen)}): rerun `iis analyze` to refit them alike"


def joined_caveats(rows: pd.DataFrame) -> str | None:
    """The caveat of a row derived from ``rows`` (a correlation or ranking row from ``iis`` rows):
    their distinct caveats, and :func:`version_caveat` when they come from several analysis
    versions, joined by ``"; "``; None when there is nothing to say."""
    caveats = sorted({c for c in rows["caveat"].dropna()}) if "caveat" in rows else []
    if "analysis_version" in rows:
        mixed = version_caveat(rows["analysis_version"])
        if mixed:
            caveats.append(mixed)
    return "; ".join(caveats) or None
