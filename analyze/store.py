"""Stage 2's reader of feature stores (the format is documented in the README and in
``extract/store.py``; this module only reads it and never imports stage 1).

A store is refused, by name, when it is not ours, of an unknown schema, of inconsistent
shapes, incomplete (any ``done`` block false), or when its ``model`` attribute is not a safe
name (it becomes a path under the results folder). Features are streamed chunk by chunk, so
projecting a split onto ``K`` concepts holds ``N x K`` values, never ``N x D``.

What the heads see is checked here, because a wrong input gives a confident wrong number
downstream (three NaN rows in train once gave every head chance accuracy and IIS 1.0):

- rows with a NaN or inf feature are excluded even when marked valid, with a warning that
  names the store, the split and the count;
- a label outside ``[0, num_classes)`` is refused, naming the store, split and value;
- a split whose usable rows cover fewer than 2 classes is refused; a class without train rows
  is a warning.
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

from iis.store_format import FORMAT, SPLITS, SUPPORTED_SCHEMAS, StoreError, check_name, missing_arrays

log = logging.getLogger(__name__)

__all__ = ["ChunkedSplit", "FeatureStore", "SplitData", "StoreError", "as_str", "open_feature_store"]

# The CLIP store's concept-word group, and the attribute stage 1 writes last to mark it finished
# (``iis.extract.clip.write_text_features``; a test pins the two modules to the same values).
TEXT_GROUP = "text"
TEXT_FORMAT = "iis-clip-text"


def held_dtype(stored: np.dtype) -> np.dtype:
    """The dtype :meth:`FeatureStore.read_split` holds raw features in with ``stored_dtype``:
    float16 stays float16 (half of float32's memory, the same values once converted); any other
    becomes float32."""
    return np.dtype(np.float16) if np.dtype(stored) == np.float16 else np.dtype(np.float32)


def as_str(values: np.ndarray) -> np.ndarray:
    """Zarr returns variable-length strings as numpy StringDType; callers get plain ``<U``."""
    return np.asarray(values).astype(object).astype(str)


@dataclass(frozen=True)
class SplitData:
    """One split's valid rows.

    Attributes:
        x: ``(N, K)`` float32 — features, or their projection (a float16 store's raw features
            read with ``stored_dtype``: float16).
        labels: ``(N,)`` int64.
        ids: ``(N,)`` str.
        rows: ``(N,)`` int64 position of each row in the stored split (invalid rows skipped).
        n_invalid: rows excluded because ``valid`` is false.
        n_nonfinite: rows marked valid but excluded because a feature is NaN or inf.
    """

    x: torch.Tensor
    labels: torch.Tensor
    ids: np.ndarray
    rows: np.ndarray
    n_invalid: int
    n_nonfinite: int = 0


class ChunkedSplit:
    """One split's usable rows, read from the store a chunk at a time (``iis.analyze.heads.ChunkedRows``).

    Usable: marked valid, with every feature finite. Only labels, ids and row maps are held;
    ``chunk(i)`` decodes chunk ``i`` when asked. The standard head trains from this, so an
    analysis never holds the ``N x D`` train features. Finding the non-finite rows costs one
    pass over the split's chunks at construction.

    Attributes:
        shape: ``(N, D)`` of the usable rows.
        labels: ``(N,)`` int64; ids ``(N,)`` str; rows ``(N,)`` int64 positions in the split.
        n_invalid: rows excluded because ``valid`` is false.
        n_nonfinite: rows marked valid but excluded for a NaN or inf feature.
    """

    def __init__(self, store: FeatureStore, split: str):
        g = store.group[split]
        valid = np.asarray(g["valid"][:], dtype=bool)
        self._features = g["features"]
        self._spans: list[tuple[slice, np.ndarray, int]] = []
        usable = valid.copy()
        filled = 0
        for rows in store._chunks(split):
            keep = valid[rows].copy()
            if keep.any():
                keep &= np.isfinite(np.asarray(self._features[rows])).all(axis=1)
                usable[rows] = keep
            if keep.any():
                self._spans.append((rows, keep, filled))
                filled += int(keep.sum())
        self.shape = (filled, store.feature_dim)
        self.labels = torch.from_numpy(np.asarray(g["labels"][:], dtype=np.int64)[usable])
        self.ids = as_str(g["ids"][:])[usable]
        self.rows = np.flatnonzero(usable)
        self.n_invalid = int((~valid).sum())
        self.n_nonfinite = int((valid & ~usable).sum())
        store._check_rows(split, self.labels.numpy(), n_invalid=self.n_invalid, n_nonfinite=self.n_nonfinite)

    @property
    def num_chunks(self) -> int:
        return len(self._spans)

    def chunk(self, index: int) -> tuple[torch.Tensor, int]:
        """Chunk ``index``'s usable rows, ``(b, D)`` float32, and its first row's index."""
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
            lacking = missing_arrays(self.group, part)
            if lacking:
                raise StoreError(f"{self.path}: damaged store, {part}/ has no {', '.join(lacking)} array(s); "
                                 "re-extract it")
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
        try:
            check_name(self.model, what="model")
        except ValueError as err:
            raise StoreError(f"{self.path}: its model attribute is refused: {err}; rewrite the store "
                             "with a safe model name") from None

    @property
    def model(self) -> str:
        """The store's model name (checked by :func:`iis.store_format.check_name` on open)."""
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

    @property
    def num_elements(self) -> int:
        """Rows of ``elements/features``: the most concepts an element library can draw."""
        return int(self.group["elements"]["features"].shape[0])

    def text_group(self) -> zarr.Group:
        """The finished ``text/`` group of a CLIP store (concept words and their features).

        Raises:
            StoreError: naming the group, when it is absent or was not finished (stage 1 writes
                its ``format`` attribute last, so an interrupted write lacks it).
        """
        if TEXT_GROUP not in self.group:
            raise StoreError(f"{self.path}: no {TEXT_GROUP}/ group (concept-word features); run `iis extract` "
                             "for a pipeline with a text: section")
        group = self.group[TEXT_GROUP]
        if group.attrs.get("format") != TEXT_FORMAT:
            raise StoreError(f"{self.path / TEXT_GROUP}: unfinished group (its writing was interrupted); "
                             "rerun `iis extract` to redo it")
        return group

    def _check_rows(self, split: str, labels: np.ndarray, *, n_invalid: int, n_nonfinite: int) -> None:
        """Warn about excluded rows; refuse labels out of range and splits of fewer than 2 classes."""
        if n_invalid:
            log.info("%s %s: %d invalid samples excluded", self.path, split, n_invalid)
        if n_nonfinite:
            log.warning("%s %s: %d rows marked valid have NaN/inf features; excluded. Re-extract the store "
                        "(with extract.dtype: float32 if float16 overflowed)", self.path, split, n_nonfinite)
        num_classes = self.num_classes
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise StoreError(f"{self.path}: {split} has label {int(bad[0])} ({bad.size} rows) outside "
                             f"[0, {num_classes}) for its {num_classes} classes")
        present = np.unique(labels)
        if present.size < 2:
            raise StoreError(f"{self.path}: the usable rows of {split} ({labels.size} of "
                             f"{labels.size + n_invalid + n_nonfinite}) cover {present.size} class(es); "
                             "a classifier needs at least 2")
        if split == "train" and present.size < num_classes:
            absent = np.setdiff1d(np.arange(num_classes), present)
            names = [self.classes[c] if c < len(self.classes) else str(c) for c in absent[:8].tolist()]
            log.warning("%s train: %d of %d classes have no usable rows (%s%s); their test images cannot be "
                        "classified right", self.path, absent.size, num_classes, ", ".join(names),
                        " …" if absent.size > 8 else "")

    def _chunks(self, part: str) -> Iterator[slice]:
        rows = self.group[part]["features"].shape[0]
        step = self.group[part]["features"].chunks[0]
        for start in range(0, rows, step):
            yield slice(start, min(start + step, rows))

    def read_split(
        self, split: str, *, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        stored_dtype: bool = False,
    ) -> SplitData:
        """The usable rows of a split (valid, every feature finite), read chunk by chunk in one pass.

        Args:
            split: ``train``, ``val`` or ``test``.
            transform: applied to each chunk's ``(b, D)`` float32 features, e.g. a concept
                projection ``(b, D) -> (b, K)``; the full ``N x D`` matrix is never held
                when one is given. None keeps the features, as float32.
            stored_dtype: without a transform, hold the features in :func:`held_dtype` (a
                float16 store's stay float16) instead of float32.

        Raises:
            StoreError: a label out of range, fewer than 2 classes, or a transform that gave
                NaN or inf.
        """
        g = self.group[split]
        features = g["features"]
        valid = np.asarray(g["valid"][:], dtype=bool)
        usable = valid.copy()
        # Filled in place, chunk by chunk: a list of chunks then a cat would hold the split twice.
        x: torch.Tensor | None = None
        filled = 0
        for rows in self._chunks(split):
            keep = valid[rows].copy()
            if not keep.any():
                continue
            part = np.asarray(features[rows])[keep]
            finite = np.isfinite(part).all(axis=1)
            keep[keep] = finite
            usable[rows] = keep
            if not finite.any():
                continue
            dtype = held_dtype(part.dtype) if stored_dtype and transform is None else np.float32
            chunk = torch.from_numpy(part[finite].astype(dtype, copy=False))
            if transform is not None:
                chunk = transform(chunk)
                if not torch.isfinite(chunk).all():
                    raise StoreError(f"{self.path}: {split} rows {rows.start}-{rows.stop - 1} give NaN/inf "
                                     "after the concept projection; the library or the features are broken")
            if x is None:
                x = torch.empty((int(valid.sum()), chunk.shape[1]), dtype=chunk.dtype)
            x[filled : filled + chunk.shape[0]] = chunk
            filled += chunk.shape[0]
        if x is None:
            x = torch.empty((0, self.feature_dim), dtype=torch.float32)
        elif filled < x.shape[0]:
            x = x[:filled].clone()  # rows were dropped: do not keep the unused tail alive
        labels = np.asarray(g["labels"][:], dtype=np.int64)[usable]
        n_invalid, n_nonfinite = int((~valid).sum()), int((valid & ~usable).sum())
        self._check_rows(split, labels, n_invalid=n_invalid, n_nonfinite=n_nonfinite)
        return SplitData(x=x, labels=torch.from_numpy(labels), ids=as_str(g["ids"][:])[usable],
                         rows=np.flatnonzero(usable), n_invalid=n_invalid, n_nonfinite=n_nonfinite)

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

        features = np.asarray(g["features"][:], dtype=np.float32)
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        if bad:
            # Concepts are indexed by element position, so a bad element cannot just be dropped.
            raise StoreError(f"{self.path}: {bad} of {n} visual elements have NaN/inf features; re-extract "
                             "the store (with extract.dtype: float32 if float16 overflowed)")
        return ElementSet(
            features=features,
            labels=col("label", -1, np.int64),
            source_ids=col("source_id", "", str),
            boxes=np.asarray(g["box"][:], dtype=np.int32) if "box" in g else np.full((n, 4), -1, np.int32),
            kinds=col("kind", "", str),
            segments=col("segment", -1, np.int32),
        )


def open_feature_store(path: Path) -> FeatureStore:
    """Open and validate a store; raises :class:`StoreError` naming it and the reason."""
    return FeatureStore(Path(path))
