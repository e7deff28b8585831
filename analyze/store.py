"""Stage 2's reader of feature stores (the format is documented in the README and in
``extract/store.py``; this module only reads it and never imports stage 1).

A store is refused, by name, when it is not ours, of an unknown schema, of inconsistent
shapes, or incomplete (any ``done`` block false). Features are streamed chunk by chunk, so
projecting a split onto ``K`` concepts holds ``N x K`` values, never ``N x D``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from iis.analyze.libraries.base import ElementSet

from iis.store_format import FORMAT, SPLITS, SUPPORTED_SCHEMAS, StoreError  # noqa: F401  (StoreError re-exported)

log = logging.getLogger(__name__)



def as_str(values: np.ndarray) -> np.ndarray:
    """Zarr returns variable-length strings as numpy StringDType; callers get plain ``<U``."""
    return np.asarray(values).astype(object).astype(str)


@dataclass(frozen=True)
class SplitData:
    """One split's valid rows.

    Attributes:
        x: ``(N, K)`` float32 — features, or their projection.
        labels: ``(N,)`` int64.
        ids: ``(N,)`` str.
        rows: ``(N,)`` int64 position of each row in the stored split (invalid rows skipped).
        n_invalid: rows excluded because ``valid`` is false.
    """

    x: torch.Tensor
    labels: torch.Tensor
    ids: np.ndarray
    rows: np.ndarray
    n_invalid: int


class ChunkedSplit:
    """One split's valid rows, read from the store a chunk at a time (``iis.analyze.heads.ChunkedRows``).

    Only labels, ids and row maps are held; ``chunk(i)`` decodes chunk ``i`` when asked. The
    standard head trains from this, so an analysis never holds the ``N x D`` train features.

    Attributes:
        shape: ``(N, D)`` of the valid rows.
        labels: ``(N,)`` int64; ids ``(N,)`` str; rows ``(N,)`` int64 positions in the split.
        n_invalid: rows excluded because ``valid`` is false.
    """

    def __init__(self, store: FeatureStore, split: str):
        g = store.group[split]
        valid = np.asarray(g["valid"][:], dtype=bool)
        self._features = g["features"]
        self._spans: list[tuple[slice, np.ndarray, int]] = []
        filled = 0
        for rows in store._chunks(split):
            keep = valid[rows]
            if keep.any():
                self._spans.append((rows, keep, filled))
                filled += int(keep.sum())
        self.shape = (filled, store.feature_dim)
        self.labels = torch.from_numpy(np.asarray(g["labels"][:], dtype=np.int64)[valid])
        self.ids = as_str(g["ids"][:])[valid]
        self.rows = np.flatnonzero(valid)
        self.n_invalid = int((~valid).sum())

    @property
    def num_chunks(self) -> int:
        return len(self._spans)

    def chunk(self, index: int) -> tuple[torch.Tensor, int]:
        """Chunk ``index``'s valid rows, ``(b, D)`` float32, and its first row's index."""
        rows, keep, start = self._spans[index]
        return torch.from_numpy(np.asarray(self._features[rows])[keep].astype(np.float32)), start


class FeatureStore:
    """A validated, complete store opened for reading."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path}: no feature store here (zarr.json missing)")
        try:
            self.group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        except Exception as err:  # zarr raises several types for unreadable metadata
            raise StoreError(f"{self.path}: not a readable Zarr v3 group ({err})") from None
        self.attrs = dict(self.group.attrs)
        self._validate()

    def _validate(self) -> None:
        fmt = self.attrs.get("format")
        if fmt != FORMAT:
            raise StoreError(f"{self.path}: foreign store (format={fmt!r}, expected {FORMAT!r})")
        version = self.attrs.get("schema_version")
        if version not in SUPPORTED_SCHEMAS:
            raise StoreError(f"{self.path}: schema_version {version!r} unknown (supported: {SUPPORTED_SCHEMAS})")
        dim = self.attrs.get("feature_dim")
        missing: list[str] = []
        for part in (*SPLITS, "elements"):
            if part not in self.group:
                raise StoreError(f"{self.path}: missing group {part}/")
            g = self.group[part]
            shape = g["features"].shape
            if len(shape) != 2 or shape[1] != dim:
                raise StoreError(f"{self.path}: {part}/features has shape {shape}, expected (N, {dim})")
            if part in SPLITS:
                for name in ("labels", "ids", "valid"):
                    if g[name].shape != (shape[0],):
                        raise StoreError(f"{self.path}: {part}/{name} has shape {g[name].shape}, expected ({shape[0]},)")
            todo = np.flatnonzero(~np.asarray(g["done"][:], dtype=bool))
            if todo.size:
                shown = ", ".join(map(str, todo[:12].tolist())) + (" …" if todo.size > 12 else "")
                missing.append(f"{part}: blocks {shown} ({todo.size} of {g['done'].shape[0]})")
        if missing:
            raise StoreError(f"{self.path}: incomplete store, not done: {'; '.join(missing)}")

    @property
    def model(self) -> str:
        return str(self.attrs.get("model"))

    @property
    def dataset(self) -> str:
        return str(self.attrs.get("dataset"))

    @property
    def classes(self) -> list[str]:
        return list(self.attrs.get("classes") or [])

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(max(int(np.max(self.group[s]["labels"][:], initial=-1)) for s in SPLITS)) + 1

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])

    def _chunks(self, part: str) -> Iterator[slice]:
        rows = self.group[part]["features"].shape[0]
        step = self.group[part]["features"].chunks[0]
        for start in range(0, rows, step):
            yield slice(start, min(start + step, rows))

    def read_split(
        self, split: str, *, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> SplitData:
        """The valid rows of a split, read chunk by chunk.

        Args:
            split: ``train``, ``val`` or ``test``.
            transform: applied to each chunk's ``(b, D)`` float32 features, e.g. a concept
                projection ``(b, D) -> (b, K)``; the full ``N x D`` matrix is never held
                when one is given. None keeps the features, as float32.
        """
        source = self.chunked_split(split)
        # Filled in place, chunk by chunk: a list of chunks then a cat would hold the split twice.
        x: torch.Tensor | None = None
        for i in range(source.num_chunks):
            part, start = source.chunk(i)
            if transform is not None:
                part = transform(part)
            if x is None:
                x = torch.empty((source.shape[0], part.shape[1]), dtype=part.dtype)
            x[start : start + part.shape[0]] = part
        if x is None:
            x = torch.empty((0, self.feature_dim))
        if source.n_invalid:
            log.info("%s %s: %d invalid samples excluded", self.model, split, source.n_invalid)
        return SplitData(x=x, labels=source.labels, ids=source.ids, rows=source.rows, n_invalid=source.n_invalid)

    def chunked_split(self, split: str) -> ChunkedSplit:
        """A split's valid rows as a :class:`ChunkedSplit`: read chunk by chunk, on demand."""
        return ChunkedSplit(self, split)

    def read_elements(self) -> ElementSet:
        """The store's visual elements with provenance; empty arrays when it has none."""
        g = self.group["elements"]
        n = g["features"].shape[0]
        if n == 0:
            raise StoreError(f"{self.path}: the store has no visual elements; concept libraries need them")

        def col(name: str, default, dtype):
            if name not in g:
                return np.full(n, default, dtype=dtype)
            values = g[name][:]
            return as_str(values) if dtype is str else np.asarray(values, dtype=dtype)

        return ElementSet(
            features=np.asarray(g["features"][:], dtype=np.float32),
            labels=col("label", -1, np.int64),
            source_ids=col("source_id", "", str),
            boxes=np.asarray(g["box"][:], dtype=np.int32) if "box" in g else np.full((n, 4), -1, np.int32),
            kinds=col("kind", "", str),
            segments=col("segment", -1, np.int32),
        )


def open_feature_store(path: Path) -> FeatureStore:
    """Open and validate a store; raises :class:`StoreError` naming it and the reason."""
    return FeatureStore(Path(path))
