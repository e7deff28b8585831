"""Concept activations and per-image sparsification (METHOD.md, "Concept activations").

Pure tensor functions: no I/O, no global state. Every routine works on CPU float32 tensors
and is deterministic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

# Guards the per-image standardisation against a constant activation vector.
_STD_EPS = 1e-6
# Rows ranked at once by magnitude_ranks.
_RANK_CHUNK = 16384
# keep_mask caches its threshold indices for at most this many (head, row) pairs a call (a trainer's
# batch: 48 heads x 256 rows is 12,288), 32 shapes: at most 16 MB held.
_CACHED_INDEX_ENTRIES = 2**15


def keep_count(ratio: float, num_concepts: int) -> int:
    """Number of entries ``k(s) = K - floor(s * K)`` that ``g_s`` keeps.

    ``ratio`` must lie in ``[0, 1)``; the result is always at least 1 for such a ratio.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"sparsity ratio must lie in [0, 1), got {ratio}")
    # A tiny tolerance stops 0.3 * 10 = 2.9999999999999996 from flooring to 2. It must not drop
    # every entry: s < 1 means s * K < K, so at most K - 1 are dropped (0.9999999999 * 10 would
    # otherwise round up to 10 and keep none).
    dropped = min(math.floor(ratio * num_concepts + 1e-9), num_concepts - 1)
    return num_concepts - dropped


def keep_counts(ratios: Sequence[float], num_concepts: int) -> torch.Tensor:
    """``k(s)`` for every ratio of a grid: ``(R,)`` int64."""
    return torch.tensor([keep_count(r, num_concepts) for r in ratios], dtype=torch.int64)


def normalize_concepts(concepts: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row of a concept matrix ``(K, D)``; zero rows stay zero."""
    return torch.nn.functional.normalize(concepts.float(), dim=1)


def standardize_per_image(raw: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance across the ``K`` entries of each row: ``(N, K) -> (N, K)``."""
    mean = raw.mean(dim=1, keepdim=True)
    std = raw.std(dim=1, unbiased=False, keepdim=True)
    return (raw - mean) / std.clamp_min(_STD_EPS)


def concept_activations(features: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """``a = standardize(z · Ĉᵀ)``.

    Args:
        features: ``(N, D)`` backbone features ``z``, not normalised; any float dtype.
        concepts: ``(K, D)`` concept vectors; normalised here, so callers need not.

    Returns:
        ``(N, K)`` float32 activations, standardised per image.
    """
    raw = features.float() @ normalize_concepts(concepts).T
    return standardize_per_image(raw)


def magnitude_ranks(activations: torch.Tensor) -> torch.Tensor:
    """Rank of every entry by magnitude within its row: 0 is the largest ``|a|``.

    Ties break by lower index (a stable sort), as METHOD.md requires.

    Args:
        activations: ``(N, K)`` float tensor.

    Returns:
        ``(N, K)`` int16 when ``K`` fits, else int32. ``ranks < k`` selects the kept entries.
    """
    n, k = activations.shape
    dtype = torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32
    ranks = torch.empty((n, k), dtype=dtype)
    positions = torch.arange(k, dtype=dtype)
    # Row chunks: a sort holds values and int64 indices of its input, several times the
    # activations' size for a whole split (measured at 1M rows); only the ranks need to stay.
    for start in range(0, n, _RANK_CHUNK):
        rows = activations[start : start + _RANK_CHUNK]
        order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
        ranks[start : start + _RANK_CHUNK].scatter_(1, order, positions.expand(rows.shape[0], k))
    return ranks


def keep_mask(values: torch.Tensor, keep: int | torch.Tensor, *, as_float: bool = False) -> torch.Tensor:
    """Which entries ``g_s`` keeps: the ``keep`` largest magnitudes of each row, ties to the lower index.

    Equal to ``magnitude_ranks(values) < keep``, without ranking every entry: one sort gives each
    row's ``keep``-th largest magnitude, entries above it are kept, and the tied ones at it are
    taken in index order until the row holds exactly ``keep`` (the sorted rows tell whether any
    row has such a tie). Heads that keep every entry are not sorted. On CPU the sort is numpy's, which
    is about 30x faster than ``torch.sort`` for rows this short (benchmarks/README.md, "Head
    trainer"); on other devices (fine-tuning on CUDA) it is torch's, where the values are.

    Args:
        values: ``(N, K)``, or ``(H, N, K)`` for a stack of heads (``H = 1`` shared by all heads);
            any float dtype, any device.
        keep: an int, or ``(H,)`` int64: each head's ``k(s)``, in ``[1, K]``.
        as_float: return float32 ones and zeros instead of bools. A trainer multiplies by the
            mask: on CPU, a comparison into a bool tensor and a float-by-bool product each cost
            5-10x their float counterparts (benchmarks/README.md, "Head trainer").

    Returns:
        bool (or float32) of the broadcast shape: ``(N, K)``, or ``(H, N, K)``.
    """
    flat = values.dim() == 2
    stacked = values.unsqueeze(0) if flat else values
    counts = torch.as_tensor(keep, dtype=torch.int64).reshape(-1).clamp(1, stacked.shape[-1])
    heads, rows, width = max(stacked.shape[0], counts.shape[0]), stacked.shape[1], stacked.shape[2]
    magnitude = stacked.detach().abs()
    counts = counts.expand(heads)
    # Heads that keep every entry need no sort; their threshold is 0, which every |value| reaches.
    partial = torch.nonzero(counts < width).view(-1)
    # Thresholds in the values' own dtype and device: a float64 k-th magnitude rounded to float32
    # could land above itself and drop out.
    threshold = torch.zeros(heads, rows, 1, dtype=magnitude.dtype, device=magnitude.device)
    tied = False
    if len(partial):
        shared = magnitude.shape[0] == 1
        first, last = int(partial[0]), int(partial[-1])
        # The usual case is a range of heads (the dense heads come first in a trainer's grid): views.
        heads_at = slice(first, last + 1) if last - first + 1 == len(partial) else partial
        positions = width - counts[partial]  # (P,) each head's threshold position in its sorted rows
        if magnitude.device.type == "cpu" and magnitude.dtype in (torch.float32, torch.float64):
            rows_of = heads_at if isinstance(heads_at, slice) else heads_at.numpy()
            chosen = magnitude.numpy()[:1] if shared else magnitude.numpy()[rows_of]
            ascending = np.sort(chosen, axis=-1).reshape(-1)  # a sorted copy, flat
            # One flat gather for every (head, row)'s threshold (cheaper than take_along_axis,
            # which builds broadcast index grids).
            # Cached for a trainer's small batches only: a split-sized evaluation would keep MBs per entry.
            threshold_index = _threshold_index if len(partial) * rows <= _CACHED_INDEX_ENTRIES else _threshold_index.__wrapped__
            index, index_below = threshold_index(tuple(positions.tolist()), rows, width, shared)
            at, below = torch.from_numpy(ascending[index]), torch.from_numpy(ascending[index_below])
        else:  # CUDA, or a dtype numpy lacks: torch's sort where the values are
            ascending = torch.sort(magnitude[:1] if shared else magnitude[heads_at], dim=-1).values
            ascending = ascending.expand(len(partial), rows, width)
            index = positions.to(magnitude.device).view(-1, 1, 1).expand(len(partial), rows, 1)
            at, below = torch.gather(ascending, -1, index)[..., 0], torch.gather(ascending, -1, index - 1)[..., 0]
        # An entry below the threshold position equal to the threshold would be kept too: a tie.
        tied = bool((below == at).any())
        threshold[heads_at] = at.unsqueeze(-1)
    if tied:
        # Some row has several entries tied at its threshold: keep those above it, then the tied
        # ones in index order until the row holds exactly k(s).
        above = magnitude > threshold
        at_threshold = magnitude == threshold
        missing = counts.to(magnitude.device).view(-1, 1, 1) - above.sum(dim=-1, keepdim=True)
        mask = above | (at_threshold & (at_threshold.cumsum(dim=-1) <= missing))
        mask = mask.float() if as_float else mask
    elif as_float and magnitude.shape[0] == heads and magnitude.dtype == torch.float32:
        # In place over the magnitudes (abs made them a copy of our own, not needed after): the
        # float32 ones and zeros without a new (H, N, K) buffer.
        mask = magnitude.ge_(threshold)
    elif as_float:
        mask = torch.ge(magnitude, threshold, out=torch.empty(heads, rows, width, device=magnitude.device))
    else:
        mask = magnitude >= threshold
    return mask[0] if flat and heads == 1 else mask


@functools.lru_cache(maxsize=32)
def _threshold_index(positions: tuple[int, ...], rows: int, width: int, shared: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into ``keep_mask``'s sorted ``(P or 1, rows, width)`` magnitudes of every (head,
    row)'s threshold entry and of the entry below it: two ``(P, rows)`` int64 arrays, read-only.
    Cached: a trainer asks for the same few (keep counts, batch) shapes at every step."""
    row_starts = np.arange(rows) * width
    head_starts = 0 if shared else (np.arange(len(positions)) * rows * width)[:, None]
    index = head_starts + row_starts[None, :] + np.asarray(positions, dtype=np.int64)[:, None]
    below = index - 1
    index.setflags(write=False)
    below.setflags(write=False)
    return index, below


def sparsify(activations: torch.Tensor, ratio: float) -> torch.Tensor:
    """``g_s(a)``: keep the ``k(s)`` largest-magnitude entries of each row, zero the rest.

    Args:
        activations: ``(N, K)`` float tensor.
        ratio: sparsity ratio ``s`` in ``[0, 1)``.

    Returns:
        ``(N, K)`` tensor of the same dtype, with exactly ``k(s)`` entries kept per row.
    """
    return activations * keep_mask(activations, keep_count(ratio, activations.shape[1]))
