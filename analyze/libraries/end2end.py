"""End2End library: a partition of the visual elements into ``K`` concepts, learned for a task.

METHOD.md, "Concept libraries". Every element has learnable logits over the ``K`` concepts and is
assigned to one of them by a hard, straight-through Gumbel-softmax (temperature 0.1). A concept is
the normalised sum of its elements. The logits are trained jointly with a linear head ``g`` on the
classification loss at one sparsity ratio ``s``; the epoch is chosen on val with the noise-free
(argmax) assignment, which is also the one the library keeps.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from iis.analyze.activations import concept_activations, keep_count, keep_mask, normalize_concepts
from iis.analyze.libraries import register_library
from iis.analyze.libraries.base import ConceptLibrary, LibraryInputs, LibraryOptions
from pydantic import Field

from iis.strict import Float, Int

logger = logging.getLogger(__name__)

# Elements kept per concept for display.
_NUM_MEMBERS = 8


class End2EndConfig(LibraryOptions):
    """Training settings of the End2End library (``analysis.options.end2end``). The defaults are
    what the registry builds.

    The defaults come from a digits proxy (E 400, K 64): 12 epochs at head lr 1e-2 left the joint
    head under-trained and the partition no better than its start; these settings gave a refitted
    head 5 to 12 points more than the same start with frozen logits, at s = 0.9 and 0.95.
    """

    epochs: Int = Field(30, ge=1)  # passes over train; the best one on val is kept
    batch_size: Int = Field(256, ge=1)  # train images per step; each step draws one fresh assignment
    lr_logits: Float = Field(0.3, ge=0)  # Adam step of the element-to-concept logits (0 freezes them)
    lr_head: Float = Field(5e-2, ge=0)  # Adam step of the head g
    tau: Float = Field(0.1, gt=0)  # Gumbel-softmax temperature (METHOD.md); sets how sharp the gradient's soft part is
    init: Literal["anchors", "random"] = "anchors"  # "anchors": k-means++ elements as seeds; "random": small random logits
    init_scale: Float = Field(30.0, gt=0)  # logits = init_scale * cos(element, anchor) under "anchors"
    random_init_std: Float = Field(0.01, ge=0)  # logit spread under "random"


def _gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise from a private generator.

    ``torch.nn.functional.gumbel_softmax`` draws from the global RNG, which a pure builder must not
    touch; ``-log(Exponential(1))`` is the same distribution it samples.
    """
    return -torch.empty(shape).exponential_(generator=generator).log()


def _straight_through(logits: torch.Tensor, *, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Hard Gumbel-softmax sample with straight-through gradient: ``(E, K) -> (E, K)`` one-hot rows."""
    soft = torch.softmax((logits + _gumbel_noise(tuple(logits.shape), generator)) / tau, dim=1)
    hard = F.one_hot(soft.argmax(dim=1), logits.shape[1]).to(soft.dtype)
    # Grouped so the forward value is exactly one-hot (x - x == 0 in IEEE); the usual
    # hard - soft + soft rounds the 1 entries to 1 +- ulp.
    return hard + (soft - soft.detach())


def _argmax_assignment(logits: torch.Tensor) -> torch.Tensor:
    """The noise-free assignment: ``(E, K)`` one-hot float32 rows."""
    return F.one_hot(logits.argmax(dim=1), logits.shape[1]).float()


def _concepts(
    assignment: torch.Tensor, logits: torch.Tensor, elements: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concept vectors from an assignment, with a fallback for empty concepts.

    An empty concept would be the zero vector, and normalising it has an unbounded gradient; so it
    is given, as a constant, the element with the highest logit for it.

    Args:
        assignment: ``(E, K)`` one-hot rows in the forward pass (maybe carrying a gradient).
        logits: ``(E, K)`` the element-to-concept logits.
        elements: ``(E, D)`` float32 unit-norm element features.

    Returns:
        ``(K, D)`` float32 unit rows; ``(K,)`` bool, which concepts were empty; ``(K,)`` int64, the
        element standing in for each concept were it empty.
    """
    sums = assignment.T @ elements
    empty = assignment.detach().sum(dim=0) == 0
    fallback = logits.detach().argmax(dim=0)
    if bool(empty.any()):
        sums = sums + empty.unsqueeze(1).float() * elements[fallback]
    return normalize_concepts(sums), empty, fallback


def _init_logits(
    elements: torch.Tensor,
    *,
    num_concepts: int,
    seed: int,
    generator: torch.Generator,
    config: End2EndConfig,
) -> torch.Tensor:
    """Initial ``(E, K)`` float32 logits.

    "anchors" (the default) seeds concept ``k`` at a k-means++ element and sets each element's
    logit to its scaled cosine with that anchor, so the first assignment is a nearest-anchor
    partition. With tau = 0.1 the straight-through gradient is near zero except where two noisy
    logits almost tie, so from small random logits every concept starts as an average of random
    elements (all near the mean element) and the loss barely separates them; a spread start gives
    ``K`` distinct concepts from the first step, and training moves the elements between them.
    """
    if config.init == "random":
        return config.random_init_std * torch.randn(elements.shape[0], num_concepts, generator=generator)
    if config.init != "anchors":
        raise ValueError(f"unknown end2end init {config.init!r}; known: anchors, random")
    from sklearn.cluster import kmeans_plusplus  # here, not at the top: see the cluster library's KMeans

    _, anchors = kmeans_plusplus(elements.numpy(), num_concepts, random_state=seed)
    return config.init_scale * (elements @ elements[torch.from_numpy(anchors)].T)


def _head(
    features: torch.Tensor, concepts: torch.Tensor, keep: int, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``g(g_s(a(z)))``: ``(B, D) -> (B, C)``. The kept-entry mask carries no gradient, as in ``g_s``."""
    activations = concept_activations(features, concepts)
    kept = keep_mask(activations, keep)
    return (activations * kept) @ weight.T + bias


def _top1(
    features: torch.Tensor,
    labels: torch.Tensor,
    concepts: torch.Tensor,
    keep: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> float:
    """Top-1 accuracy of the sparse head on a split, in batches to bound memory."""
    correct = 0
    for start in range(0, features.shape[0], 4096):
        logits = _head(features[start : start + 4096], concepts, keep, weight, bias)
        correct += int((logits.argmax(dim=1) == labels[start : start + 4096]).sum())
    return correct / max(features.shape[0], 1)


def _members(
    assignment: torch.Tensor, logits: torch.Tensor, empty: torch.Tensor, fallback: torch.Tensor
) -> list[np.ndarray]:
    """Per concept, its assigned elements by descending logit (at most 8); the fallback if empty."""
    members = []
    for k in range(assignment.shape[1]):
        if bool(empty[k]):
            members.append(np.array([int(fallback[k])], dtype=np.int64))
            continue
        idx = torch.nonzero(assignment[:, k], as_tuple=True)[0]
        order = torch.sort(logits[idx, k], descending=True, stable=True).indices[:_NUM_MEMBERS]
        members.append(idx[order].numpy().astype(np.int64))
    return members


def fit_end2end(
    inputs: LibraryInputs,
    *,
    num_concepts: int,
    seed: int,
    ratio: float,
    config: End2EndConfig | None = None,
) -> ConceptLibrary:
    """Learn the element-to-concept partition jointly with a linear head at sparsity ``ratio``.

    Args:
        inputs: elements ``(E, D)``; ``train_features (N, D)`` / ``train_labels (N,)`` and
            ``val_features (M, D)`` / ``val_labels (M,)``, all required.
        num_concepts: ``K <= E``.
        seed: seeds the initial logits, the batch order and the Gumbel noise (a private
            ``torch.Generator``; the global RNG is not touched).
        ratio: sparsity ratio ``s`` in ``[0, 1)`` the head is trained at.
        config: training settings; ``End2EndConfig()`` when None.

    Returns:
        A library with ``vectors (K, D)`` float32 unit rows from the argmax assignment of the epoch
        best on val, ``members[k]`` its elements by descending logit (at most 8), and ``info`` with
        ``train_loss`` (per epoch), ``val_top1`` (the selected epoch's), ``val_top1_per_epoch``,
        ``best_epoch``, ``empty_concepts``, ``assignment`` (``E`` ints, each element's concept) and
        ``fit_seconds``.
    """
    config = config or End2EndConfig()
    num_elements = len(inputs.elements)
    if num_concepts > num_elements:
        raise ValueError(
            f"end2end library wants {num_concepts} concepts but there are only {num_elements} elements"
        )
    if num_concepts < 1:
        raise ValueError(f"num_concepts must be at least 1, got {num_concepts}")
    if inputs.train_features is None or inputs.train_labels is None:
        raise ValueError("end2end library needs train_features and train_labels")
    if inputs.val_features is None or inputs.val_labels is None:
        raise ValueError("end2end library selects its epoch on val; pass val_features and val_labels")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"end2end needs epochs >= 1 and batch_size >= 1, got {config}")
    keep = keep_count(ratio, num_concepts)
    started = time.perf_counter()

    elements = normalize_concepts(torch.from_numpy(np.asarray(inputs.elements.features, dtype=np.float32)))
    train_x, train_y = inputs.train_features.float(), inputs.train_labels.long()
    val_x, val_y = inputs.val_features.float(), inputs.val_labels.long()
    generator = torch.Generator().manual_seed(seed)

    logits = _init_logits(elements, num_concepts=num_concepts, seed=seed, generator=generator, config=config)
    logits.requires_grad_(True)
    # Zero init: multinomial logistic regression is convex in the head, and nn.Linear's own
    # initialiser would draw from the global RNG.
    weight = torch.zeros(inputs.num_classes, num_concepts, requires_grad=True)
    bias = torch.zeros(inputs.num_classes, requires_grad=True)
    optimizer = torch.optim.Adam(
        [{"params": [logits], "lr": config.lr_logits}, {"params": [weight, bias], "lr": config.lr_head}]
    )

    train_loss: list[float] = []
    val_top1: list[float] = []
    best: tuple[float, int, torch.Tensor] | None = None  # (val top1, epoch, logits)
    for epoch in range(config.epochs):
        order = torch.randperm(train_x.shape[0], generator=generator)
        total, seen = 0.0, 0
        for start in range(0, order.numel(), config.batch_size):
            batch = order[start : start + config.batch_size]
            assignment = _straight_through(logits, tau=config.tau, generator=generator)
            concepts, _, _ = _concepts(assignment, logits, elements)
            loss = F.cross_entropy(_head(train_x[batch], concepts, keep, weight, bias), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.numel()
            seen += batch.numel()
        train_loss.append(total / seen)
        with torch.no_grad():
            concepts, _, _ = _concepts(_argmax_assignment(logits), logits, elements)
            val_top1.append(_top1(val_x, val_y, concepts, keep, weight, bias))
        logger.debug(
            "end2end s=%.2f epoch %d: train loss %.4f, val top1 %.4f",
            ratio,
            epoch,
            train_loss[-1],
            val_top1[-1],
        )
        # Strictly better only: on a tie the earlier (less trained) epoch stays.
        if best is None or val_top1[-1] > best[0]:
            best = (val_top1[-1], epoch, logits.detach().clone())

    assert best is not None  # config.epochs >= 1 is checked above
    best_top1, best_epoch, best_logits = best
    with torch.no_grad():
        assignment = _argmax_assignment(best_logits)
        concepts, empty, fallback = _concepts(assignment, best_logits, elements)
    num_empty = int(empty.sum())
    if num_empty:
        logger.warning(
            "end2end s=%.2f: %d of %d concepts are empty; each uses its highest-logit element",
            ratio,
            num_empty,
            num_concepts,
        )
    seconds = time.perf_counter() - started
    logger.info(
        "end2end s=%.2f: best epoch %d of %d, val top1 %.4f, %.1f s",
        ratio,
        best_epoch,
        config.epochs,
        best_top1,
        seconds,
    )
    return ConceptLibrary(
        name="end2end",
        vectors=np.ascontiguousarray(concepts.numpy(), dtype=np.float32),
        members=_members(assignment, best_logits, empty, fallback),
        ratio=float(ratio),
        info={
            "train_loss": train_loss,
            "val_top1": best_top1,
            "val_top1_per_epoch": val_top1,
            "best_epoch": best_epoch,
            "empty_concepts": num_empty,
            # The whole partition (a concept's members list only its first 8): element -> concept.
            "assignment": best_logits.argmax(dim=1).tolist(),
            "fit_seconds": seconds,
        },
    )


@register_library("end2end", per_ratio=True, supervised=True, options=End2EndConfig)
def build_end2end(
    inputs: LibraryInputs,
    *,
    num_concepts: int,
    seed: int,
    ratio: float | None = None,
    options: End2EndConfig | None = None,
) -> ConceptLibrary:
    """The registered builder: :func:`fit_end2end` with ``options`` (the pipeline's
    ``analysis.options.end2end``; the defaults when None)."""
    if ratio is None:
        raise ValueError("end2end library is built per sparsity ratio; pass ratio=")
    return fit_end2end(inputs, num_concepts=num_concepts, seed=seed, ratio=ratio, config=options)
