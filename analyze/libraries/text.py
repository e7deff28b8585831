"""Text library: concept words, learned as a projection of the backbone's features (Label-free CBM).

METHOD.md, "Concept libraries", "Text". Concept words are embedded by a CLIP text encoder and the
train/val images by the same CLIP's image encoder (done upstream: this module reads
:class:`~iis.analyze.libraries.base.TextInputs`). Then:

1. Concepts whose mean top-5 image-text similarity over train is ``<= top5_cutoff`` (0.25) are
   dropped: CLIP does not see them in any image.
2. A bias-free projection ``W: D -> K'`` is learned so that each column of ``Z Wᵀ`` matches the
   same concept's column of CLIP similarities ``P`` under the cos³ similarity (columns centred
   over samples, cubed, normalised over samples, then their cosine). Adam, early stop on val.
3. Concepts whose val cos³ similarity is ``<= val_cutoff`` (0.45) are dropped: the backbone does
   not carry them.
4. Activations are ``(z Wᵀ - mean) / std`` with train statistics (``kind="projection"``).

Every dropped concept is recorded in ``ConceptLibrary.dropped`` with its reason and the value that
dropped it, and logged. ``num_concepts`` caps the library: of the concepts that pass both filters,
the ``num_concepts`` with the highest val similarity are kept (the rest are dropped with reason
``"num_concepts"``), so ``K' <= num_concepts`` and ``K'`` may be smaller.

Memory: ``P`` is never held for a whole split (``N x T`` can be tens of GB); it is computed per
batch or chunk from the normalised CLIP embeddings.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from iis.analyze.libraries import register_library
from iis.analyze.libraries.base import ConceptLibrary, LibraryInputs, LibraryOptions, TextInputs
from pydantic import Field

from iis.strict import Float, Int

logger = logging.getLogger(__name__)

# Rows per chunk when a whole split is scanned (top-5, val similarity, train statistics).
_CHUNK = 4096
# Below this a column counts as constant: its cos³ similarity is 0, and its std is floored here.
_EPS = 1e-12

MISSING_TEXT = (
    "the text library needs CLIP features: add a `text:` section (a concept word list and a CLIP "
    "model) to the pipeline config, so that the concept words and the train/val images are embedded "
    "by CLIP and passed as LibraryInputs.text"
)


class TextConfig(LibraryOptions):
    """Settings of the text library (``analysis.options.text``). The defaults are what the registry builds.

    Training is counted in optimiser steps, not epochs: an epoch is one step for a small train set
    (a batch holds it all) and hundreds for ImageNet, so a step budget and a val check every
    ``check_every`` steps mean the same thing on both.

    Attributes:
        top5_cutoff: step 1; a concept is dropped when its mean top-``top_k`` train similarity is
            ``<=`` this (METHOD.md: 0.25, for CLIP ViT-B/16-like similarity scales).
        val_cutoff: step 3; a concept is dropped when its val cos³ similarity is ``<=`` this (0.45).
        top_k: how many of the most similar train images step 1 averages (5; fewer when train has
            fewer images).
        lr: Adam step size (1e-3, METHOD.md).
        batch_size: train images per step. The cos³ similarity is estimated over a batch, so
            batches are large; a train set no larger than one batch is used whole every step.
        max_steps: optimiser steps at most.
        check_every: steps between two val checks (the first check is before any step).
        patience: val checks without a strict improvement of the mean val cos³ similarity after
            which training stops; the best checked ``W`` is kept.
    """

    top5_cutoff: Float = 0.25
    val_cutoff: Float = 0.45
    top_k: Int = Field(5, ge=1)
    lr: Float = Field(1e-3, gt=0)
    batch_size: Int = Field(8192, ge=2)
    max_steps: Int = Field(5000, ge=0)
    check_every: Int = Field(50, ge=1)
    patience: Int = Field(5, ge=1)


def cubed_cosine_similarity(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-column cos³ similarity of two ``(B, K)`` matrices over their ``B`` rows: ``(K,)``.

    Each column is centred over the rows, cubed (``x³`` keeps the sign), and the cosine of the
    two cubed columns is taken. The cubing stresses the samples far from the mean, where a concept
    is clearly present or clearly absent. A constant column has similarity 0.

    The similarity is invariant to a positive rescaling of either column, so each centred column
    is first divided by its norm, which keeps ``x³`` and its gradient well inside float32's range
    whatever the features' scale; the value is unchanged.
    """
    return (_cubed_unit_columns(outputs) * _cubed_unit_columns(targets)).sum(dim=0)


def _cubed_unit_columns(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(dim=0, keepdim=True)
    scaled = centred / centred.norm(dim=0, keepdim=True).clamp_min(_EPS)
    return F.normalize(scaled.pow(3), dim=0, eps=_EPS)


def clip_similarities(clip_images: torch.Tensor, text_unit: torch.Tensor) -> torch.Tensor:
    """``P = normalise(images) · T̂ᵀ``: ``(B, Dc), (T, Dc) -> (B, T)``; ``text_unit`` already unit rows."""
    return F.normalize(clip_images.float(), dim=1) @ text_unit.T


def mean_top_similarity(clip_images: torch.Tensor, text_unit: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per concept, the mean of its ``top_k`` highest similarities over the images: ``(T,)`` float32.

    Scans the images in chunks, so ``(N, T)`` is never held.
    """
    num = clip_images.shape[0]
    k = min(top_k, num)
    best = torch.empty(0, text_unit.shape[0])
    for start in range(0, num, _CHUNK):
        chunk = clip_similarities(clip_images[start : start + _CHUNK], text_unit)
        best = torch.cat([best, chunk]).topk(min(k, best.shape[0] + chunk.shape[0]), dim=0).values
    return best.mean(dim=0)


class _SplitScorer:
    """Per-concept cos³ similarity between ``Z Wᵀ`` and ``P`` over a whole split, chunk by chunk.

    Centring needs each column's split mean before any cube is taken. For ``Z Wᵀ`` it is exact from
    the split's mean feature (``mean(Z) Wᵀ``); the column scale (again only for conditioning) is
    ``sqrt(diag(W Σ Wᵀ))``, with ``Σ`` the features' covariance. ``P`` does not change, so its
    column means, scales and cubed norms are computed once.
    """

    def __init__(self, features: torch.Tensor, clip_images: torch.Tensor, text_unit: torch.Tensor) -> None:
        self.features = features
        self.clip_images = clip_images
        self.text_unit = text_unit
        num = features.shape[0]
        feat_sum = torch.zeros(features.shape[1], dtype=torch.float64)
        for start in range(0, num, _CHUNK):
            feat_sum += features[start : start + _CHUNK].double().sum(dim=0)
        self.feat_mean = feat_sum / num
        cov = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
        for start in range(0, num, _CHUNK):
            centred = features[start : start + _CHUNK].double() - self.feat_mean
            cov += centred.T @ centred
        self.feat_cov = cov / num
        p_sum = torch.zeros(text_unit.shape[0], dtype=torch.float64)
        for start in range(0, num, _CHUNK):
            p_sum += clip_similarities(clip_images[start : start + _CHUNK], text_unit).double().sum(dim=0)
        self.p_mean = p_sum / num
        p_sq = torch.zeros_like(p_sum)
        for start in range(0, num, _CHUNK):
            chunk = clip_similarities(clip_images[start : start + _CHUNK], text_unit).double()
            p_sq += (chunk - self.p_mean).pow(2).sum(dim=0)
        self.p_scale = p_sq.sqrt().clamp_min(_EPS)
        p_six = torch.zeros_like(p_sum)
        for start in range(0, num, _CHUNK):
            p_six += self._p_cubed(start).pow(2).sum(dim=0)
        self.p_norm = p_six.sqrt()

    def _p_cubed(self, start: int) -> torch.Tensor:
        chunk = clip_similarities(self.clip_images[start : start + _CHUNK], self.text_unit).double()
        return ((chunk - self.p_mean) / self.p_scale).pow(3)

    @torch.no_grad()
    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """``(T, D)`` projection -> ``(T,)`` float64 cos³ similarity of each concept on the split."""
        w64 = weight.detach().double()
        out_mean = w64 @ self.feat_mean
        out_scale = ((w64 @ self.feat_cov) * w64).sum(dim=1).clamp_min(0).sqrt().clamp_min(_EPS)
        dot = torch.zeros(weight.shape[0], dtype=torch.float64)
        out_six = torch.zeros_like(dot)
        w32 = weight.detach().float()
        for start in range(0, self.features.shape[0], _CHUNK):
            out = (self.features[start : start + _CHUNK].float() @ w32.T).double()
            out_cubed = ((out - out_mean) / out_scale).pow(3)
            dot += (out_cubed * self._p_cubed(start)).sum(dim=0)
            out_six += out_cubed.pow(2).sum(dim=0)
        denom = out_six.sqrt() * self.p_norm
        return torch.where(denom > _EPS, dot / denom.clamp_min(_EPS), torch.zeros_like(dot))


@dataclass(frozen=True)
class ProjectionFit:
    """The result of :func:`fit_projection`.

    Attributes:
        weight: ``(T, D)`` float32, the ``W`` of the best val check.
        val_similarity: ``(T,)`` float64, each concept's cos³ similarity on val under ``weight``.
        best_step: optimiser steps taken before the best check (0: the initial ``W``).
        steps: optimiser steps taken in all.
        val_history: the mean val similarity at each check, in order.
    """

    weight: torch.Tensor
    val_similarity: np.ndarray
    best_step: int
    steps: int
    val_history: list[float]


def fit_projection(
    train_features: torch.Tensor,
    train_clip: torch.Tensor,
    val_features: torch.Tensor,
    val_clip: torch.Tensor,
    text_unit: torch.Tensor,
    *,
    seed: int,
    config: TextConfig | None = None,
) -> ProjectionFit:
    """Learn a bias-free ``W (T, D)`` maximising the mean cos³ similarity of ``Z Wᵀ`` with ``P``.

    Step 2 of METHOD.md's text library. The loss is ``-mean_k cos³(Z W_kᵀ, P_k)`` over a batch:
    we maximise the similarity itself. The IIS authors' code instead maximises the negative of a
    distance whose sign is flipped with respect to this similarity, so its learned concepts come
    out negated (a concept's activation is lowest on the images CLIP matches to its word); here a
    high activation means CLIP sees the word in the image.

    Args:
        train_features, val_features: ``(N, D)`` and ``(M, D)`` backbone features ``Z``.
        train_clip, val_clip: ``(N, Dc)`` and ``(M, Dc)`` CLIP image embeddings, row-aligned, raw.
        text_unit: ``(T, Dc)`` CLIP text embeddings, unit rows.
        seed: seeds the initial ``W`` and the batch order (a private ``torch.Generator``).
        config: ``lr``, ``batch_size``, ``max_steps``, ``check_every``, ``patience`` are read.

    Returns:
        A :class:`ProjectionFit`; ``W`` is the one best on val (mean over concepts).
    """
    config = config or TextConfig()
    if config.batch_size < 2 or config.max_steps < 0 or config.check_every < 1 or config.patience < 1:
        raise ValueError(f"text library needs batch_size >= 2, max_steps >= 0, check_every >= 1 "
                         f"and patience >= 1, got {config}")
    num_train, dim = train_features.shape
    if num_train < 2:
        raise ValueError(f"the text library needs at least 2 train images, got {num_train}")
    generator = torch.Generator().manual_seed(seed)
    # nn.Linear(D, T, bias=False)'s own initialiser draws from the global RNG; this is the same
    # uniform(-1/sqrt(D), 1/sqrt(D)) draw, from the private generator.
    bound = 1.0 / math.sqrt(dim)
    weight = ((torch.rand(text_unit.shape[0], dim, generator=generator) * 2 - 1) * bound).requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=config.lr)
    score_val = _SplitScorer(val_features, val_clip, text_unit)
    train_x = train_features.float()
    train_unit_clip = F.normalize(train_clip.float(), dim=1)

    batch_size = min(config.batch_size, num_train)
    # A short last batch would estimate the cos³ similarity from a handful of images; it is left
    # out, and the next epoch's shuffle gives its images their turn.
    batches_per_epoch = num_train // batch_size

    val_now = score_val(weight)
    history = [float(val_now.mean())]
    best = (history[0], 0, weight.detach().clone(), val_now)
    since_best = 0
    step = 0
    while step < config.max_steps and since_best < config.patience:
        order = torch.randperm(num_train, generator=generator)
        for b in range(batches_per_epoch):
            batch = order[b * batch_size : (b + 1) * batch_size]
            targets = train_unit_clip[batch] @ text_unit.T
            loss = -cubed_cosine_similarity(train_x[batch] @ weight.T, targets).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % config.check_every == 0 or step == config.max_steps:
                val_now = score_val(weight)
                history.append(float(val_now.mean()))
                logger.debug("text projection step %d: train loss %.4f, val cos3 %.4f", step,
                             float(loss.detach()), history[-1])
                # Strictly better only: on a tie the earlier (less trained) W stays.
                if history[-1] > best[0]:
                    best = (history[-1], step, weight.detach().clone(), val_now)
                    since_best = 0
                else:
                    since_best += 1
            if step >= config.max_steps or since_best >= config.patience:
                break
    _, best_step, best_weight, best_val = best
    return ProjectionFit(weight=best_weight, val_similarity=best_val.numpy(), best_step=best_step, steps=step,
                         val_history=history)


def _check_inputs(inputs: LibraryInputs) -> TextInputs:
    text = inputs.text
    if text is None:
        raise ValueError(MISSING_TEXT)
    if inputs.train_features is None or inputs.val_features is None:
        raise ValueError("the text library learns a projection of train features and selects it on val; "
                         "pass train_features and val_features")
    num_words = len(text.words)
    text_shape = np.shape(text.text_features)
    if len(text_shape) != 2 or text_shape[0] != num_words or num_words == 0:
        raise ValueError(f"the text library needs text_features (T, Dc) for its {num_words} words, "
                         f"got shape {text_shape}")
    for split, clip, feats in (("train", text.clip_train, inputs.train_features),
                               ("val", text.clip_val, inputs.val_features)):
        if clip.ndim != 2 or clip.shape[0] != feats.shape[0] or clip.shape[1] != text_shape[1]:
            raise ValueError(f"the text library needs clip_{split} ({feats.shape[0]}, {text_shape[1]}), "
                             f"row-aligned with {split}_features; got {tuple(clip.shape)}")
    return text


def _record(dropped: list[dict], words: list[str], indices: np.ndarray, values: np.ndarray, reason: str,
            cutoff: str) -> None:
    for i in indices:
        entry = {"word": words[i], "reason": reason, "value": float(values[i])}
        dropped.append(entry)
        logger.info("text library: dropped %r (%s %.4f %s)", entry["word"], reason, entry["value"], cutoff)


def _empty(filter_name: str, values: np.ndarray, cutoff: float) -> ValueError:
    return ValueError(f"the text library dropped every concept at the {filter_name} filter: the largest "
                      f"value is {float(np.max(values)):.4f}, not above the cutoff {cutoff}")


def _train_statistics(features: torch.Tensor, weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-concept mean and (population) std of ``Z Wᵀ`` over a split, in float64 chunks."""
    num = features.shape[0]
    feat_sum = torch.zeros(features.shape[1], dtype=torch.float64)
    for start in range(0, num, _CHUNK):
        feat_sum += features[start : start + _CHUNK].double().sum(dim=0)
    mean = (feat_sum / num) @ weight.double().T
    sq = torch.zeros_like(mean)
    for start in range(0, num, _CHUNK):
        out = (features[start : start + _CHUNK].float() @ weight.float().T).double()
        sq += (out - mean).pow(2).sum(dim=0)
    std = (sq / num).sqrt()
    return mean.float().numpy(), std.float().numpy()


def fit_text_library(
    inputs: LibraryInputs,
    *,
    num_concepts: int,
    seed: int,
    config: TextConfig | None = None,
) -> ConceptLibrary:
    """Build the text library (METHOD.md, "Text", steps 1-4).

    Args:
        inputs: ``text`` (words, text embeddings, CLIP train/val image embeddings),
            ``train_features (N, D)`` and ``val_features (M, D)`` are read; labels are not.
        num_concepts: the most concepts kept; of those passing both filters, the best on val.
        seed: seeds the projection's initialisation and batch order (private generator).
        config: filters and training settings; ``TextConfig()`` when None.

    Returns:
        A ``kind="projection"`` library: ``vectors (K', D)`` float32, the rows of ``W`` for the kept
        concepts (not normalised), ``mean``/``std (K',)`` their train statistics, ``words`` the
        kept words in list order, ``members`` ``K'`` empty arrays, ``dropped`` every dropped
        concept, and ``info`` with ``val_similarity`` and ``top5_similarity`` (per kept concept),
        ``n_words``, ``n_after_top5``, ``n_after_val``, ``num_concepts_requested``, ``best_step``,
        ``steps``, ``val_history`` and ``fit_seconds``.

    Raises:
        ValueError: missing inputs (see :data:`MISSING_TEXT`), or every concept dropped (the
            message names the filter and the largest value it saw).
    """
    config = config or TextConfig()
    if num_concepts < 1:
        raise ValueError(f"num_concepts must be at least 1, got {num_concepts}")
    text = _check_inputs(inputs)
    started = time.perf_counter()
    words = list(text.words)
    text_unit = F.normalize(torch.as_tensor(np.asarray(text.text_features, dtype=np.float32)), dim=1)
    train_x, val_x = inputs.train_features.float(), inputs.val_features.float()
    dropped: list[dict] = []

    # 1. CLIP must see the concept in some train images.
    top5 = mean_top_similarity(text.clip_train, text_unit, config.top_k).numpy()
    passed = top5 > config.top5_cutoff
    _record(dropped, words, np.flatnonzero(~passed), top5, "top5_similarity", f"<= {config.top5_cutoff}")
    if not passed.any():
        raise _empty("top5_similarity", top5, config.top5_cutoff)
    candidates = np.flatnonzero(passed)

    # 2. Learn W for the surviving concepts.
    fit = fit_projection(train_x, text.clip_train, val_x, text.clip_val, text_unit[candidates], seed=seed,
                         config=config)

    # 3. The backbone must carry the concept on val.
    val_sim = np.full(len(words), np.nan)
    val_sim[candidates] = fit.val_similarity
    carried = fit.val_similarity > config.val_cutoff
    _record(dropped, words, candidates[~carried], val_sim, "val_similarity", f"<= {config.val_cutoff}")
    if not carried.any():
        raise _empty("val_similarity", fit.val_similarity, config.val_cutoff)
    rows = np.flatnonzero(carried)  # rows of fit.weight

    # Cap at num_concepts: the best on val (ties by list order), kept in list order.
    if rows.size > num_concepts:
        order = np.argsort(-fit.val_similarity[rows], kind="stable")
        over = np.sort(rows[order[num_concepts:]])
        rows = np.sort(rows[order[:num_concepts]])
        _record(dropped, words, candidates[over], val_sim, "num_concepts", f"below the best {num_concepts}")
    kept = candidates[rows]
    weight = fit.weight[torch.from_numpy(rows)].contiguous()

    # 4. Standardise with train statistics.
    mean, std = _train_statistics(train_x, weight)
    seconds = time.perf_counter() - started
    logger.info(
        "text library: kept %d of %d words (%d dropped at top-5 similarity <= %g, %d at val similarity "
        "<= %g, %d over num_concepts=%d); projection best at step %d of %d, %.1f s",
        kept.size, len(words), int((~passed).sum()), config.top5_cutoff, int((~carried).sum()), config.val_cutoff,
        int(carried.sum()) - kept.size, num_concepts, fit.best_step, fit.steps, seconds,
    )
    return ConceptLibrary(
        name="text",
        vectors=np.ascontiguousarray(weight.numpy(), dtype=np.float32),
        members=[np.empty(0, dtype=np.int64) for _ in kept],
        words=[words[i] for i in kept],
        kind="projection",
        mean=mean,
        std=std,
        dropped=dropped,
        info={
            "val_similarity": [float(v) for v in val_sim[kept]],
            "top5_similarity": [float(v) for v in top5[kept]],
            "n_words": len(words),
            "n_after_top5": int(candidates.size),
            "n_after_val": int(carried.sum()),
            "num_concepts_requested": int(num_concepts),
            "best_step": fit.best_step,
            "steps": fit.steps,
            "val_history": fit.val_history,
            "fit_seconds": seconds,
        },
    )


@register_library("text", supervised=True, needs_text=True, options=TextConfig)
def build_text(
    inputs: LibraryInputs,
    *,
    num_concepts: int,
    seed: int,
    ratio: float | None = None,
    options: TextConfig | None = None,
) -> ConceptLibrary:
    """The registered builder: :func:`fit_text_library` with ``options`` (the pipeline's
    ``analysis.options.text``, e.g. the two cutoffs; the defaults when None).

    ``ratio`` is unused: the text library does not depend on the sparsity ratio.
    """
    return fit_text_library(inputs, num_concepts=num_concepts, seed=seed, config=options)
