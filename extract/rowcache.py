"""Transformed input rows kept between the models that one process extracts from one dataset.

A pipeline extracts several models over the same images: checkpoints along training, layers of
other backbones, fine-tuned arms. When two of them share a transform (the same resize, crop and
size; normalisation is per batch and not part of it), the per-image work (decode, resize, crop,
and for visual elements the render and SLIC) gives the same uint8 tensor for each. On small
images that work costs about as much as the forward pass (benchmarks/README.md,
"`extract_overhead.py`"), so the first model's rows are kept, up to a byte budget, and later
models read them.

A cache belongs to one :class:`~iis.extract.datasets.ImageDataset` object and goes with it: a
dataset loaded again (after its files changed, say) starts empty, so a row is never served from
other pixels. Only readable rows are kept (an unreadable image fails, and is reported, for every
store). DataLoader worker processes do not share it: the runner uses it only with
``num_workers=0``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)

# Default budget: this share of physical RAM (the demo's 5,770 rows at 32 px take 17 MB; ImageNet
# at 224 px, 150 kB a row, would fill it and keep the rows first seen).
MEMORY_FRACTION = 1 / 16
# Bytes counted per row beyond its pixels: the tensor object and the dict entry.
_ROW_OVERHEAD = 512


class RowCache:
    """Transformed rows by key, up to ``budget`` bytes; once full, new rows are not kept.

    Keeping the first rows (no eviction) makes every later model's hits the same rows, and
    costs nothing per miss. Thread-safe for the rare caller with several loader threads.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.hits = 0  # rows served from the cache
        self._rows: dict[Hashable, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._full_logged = False

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The row kept under ``key``, or None. Callers must not modify it (a DataLoader's
        collate copies it into the batch)."""
        row = self._rows.get(key)
        if row is not None:
            self.hits += 1
        return row

    def get_or_make(self, key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The row kept under ``key``, else ``make()``, kept if the budget has room. What
        ``make`` raises propagates, and nothing is kept."""
        row = self.get(key)
        if row is None:
            row = make()
            self.put(key, row)
        return row

    def put(self, key: Hashable, row: torch.Tensor) -> None:
        """Keep ``row`` under ``key`` if the budget has room."""
        size = row.numel() * row.element_size() + _ROW_OVERHEAD
        with self._lock:
            if key in self._rows:
                return
            if self.used + size > self.budget:
                if not self._full_logged:
                    log.info("row cache full at %d rows (%.0f MB); later rows are transformed for each model",
                             len(self._rows), self.used / 2**20)
                    self._full_logged = True
                return
            self._rows[key] = row
            self.used += size


_caches: dict[int, RowCache] = {}


def default_budget() -> int:
    """Bytes: :data:`MEMORY_FRACTION` of this machine's RAM."""
    import psutil  # a dependency of distributed

    return int(MEMORY_FRACTION * psutil.virtual_memory().total)


def cache_for(dataset: object, budget: int | None) -> RowCache | None:
    """The row cache of ``dataset`` (created on first use, dropped with the dataset object).

    Args:
        budget: bytes; None: :func:`default_budget`; 0: no cache (returns None). A later call
            with another budget changes the budget, not the rows already kept.
    """
    if budget is None:
        budget = default_budget()
    if budget <= 0:
        return None
    key = id(dataset)
    cache = _caches.get(key)
    if cache is None:
        cache = _caches[key] = RowCache(budget)
        # Keyed by id(): the entry must go when the dataset does, before another object gets its id.
        weakref.finalize(dataset, _caches.pop, key, None)
    cache.budget = budget
    return cache


def bind(cache: RowCache | None, transform: object) -> tuple[RowCache | None, str | None]:
    """``(cache, transform_key(transform))`` for a dataset of rows made by ``transform``;
    ``(None, None)`` without a cache or when the transform has no stable name."""
    key = transform_key(transform) if cache is not None else None
    return (cache, key) if key is not None else (None, None)


def transform_key(transform: object) -> str | None:
    """A key that names what ``transform`` computes: its repr, when that spells out the steps
    and their parameters (torchvision's and timm's transforms do); None when the repr carries
    an object address (a step without a repr of its own), which would name nothing stable."""
    text = repr(transform)
    return None if " at 0x" in text else text
