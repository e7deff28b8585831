"""Which code computed a table row: ``analysis_version``.

`iis analyze` and `iis run` skip a (store, seed) whose rows are already in the tables
(``skip_complete``). Judged by rows alone, rows fitted by an older head trainer or library
builder would be kept after an upgrade, beside new rows, and correlated with them: numbers from
two methods in one table, with nothing to tell them apart. So every ``accuracy`` and ``iis`` row
carries the version of the code that computed it, the package version plus a digest of the
source of the modules that decide its numbers and of the versions of the numeric libraries they
call (torch, numpy, SciPy, scikit-learn); a row of another version counts as missing.

The digest is of source bytes, so any edit to those modules (a comment too) refits, and so does an
upgrade of those libraries (their kernels' rounding moves heads near a tie): erring towards a refit
costs minutes, erring the other way costs a silently wrong table.
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
# The modules a task imports from this package that decide no number (tests/test_versioning.py
# checks that every module a task loads is in one list or the other).
NON_NUMERIC_MODULES = ("__init__", "allocator", "artifacts", "sources", "tables", "versioning")
# The libraries whose kernels compute the numbers; their versions enter the digest.
NUMERIC_LIBRARIES = ("torch", "numpy", "scipy", "sklearn")


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


def library_versions() -> str:
    """``"torch=2.14.1 numpy=…"``: the installed versions of :data:`NUMERIC_LIBRARIES`."""
    import importlib

    return " ".join(f"{name}={importlib.import_module(name).__version__}" for name in NUMERIC_LIBRARIES)


@functools.cache
def analysis_version() -> str:
    """``"<package version>+<12 hex digits>"``, e.g. ``"0.1.0+3f9a1c2e04b7"``: the digits are the
    sha256 of :func:`source_digest` and :func:`library_versions`, so every process that runs the same
    installed code on the same libraries has the same version. An install without the modules'
    source (byte code only) gets ``"<package version>+nosource"``."""
    try:
        sources = source_digest(Path(__file__).parent)
    except FileNotFoundError as err:
        log.warning("analysis version: %s; rows are marked with the package version alone", err)
        return f"{__version__}+nosource"
    return f"{__version__}+{hashlib.sha256(f'{sources} {library_versions()}'.encode()).hexdigest()[:12]}"


def version_label(version: object) -> str:
    """A row's ``analysis_version`` as logs and caveats name it: ``"unknown"`` for a null."""
    return "unknown" if pd.isna(version) else str(version)


def version_caveat(versions: Iterable[object]) -> str | None:
    """The caveat of a row computed from rows of several analysis versions (nulls: tables written
    before the column existed), or None when they are all one version."""
    seen = sorted({version_label(v) for v in versions})
    if len(seen) <= 1:
        return None
    return (f"rows from {len(seen)} analysis versions ({', '.join(seen)}): analyse their models again with one "
            "version, or remove the rows of models no longer analysed")


def models_by_version(rows: pd.DataFrame) -> dict[str, list[str]]:
    """``{analysis version: sorted model names}`` of ``rows`` (``iis`` or ``accuracy`` rows)."""
    if rows.empty or "analysis_version" not in rows:
        return {}
    labels = rows["analysis_version"].map(version_label)
    return {version: sorted(set(models)) for version, models in rows["model"].groupby(labels)}


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
