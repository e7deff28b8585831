"""How the head trainer walks its data: in memory or a chunk at a time, in shuffled batches.

Train rows come either as a tensor or as :class:`ChunkedRows` (read from a feature store a chunk
at a time, for raw features beyond the memory budget); val and test are always tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

# Rows per block when a whole split is walked (evaluation, moments), to bound the temporaries.
EVAL_CHUNK = 4096
# Entries of a stack of heads' (H, rows, K) inputs per block when many heads are evaluated at once
# (32 MB in float32): at 4,096 rows, 48 heads of K 200 made 1.3 GB of temporaries, and K 2,000
# would make ten times as much (benchmarks/README.md, "analyze_scaling.py").
EVAL_STACK_ENTRIES = 1 << 23


def stacked_eval_rows(num_heads: int, num_inputs: int) -> int:
    """Rows per block for evaluating ``num_heads`` heads of ``num_inputs`` inputs together: at most
    ``EVAL_CHUNK``, fewer so that a block's ``(H, rows, K)`` tensors hold ``EVAL_STACK_ENTRIES``."""
    return max(1, min(EVAL_CHUNK, EVAL_STACK_ENTRIES // max(1, num_heads * num_inputs)))


class ChunkedRows(Protocol):
    """Train rows read a chunk at a time (e.g. straight from a feature store), never held whole.

    ``shape`` is ``(N, K)``; ``chunk(i)`` returns chunk ``i``'s rows as ``(b_i, K)`` float32 and
    the index of its first row in the split (rows ``start .. start + b_i`` of the labels).
    """

    shape: tuple[int, int]
    num_chunks: int

    def chunk(self, index: int) -> tuple[torch.Tensor, int]: ...


def is_chunked(x: object) -> bool:
    return hasattr(x, "chunk") and hasattr(x, "num_chunks")


def materialize(x: torch.Tensor | ChunkedRows) -> torch.Tensor:
    """The whole of ``x`` as one tensor ``(N, K)``."""
    return torch.cat([x.chunk(i)[0] for i in range(x.num_chunks)]) if is_chunked(x) else x


def row_blocks(x: torch.Tensor | ChunkedRows) -> Iterator[torch.Tensor]:
    """The rows of ``x`` in order, a block at a time."""
    if is_chunked(x):
        for i in range(x.num_chunks):
            yield x.chunk(i)[0]
    else:
        for start in range(0, x.shape[0], EVAL_CHUNK):
            yield x[start : start + EVAL_CHUNK]


def epoch_batches(x: torch.Tensor | ChunkedRows, y: torch.Tensor, *, batch_size: int,
                  generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled ``(x_batch, y_batch)``; ``ceil(N / batch_size)`` batches.

    In memory: a permutation of all rows. Chunked: chunks in random order, rows shuffled within
    each chunk, leftovers carried into the next chunk's batches, so only a chunk or two is held
    (the usual out-of-core compromise).
    """
    if not is_chunked(x):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
        return
    carry_x, carry_y = x.chunk(0)[0][:0], y[:0]
    for i in torch.randperm(x.num_chunks, generator=generator).tolist():
        rows, start = x.chunk(i)
        perm = torch.randperm(rows.shape[0], generator=generator)
        pool_x = torch.cat([carry_x, rows[perm]])
        pool_y = torch.cat([carry_y, y[start : start + rows.shape[0]][perm]])
        full = pool_x.shape[0] - pool_x.shape[0] % batch_size
        for b in range(0, full, batch_size):
            yield pool_x[b : b + batch_size], pool_y[b : b + batch_size]
        carry_x, carry_y = pool_x[full:], pool_y[full:]
    if carry_x.shape[0]:
        yield carry_x, carry_y


def column_moments(x: torch.Tensor | ChunkedRows) -> tuple[torch.Tensor, float]:
    """Column means ``(K,)`` float32 and the RMS of the column stds, accumulated in float64 by blocks."""
    n = x.shape[0]
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for block in row_blocks(x):
        block = block.double()
        total += block.sum(dim=0)
        squares += block.square().sum(dim=0)
    mean = total / n
    var = (squares / n - mean.square()).clamp_min(0.0) * (n / max(n - 1, 1))
    return mean.float(), float(var.mean().sqrt())
