"""The objects every concept-library builder shares: its inputs and its output."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from analyze.activations import concept_activations


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
class LibraryInputs:
    """Everything a builder may read. Pure arrays: builders do no I/O.

    Attributes:
        elements: the store's visual elements.
        num_classes: ``C``.
        train_features: ``(N, D)`` float32 train features, or None where a builder needs none.
        train_labels: ``(N,)`` int64.
        val_features: ``(M, D)`` float32, for builders that select on val (end2end).
        val_labels: ``(M,)`` int64.
    """

    elements: ElementSet
    num_classes: int
    train_features: torch.Tensor | None = None
    train_labels: torch.Tensor | None = None
    val_features: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None


@dataclass(frozen=True)
class ConceptLibrary:
    """``K`` unit-norm concept vectors in the backbone's feature space, with their provenance.

    Attributes:
        name: the registered builder's name.
        vectors: ``(K, D)`` float32, rows L2-normalised.
        members: per concept, the element indices that show it to a person, most
            representative first (a prototype's own element; a cluster's nearest elements;
            an end2end concept's assigned elements).
        ratio: the sparsity ratio a per-ratio library (end2end) was built for, else None.
        words: per concept, its word, for text libraries; else None.
        info: free-form, JSON-serialisable facts about the build (e.g. k-means inertia).
    """

    name: str
    vectors: np.ndarray
    members: list[np.ndarray]
    ratio: float | None = None
    words: list[str] | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_concepts(self) -> int:
        return int(self.vectors.shape[0])

    def activations(self, features: torch.Tensor) -> torch.Tensor:
        """Concept activations of a batch: ``(N, D) -> (N, K)`` float32 (METHOD.md steps 1-2)."""
        return concept_activations(features, torch.from_numpy(self.vectors))
