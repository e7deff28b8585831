"""METHOD-level check with planted concepts: IIS sees whether class information lies in the concepts.

Features are ``Z = A @ P + noise`` with known unit concept directions ``P (K, D)``; each class has
a few characteristic concepts. With the library equal to ``P``:

1. all label information inside span(P): the interpretable heads keep their accuracy up to high
   sparsity, so ARR stays near 1;
2. the same class structure moved to directions orthogonal to span(P): the standard head is as
   accurate as before, but the concepts carry no label information, so IIS collapses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from iis.analyze.heads import fit_heads
from iis.analyze.libraries.base import ConceptLibrary
from iis.analyze.metrics import accuracy_retention, interpretability_score, normalized_score

RATIOS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]
NUM_CLASSES, PER_CLASS, DIM = 5, 4, 64
NUM_CONCEPTS = NUM_CLASSES * PER_CLASS  # 20: k(0.9) = 2, k(0.95) = k(0.98) = 1
SIZES = {"train": 1500, "val": 300, "test": 600}


def _directions() -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal concept directions ``P (K, D)`` and another ``K`` orthogonal to all of them."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(DIM, 2 * NUM_CONCEPTS, generator=g))
    return basis[:, :NUM_CONCEPTS].T.contiguous(), basis[:, NUM_CONCEPTS:].T.contiguous()


def _class_codes(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Sparse class-specific activations ``(N, K)``: a class's own concepts near 3, the rest near 0."""
    n = labels.shape[0]
    codes = 0.3 * torch.randn(n, NUM_CONCEPTS, generator=g)
    own = labels.unsqueeze(1) * PER_CLASS + torch.arange(PER_CLASS)  # (N, PER_CLASS)
    codes.scatter_add_(1, own, 3.0 + 0.5 * torch.randn(n, PER_CLASS, generator=g))
    return codes


def _nuisance_codes(n: int, g: torch.Generator) -> torch.Tensor:
    """Class-independent activations of the same sparsity: 4 random concepts per image near 3."""
    codes = 0.3 * torch.randn(n, NUM_CONCEPTS, generator=g)
    chosen = torch.rand(n, NUM_CONCEPTS, generator=g).argsort(dim=1)[:, :PER_CLASS]
    codes.scatter_add_(1, chosen, 3.0 + 0.5 * torch.randn(n, PER_CLASS, generator=g))
    return codes


def _features(inside_span: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    concepts, orthogonal = _directions()
    splits = {}
    for offset, (name, n) in enumerate(SIZES.items()):
        g = torch.Generator().manual_seed(10 + offset)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        if inside_span:
            z = _class_codes(labels, g) @ concepts
        else:
            # Same class codes, on directions the library cannot see; the concepts get
            # activations with the same statistics but no label information.
            z = _class_codes(labels, g) @ orthogonal + _nuisance_codes(n, g) @ concepts
        splits[name] = (z + 0.1 * torch.randn(n, DIM, generator=g), labels)
    return splits


def _score(inside_span: bool) -> dict:
    concepts, _ = _directions()
    library = ConceptLibrary(name="planted", vectors=concepts.numpy(),
                             members=[np.array([k]) for k in range(NUM_CONCEPTS)])
    features = _features(inside_span)
    activations = {name: (library.activations(z), y) for name, (z, y) in features.items()}
    standard = fit_heads(**features, num_classes=NUM_CLASSES, ratios=None, seed=0)
    heads = fit_heads(**activations, num_classes=NUM_CLASSES, ratios=RATIOS, seed=0)
    arr = accuracy_retention(heads.test_top1, float(standard.test_top1[0]))
    return {"standard": float(standard.test_top1[0]), "arr": arr,
            "iis": interpretability_score(RATIOS, arr), "normalized": normalized_score(RATIOS, arr)}


@pytest.fixture(scope="module")
def inside() -> dict:
    return _score(inside_span=True)


@pytest.fixture(scope="module")
def outside() -> dict:
    return _score(inside_span=False)


def test_label_information_in_the_concepts_survives_sparsification(inside):
    assert inside["standard"] > 0.97
    arr = dict(zip(RATIOS, inside["arr"]))
    assert arr[0.9] >= 0.9
    # Even one kept concept (s >= 0.95) names one of the class's own concepts.
    assert min(inside["arr"]) >= 0.85
    assert inside["normalized"] > 0.9


def test_label_information_outside_the_concepts_lowers_the_score(inside, outside):
    # The standard head cannot tell the two apart ...
    assert outside["standard"] > 0.97
    assert abs(outside["standard"] - inside["standard"]) < 0.03
    # ... the interpretable heads can: the concepts see no class, so they sit near chance (0.2).
    assert outside["arr"].max() < 0.4
    assert inside["normalized"] - outside["normalized"] > 0.5
    assert inside["iis"] - outside["iis"] > 0.5 * (RATIOS[-1] - RATIOS[0])
