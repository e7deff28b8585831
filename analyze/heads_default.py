"""The default protocol: every head of a ratio grid trained together, every choice made on val.

One ``(H, L*C, K)`` weight tensor (classes first) holds ``H`` heads (``R`` ratios times ``M`` L2
strengths), each with ``L`` learning rates (as DINOv2's ``setup_linear_classifiers`` trains a grid
of linear heads in one pass), plus each head's per-concept ``(γ, β)``. Adam with an L2 penalty on
the weights and a cosine decay to zero; the dense heads (every concept kept) train first and every
other ratio's heads start from them, for the penalties near the dense heads' val choice; every head
keeps its final state, and val is looked at once, at the end, to choose the L2 strength and
learning rate.
Test is never looked at here.

The constants below are measured, not guessed: benchmarks/README.md ("Head trainer") holds the
measurements behind each.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from iis.analyze.activations import keep_counts, keep_mask
from iis.analyze.heads_batching import column_moments, epoch_batches, materialize, stacked_eval_rows
from iis.analyze.heads_model import HeadFit, empty_fit, evaluate

# Optimiser steps per head, however small the train set (the sparsest heads: SPARSE_EPOCH_FACTOR
# times as many): enough for every head to reach its L-BFGS optimum on small planted workloads
# (tests/test_heads_training.py), and more bought nothing at 100k rows (benchmarks/README.md,
# "Head trainer").
STEPS = 1000
BATCH = 256
# ...and at least this many epochs: on a large train set STEPS batches are a fraction of an epoch. On
# one planted spec (planted-100k's) with N_train grown to 400k, the dense heads' val-chosen test top-1
# at 1,000 / 2,000 / 3,000 / 4,000 steps (0.6 / 1.3 / 1.9 / 2.6 epochs) was 64.13 / 64.92 / 64.97 /
# 64.95, while at 100k 4x the steps gained nothing (64.41 / 64.42) and at 25k lost 0.4
# (benchmarks/README.md, "steps_vs_train_size.py"). Below 128k rows (BATCH 256) STEPS rule.
MIN_EPOCHS = 2
# Small train sets get smaller batches, at least this many per epoch (full-batch Adam weights noise
# inputs like signal on a few hundred images).
MIN_BATCHES_PER_EPOCH = 8
# Learning rates. Concept activations are standardised per image, so one base rate serves every
# library (scaled per L2 strength: CONCEPT_LR_FACTORS); raw features vary more between backbones,
# so the standard head's rate is chosen on val from a grid.
CONCEPT_LRS = (1e-2,)
STANDARD_LRS = (1e-3, 3e-3, 1e-2)
# L2 penalty on the weights as scikit-learn's inverse strength C: the loss is mean cross-entropy
# + ||W||^2 / (2 C N_train). Neither the bias nor (γ, β) is penalised, as in the authors' LayerNorm:
# a penalty on γ keeps sparse heads from choosing their concepts (benchmarks/README.md). (With γ
# free, scaling γ up and W down would shrink the penalty at no cost to the fit; the fixed number of
# Adam steps does not walk that far, and the linear part is converged given the learnt selection.)
# Concept heads train one head per C of the grid (warm-started ratios: a window of it,
# WARM_PENALTY_WINDOW) and keep, per ratio, the C best on val: the best C
# differs between ratios and workloads by more than a point of top-1 (benchmarks/README.md, "L2
# strength"). Noisy planted workloads choose from 1e-4 to 1e-2; trained networks on small train sets
# choose 1e-1 and 1 at low sparsity (the weak end, measured on the demo's stores: "The grid's weak
# end"). Half decades from 1e-4 to 1e-2, without 1e-3 (its neighbours stand in for it at no measured
# cost, and its place pays for C = 1), then decades to 1.
CONCEPT_INVERSE_L2 = (1e-4, 3e-4, 3e-3, 1e-2, 1e-1, 1.0)
# A concept head's learning rate is CONCEPT_LRS[0] times a factor of its C: 1 up to C = 3e-3, 3 at
# 1e-2, 10 at 1e-1 and 30 at 1 (log-linear between, flat beyond). A weak penalty's optimum lies far
# from the origin and Adam moves a weight about one learning rate a step, so at the base rate those
# heads stopped short (on the demo's stores, +5.6 points of test top-1 on held-out stores from the
# faster rates); the strong penalties' heads are noise-limited on large noisy train sets, where a
# faster rate loses (benchmarks/README.md, "Learning rate per penalty").
CONCEPT_LR_FACTORS = ((3e-3, 1.0), (1e-2, 3.0), (1e-1, 10.0), (1.0, 30.0))
# The standard head chooses its (C, learning rate) on val: decades from 0.03, each with the rates of
# STANDARD_LRS times a factor of its C (1 at 0.03, 3 from 0.3 on; log-linear between). Noisy planted
# and Gaussian workloads choose 0.03; trained networks' features choose the weak end, where 0.03 alone
# understated the demo's standard heads by 2.7 points of test top-1 on average and up to 11
# (benchmarks/README.md, "Standard head: L2 strength").
STANDARD_INVERSE_L2 = (0.03, 0.3, 3.0)
STANDARD_LR_FACTORS = ((0.03, 1.0), (0.3, 3.0))
# Heads that keep at most this fraction of the concepts train this many times the steps, on their
# own cosine schedule: each concept's weights learn only from the images that keep it.
SPARSE_KEEP_FRACTION = 0.1
SPARSE_EPOCH_FACTOR = 2
# Warm starts along the ratio grid: every ratio's concept head starts from the dense head (every
# concept kept) of its penalty, which trains first, from zeros. From there the heads that are not
# sparse train this fraction of the schedule; the sparse ones keep their longer one. Against every
# head from zeros on its whole schedule: +1.2 points of test top-1 on the demo's stores (mean over
# heads), +0.4 on the workloads (none below), 0.9x the heads' CPU; half the schedule saved more
# but lost up to 0.9 points on planted-100k's dense heads (benchmarks/README.md, "Warm starts along
# the ratio grid").
WARM_STEP_FRACTION = 0.75
# The penalties a warm-started ratio trains: from this many strengths stronger than the dense heads'
# val choice to this many weaker (in CONCEPT_INVERSE_L2's order, cut at its ends). The dense heads
# train every penalty. Scored against the whole grid from every head's recorded val and test top-1
# (31 cases: 9 workload-seeds, the demo's 11 stores x 2 libraries): test top-1 of val's choice +0.01
# points mean on the workloads, -0.04 on the demo stores, for 0.6x the grid's head-steps (the
# sparser heads choose stronger penalties than the dense ones; benchmarks/README.md, "A window of
# penalties").
WARM_PENALTY_WINDOW = (2, 1)
# The same for the sparse heads (keep <= SPARSE_KEEP_FRACTION), which train twice as long and
# choose stronger penalties than the dense heads: three stronger, none weaker. Scored against the
# whole grid from every head's recorded val and test top-1 (13 workload-seeds, three of them held-out
# shapes, and the demo's 11 stores x 2 libraries; 81 sparse heads): val never chose the weaker
# penalty, and a held-out 200-class workload's s = 0.98 head wanted the third stronger one (1.05
# points of test top-1 lost with two). Against two stronger: worst head -1.05 -> -0.65 points on the
# workloads and -2.6 -> -1.8 on the demo's stores, fewer heads below -0.5 on both, for 1.02x /
# 1.13x the grids' head-steps (benchmarks/README.md, "A window of penalties").
SPARSE_PENALTY_WINDOW = (3, 0)
# Penalties stronger than CONCEPT_INVERSE_L2's strongest, open to the sparse heads alone, so that
# their window is not cut at the grid's end where the dense heads choose a strong penalty (noisy
# train sets); a sparse head of such a penalty starts from the strongest dense head. On 11
# workload-seeds val chose one of them for 30 of 41 sparse heads: test top-1 +0.54 points mean
# (s = 0.98: +1.10; worst head -0.9), for up to two more heads a sparse ratio. A third, 3e-6, scored
# below 1e-5 on val everywhere it was tried. The demo's stores, whose dense heads choose weak
# penalties, never reach them (benchmarks/README.md, "The sparse heads' strong end").
SPARSE_STRONG_END = (1e-5, 3e-5)
# Raw features whose overall scale is below this are left unscaled.
STD_FLOOR = 1e-6


def step_factors(keep: torch.Tensor, num_inputs: int, *, warm: bool = False) -> torch.Tensor:
    """Each concept head's multiple of the base schedule, ``(H,)`` float64 from ``keep`` ``(H,)``.

    ``SPARSE_EPOCH_FACTOR`` for heads that keep at most ``SPARSE_KEEP_FRACTION`` of the
    ``num_inputs`` concepts; with ``warm`` (warm starts from the dense heads), ``WARM_STEP_FRACTION``
    for the other heads that drop a concept; else 1.
    """
    sparse = sparse_heads(keep, num_inputs)
    factors = torch.where(sparse, float(SPARSE_EPOCH_FACTOR), 1.0).double()
    if warm:
        factors = torch.where(~sparse & (keep < num_inputs), WARM_STEP_FRACTION, factors)
    return factors


def sparse_heads(keep: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """``(H,)`` bool: the heads that keep at most ``SPARSE_KEEP_FRACTION`` of the ``num_inputs``
    concepts (longer schedules, their own penalty window)."""
    return keep <= SPARSE_KEEP_FRACTION * num_inputs


def concept_penalties() -> tuple[float, ...]:
    """Every L2 strength a ratio's concept heads may train, strongest first: the sparse ratios'
    ``SPARSE_STRONG_END``, then ``CONCEPT_INVERSE_L2`` (the dense heads', and the only ones the other
    ratios train)."""
    return (*SPARSE_STRONG_END, *CONCEPT_INVERSE_L2)


def penalty_window(choice: int, *, sparse: bool = False) -> slice:
    """The penalties (indices into :func:`concept_penalties`) a warm-started ratio trains, given the
    dense heads' val choice ``choice`` (an index into ``CONCEPT_INVERSE_L2``): :data:`WARM_PENALTY_WINDOW`
    around it (a sparse ratio's: :data:`SPARSE_PENALTY_WINDOW`), cut at the grid's ends, which for
    the sparse ratios lie ``SPARSE_STRONG_END`` further."""
    below, above = SPARSE_PENALTY_WINDOW if sparse else WARM_PENALTY_WINDOW
    extra = len(SPARSE_STRONG_END)
    anchor = extra + choice
    lowest = 0 if sparse else extra
    return slice(max(anchor - below, lowest), min(anchor + above, extra + len(CONCEPT_INVERSE_L2) - 1) + 1)


def sparse_grid_share() -> float:
    """A sparse ratio's penalties against another ratio's (the strong end): its heads' share of a
    grid fitted without warm starts."""
    return len(concept_penalties()) / len(CONCEPT_INVERSE_L2)


def warm_penalty_share(*, sparse: bool = False) -> float:
    """The widest :func:`penalty_window`, in heads per dense grid (``len(CONCEPT_INVERSE_L2)``): the
    most of a (sparse) ratio's heads that a warm-started grid trains, against its dense heads."""
    windows = [penalty_window(choice, sparse=sparse) for choice in range(len(CONCEPT_INVERSE_L2))]
    return max(w.stop - w.start for w in windows) / len(CONCEPT_INVERSE_L2)


def concept_lr_factor(inverse_l2: float) -> float:
    """The multiple of ``CONCEPT_LRS[0]`` a concept head of L2 strength ``inverse_l2`` trains at
    (``CONCEPT_LR_FACTORS``, interpolated in log C)."""
    return _lr_factor(inverse_l2, CONCEPT_LR_FACTORS)


def standard_lr_factor(inverse_l2: float) -> float:
    """The multiple of ``STANDARD_LRS`` a standard head of L2 strength ``inverse_l2`` trains at
    (``STANDARD_LR_FACTORS``, interpolated in log C)."""
    return _lr_factor(inverse_l2, STANDARD_LR_FACTORS)


def _lr_factor(inverse_l2: float, table: tuple[tuple[float, float], ...]) -> float:
    strengths, factors = zip(*table)
    return float(np.interp(math.log10(inverse_l2), np.log10(strengths), factors))


@contextmanager
def denormals_flushed() -> Iterator[bool]:
    """Flush subnormal floats to zero on CPU while the heads train; yields whether the CPU can.

    A confident head's softmax holds probabilities below float32's smallest normal number
    (``exp(-88)``), and a matmul fed such subnormals runs several times slower on x86 (the two
    gradient matmuls took 3x the forward one's time; benchmarks/README.md, "subnormals.py").
    Flushed, they become zeros: a change of under 1e-38 in a gradient entry. torch offers no
    getter for the mode, so on leaving it is set back to torch's default, off.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported:
            torch.set_flush_denormal(False)


@dataclass(frozen=True)
class Schedule:
    """How long and in what batches the default protocol trains (resolved from the train size)."""

    steps: int  # optimiser steps of a head (the sparsest train SPARSE_EPOCH_FACTOR times as many)
    batch_size: int

    @classmethod
    def resolve(cls, num_train: int, *, epochs: int | None, batch_size: int | None) -> Schedule:
        """``STEPS`` steps (at least ``MIN_EPOCHS`` epochs), or ``epochs`` whole epochs when given;
        batches of ``BATCH`` rows, fewer on a small train set."""
        batch = batch_size or min(BATCH, max(1, num_train // MIN_BATCHES_PER_EPOCH))
        if epochs is None:
            steps = max(STEPS, math.ceil(MIN_EPOCHS * num_train / batch))
        else:
            steps = epochs * math.ceil(num_train / batch)
        return cls(steps=steps, batch_size=batch)


class Adam:
    """Adam (Kingma & Ba) over stacked heads, with a learning rate that broadcasts over each parameter.

    ``torch.optim.Adam`` takes one rate per parameter group; here every head of the grid lives in
    one tensor, its first axis, and a subset of heads can be updated while the others rest.
    """

    def __init__(self, params: list[torch.Tensor], rates: list[torch.Tensor], l2: list[torch.Tensor | float | None],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.rates, self.l2, self.betas, self.eps = params, rates, l2, betas, eps
        self.first = [torch.zeros_like(p) for p in params]
        self.second = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], scale: torch.Tensor, heads: slice | torch.Tensor) -> None:
        """One update of the heads ``heads`` (first axis) of every parameter.

        ``grads`` are shaped like ``param[heads]``; ``scale`` (broadcasting over ``param[heads]``)
        multiplies the rates: the schedule. A slice updates views in place; an index tensor
        gathers, updates and scatters back.
        """
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, root2 = 1 - beta1**self.steps, math.sqrt(1 - beta2**self.steps)
        # The schedule's factor, signed and bias-corrected once for every parameter.
        step_size = scale * (-root2 / correction1)
        view = isinstance(heads, slice)
        for param, g, first, second, rate, l2 in zip(self.params, grads, self.first, self.second, self.rates, self.l2):
            p, m, v = param[heads], first[heads], second[heads]
            if isinstance(l2, torch.Tensor):  # one strength per head (first axis)
                g = g.addcmul(l2[heads], p)  # the penalty's gradient, inside Adam (L2, not decoupled decay)
            elif l2:
                g = g.add(p, alpha=l2)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            # m̂ / (sqrt(v̂) + eps), with v's bias correction moved onto eps and the step size (a
            # pass fewer over the parameters than dividing v).
            denom = v.sqrt().add_(self.eps * root2)
            p.addcdiv_(m * (rate * step_size), denom)
            if not view:
                param[heads], first[heads], second[heads] = p, m, v


def head_grid_inputs(x: torch.Tensor, scale: torch.Tensor | None, keep: torch.Tensor, *,
                     dense: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``g_s(ã)`` of a batch for a stack of heads.

    Args:
        x: ``(B, K)`` float32 standardised activations.
        scale: ``(H, 2, K)`` each head's ``(γ, β)``, or None (``ã = x`` for every head).
        keep: ``(H,)`` int64 keep counts.
        dense: whether every head keeps every entry, when the caller knows (else read from ``keep``).

    Returns:
        ``inputs (H, B, K)`` (``g_s(ã)``) and ``mask (H, B, K)`` float32 ones and zeros (the kept
        entries), or None when every head keeps every entry (the dense heads, trained on their own).
        Read-only: without ``scale``, dense heads' inputs are ``x`` itself, expanded over ``H``.
    """
    if dense is None:
        dense = bool((keep >= x.shape[-1]).all())
    if scale is None:
        if dense:
            return x.unsqueeze(0).expand(len(keep), -1, -1), None
        mask = keep_mask(x.unsqueeze(0), keep, as_float=True)
        return x * mask, mask
    tilde = torch.addcmul(scale[:, 1:2], scale[:, 0:1], x.unsqueeze(0))
    if dense:
        return tilde, None
    mask = keep_mask(tilde, keep, as_float=True)
    return tilde.mul_(mask), mask


def class_major_logits(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Every head's logits, classes before images: ``(H, L*C, B)``.

    The heads' parameters are held classes-first too (``weight (H, L*C, K)``, ``bias (H, L*C, 1)``),
    so that every product of the trainer has B columns or B as its inner size: a batched matmul
    with a few output columns (C = 10) is 3-5x slower on CPU than its transpose with B columns,
    and Adam's elementwise updates stay on contiguous memory (benchmarks/README.md, "Head trainer").

    Args:
        inputs: ``(H, B, K)``; weight: ``(H, L*C, K)``; bias: ``(H, L*C, 1)``.
    """
    return torch.baddbmm(bias, weight, inputs.transpose(1, 2))


def cross_entropy_grads(inputs: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        num_classes: int, *, input_grad: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of the heads' summed mean softmax cross-entropies.

    The closed form of multinomial logistic regression, ``(softmax - onehot)^T X / B``, skips
    autograd's bookkeeping. Summing the heads' losses keeps each head's gradient its own.

    Args:
        inputs: ``(H, B, K)`` float32, each head's ``g_s(ã)`` of the batch.
        labels: ``(B,)`` int64.
        weight: ``(H, L*C, K)``; bias: ``(H, L*C, 1)`` (classes first: :func:`class_major_logits`).
        input_grad: also return ``d inputs`` (a third matmul as large as the others; only a
            learnt ``(γ, β)`` needs it).

    Returns:
        ``d weight`` ``(H, L*C, K)``, ``d bias`` ``(H, L*C, 1)`` and ``d inputs`` ``(H, B, K)``
        (summed over the ``L`` rates; only used with ``L = 1``), or None without ``input_grad``.
    """
    heads, batch = weight.shape[0], labels.shape[0]
    # (softmax - onehot) / B, in place on the logits: the 1/B rides on the (H, L, 1, B) softmax
    # denominators, and the one-hot is one entry per (head, rate, image), not a dense pass over
    # (H, L*C, B) (the elementwise passes cost as much as a product here; benchmarks/README.md,
    # "Head trainer").
    residual = class_major_logits(inputs, weight, bias).view(heads, -1, num_classes, batch)
    residual.sub_(residual.amax(dim=2, keepdim=True)).exp_()
    residual.div_(residual.sum(dim=2, keepdim=True).mul_(batch))
    residual = residual.view(heads, -1, batch)  # (H, L*C, B)
    offsets, minus = _onehot_terms(batch, residual.shape[1] // num_classes, num_classes, residual.dtype, residual.device)
    targets = (labels.view(1, -1) * batch + offsets).view(-1)  # (L*B,): each (rate block, image)'s label entry
    residual.view(heads, -1).index_add_(1, targets, minus.expand(heads, len(targets)))
    d_inputs = torch.bmm(residual.transpose(1, 2), weight) if input_grad else None
    return torch.bmm(residual, inputs), residual.sum(dim=2, keepdim=True), d_inputs


@functools.lru_cache(maxsize=16)
def _onehot_terms(batch: int, blocks: int, num_classes: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`cross_entropy_grads` adds to a label to find its entry, and the entry's value.

    Returns ``offsets`` ``(L, B)`` int64 (image ``b`` of rate block ``l`` is column ``b`` of
    block ``l``'s ``C x B`` residual: ``b + l * C * B``) and ``-1/B`` as a ``(1, 1)`` tensor.
    Built once per batch shape, as the trainer asks for the same few shapes at every step. Read-only.
    """
    offsets = torch.arange(batch, device=device) + (torch.arange(blocks, device=device) * (num_classes * batch)).view(-1, 1)
    return offsets, torch.full((1, 1), -1.0 / batch, dtype=dtype, device=device)


@dataclass(frozen=True)
class DenseHeads:
    """The dense heads of a warm-started concept grid, trained once (:func:`fit_dense`) so that the
    parts of a split grid share them instead of each training them again.

    ``heads`` holds one head per penalty of ``CONCEPT_INVERSE_L2`` (every concept kept), trained
    from zeros on the whole schedule. The other fields say what they were trained on; a fit that
    is handed them checks each (:meth:`check`), as heads trained on other inputs would silently
    start every other ratio from the wrong place.
    """

    heads: _Heads
    num_classes: int
    learn_scale: bool
    seed: int
    schedule: Schedule
    train_digest: str  # sha256 of the train activations and labels

    def check(self, x_train: torch.Tensor, y_train: torch.Tensor, *, num_classes: int, learn_scale: bool,
              seed: int, schedule: Schedule) -> None:
        """Raise ValueError unless these heads were trained on exactly these inputs and settings."""
        mine = (self.num_classes, self.learn_scale, self.seed, self.schedule)
        theirs = (num_classes, learn_scale, seed, schedule)
        if mine != theirs:
            raise ValueError(f"the dense heads were trained with (classes, learnt scale, seed, schedule) {mine}, "
                             f"this fit asks {theirs}")
        if train_digest(x_train, y_train) != self.train_digest:
            raise ValueError("the dense heads were trained on other train activations than this fit's")


def train_digest(x_train: torch.Tensor, y_train: torch.Tensor) -> str:
    """sha256 of a train split's values, shape and dtype (activations, then labels)."""
    digest = hashlib.sha256()
    for t in (x_train, y_train):
        array = t.contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _concept_trainer(x_train: torch.Tensor, y_train: torch.Tensor, *, num_classes: int, seed: int,
                     schedule: Schedule) -> _Trainer:
    return _Trainer(x_train, y_train, prep=torch.Tensor.float, num_classes=num_classes, standard=False, seed=seed,
                    batch_size=schedule.batch_size, column_rate=_column_rates(CONCEPT_LRS, num_classes))


def _column_rates(rates: Sequence[float], num_classes: int) -> torch.Tensor:
    """``(P*C, 1)`` float32: each column block's base rate, repeated over its classes."""
    return torch.tensor(rates, dtype=torch.float64).float().repeat_interleave(num_classes).view(-1, 1)


def _train_dense(trainer: _Trainer, *, num_inputs: int, num_train: int, steps: int, learn_scale: bool) -> _Heads:
    """One head per penalty of ``CONCEPT_INVERSE_L2``, every concept kept, trained from zeros."""
    num_heads, num_classes = len(CONCEPT_INVERSE_L2), trainer.num_classes
    option_c = torch.tensor(CONCEPT_INVERSE_L2, dtype=torch.float64).view(-1, 1).expand(-1, len(CONCEPT_LRS))
    heads = _Heads.zeros(num_heads, len(CONCEPT_LRS) * num_classes, num_inputs, with_scale=learn_scale)
    l2 = (1.0 / (option_c * num_train)).float().repeat_interleave(num_classes, dim=1)  # kept fraction 1
    factor = torch.tensor([concept_lr_factor(c) for c in CONCEPT_INVERSE_L2], dtype=torch.float64)
    trainer.train(heads, keep=torch.full((num_heads,), num_inputs), l2=l2, head_factor=factor,
                  head_steps=torch.full((num_heads,), steps))
    return heads


def fit_dense(train: tuple[torch.Tensor, torch.Tensor], *, num_classes: int, seed: int, schedule: Schedule,
              learn_scale: bool = True) -> DenseHeads:
    """The dense heads :func:`fit_default` trains first for a warm-started grid, alone.

    Args:
        train: ``(X (N, K) concept activations, y (N,) int64)``, as :func:`fit_default` gets them.

    ``fit_default(..., dense_heads=fit_dense(...))`` on the same train split, seed, schedule and model
    fits the heads it fits without them, bit for bit: every call to the trainer draws its batches
    anew from the seed.
    """
    x_train, y_train = materialize(train[0]).float(), train[1]
    trainer = _concept_trainer(x_train, y_train, num_classes=num_classes, seed=seed, schedule=schedule)
    with denormals_flushed():
        heads = _train_dense(trainer, num_inputs=x_train.shape[1], num_train=x_train.shape[0], steps=schedule.steps,
                             learn_scale=learn_scale)
    return DenseHeads(heads, num_classes, learn_scale, seed, schedule, train_digest(x_train, y_train))


def fit_default(splits: dict[str, tuple[torch.Tensor, torch.Tensor]], *, num_classes: int,
                ratios: list[float] | None, seed: int, schedule: Schedule, learn_scale: bool = True,
                warm_start: bool = True, dense_heads: DenseHeads | None = None) -> HeadFit:
    """Fit the standard head (``ratios`` None) or every ratio's interpretable head.

    Internally ``H = R * M`` concept heads train together (``M`` penalties of
    :func:`concept_penalties` per ratio; the strongest, ``SPARSE_STRONG_END``, only at the sparse
    ratios), each with ``P`` column blocks, its learning rates; the standard head is one head whose
    ``P`` blocks are the pairs of ``STANDARD_INVERSE_L2 x STANDARD_LRS``. Per ratio the (penalty,
    rate) pair best on val among the trained heads is kept.

    With ``warm_start`` the dense heads (every concept kept, as at s = 0; one per penalty of
    ``CONCEPT_INVERSE_L2``) train first, from zeros, and every other ratio's head of the same penalty
    starts from them (of the strong end: from the strongest), on a shorter schedule unless it is
    sparse (:func:`step_factors`); those ratios train only the penalties of :func:`penalty_window`
    around the dense heads' val choice (the sparse ratios their own). The dense heads are trained
    whether or not the grid holds s = 0, so a ratio's head does not depend on which other ratios are
    fitted beside it.

    Args:
        splits: ``train``/``val``/``test`` as ``(X, y)``; train may be :class:`ChunkedRows` for
            the standard head (raw features beyond the memory budget).
        ratios: the grid, or None for the standard head.
        learn_scale: fit each head's per-concept ``(γ, β)`` (METHOD.md's model); False keeps the
            fixed standardisation ``γ = 1, β = 0``.
        warm_start: start the concept heads from the dense ones (for a library whose concepts are
            the same at every ratio); False: every head from zeros on the whole schedule.
        dense_heads: those dense heads, already trained by :func:`fit_dense` on the same train split
            (checked), so that they are not trained again; only with ``warm_start``.
    """
    (x_train, y_train), (x_val, y_val) = splits["train"], splits["val"]
    num_train, num_inputs = x_train.shape
    standard = ratios is None
    if not standard:
        x_train = materialize(x_train).float()  # concept activations are N x K: held
    keep_per_ratio = torch.tensor([num_inputs]) if standard else keep_counts(ratios, num_inputs)
    num_ratios = len(keep_per_ratio)
    # Every head holds P column blocks of C classes (options), each with its own L2 strength and
    # rate: `option_c` and `option_rate`, (H, P) float64, exact for the record. Concept heads differ
    # in their inputs (each (ratio, penalty) keeps its own concepts), so a penalty is a head and the
    # columns are the rates. The standard head's inputs are the same for every option, so its
    # (penalty, rate) pairs are all columns of one head: one matmul with more columns.
    if standard:
        heads_per_ratio = 1
        option_c = torch.tensor([[c for c in STANDARD_INVERSE_L2 for _ in STANDARD_LRS]], dtype=torch.float64)
        column_rate = torch.tensor([lr * standard_lr_factor(c) for c in STANDARD_INVERSE_L2 for lr in STANDARD_LRS],
                                   dtype=torch.float64)
        head_factor = torch.ones(1, dtype=torch.float64)
    else:
        heads_per_ratio = len(concept_penalties())
        column_rate = torch.tensor(CONCEPT_LRS, dtype=torch.float64)
        head_c = torch.tensor(concept_penalties(), dtype=torch.float64).repeat(num_ratios)
        option_c = head_c.view(-1, 1).expand(-1, len(column_rate))
        # Each concept head's own rate (CONCEPT_LR_FACTORS) rides on its schedule factor.
        head_factor = torch.tensor([concept_lr_factor(float(c)) for c in head_c], dtype=torch.float64)
    # Ratio-major order: a ratio's penalties sit together, and the sparsest ratios, which train
    # longest, come last (so the heads still training are a contiguous range: views, not copies).
    keep = keep_per_ratio.repeat_interleave(heads_per_ratio)
    num_heads, num_options = len(keep), len(column_rate)
    option_rate = head_factor.view(-1, 1) * column_rate
    with_scale = learn_scale and not standard

    # Raw features are centred and divided by their overall scale (RMS of the column stds), so one
    # rate grid fits any backbone; one scale for all columns, because dividing a nearly constant
    # column by its own tiny std blows it up. Folded into weight and bias at the end. Train is
    # standardised batch by batch (a standardised copy of N x D was an analysis' largest allocation).
    prep = torch.Tensor.float
    if standard:
        mean, scale = column_moments(x_train)
        inv_scale = 1.0 / scale if scale > STD_FLOOR else 1.0

        def prep(xb: torch.Tensor) -> torch.Tensor:
            return (xb.float() - mean) * inv_scale

        x_val = prep(x_val)

    # A head's penalty scales with the fraction of concepts it keeps: a weight of a head that keeps
    # k of K concepts is used by about k/K of the images, so (k/K) ||W||^2 penalises the logits'
    # expected size as a dense head's ||W||^2 does, and one C grid brackets every ratio's optimum
    # (benchmarks/README.md, "L2 strength").
    kept_fraction = keep.double().view(-1, 1) / num_inputs
    l2_per_column = (kept_fraction / (option_c * num_train)).float().repeat_interleave(num_classes, dim=1)
    if with_scale and num_options != 1:
        raise ValueError("a learnt (γ, β) shares its head's one learning rate")
    heads = _Heads.zeros(num_heads, num_options * num_classes, num_inputs, with_scale=with_scale)
    # Each head's penalty (an index into concept_penalties()) and the dense head of the same one, which
    # a warm start starts it from (the strongest for the sparse ratios' strong end); the strong end
    # is the sparse ratios' alone.
    extra = 0 if standard else len(SPARSE_STRONG_END)
    penalty = torch.arange(num_heads) % heads_per_ratio
    dense_penalty = (penalty - extra).clamp(min=0)
    sparse = sparse_heads(keep, num_inputs)
    # The heads that train: heads outside a warm ratio's penalty window do not, nor a strong-end
    # head of a ratio that is not sparse.
    trained = sparse | (penalty >= extra)
    if standard:
        trainer = _Trainer(x_train, y_train, prep=prep, num_classes=num_classes, standard=True, seed=seed,
                           batch_size=schedule.batch_size, column_rate=_column_rates(column_rate.tolist(), num_classes))
    else:
        trainer = _concept_trainer(x_train, y_train, num_classes=num_classes, seed=seed, schedule=schedule)
    dense = keep == num_inputs
    dense_trained = dense & trained
    warm = warm_start and not standard and not bool(dense.all())
    factors = step_factors(keep, num_inputs, warm=warm)  # 1 for the standard head (one dense head, not warm)
    head_steps = (schedule.steps * factors).round().clamp(min=1).to(torch.int64)
    if dense_heads is not None:
        if standard or not warm_start:
            raise ValueError("dense heads were given to a fit that does not start from them "
                             "(the standard head, or warm_start=False)")
        dense_heads.check(x_train, y_train, num_classes=num_classes, learn_scale=with_scale, seed=seed, schedule=schedule)

    def train_at(index: torch.Tensor, start: _Heads) -> None:
        """Train the heads at ``index`` (first axis) from ``start`` and put them in place."""
        trainer.train(start, keep=keep[index], l2=l2_per_column[index], head_factor=head_factor[index],
                      head_steps=head_steps[index])
        heads.scatter(index, start)

    with denormals_flushed():
        if warm:
            # The dense heads first (one per penalty of CONCEPT_INVERSE_L2; the grid's own s = 0 heads
            # where it has them), then every other ratio's heads of the penalties in the window, each
            # from the dense head of its penalty. (`anchor` is only read below: `take` copies.)
            anchor = dense_heads.heads if dense_heads is not None else _train_dense(
                trainer, num_inputs=num_inputs, num_train=num_train, steps=schedule.steps, learn_scale=with_scale)
            # The other ratios train only the penalties near the dense heads' val choice.
            anchor_val = _val_top1(anchor.weight, anchor.bias, anchor.affine,
                                   torch.full((len(CONCEPT_INVERSE_L2),), num_inputs), prep_val=x_val, y_val=y_val,
                                   num_classes=num_classes, standard=False)
            choice = int(anchor_val.max(dim=1).values.argmax())
            trained = dense_trained.clone()
            for kind, window in ((~sparse, penalty_window(choice)), (sparse, penalty_window(choice, sparse=True))):
                trained |= kind & (penalty >= window.start) & (penalty < window.stop)
            rest = torch.nonzero(trained & ~dense).view(-1)
            train_at(rest, anchor.take(dense_penalty[rest]))
            heads.scatter(torch.nonzero(dense_trained).view(-1), anchor.take(dense_penalty[dense_trained]))
        elif dense_heads is not None:  # every ratio keeps every concept: its heads are the dense heads
            heads.scatter(torch.nonzero(trained).view(-1), dense_heads.heads.take(dense_penalty[trained]))
        else:  # from zeros, every head but the strong end of the ratios that are not sparse
            index = torch.nonzero(trained).view(-1)
            train_at(index, heads.take(index))
    weight, bias, affine = heads.weight, heads.bias, heads.affine

    # Val is evaluated once, on the final states, to choose each ratio's (penalty, learning rate)
    # (ties: the first in the grids, i.e. the stronger penalty, the smaller rate). With the L2
    # penalty and the cosine decay to zero the final state is near the regularised optimum; picking
    # the best of many val checks along training on a small val set would pick its noise.
    val_top1 = _val_top1(weight, bias, affine, keep, prep_val=x_val, y_val=y_val, num_classes=num_classes,
                         standard=standard)
    val_top1[~trained] = -1.0  # heads outside a warm ratio's penalty window: never trained, never chosen
    chosen = val_top1.view(num_ratios, heads_per_ratio * num_options).argmax(dim=1)
    head = torch.arange(num_ratios) * heads_per_ratio + chosen // num_options
    option = chosen % num_options
    final_weight = weight.view(num_heads, num_options, num_classes, num_inputs)[head, option].transpose(1, 2).contiguous()
    final_bias = bias.view(num_heads, num_options, num_classes)[head, option]
    if standard:
        final_weight = final_weight * inv_scale
        final_bias = final_bias - mean @ final_weight[0]
    steps_per_epoch = math.ceil(num_train / schedule.batch_size)
    fit = empty_fit(ratios, final_weight, final_bias, None if affine is None else affine[head],
                    ((head_steps[head] - 1) // steps_per_epoch).numpy().astype(np.int64), "default")
    fit.inverse_l2 = option_c[head, option].numpy()
    fit.learning_rate = option_rate[head, option].numpy()
    evaluate(fit, splits["val"], splits["test"])
    return fit


@dataclass
class _Heads:
    """A stack of heads being trained: ``weight (H, P*C, K)`` and ``bias (H, P*C, 1)`` classes first
    (:func:`class_major_logits`), ``affine (H, 2, K)`` each head's ``(γ, β)`` or None."""

    weight: torch.Tensor
    bias: torch.Tensor
    affine: torch.Tensor | None

    @classmethod
    def zeros(cls, num_heads: int, columns: int, num_inputs: int, *, with_scale: bool) -> _Heads:
        affine = None
        if with_scale:
            affine = torch.stack([torch.ones(num_heads, num_inputs), torch.zeros(num_heads, num_inputs)], dim=1)
        return cls(torch.zeros(num_heads, columns, num_inputs), torch.zeros(num_heads, columns, 1), affine)

    def params(self) -> list[torch.Tensor]:
        return [self.weight, self.bias] if self.affine is None else [self.weight, self.bias, self.affine]

    def take(self, index: torch.Tensor) -> _Heads:
        """The heads at ``index`` (first axis), as new tensors."""
        return _Heads(*(None if p is None else p[index] for p in (self.weight, self.bias, self.affine)))

    def scatter(self, index: torch.Tensor, heads: _Heads) -> None:
        """Set the heads at ``index`` (first axis) to ``heads``."""
        for mine, theirs in zip(self.params(), heads.params()):
            mine[index] = theirs


class _Trainer:
    """Adam with an L2 penalty and a cosine decay to zero, over stacks of heads fed the same batches.

    Every call to :meth:`train` draws its batches anew from ``seed``, so a head's training depends
    on its own start, penalty and schedule only, not on the heads trained beside it.
    """

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, *, prep: Callable[[torch.Tensor], torch.Tensor],
                 num_classes: int, standard: bool, seed: int, batch_size: int, column_rate: torch.Tensor) -> None:
        self.x_train, self.y_train, self.prep = x_train, y_train, prep
        self.num_classes, self.standard, self.seed, self.batch_size = num_classes, standard, seed, batch_size
        self.column_rate = column_rate  # (P*C, 1): each column block's base rate

    def train(self, heads: _Heads, *, keep: torch.Tensor, l2: torch.Tensor, head_factor: torch.Tensor,
              head_steps: torch.Tensor) -> None:
        """Train ``heads`` in place.

        Args:
            keep: ``(H,)`` int64 each head's ``k(s)``.
            l2: ``(H, P*C)`` float32, each column's L2 coefficient (penalty ``l2 * ||W||^2 / 2``).
            head_factor: ``(H,)`` float64, each head's multiple of its columns' rates.
            head_steps: ``(H,)`` int64, each head's schedule; heads leave as theirs end, so the
                longest come last (a contiguous range keeps training: views, not copies).
        """
        num_heads, num_classes = len(keep), self.num_classes
        weight, bias, affine = heads.weight, heads.bias, heads.affine
        rates = [self.column_rate, self.column_rate] + ([] if affine is None else [self.column_rate[0]])
        optimizer = Adam(heads.params(), rates, [l2.unsqueeze(-1), None, None][: len(rates)])
        # Every head's cosine factor at every step, (steps, H, 1, 1): one lookup a step.
        progress = (torch.arange(int(head_steps.max())).double().view(-1, 1) / head_steps.double()).clamp(max=1.0)
        cosine = (0.5 * (1.0 + torch.cos(math.pi * progress))).float().view(-1, num_heads, 1, 1)
        cosine *= head_factor.float().view(1, num_heads, 1, 1)
        generator = torch.Generator().manual_seed(self.seed)
        active = torch.arange(num_heads)
        index, active_keep, leave_at = _as_slice(active), keep, set(head_steps.tolist())
        num_inputs = self.x_train.shape[1]
        dense = bool((keep >= num_inputs).all())  # whether every active head keeps every entry
        step = 0
        while len(active):
            for xb, yb in epoch_batches(self.x_train, self.y_train, batch_size=self.batch_size, generator=generator):
                xb = self.prep(xb)
                if self.standard:
                    inputs, mask = xb.unsqueeze(0), None
                else:
                    inputs, mask = head_grid_inputs(xb, None if affine is None else affine[index], active_keep,
                                                    dense=dense)
                d_weight, d_bias, d_inputs = cross_entropy_grads(inputs, yb, weight[index], bias[index], num_classes,
                                                                 input_grad=affine is not None)
                grads = [d_weight, d_bias]
                if affine is not None:
                    d_tilde = d_inputs if mask is None else d_inputs.mul_(mask)
                    d_shift = d_tilde.sum(dim=1)
                    grads.append(torch.stack([d_tilde.mul_(xb).sum(dim=1), d_shift], dim=1))
                optimizer.step(grads, cosine[step, index], index)
                step += 1
                if step in leave_at:  # heads whose schedule ended leave
                    active = active[head_steps[active] > step]
                    if len(active) == 0:
                        break
                    index, active_keep = _as_slice(active), keep[active]
                    dense = bool((active_keep >= num_inputs).all())


@torch.no_grad()
def _val_top1(weight: torch.Tensor, bias: torch.Tensor, affine: torch.Tensor | None, keep: torch.Tensor, *,
              prep_val: torch.Tensor, y_val: torch.Tensor, num_classes: int, standard: bool) -> torch.Tensor:
    """Val top-1 of every (head, learning rate): ``(H, L)`` float64, ``H = R * M`` heads."""
    num_heads = weight.shape[0]
    correct = torch.zeros(num_heads, weight.shape[1] // num_classes, dtype=torch.float64)
    rows = stacked_eval_rows(num_heads, weight.shape[2])
    for start in range(0, prep_val.shape[0], rows):
        xb = prep_val[start : start + rows]
        inputs = xb.unsqueeze(0) if standard else head_grid_inputs(xb, affine, keep)[0]
        logits = class_major_logits(inputs, weight, bias).view(num_heads, -1, num_classes, xb.shape[0])
        correct += (logits.argmax(dim=2) == y_val[start : start + rows]).sum(dim=-1)
    return correct / prep_val.shape[0]


def _as_slice(heads: torch.Tensor) -> slice | torch.Tensor:
    """``heads`` (sorted indices) as a slice when they are a contiguous range, so that selecting
    them gives views: the usual case, as the sparsest heads, which train longest, come last."""
    first, last = int(heads[0]), int(heads[-1])
    return slice(first, last + 1) if last - first + 1 == len(heads) else heads
