"""One trainer for the standard head ``h`` and the interpretable heads ``g`` (METHOD.md).

Both heads are multinomial logistic regression fitted by the same code, so their accuracies differ
only in what they see: raw features ``z`` for ``h``; for ``g``, the per-image standardised concept
activations with a learnt per-concept scale and shift, sparsified (``heads_model.py`` states the model).

Two protocols:

- ``"default"`` (``heads_default.py``): the dense heads train first, then every other ratio's
  heads together, started from them, each to the end of a fixed schedule; every choice is made on
  **val**; test is evaluated once.
- ``"reference"`` (``heads_reference.py``): the IIS authors' protocol, for comparison only. It
  selects on **test**.

Everything here runs on CPU float32 under the caller's thread settings, and is deterministic given
``seed``. Batching (in memory or streamed from a store) lives in ``heads_batching.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from iis.analyze.allocator import reuse_freed_memory
from iis.analyze.heads_batching import ChunkedRows, is_chunked, row_blocks
from iis.analyze.heads_default import DenseHeads, Schedule, fit_default, fit_dense
from iis.analyze.heads_model import HeadFit
from iis.analyze.heads_reference import BATCH as REFERENCE_BATCH
from iis.analyze.heads_reference import EPOCHS as REFERENCE_EPOCHS
from iis.analyze.heads_reference import fit_reference

from iis.store_format import check_labels

__all__ = ["PROTOCOLS", "ChunkedRows", "DenseHeads", "HeadFit", "fit_dense_heads", "fit_heads"]

logger = logging.getLogger(__name__)

# "fixed-scale": the default trainer with METHOD.md's per-concept (γ, β) held at (1, 0), the fixed
# standardisation, kept so that the two models can be compared (its rows are keyed apart).
PROTOCOLS = ("default", "fixed-scale", "reference")

Split = tuple[torch.Tensor, torch.Tensor]


def fit_heads(
    *,
    train: Split,
    val: Split,
    test: Split,
    num_classes: int,
    ratios: Sequence[float] | None,
    seed: int,
    protocol: str = "default",
    max_epochs: int | None = None,
    batch_size: int | None = None,
    warm_start: bool = True,
    dense_heads: DenseHeads | None = None,
) -> HeadFit:
    """Fit the standard head (``ratios=None``) or one interpretable head per sparsity ratio.

    Args:
        train, val, test: ``(X, y)`` with ``X (N, K)`` float (concept activations standardised
            per image, or raw features for the standard head) and ``y (N,)`` int64 in
            ``[0, num_classes)``. Train's ``X`` may be :class:`ChunkedRows` for the standard head.
        num_classes: ``C``.
        ratios: sparsity ratios in ``[0, 1)``, or None for the standard head (no ``g_s``).
        seed: seeds initialisation and shuffling (a private ``torch.Generator``).
        protocol: ``"default"``; ``"fixed-scale"`` (the same trainer with the per-concept
            ``(γ, β)`` fixed at ``(1, 0)``, for comparison); or ``"reference"`` (the authors'
            protocol, which selects on **test**; for comparison only).
        max_epochs: override of the protocol's epoch count (tests use it for speed).
        batch_size: override of the protocol's batch size.
        warm_start: in the default protocols, start every ratio's heads from the dense heads
            (``heads_default.fit_default``); False for a library whose concepts differ between
            ratios (one library per ratio). The reference protocol trains each ratio from scratch.
        dense_heads: the dense heads a warm-started grid starts from, trained beforehand by
            :func:`fit_dense_heads` on the same train split, seed and protocol (checked), so that
            several fits of parts of one grid share them. The heads come out as without them.

    Returns:
        A :class:`HeadFit` with ``R = len(ratios)`` heads (1 for the standard head).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if ratios is not None and len(ratios) == 0:
        raise ValueError("ratios must be None (standard head) or a non-empty sequence")
    if ratios is not None and len({float(r) for r in ratios}) != len(ratios):
        # The tables key a head by its ratio: a repeated one would be fitted twice, then one dropped.
        raise ValueError(f"ratios must not repeat, got {list(ratios)}")
    if dense_heads is not None and protocol == "reference":
        raise ValueError("the reference protocol trains every ratio from scratch: it takes no dense heads")
    splits = {name: _check_split(name, split, num_classes) for name, split in
              (("train", train), ("val", val), ("test", test))}
    widths = {split[0].shape[1] for split in splits.values()}
    if len(widths) != 1:
        raise ValueError(f"train, val and test have different widths: {sorted(widths)}")
    ratio_list = None if ratios is None else [float(r) for r in ratios]
    # The trainers allocate the same MB-sized buffers at every step: have glibc reuse them in any
    # process that fits heads (a notebook, a benchmark), not only in the analysis' Dask tasks.
    # Process-wide and set once (allocator.py): freed memory up to 64 MiB is kept for reuse.
    reuse_freed_memory()
    start = time.perf_counter()
    if protocol == "reference":
        fit = fit_reference(splits, num_classes=num_classes, ratios=ratio_list, seed=seed,
                            epochs=max_epochs or REFERENCE_EPOCHS, batch_size=batch_size or REFERENCE_BATCH)
    else:
        schedule = Schedule.resolve(splits["train"][0].shape[0], epochs=max_epochs, batch_size=batch_size)
        fit = fit_default(splits, num_classes=num_classes, ratios=ratio_list, seed=seed, schedule=schedule,
                          learn_scale=protocol == "default", warm_start=warm_start, dense_heads=dense_heads)
        fit.protocol = protocol
    fit.fit_seconds = time.perf_counter() - start
    logger.info("fitted %d head(s) (%s protocol) in %.2fs; test top-1 %s", fit.num_heads, protocol,
                fit.fit_seconds, np.round(fit.test_top1, 4).tolist())
    return fit


def fit_dense_heads(*, train: Split, num_classes: int, seed: int, protocol: str = "default",
                    max_epochs: int | None = None, batch_size: int | None = None) -> DenseHeads:
    """Train the dense heads of a warm-started concept grid alone (one per L2 strength, every
    concept kept), for :func:`fit_heads` (``dense_heads=``) to start from.

    A grid split over several tasks trains them once this way instead of once per part; each part's
    heads come out bit for bit as the whole grid's.

    Args:
        train: ``(X (N, K), y (N,))`` concept activations and labels, as given to :func:`fit_heads`.
        protocol: ``"default"`` or ``"fixed-scale"`` (the reference protocol has no dense heads).
    """
    if protocol not in ("default", "fixed-scale"):
        raise ValueError(f"protocol {protocol!r} has no dense heads to share; use 'default' or 'fixed-scale'")
    x, y = _check_split("train", train, num_classes)
    reuse_freed_memory()
    schedule = Schedule.resolve(x.shape[0], epochs=max_epochs, batch_size=batch_size)
    start = time.perf_counter()
    dense = fit_dense((x, y), num_classes=num_classes, seed=seed, schedule=schedule,
                      learn_scale=protocol == "default")
    logger.info("fitted %d dense head(s) (%s protocol) in %.2fs", len(dense.heads.weight), protocol,
                time.perf_counter() - start)
    return dense


def _check_split(name: str, split: Split, num_classes: int) -> Split:
    x, y = split
    if is_chunked(x):
        if name != "train" or tuple(x.shape)[0] != y.shape[0]:
            raise ValueError(f"{name}: only train may be chunked, with one label per row")
        return x, _check_labels(name, y, num_classes)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: expected X (N, K) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} split is empty")
    # A non-finite input makes every head's numbers meaningless (NaN logits argmax to class 0).
    bad_rows = _non_finite_rows(x)
    if bad_rows:
        raise ValueError(f"{name}: {bad_rows} row(s) hold non-finite values")
    y = _check_labels(name, y, num_classes)
    # Train may stay float16 (raw features of a float16 store: half the memory); batches are
    # converted as they are drawn. Val and test are small and become float32 here.
    if name == "train" and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return x.contiguous(), y
    return x.float().contiguous(), y


def _non_finite_rows(x: torch.Tensor) -> int:
    """How many rows of ``x`` ``(N, K)`` hold a NaN or an infinity.

    A block of rows at a time: ``torch.isfinite`` over a whole 1M x 512 float32 split made
    temporaries of 1.7x its size (3.4 GB) and took 5 s (benchmarks/README.md, "analyze_scaling.py").
    A block whose sum is finite has only finite entries (NaN and inf propagate through a sum), and
    a sum is about 10x faster than ``isfinite`` on CPU; a block whose sum is not (a non-finite entry,
    or an overflow of finite ones) is checked entry by entry.
    """
    bad = 0
    for block in row_blocks(x):
        if not bool(torch.isfinite(block.sum(dtype=torch.float32))):
            bad += int((~torch.isfinite(block)).any(dim=1).sum())
    return bad


def _check_labels(name: str, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``y`` as int64 class indices in ``[0, num_classes)`` (the store's check: whole numbers only)."""
    return torch.from_numpy(check_labels(torch.as_tensor(y).cpu().numpy(), num_classes, where=name))
