"""The feature store: stage 1's side of the contract with stage 2.

One Zarr v3 group per (dataset, model)::

    <store>/zarr.json                 attrs: format, schema_version, backbone, weights, data config, …
    <store>/{train,val,test}/
        features  (N, D) float16|float32, chunks (block_rows, D)   dims (sample, feature)
        labels    (N,)   int64,           chunks (block_rows,)     dims (sample,)
        ids       (N,)   str                                       dims (sample,)
        valid     (N,)   bool                                      dims (sample,)
        done      (B,)   bool, chunks (1,)                         dims (block,)
    <store>/elements/
        features, done                     as above, E rows
        source_id (E,) str, source_index (E,) int64, label (E,) int64,
        box (E, 4) int32 (y0, x0, y1, x1), kind (E,) str, segment (E,) int32

A *block* is one chunk of rows. Writers write whole blocks only and set ``done[b]`` after the
block's rows are written, so a block is either complete or redone on resume. ``done`` has one
chunk per block, so parallel writers with disjoint block ranges never touch the same file.
Metadata (the group attributes and the element provenance) is written once, at creation, by
the coordinator; :func:`finalize_store` adds an idempotent summary when the last block lands.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
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
    SCHEMA_VERSION,
    SPLITS,
    SUMMARY_KEY,
    StoreError,
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
        "done", shape=(num_blocks(rows, block_rows),), chunks=(1,), dtype="bool",
        dimension_names=["block"], fill_value=False,
    )
    return part


def create_store(
    path: Path,
    *,
    split_sizes: Mapping[str, int],
    feature_dim: int,
    attrs: Mapping[str, object],
    elements: ElementProvenance | None,
    block_rows: int = BLOCK_ROWS,
    dtype: str = "float16",
) -> zarr.Group:
    """Create an empty store: arrays, element provenance and attributes. Fails if it exists.

    Args:
        path: the store directory (conventionally ``<root>/<model>.zarr``).
        split_sizes: rows per split, for ``train``, ``val`` and ``test``.
        feature_dim: ``D``.
        attrs: JSON-serialisable metadata (backbone, weights, data config, dataset, …).
        elements: provenance of the visual elements, or None for a store without elements.
        block_rows: rows per block (= chunk along N).
        dtype: ``float16`` or ``float32`` for features.
    """
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    if set(split_sizes) != set(SPLITS):
        raise ValueError(f"split_sizes must name exactly {SPLITS}, got {sorted(split_sizes)}")
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
    log.info("created store %s (%s)", path, ", ".join(f"{s}={split_sizes[s]}" for s in SPLITS))
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
    if fmt != FORMAT:
        raise StoreError(f"{path}: not an iis feature store (format={fmt!r}, expected {FORMAT!r})")
    version = group.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {version!r} is not supported (this iis reads {SCHEMA_VERSION})")
    return group


def wait_for_store(path: Path, *, timeout: float, poll: float = 2.0) -> zarr.Group:
    """Wait for the coordinator (shard 0) to create the store; used by the other shards."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return open_store(path, mode="r+")
        except StoreError:
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"{path}: not created within {timeout:.0f} s; shard 0 (the coordinator) creates it"
                ) from None
            time.sleep(poll)


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


def write_block(group: zarr.Group, part: str, block: int, **columns: np.ndarray) -> None:
    """Write one whole block of rows, then mark it done.

    Args:
        group: the open store (mode ``r+``).
        part: ``train``, ``val``, ``test`` or ``elements``.
        block: block index.
        columns: arrays named after the part's arrays (``features`` ``(b, D)``, ``labels``,
            ``ids``, ``valid``; only ``features`` for elements), each with the block's rows.
    """
    target = group[part]
    rows = target["features"].shape[0]
    rows_slice = block_slice(block, rows=rows, block_rows=int(group.attrs["block_rows"]))
    expected = rows_slice.stop - rows_slice.start
    for name, values in columns.items():
        if values.shape[0] != expected:
            raise ValueError(f"{part}/{name} block {block}: {values.shape[0]} rows, expected {expected}")
        target[name][rows_slice] = values
    # Marked only after every row of the block is on disk: the resume contract.
    target["done"][block] = True


def finalize_store(group: zarr.Group, path: Path) -> bool:
    """Record the per-split invalid counts once every block is done. Idempotent.

    Any process that finishes last may call it; all compute the same value from ``valid``.

    Returns:
        True when the store is complete (and the summary written).
    """
    if missing_blocks(group):
        return False
    invalid = {s: int((~np.asarray(group[s]["valid"][:], dtype=bool)).sum()) for s in SPLITS}
    summary = {"complete": True, "invalid": invalid}
    if group.attrs.get(SUMMARY_KEY) != summary:
        group.attrs[SUMMARY_KEY] = summary
    if any(invalid.values()):
        log.warning("%s: %s unreadable samples marked invalid", path, invalid)
    return True


def creation_attrs(group: zarr.Group) -> dict:
    """The attributes fixed at creation (everything but the finalisation summary)."""
    attrs = dict(group.attrs)
    attrs.pop(SUMMARY_KEY, None)
    return json.loads(json.dumps(attrs))
