"""Fine-tuning with interpretability maximisation (METHOD.md, application 1).

The backbone is trained with ``L = CE(h(z), y) + λ · CE(g(g_s(a(z))), y)``, where ``a(z)`` are
the activations of a prototype library that the *current* backbone re-embeds every few steps,
and ``g`` is a linear head on ``g_s(a)`` learned jointly. The same budget and seed with λ = 0
is the control. Both results are ordinary checkpoints, so stage 1 and stage 2 measure them
like any other model.

The loss's library must not be among the libraries that score the result: a prototype draw
depends only on the labels and the seed, so scoring with the loss's own seed would measure the
very elements the backbone was trained to separate. :func:`split_elements` reserves the
elements of some source images per class for the loss (:func:`loss_library_members` draws from
them); the scoring libraries are built from the rest only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from iis.analyze.activations import concept_activations, sparsify
from iis.analyze.heads_default import CONCEPT_LRS
from iis.analyze.libraries import ElementSet, LibraryInputs, build_library
from iis.analyze.versioning import analysis_version, source_digest
from iis.extract.backbones import element_transform
from iis.extract.datasets import ImageDataset
from iis.extract.elements import ElementPlan, render_element
from iis.extract.train import TrainOptions, TrainResult, train_backbone

log = logging.getLogger(__name__)

# g and its (γ, β) learn from scratch while the backbone is only nudged (finetune.lr, 5e-4 by
# default): at the backbone's rate g stayed at chance (loss ln C) through the demo's 8 steps, so the
# λ term sent the backbone no class signal. They take the rate the default trainer gives concept
# heads.
HEAD_LR = CONCEPT_LRS[0]


class InterpretabilityLoss:
    """``λ · CE(g(g_s(a(z))), y)`` with a prototype library re-embedded by the live backbone.

    Args:
        element_images: ``(K, 3, H, W)`` normalised element crops: the prototype library.
        num_classes: ``C``.
        lam: ``λ``.
        ratio: the sparsity ratio ``s`` of ``g_s``.
        refresh_every: steps between re-embeddings of the library.
        seed: seeds ``g``'s initialisation.
    """

    def __init__(self, *, element_images: torch.Tensor, num_classes: int, lam: float, ratio: float,
                 refresh_every: int, seed: int):
        self.images, self.lam, self.ratio, self.refresh_every = element_images, lam, ratio, refresh_every
        generator = torch.Generator().manual_seed(seed)
        k = element_images.shape[0]
        # g starts small and seeded; nn.Linear's own init would draw from the global RNG.
        self.weight = torch.nn.Parameter(torch.randn(num_classes, k, generator=generator) * 0.01)
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))
        # METHOD.md's per-concept scale and shift before g_s, learnt with g.
        self.scale = torch.nn.Parameter(torch.ones(k))
        self.shift = torch.nn.Parameter(torch.zeros(k))
        self.model: torch.nn.Module | None = None
        self.concepts: torch.Tensor | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.weight, self.bias, self.scale, self.shift]

    def attach(self, model: torch.nn.Module) -> None:
        """Called by the trainer before the first step: the backbone to re-embed with."""
        self.model = model

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-embed the library with the current backbone (eval mode, so BN stats stay put)."""
        assert self.model is not None, "attach() the model first"
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        feats = self.model.forward_head(self.model.forward_features(self.images.to(device)), pre_logits=True)
        self.concepts = feats.float()
        self.model.train(was_training)

    def __call__(self, z: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """``z (B, D)``, ``y (B,)`` -> scalar loss; gradients reach the backbone through ``z``."""
        if self.concepts is None or step % self.refresh_every == 0:
            self.refresh()
        a = torch.addcmul(self.shift, self.scale, concept_activations(z.float(), self.concepts))
        logits = F.linear(sparsify(a, self.ratio), self.weight, self.bias)
        return self.lam * F.cross_entropy(logits, y)


def element_images(dataset: ImageDataset, plans: Sequence[ElementPlan], indices: Sequence[int],
                   data_config: dict) -> torch.Tensor:
    """Render elements ``indices`` of ``plans`` as the backbone's inputs: ``(K, 3, H, W)``."""
    transform = element_transform(data_config)
    fill = tuple(int(round(255 * m)) for m in data_config["mean"])
    crops = []
    for i in indices:
        plan = plans[i]
        crops.append(transform(render_element(dataset.load("train", plan.source_index), plan, fill=fill)))
    return torch.stack(crops)


@dataclass(frozen=True)
class ElementSplit:
    """The visual elements split by source image: the loss library's pool and the scoring pool.

    Attributes:
        loss: ``(E_l,)`` int64 ascending element indices reserved for the loss's library.
        scoring: ``(E_s,)`` int64 ascending indices of every other element. No element and no
            source image is in both.
    """

    loss: np.ndarray
    scoring: np.ndarray


def split_elements(labels: np.ndarray, sources: np.ndarray, *, holdout: float, seed: int) -> ElementSplit:
    """Reserve the elements of a share ``holdout`` of each class's source images for the loss.

    Whole source images are reserved, not single crops, so a scoring library never holds another
    crop of an image the loss trained on.

    Args:
        labels: ``(E,)`` int class of each element.
        sources: ``(E,)`` source image of each element (its train index or id).
        holdout: share of each class's source images reserved, in (0, 1); rounded, and at least
            one image per class is reserved and at least one left.
        seed: seeds the choice (a local ``np.random.Generator``).

    Raises:
        ValueError: a class whose elements come from fewer than two source images.
    """
    labels, sources = np.asarray(labels), np.asarray(sources)
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must lie in (0, 1), got {holdout}")
    rng = np.random.default_rng(seed)
    reserved = np.zeros(labels.shape[0], dtype=bool)
    for cls in np.unique(labels):
        mine = labels == cls
        images = np.unique(sources[mine])
        if images.size < 2:
            raise ValueError(f"class {cls} has visual elements from {images.size} source image(s); the loss's "
                             "library and the scoring libraries need different ones (elements.images_per_class >= 2)")
        count = min(images.size - 1, max(1, round(holdout * images.size)))
        reserved |= mine & np.isin(sources, rng.choice(images, size=count, replace=False))
    return ElementSplit(loss=np.flatnonzero(reserved), scoring=np.flatnonzero(~reserved))


def loss_library_members(elements: ElementSet, pool: np.ndarray, *, num_concepts: int, num_classes: int,
                         seed: int) -> np.ndarray:
    """The loss's prototype library: ``num_concepts`` elements of ``pool``, drawn by the prototype
    builder (stratified over classes, seeded).

    Args:
        elements: every visual element (``E`` rows).
        pool: ``(E_l,)`` indices the draw is limited to (:attr:`ElementSplit.loss`).

    Returns:
        ``(K,)`` int64 ascending indices into ``elements``, all in ``pool``.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if num_concepts > pool.size:
        raise ValueError(f"the loss's library needs {num_concepts} elements but finetune.holdout reserves only "
                         f"{pool.size}; raise finetune.holdout or elements.images_per_class")
    held = ElementSet(*(getattr(elements, f.name)[pool] for f in fields(ElementSet)))
    library = build_library("prototype", LibraryInputs(elements=held, num_classes=num_classes),
                            num_concepts=num_concepts, seed=seed)
    return pool[np.array([int(m[0]) for m in library.members], dtype=np.int64)]


@functools.cache
def loss_version() -> str:
    """The code behind the interpretability loss, recorded in the λ arm's training settings.

    The analysis version (concept activations, libraries, heads; :mod:`iis.analyze.versioning`)
    plus 12 hex digits of this module's source: an upgrade that changes the loss trains the λ arm
    again instead of reusing a checkpoint the new code would not produce (the λ = 0 arm has no loss
    and is kept). An install without this module's source records ``"+nosource"``.
    """
    try:
        digest = source_digest(Path(__file__).parent, (Path(__file__).name,))[:12]
    except FileNotFoundError:
        digest = "nosource"
    return f"{analysis_version()}+{digest}"


@dataclass(frozen=True)
class FinetuneArm:
    """One arm of the comparison at one training seed: its λ and the checkpoint it produced."""

    lam: float
    seed: int
    checkpoint: Path
    result: TrainResult


def finetune_arms(
    *,
    dataset: ImageDataset,
    backbone: str,
    weights: str,
    img_size: int | None,
    init_seed: int,
    images: torch.Tensor,
    lam: float,
    ratio: float,
    options: TrainOptions,
    refresh_every: int,
    out_root: Path,
    library_elements: Sequence[int] = (),
) -> list[FinetuneArm]:
    """Fine-tune from ``weights`` with λ and with λ = 0, on the same budget and seed.

    Args:
        images: ``(K, 3, H, W)`` the prototype library's element crops (see :func:`element_images`).
        options: epochs, lr, seed…; ``options.checkpoints`` must hold ``options.epochs``.
        out_root: each arm writes under ``out_root / f"lam{λ:g}"``.
        library_elements: the ``K`` element indices behind ``images``, recorded in the λ arm's
            ``train.json`` (its provenance; another draw trains again).

    Returns:
        The λ arm, then the λ = 0 arm.
    """
    arms = []
    for arm_lam in (lam, 0.0):
        loss = None
        if arm_lam > 0:
            loss = InterpretabilityLoss(element_images=images, num_classes=len(dataset.classes), lam=arm_lam,
                                        ratio=ratio, refresh_every=refresh_every, seed=options.seed)
        out_dir = Path(out_root) / f"lam{arm_lam:g}"
        result = train_backbone(
            dataset=dataset, backbone=backbone, weights=weights, img_size=img_size, init_seed=init_seed,
            options=options, out_dir=out_dir, extra_loss=loss, extra_params=loss.params if loss else (),
            extra_lr=HEAD_LR if loss else None,
            extra_config={"lambda": arm_lam, "ratio": ratio, "library_size": int(images.shape[0]),
                          "library_elements": [int(i) for i in library_elements],
                          "refresh_every": refresh_every, "start": str(weights), "loss_code": loss_version()},
            on_train_start=loss.attach if loss else None,
        )
        log.info("fine-tune lambda=%g seed %d: train loss %s, val top-1 %s", arm_lam, options.seed,
                 [round(v, 4) for v in result.train_loss], [round(v, 4) for v in result.val_top1])
        arms.append(FinetuneArm(lam=arm_lam, seed=options.seed, checkpoint=result.checkpoints[options.epochs],
                                result=result))
    return arms
