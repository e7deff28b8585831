"""The objects every concept-library builder shares: its inputs and its output."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from iis.analyze.activations import concept_activations
from pydantic import BaseModel, ConfigDict


class LibraryOptions(BaseModel):
    """A library's own settings (``analysis.options.<library>`` in pipelines.yaml).

    Each library declares a subclass with typed, defaulted fields and registers it with its
    builder; the pipeline parser validates the yaml against it, so a bad option is reported
    with its key path before anything runs. Frozen, and unknown keys are refused. A library
    without settings registers this class itself (no fields).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class ElementSet:
    """The visual elements of one store (crops of train images), embedded by its backbone.

    Attributes:
        features: ``(E, D)`` float32 element features, not normalised.
        labels: ``(E,)`` int64 class of each element's source image.
        source_ids: ``(E,)`` str id of each source image (as in the store's ``train/ids``).
        boxes: ``(E, 4)`` int32 ``(y0, x0, y1, x1)`` of the crop in source-image pixels.
        kinds: ``(E,)`` str, ``"grid"`` or ``"slic"``.
        segments: ``(E,)`` int32 SLIC segment label, ``-1`` for a grid patch.
    """

    features: np.ndarray
    labels: np.ndarray
    source_ids: np.ndarray
    boxes: np.ndarray
    kinds: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class TextInputs:
    """A concept word list embedded by a CLIP model, and the same CLIP's train/val image embeddings.

    Read by the text library only (METHOD.md, "Text"). The CLIP embeddings are raw: the library
    normalises them itself.

    Attributes:
        words: the ``T`` concept words, in list order.
        text_features: ``(T, Dc)`` float32 CLIP text embeddings of ``words``, not normalised.
        clip_train: ``(N, Dc)`` float32 CLIP image embeddings of the train split, row-aligned
            with :attr:`LibraryInputs.train_features`.
        clip_val: ``(M, Dc)`` float32, likewise for val (row-aligned with ``val_features``).
    """

    words: list[str]
    text_features: np.ndarray
    clip_train: torch.Tensor
    clip_val: torch.Tensor


@dataclass(frozen=True)
class LibraryInputs:
    """Everything a builder may read. Pure arrays: builders do no I/O.

    Attributes:
        elements: the store's visual elements.
        num_classes: ``C``.
        train_features: ``(N, D)`` float32 train features, or None where a builder needs none.
        train_labels: ``(N,)`` int64.
        val_features: ``(M, D)`` float32, for builders that select on val (end2end).
        val_labels: ``(M,)`` int64.
        text: concept words and CLIP embeddings, for the text library; None elsewhere.
    """

    elements: ElementSet
    num_classes: int
    train_features: torch.Tensor | None = None
    train_labels: torch.Tensor | None = None
    val_features: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    text: TextInputs | None = None


# How a library turns features into activations (see ConceptLibrary.activations).
ACTIVATION_KINDS = ("cosine", "projection")

# Guards the per-concept standardisation of a projection library against a constant concept.
_PROJECTION_STD_EPS = 1e-6


@dataclass(frozen=True)
class ConceptLibrary:
    """``K`` concept vectors in the backbone's feature space, with their provenance.

    Two kinds of library, which differ in how features become activations:

    - ``"cosine"`` (prototype, cluster, end2end): ``vectors`` are unit rows and
      ``a = standardize_per_image(z · Ĉᵀ)`` (METHOD.md, "Concept activations", steps 1-2).
    - ``"projection"`` (text): ``vectors`` are the rows of a learned projection ``W``, **not**
      normalised, and ``a = (z · Wᵀ - mean) / std`` with the per-concept ``mean`` and ``std`` of
      ``z · Wᵀ`` over train (METHOD.md, "Text", step 4).

    Attributes:
        name: the registered builder's name.
        vectors: ``(K, D)`` float32; rows L2-normalised for ``kind="cosine"``.
        members: per concept, the element indices that show it to a person, most
            representative first (a prototype's own element; a cluster's nearest elements;
            an end2end concept's assigned elements). Empty arrays for text concepts, which are
            shown by their word.
        ratio: the sparsity ratio a per-ratio library (end2end) was built for, else None.
        words: per concept, its word, for text libraries; else None.
        info: free-form, JSON-serialisable facts about the build (e.g. k-means inertia).
        kind: ``"cosine"`` or ``"projection"``, as above.
        mean: ``(K,)`` float32 train mean of ``z · Wᵀ`` (``kind="projection"`` only).
        std: ``(K,)`` float32 train standard deviation of ``z · Wᵀ`` (``kind="projection"`` only).
        dropped: every concept the builder dropped, in the order dropped, as
            ``{"word": str, "reason": str, "value": float}`` (the value the filter compared).
    """

    name: str
    vectors: np.ndarray
    members: list[np.ndarray]
    ratio: float | None = None
    words: list[str] | None = None
    info: dict = field(default_factory=dict)
    kind: str = "cosine"
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    dropped: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(f"unknown activation kind {self.kind!r}; known: {', '.join(ACTIVATION_KINDS)}")
        if self.kind == "projection":
            k = self.vectors.shape[0]
            for label, stat in (("mean", self.mean), ("std", self.std)):
                if stat is None or np.shape(stat) != (k,):
                    raise ValueError(f"a projection library needs {label} of shape ({k},), got "
                                     f"{None if stat is None else np.shape(stat)}")

    @property
    def num_concepts(self) -> int:
        return int(self.vectors.shape[0])

    def activations(self, features: torch.Tensor) -> torch.Tensor:
        """Concept activations of a batch: ``(N, D) -> (N, K)`` float32, by :attr:`kind`."""
        if self.kind == "projection":
            return projection_activations(features, self.vectors, self.mean, self.std)
        return concept_activations(features, torch.from_numpy(self.vectors))


def projection_activations(features: torch.Tensor, weight: np.ndarray, mean: np.ndarray,
                           std: np.ndarray) -> torch.Tensor:
    """``a = (z · Wᵀ - mean) / std``: ``(N, D) -> (N, K)`` float32, standardised per concept.

    Args:
        features: ``(N, D)`` backbone features ``z``, not normalised; any float dtype.
        weight: ``(K, D)`` the projection ``W``, not normalised.
        mean, std: ``(K,)`` train statistics of ``z · Wᵀ``.
    """
    raw = features.float() @ torch.as_tensor(weight, dtype=torch.float32).T
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32).clamp_min(_PROJECTION_STD_EPS)
    return (raw - mean_t) / std_t
