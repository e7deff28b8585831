"""The feature store: stage 1's side of the contract with stage 2.

One Zarr v3 group per (dataset, model)::

    <store>/zarr.json                 attrs: format, schema_version, backbone, weights, data config, …
    <store>/{train,val,test}/
        features  (N, D) float16|float32, chunks (block_rows, D)   dims (sample, feature)
        labels    (N,)   int64,           chunks (block_rows,)     dims (sample,)
        ids       (N,)   str                                       dims (sample,)
        valid     (N,)   bool                                      dims (sample,)
        reason    (N,)   int8, why a row is invalid (ROW_REASONS)  dims (sample,)
        done      (B,)   bool, chunks (1,)                         dims (block,)
    <store>/elements/
        features, reason, done             as above, E rows
        source_id (E,) str, source_index (E,) int64, label (E,) int64,
        box (E, 4) int32 (y0, x0, y1, x1), kind (E,) str, segment (E,) int32

A *block* is one chunk of rows. Writers write whole blocks only and set ``done[b]`` after the
block's rows are written, so a block is either complete or redone on resume. ``done`` has one
chunk per block, so parallel writers with disjoint block ranges never touch the same file.
Metadata (the group attributes and the element provenance) is written once, at creation, by
the coordinator; :func:`finalize_store` adds an idempotent summary when the last block lands.

Finite or invalid: :func:`write_block` casts each block to the store's dtype and marks every row
whose stored features are not all finite ``valid=false``, with its ``reason`` (NaN/inf from the
backbone, or a float16 overflow of finite values). A store is created in a hidden folder beside
its path and renamed into place, so a store path holds a whole store or nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from iis.store_format import (  # noqa: F401  (re-exported: stage 1's callers use st.SPLITS, st.StoreError, …)
    BLOCK_ROWS,
    ELEMENTS,
    FEATURE_DTYPES,
    FORMAT,
    PARTS,
    ROW_NONFINITE,
    ROW_OK,
    ROW_OVERFLOW,
    ROW_REASONS,
    ROW_UNREADABLE,
    SCHEMA_VERSION,
    SPLITS,
    SUMMARY_KEY,
    TEXT_GROUP,
    StoreError,
    check_labels,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ElementProvenance:
    """Where each visual element comes from; written at creation. All arrays have ``E`` rows.

    Attributes:
        source_id: ``(E,)`` str id of the source train image.
        source_index: ``(E,)`` int64 row of the source image in ``train``.
        label: ``(E,)`` int64 class of the source image.
        box: ``(E, 4)`` int32 ``(y0, x0, y1, x1)``, end-exclusive, in source pixels.
        kind: ``(E,)`` str, ``grid`` or ``slic``.
        segment: ``(E,)`` int32 SLIC label, -1 for grid patches.
    """

    source_id: np.ndarray
    source_index: np.ndarray
    label: np.ndarray
    box: np.ndarray
    kind: np.ndarray
    segment: np.ndarray

    def __len__(self) -> int:
        return int(self.source_id.shape[0])


def num_blocks(rows: int, block_rows: int) -> int:
    """Blocks needed for ``rows`` rows; an empty part still has zero blocks."""
    return math.ceil(rows / block_rows)


def block_slice(block: int, *, rows: int, block_rows: int) -> slice:
    """Row range of one block."""
    start = block * block_rows
    return slice(start, min(start + block_rows, rows))


def shard_blocks(total_blocks: int, *, shard: int, num_shards: int) -> range:
    """The contiguous, disjoint block range that shard ``shard`` of ``num_shards`` fills."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard}/{num_shards}: index must lie in [0, {num_shards})")
    per = math.ceil(total_blocks / num_shards) if total_blocks else 0
    return range(min(shard * per, total_blocks), min((shard + 1) * per, total_blocks))


def _create_part(
    group: zarr.Group, name: str, *, rows: int, dim: int, dtype: str, block_rows: int
) -> zarr.Group:
    part = group.create_group(name)
    chunk = max(1, min(block_rows, rows)) if rows else block_rows
    part.create_array(
        "features", shape=(rows, dim), chunks=(chunk, dim), dtype=dtype,
        dimension_names=["sample", "feature"], fill_value=np.nan,
    )
    part.create_array(
        "reason", shape=(rows,), chunks=(chunk,), dtype="int8",
        dimension_names=["sample"], fill_value=ROW_OK,
    )
    part.create_array(
        "done", shape=(num_blocks(rows, block_rows),), chunks=(1,), dtype="bool",
        dimension_names=["block"], fill_value=False,
    )
    return part


_CREATING = ".creating-"


@contextlib.contextmanager
def building(path: Path) -> Iterator[Path]:
    """Yield a hidden, empty folder beside ``path`` to build a store in; on success it becomes ``path``.

    A failure (an exception, Ctrl-C) removes the folder, so ``path`` holds a whole store or
    nothing; a folder left by a SIGKILL is removed by the next build of the same path.
    Raises :class:`FileExistsError` when ``path`` exists and is not an empty folder.
    """
    path = Path(path)
    _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}{_CREATING}*"):
        log.info("removing %s, left by an interrupted store creation", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_CREATING}", dir=path.parent))
    try:
        yield tmp
        _refuse_existing(path)
        if path.is_dir():
            path.rmdir()  # an empty folder (made by hand) makes way
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_existing(path: Path) -> None:
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path}: already exists; delete it or pick another store path")


def interrupted_creation(path: Path) -> bool:
    """True when ``path`` holds what a killed :func:`create_store` of an older iis left behind.

    That is a Zarr group whose ``zarr.json`` carries no attributes (the format marker is written
    last) and whose entries are only the store's own parts, with no block done. Anything else
    without the format marker is foreign and is never deleted.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("node_type") != "group" or meta.get("attributes"):
        return False
    entries = {p.name for p in path.iterdir()}
    if not entries <= {"zarr.json", *PARTS}:
        return False
    # No block was ever done: done arrays keep no chunk files until a block is marked.
    return not any((path / part / "done" / "c").exists() for part in PARTS)


def create_store(
    path: Path,
    *,
    split_sizes: Mapping[str, int],
    feature_dim: int,
    attrs: Mapping[str, object],
    elements: ElementProvenance | None,
    block_rows: int = BLOCK_ROWS,
    dtype: str = "float16",
    atomic: bool = True,
) -> zarr.Group:
    """Create an empty store: arrays, element provenance and attributes. Fails if it exists.

    The store is built in a hidden folder beside ``path`` and renamed into place (see
    :func:`building`), so an interrupted creation leaves no half-made store at ``path``.

    Args:
        path: the store directory (conventionally ``<root>/<model>.zarr``).
        split_sizes: rows per split, for ``train``, ``val`` and ``test``.
        feature_dim: ``D``.
        attrs: JSON-serialisable metadata (backbone, weights, data config, dataset, …).
        elements: provenance of the visual elements, or None for a store without elements.
        block_rows: rows per block (= chunk along N).
        dtype: ``float16`` or ``float32`` for features.
        atomic: False creates the store in ``path`` itself, for a caller that builds a whole
            store inside :func:`building` (``import-h5``).
    """
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    if set(split_sizes) != set(SPLITS):
        raise ValueError(f"split_sizes must name exactly {SPLITS}, got {sorted(split_sizes)}")
    check_block_rows(block_rows)
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int | np.integer) or feature_dim < 1:
        raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
    if atomic:
        with building(path) as tmp:
            _init_store(tmp, split_sizes=split_sizes, feature_dim=int(feature_dim), attrs=attrs,
                        elements=elements, block_rows=block_rows, dtype=dtype)
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    else:
        group = _init_store(path, split_sizes=split_sizes, feature_dim=int(feature_dim), attrs=attrs,
                            elements=elements, block_rows=block_rows, dtype=dtype)
    log.info("created store %s (%s)", path, ", ".join(f"{s}={split_sizes[s]}" for s in SPLITS))
    return group


def check_block_rows(block_rows: object) -> int:
    """``block_rows`` if it is a positive integer, else :class:`ValueError`."""
    if isinstance(block_rows, bool) or not isinstance(block_rows, int | np.integer) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
    return int(block_rows)


def _init_store(path: Path, *, split_sizes: Mapping[str, int], feature_dim: int, attrs: Mapping[str, object],
                elements: ElementProvenance | None, block_rows: int, dtype: str) -> zarr.Group:
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for split in SPLITS:
        rows = int(split_sizes[split])
        part = _create_part(group, split, rows=rows, dim=feature_dim, dtype=dtype, block_rows=block_rows)
        chunk = part["features"].chunks[0]
        part.create_array("labels", shape=(rows,), chunks=(chunk,), dtype="int64",
                          dimension_names=["sample"], fill_value=-1)
        part.create_array("ids", shape=(rows,), chunks=(chunk,), dtype=str,
                          dimension_names=["sample"], fill_value="")
        part.create_array("valid", shape=(rows,), chunks=(chunk,), dtype="bool",
                          dimension_names=["sample"], fill_value=False)
    n_elements = len(elements) if elements is not None else 0
    part = _create_part(group, ELEMENTS, rows=n_elements, dim=feature_dim, dtype=dtype, block_rows=block_rows)
    if elements is not None and n_elements:
        _write_provenance(part, elements)
    # The format marker goes last: a reader (or a waiting shard) that sees it knows every
    # array above exists.
    group.attrs.update(
        {
            **dict(attrs),
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "block_rows": block_rows,
            "feature_dtype": dtype,
            "feature_dim": feature_dim,
            "split_sizes": {s: int(split_sizes[s]) for s in SPLITS},
            "num_elements": n_elements,
        }
    )
    return group


def _write_provenance(part: zarr.Group, elements: ElementProvenance) -> None:
    rows = len(elements)
    columns = {
        "source_id": (elements.source_id.astype(str), str, ""),
        "source_index": (elements.source_index.astype(np.int64), "int64", -1),
        "label": (elements.label.astype(np.int64), "int64", -1),
        "kind": (elements.kind.astype(str), str, ""),
        "segment": (elements.segment.astype(np.int32), "int32", -1),
    }
    for name, (values, dtype, fill) in columns.items():
        arr = part.create_array(name, shape=(rows,), chunks=(rows,), dtype=dtype,
                                dimension_names=["element"], fill_value=fill)
        arr[:] = values
    box = part.create_array("box", shape=(rows, 4), chunks=(rows, 4), dtype="int32",
                            dimension_names=["element", "corner"], fill_value=-1)
    box[:] = elements.box.astype(np.int32)


def open_store(path: Path, *, mode: str = "r") -> zarr.Group:
    """Open an existing store and check that it is one of ours, of a schema we know."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path}: not a feature store (no zarr.json)")
    group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    fmt = group.attrs.get("format")
    if fmt is None and interrupted_creation(path):
        raise StoreError(f"{path}: its creation was interrupted before it was complete; rerun `iis extract` "
                         "(shard 0) to make it anew")
    if fmt != FORMAT:
        raise StoreError(f"{path}: not an iis feature store (format={fmt!r}, expected {FORMAT!r})")
    version = group.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {version!r} is not supported (this iis reads {SCHEMA_VERSION})")
    return group


def _not_created_yet(path: Path) -> bool:
    """True while shard 0 may still put a store at ``path``: nothing there (or an empty folder),
    or what an interrupted creation of an older iis left, which shard 0 removes and makes anew."""
    try:
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return True
        return interrupted_creation(path)
    except FileNotFoundError:  # shard 0 is removing it, or renaming its new store into place
        return True


def wait_for_store(path: Path, *, timeout: float, poll: float = 2.0) -> zarr.Group:
    """Wait for the coordinator (shard 0) to create the store; used by the other shards.

    Only a store that is not there yet is waited for. Anything else at ``path`` (a foreign
    folder, another format, an unknown schema) raises its own :class:`StoreError` at once:
    waiting would not change it, and the timeout would hide the cause.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    while _not_created_yet(path):
        if time.monotonic() >= deadline:
            left = " (what is there is an interrupted creation)" if interrupted_creation(path) else ""
            raise StoreError(f"{path}: not created within {timeout:.0f} s{left}; shard 0 (the coordinator) "
                             "creates it")
        time.sleep(poll)
    return open_store(path, mode="r+")


def done_blocks(group: zarr.Group, part: str) -> np.ndarray:
    """``(B,)`` bool done markers of one part."""
    return np.asarray(group[part]["done"][:], dtype=bool)


def missing_blocks(group: zarr.Group) -> dict[str, list[int]]:
    """Blocks not yet done, per part; parts with none missing are left out."""
    missing = {}
    for part in PARTS:
        todo = np.flatnonzero(~done_blocks(group, part)).tolist()
        if todo:
            missing[part] = todo
    return missing


def _format_blocks(blocks: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, blocks[:limit]))
    return shown + (f", … ({len(blocks)} in all)" if len(blocks) > limit else "")


def check_complete(group: zarr.Group, path: Path) -> None:
    """Raise :class:`StoreError` naming the store and its missing blocks, if any."""
    missing = missing_blocks(group)
    if missing:
        detail = "; ".join(f"{part}: blocks {_format_blocks(b)}" for part, b in missing.items())
        raise StoreError(f"{path}: incomplete store, missing {detail}. Rerun `iis extract` to finish it.")


def write_block(group: zarr.Group, part: str, block: int, **columns: np.ndarray) -> dict[str, int]:
    """Write one whole block of rows, then mark it done. Returns the block's invalid-row counts.

    ``features`` may come in any float dtype; they are cast to the store's dtype here, and a row
    whose stored features are not all finite is written ``valid=false`` with its ``reason``:
    ``nonfinite`` when the features were NaN/inf before the cast, ``overflow`` when finite values
    overflowed the store's dtype (float16 above 65504). Rows the caller marks invalid (an
    unreadable image) get ``unreadable``. Labels must be class indices of the store's ``classes``.

    Args:
        group: the open store (mode ``r+``).
        part: ``train``, ``val``, ``test`` or ``elements``.
        block: block index.
        columns: arrays named after the part's arrays (``features`` ``(b, D)``, ``labels``,
            ``ids``, ``valid`` and optionally ``reason``; only ``features`` for elements), each
            with the block's rows.

    Returns:
        ``{"unreadable": n, "nonfinite": n, "overflow": n}`` for this block's rows.
    """
    target = group[part]
    rows = target["features"].shape[0]
    rows_slice = block_slice(block, rows=rows, block_rows=int(group.attrs["block_rows"]))
    expected = rows_slice.stop - rows_slice.start
    for name, values in columns.items():
        if np.shape(values)[:1] != (expected,):
            raise ValueError(f"{part}/{name} block {block}: {np.shape(values)[:1]} rows, expected {expected}")
    counts = dict.fromkeys(("unreadable", "nonfinite", "overflow"), 0)
    if "features" in columns:
        columns = dict(columns)
        columns["features"], valid, reason = _check_features(group, part, columns)
        if part != ELEMENTS:
            columns["valid"] = valid
        if "reason" in target:
            columns["reason"] = reason
        else:
            columns.pop("reason", None)  # a store made before `reason` existed
        for code, name in ROW_REASONS.items():
            if code != ROW_OK:
                counts[name] = int((reason == code).sum())
    if "labels" in columns:
        classes = group.attrs.get("classes")
        columns["labels"] = check_labels(
            columns["labels"], len(classes) if isinstance(classes, list) and classes else None,
            where=f"{part} split", first_row=rows_slice.start)
    for name, values in columns.items():
        target[name][rows_slice] = values
    # Marked only after every row of the block is on disk: the resume contract.
    target["done"][block] = True
    return counts


def _check_features(group: zarr.Group, part: str, columns: Mapping[str, np.ndarray]):
    """Cast a block's features to the store dtype; return them, ``valid`` and ``reason``."""
    raw = np.asarray(columns["features"])
    dim = group[part]["features"].shape[1]
    if raw.ndim != 2 or raw.shape[1] != dim:
        raise ValueError(f"{part}/features: block has shape {raw.shape}, expected (rows, {dim})")
    if raw.dtype.kind not in "fiub":
        raise ValueError(f"{part}/features: dtype {raw.dtype} is not numeric")
    dtype = np.dtype(group.attrs["feature_dtype"])
    with np.errstate(over="ignore", invalid="ignore"):
        stored = raw.astype(dtype)
    n = raw.shape[0]
    valid = np.asarray(columns["valid"], dtype=bool) if "valid" in columns else np.ones(n, dtype=bool)
    if "reason" in columns:
        reason = np.asarray(columns["reason"], dtype=np.int8).copy()
        reason[~valid & (reason == ROW_OK)] = ROW_UNREADABLE
    else:
        reason = np.where(valid, ROW_OK, ROW_UNREADABLE).astype(np.int8)
    bad = (reason == ROW_OK) & ~np.isfinite(stored).all(axis=1)
    if bad.any():
        finite_before = np.isfinite(raw[bad]).all(axis=1)
        reason[np.flatnonzero(bad)] = np.where(finite_before, ROW_OVERFLOW, ROW_NONFINITE)
    return stored, reason == ROW_OK, reason


def describe_invalid(counts: Mapping[str, int], *, dtype: str) -> str:
    """One phrase for invalid-row counts, with the fix for an overflow; '' when there are none."""
    parts = []
    if counts.get("unreadable"):
        parts.append(f"{counts['unreadable']} unreadable")
    if counts.get("nonfinite"):
        parts.append(f"{counts['nonfinite']} with NaN/inf features")
    if counts.get("overflow"):
        limit = f" (|x| > {float(np.finfo(dtype).max):g})" if np.dtype(dtype).kind == "f" else ""
        parts.append(f"{counts['overflow']} whose finite features overflow {dtype}{limit}; "
                     "set `extract.dtype: float32` and extract again into a new store")
    return ", ".join(parts)


def finalize_store(group: zarr.Group, path: Path) -> bool:
    """Record the per-part invalid-row counts once every block is done. Idempotent.

    Any process that finishes last may call it; all compute the same value from ``valid`` and
    ``reason``. The summary holds ``invalid`` (per split) and, split by cause, ``unreadable``
    (per split), ``nonfinite`` and ``overflow`` (per part, elements included); for a split,
    ``invalid = unreadable + nonfinite + overflow``.

    Returns:
        True when the store is complete (and the summary written).
    """
    if missing_blocks(group):
        return False
    invalid = {s: int((~np.asarray(group[s]["valid"][:], dtype=bool)).sum()) for s in SPLITS}
    summary: dict = {"complete": True, "invalid": invalid}
    if all("reason" in group[p] for p in PARTS):
        reasons = {p: np.asarray(group[p]["reason"][:]) for p in PARTS}
        summary["unreadable"] = {s: int((reasons[s] == ROW_UNREADABLE).sum()) for s in SPLITS}
        summary["nonfinite"] = {p: int((reasons[p] == ROW_NONFINITE).sum()) for p in PARTS}
        summary["overflow"] = {p: int((reasons[p] == ROW_OVERFLOW).sum()) for p in PARTS}
    if group.attrs.get(SUMMARY_KEY) != summary:
        group.attrs[SUMMARY_KEY] = summary
    dtype = str(group.attrs.get("feature_dtype"))
    for p in PARTS:
        counts = {k: summary[k][p] for k in ("unreadable", "nonfinite", "overflow") if p in summary.get(k, {})}
        if p in invalid and "unreadable" not in summary:
            counts = {"unreadable": invalid[p]}
        text = describe_invalid(counts, dtype=dtype)
        if text:
            total = group[p]["features"].shape[0]
            log.warning("%s: %s rows marked invalid: %s (of %d)", path, p, text, total)
    empty = [s for s in SPLITS if invalid[s] and invalid[s] == group[s]["features"].shape[0]]
    if empty:
        log.warning("%s: no valid row left in %s; the store cannot be analysed", path, ", ".join(empty))
    return True


def creation_attrs(group: zarr.Group) -> dict:
    """The attributes fixed at creation (everything but the finalisation summary)."""
    attrs = dict(group.attrs)
    attrs.pop(SUMMARY_KEY, None)
    return json.loads(json.dumps(attrs))


# Attributes compared when a store is reopened to resume, and the setting a user changes to get
# each back. Every one of them changes the stored bytes; `versions` does not and is left out.
SETTINGS = {
    "feature_dtype": "dtype (extract.dtype)",
    "block_rows": "block_rows (extract.block_rows)",
    "feature_dim": "feature dimension (the backbone)",
    "data_config": "data config (the model's img_size, mean, std, crop)",
    "backbone": "backbone",
    "weights": "weights",
    "weights_sha256": "weights (their sha256)",
    "elements": "elements settings",
    "num_elements": "number of visual elements",
    "split_sizes": "split sizes (the dataset and its splits)",
    "rows_sha256": "rows (the ids and labels of each split, the element plan)",
    "classes": "classes",
    "dataset": "dataset",
    # How the values were computed: kernels and rounding differ between devices, autocast dtypes
    # and batch sizes, so a resume or a shard that changes one would mix two sets of numbers.
    "device_type": "device type (extract.device, --device)",
    "autocast": "autocast dtype (extract.amp on CUDA; none on CPU)",
    "batch_size": "batch_size (extract.batch_size)",
}


def _show(value: object, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_settings(group: zarr.Group, path: Path, expected: Mapping[str, object], *,
                   optional: tuple[str, ...] = ()) -> None:
    """Refuse, by name, a store whose creation settings differ from ``expected``.

    Every key of ``expected`` is compared with the stored attribute; keys in ``optional`` are
    compared only when the store records them (an older store may not). The error names each
    changed setting with its stored and requested value, and the fix.
    """
    stored = creation_attrs(group)
    expected = json.loads(json.dumps(dict(expected)))
    differing = [k for k in expected if stored.get(k) != expected[k] and not (k in optional and k not in stored)]
    if not differing:
        return
    order = list(SETTINGS)
    differing.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    detail = "; ".join(f"{SETTINGS.get(k, k)}: the store was made with {_show(stored.get(k))}, "
                       f"this run asks {_show(expected[k])}" for k in differing)
    raise StoreError(f"{path}: exists with other settings ({detail}). Delete the store to make it anew, "
                     "or restore the setting")


def write_text_group(group: zarr.Group, words: np.ndarray, features: np.ndarray, attrs: dict) -> None:
    """Create (or replace an unfinished) ``text/`` group: ``words (T,)`` str, ``features (T, D)``
    float32 in one chunk each, then ``attrs``, which carry the format marker and so go last."""
    rows, dim = features.shape
    text = group.create_group(TEXT_GROUP, overwrite=True)
    arr = text.create_array("features", shape=(rows, dim), chunks=(rows, dim), dtype="float32",
                            dimension_names=["concept", "feature"], fill_value=np.nan)
    arr[:] = features
    arr = text.create_array("words", shape=(rows,), chunks=(rows,), dtype=str, dimension_names=["concept"],
                            fill_value="")
    arr[:] = np.asarray(words, dtype=str)
    text.attrs.update(attrs)
