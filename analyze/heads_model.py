"""The fitted heads: what :func:`iis.analyze.heads.fit_heads` returns, and how it computes logits.

The interpretable head of METHOD.md ("Concept activations and sparsification", steps 2-5), per
sparsity ratio ``s``::

    x  = standardize_per_image(a)            (done by the library: the caller's input)
    ã  = γ ⊙ x + β                           learnable per-concept scale and shift (K each)
    g_s(ã): keep the k(s) entries of largest |ã| (ties: lower index), zero the rest
    logits = g_s(ã) W + b                    W (K, C), b (C,)

``γ, β`` are fitted jointly with ``W, b``. Without them (``input_scale`` None: the fixed
standardisation, an option kept for comparison) ``ã = x``. A concept's contribution to class ``c``
is ``W[k, c] · ã_k``, so contributions plus ``b[c]`` add up to the logit.

The reference protocol (the authors' code) applies a LayerNorm over the ``K`` inputs, with the
same learnable affine, before ``g_s``. On inputs already standardised per image the LayerNorm's
normalisation is the identity (up to its epsilon), so the two protocols fit the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from iis.analyze.activations import keep_counts, keep_mask
from iis.analyze.heads_batching import EVAL_CHUNK

LAYER_NORM_EPS = 1e-5  # the reference protocol's LayerNorm (torch's default)


def affine_inputs(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``ã = γ ⊙ x + β``: ``x (N, K)``, ``scale (2, K)`` (γ, β) -> ``(N, K)``; ``x`` when ``scale`` is None."""
    return x if scale is None else torch.addcmul(scale[1], scale[0], x)


def reference_input(x: torch.Tensor, layer_norm: torch.Tensor, keep: int) -> torch.Tensor:
    """The authors' LayerNorm over the ``K`` inputs, then ``g_s``: ``(N, K) -> (N, K)``.

    ``torch.topk`` picks the kept entries (as fast a ``g_s`` as the authors' code could have); on
    ties its choice is unspecified, unlike :func:`iis.analyze.activations.keep_mask`, which matters only for exactly tied
    magnitudes.
    """
    h = F.layer_norm(x, (x.shape[1],), layer_norm[0], layer_norm[1], LAYER_NORM_EPS)
    if keep >= x.shape[1]:
        return h
    top = h.detach().abs().topk(keep, dim=1, sorted=False).indices
    mask = torch.zeros_like(h, dtype=torch.bool).scatter_(1, top, True)
    return h * mask


def reference_logits(x: torch.Tensor, layer_norm: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     keep: int) -> torch.Tensor:
    """One reference head: ``(N, K) -> (N, C)``; ``layer_norm`` is ``(2, K)`` (weight, bias)."""
    return torch.addmm(bias, reference_input(x, layer_norm, keep), weight)


@dataclass(eq=False)
class HeadFit:
    """The fitted heads of one (features, ratio grid) pair, and their accuracies.

    Attributes:
        ratios: the sparsity ratios, one head each; None for the standard head.
        weight: ``(R, K, C)`` float32; ``R = 1`` and ``K = D`` for the standard head. It acts on
            ``g_s(ã)``, so ``weight[r, k, c] * ã_k`` is concept ``k``'s contribution to class ``c``.
        bias: ``(R, C)`` float32.
        input_scale: ``(R, 2, K)`` float32, each head's per-concept ``(γ, β)`` (default protocol)
            or its LayerNorm's ``(weight, bias)`` (reference protocol); None for the standard head
            and for the fixed standardisation (``γ = 1, β = 0``).
        val_top1: ``(R,)`` float64 in ``[0, 1]``.
        test_top1: ``(R,)`` float64.
        test_top5: ``(R,)`` float64; top-``min(5, C)``.
        test_correct: ``(R, N_test)`` bool, per-image top-1 correctness (for paired bootstraps).
        test_pred: ``(R, N_test)`` int64 predicted class.
        active_concepts: ``(R,)`` int64: inputs kept by ``g_s`` (and nonzero) for at least one
            test image; ``D`` for the standard head.
        best_epoch: ``(R,)`` int64, 0-based epoch of the kept state: the head's last epoch by
            default (the final state is kept), the epoch selected on test in the reference protocol.
        fit_seconds: wall time of the fit, evaluation included.
        protocol: ``"default"``, ``"fixed-scale"`` or ``"reference"``; decides how :meth:`logits`
            treats its input.
        inverse_l2: ``(R,)`` float64, the L2 strength (scikit-learn's C) each head was fitted
            with, chosen on val; NaN where none applies (reference).
        learning_rate: ``(R,)`` float64, each head's learning rate: chosen on val with C for the
            standard head, set by the chosen C for concept heads.
        epoch_top1: ``(R, E, 2)`` float64, val and test top-1 after each of the ``E`` epochs
            (reference protocol only; None otherwise): how much its selection on test flatters it.
    """

    ratios: list[float] | None
    weight: torch.Tensor
    bias: torch.Tensor
    input_scale: torch.Tensor | None
    val_top1: np.ndarray
    test_top1: np.ndarray
    test_top5: np.ndarray
    test_correct: np.ndarray
    test_pred: np.ndarray
    active_concepts: np.ndarray
    best_epoch: np.ndarray
    fit_seconds: float
    protocol: str = "default"
    inverse_l2: np.ndarray | None = None
    learning_rate: np.ndarray | None = None
    epoch_top1: np.ndarray | None = None
    _keep: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        num_inputs = self.weight.shape[1]
        self._keep = (
            torch.tensor([num_inputs]) if self.ratios is None else keep_counts(self.ratios, num_inputs)
        )

    @property
    def num_heads(self) -> int:
        return int(self.weight.shape[0])

    def head_inputs(self, x: torch.Tensor, r: int = 0) -> torch.Tensor:
        """What head ``r``'s linear layer sees: ``(N, K)`` activations -> ``(N, K)`` ``g_s(ã)``.

        Exactly as in training and evaluation; the standard head sees ``x`` itself.
        """
        x = x.float()
        keep = int(self._keep[r])
        scale = None if self.input_scale is None else self.input_scale[r]
        if self.protocol == "reference":
            return x if scale is None else reference_input(x, scale, keep)
        if self.ratios is None:
            return x
        tilde = affine_inputs(x, scale)
        if keep >= x.shape[1]:
            return tilde
        return tilde * keep_mask(tilde, keep)

    def logits(self, x: torch.Tensor, r: int = 0) -> torch.Tensor:
        """Logits of head ``r``: ``(N, K)`` activations, not yet sparsified -> ``(N, C)`` float32."""
        return torch.addmm(self.bias[r], self.head_inputs(x, r), self.weight[r])


def empty_fit(ratios: list[float] | None, weight: torch.Tensor, bias: torch.Tensor,
              input_scale: torch.Tensor | None, best_epoch: np.ndarray, protocol: str) -> HeadFit:
    """A :class:`HeadFit` whose accuracy fields :func:`evaluate` fills in."""
    num_heads = weight.shape[0]
    return HeadFit(ratios=ratios, weight=weight.contiguous(), bias=bias.contiguous(),
                   input_scale=None if input_scale is None else input_scale.contiguous(),
                   val_top1=np.zeros(num_heads), test_top1=np.zeros(num_heads), test_top5=np.zeros(num_heads),
                   test_correct=np.zeros((num_heads, 0), dtype=bool),
                   test_pred=np.zeros((num_heads, 0), dtype=np.int64),
                   active_concepts=np.zeros(num_heads, dtype=np.int64), best_epoch=best_epoch,
                   fit_seconds=0.0, protocol=protocol)


@torch.no_grad()
def evaluate(fit: HeadFit, val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Fill the accuracy fields of ``fit``, through :meth:`HeadFit.head_inputs`, in row chunks."""
    (x_val, y_val), (x_test, y_test) = val, test
    top = min(5, fit.bias.shape[1])
    val_top1, test_top1, test_top5, correct, preds, active = [], [], [], [], [], []
    for r in range(fit.num_heads):
        val_hits = 0
        for start in range(0, x_val.shape[0], EVAL_CHUNK):
            logits = fit.logits(x_val[start : start + EVAL_CHUNK], r)
            val_hits += int((logits.argmax(1) == y_val[start : start + EVAL_CHUNK]).sum())
        val_top1.append(val_hits / x_val.shape[0])
        pred, in_top, used = [], [], torch.zeros(fit.weight.shape[1], dtype=torch.bool)
        for start in range(0, x_test.shape[0], EVAL_CHUNK):
            inputs = fit.head_inputs(x_test[start : start + EVAL_CHUNK], r)
            logits = torch.addmm(fit.bias[r], inputs, fit.weight[r])
            pred.append(logits.argmax(1))
            in_top.append((logits.topk(top, dim=1).indices == y_test[start : start + EVAL_CHUNK, None]).any(dim=1))
            used |= (inputs != 0).any(dim=0)
        pred_all = torch.cat(pred)
        correct.append((pred_all == y_test).numpy())
        preds.append(pred_all.numpy())
        test_top1.append(float(correct[-1].mean()))
        test_top5.append(torch.cat(in_top).double().mean().item())
        active.append(fit.weight.shape[1] if fit.ratios is None else int(used.sum()))
    fit.val_top1, fit.test_top1, fit.test_top5 = np.array(val_top1), np.array(test_top1), np.array(test_top5)
    fit.test_correct, fit.test_pred = np.stack(correct), np.stack(preds).astype(np.int64)
    fit.active_concepts = np.array(active, dtype=np.int64)


def concat_fits(fits: list[HeadFit]) -> HeadFit:
    """The heads of several fits of one library, as one fit with its ratios ascending.

    The fits are parts of one ratio grid fitted apart (:mod:`iis.analyze.parts`): same library,
    protocol and test images, disjoint ratios. Each field is concatenated along its ratio axis.
    """
    if not fits or any(f.ratios is None for f in fits):
        raise ValueError("concat_fits joins interpretable heads (fits with ratios)")
    if len({f.protocol for f in fits}) != 1:
        raise ValueError("the parts of a ratio grid were fitted with different protocols")
    ratios = [r for f in fits for r in f.ratios]
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"the parts of a ratio grid overlap: {ratios}")
    order = np.argsort(ratios, kind="stable")
    index = torch.from_numpy(order)

    def present(name: str) -> list | None:
        values = [getattr(f, name) for f in fits]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise ValueError(f"the parts of a ratio grid disagree on {name!r}: some have it, some do not")
        return values

    def join(name: str) -> np.ndarray | None:
        values = present(name)
        return None if values is None else np.concatenate(values)[order]

    def join_tensor(name: str) -> torch.Tensor | None:
        values = present(name)
        return None if values is None else torch.cat(values)[index].contiguous()

    return HeadFit(
        ratios=[float(ratios[i]) for i in order], weight=join_tensor("weight"), bias=join_tensor("bias"),
        input_scale=join_tensor("input_scale"), val_top1=join("val_top1"), test_top1=join("test_top1"),
        test_top5=join("test_top5"), test_correct=join("test_correct"), test_pred=join("test_pred"),
        active_concepts=join("active_concepts"), best_epoch=join("best_epoch"),
        fit_seconds=float(sum(f.fit_seconds for f in fits)), protocol=fits[0].protocol,
        inverse_l2=join("inverse_l2"), learning_rate=join("learning_rate"), epoch_top1=join("epoch_top1"))
