"""Planted-concept workloads: features whose class information lies in known concept directions.

The structure the IIS exists to find: each class switches on a few of ``K`` concept directions
(a sparse, non-negative mix), has a part of its own orthogonal to every concept, and some concepts
are *distractors* that fire strongly on every image without regard to the class. Gaussian noise
covers everything. With the concept directions as the library, a head that keeps few concepts
must learn to keep the informative ones, not the loudest.

Used by the benchmarks (``benchmarks/heads_vs_reference.py``, ``benchmarks/analyze_vs_reference.py``)
and the tests, and useful to check a new library or head against a known answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlantedSpec:
    """A planted-concept workload; every field has a comment on its role."""

    n_train: int = 100_000
    n_val: int = 2_000
    n_test: int = 2_000
    dim: int = 512  # D
    classes: int = 100  # C
    concepts: int = 200  # K; needs K + C <= D (directions and class parts are orthonormal)
    per_class: int = 4  # concepts each class switches on
    strength: float = 1.6  # scale of a class's concept mix (its weights are uniform in [0.5, 1.5])
    jitter: float = 0.5  # per-image relative variation of the class's concept weights
    orthogonal: float = 0.4  # norm of each class's own part, orthogonal to every concept
    distractors: float = 0.25  # fraction of concepts that fire on every image, class-blind
    distractor_std: float = 2.0  # std of a distractor's activation
    noise: float = 0.9  # std of isotropic Gaussian noise per feature dimension
    offset: float = 0.5  # std of a mean shared by every class, as pooled features have
    label_noise: float = 0.0  # fraction of labels replaced by a random class


Split = tuple[torch.Tensor, torch.Tensor]


def planted_concepts(spec: PlantedSpec, seed: int) -> tuple[dict[str, Split], torch.Tensor]:
    """Draw a workload.

    Args:
        spec: its shape and noise.
        seed: seeds everything (one private generator).

    Returns:
        ``{"train", "val", "test"}`` -> ``(Z (N, D) float32, y (N,) int64)``, and the concept
        directions ``(K, D)`` float32, unit rows: the library under which the classes are sparse.
    """
    if spec.concepts + spec.classes > spec.dim:
        raise ValueError(f"concepts + classes ({spec.concepts} + {spec.classes}) must not exceed dim {spec.dim}")
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(spec.dim, spec.concepts + spec.classes, generator=g))
    directions = basis[:, : spec.concepts].T.contiguous()  # (K, D)
    class_parts = basis[:, spec.concepts :].T * spec.orthogonal  # (C, D)
    num_distractors = round(spec.distractors * spec.concepts)
    order = torch.randperm(spec.concepts, generator=g)
    distractor, informative = order[:num_distractors], order[num_distractors:]
    # Each class: `per_class` informative concepts, non-negative weights.
    mix = torch.zeros(spec.classes, spec.concepts)
    for c in range(spec.classes):
        picks = informative[torch.randperm(len(informative), generator=g)[: spec.per_class]]
        mix[c, picks] = spec.strength * (0.5 + torch.rand(spec.per_class, generator=g))
    shared = torch.randn(spec.dim, generator=g) * spec.offset

    def split(n: int) -> Split:
        y = torch.randint(0, spec.classes, (n,), generator=g)
        codes = mix[y] * (1 + spec.jitter * torch.randn(n, spec.concepts, generator=g))
        codes[:, distractor] = spec.distractor_std * torch.randn(n, num_distractors, generator=g)
        z = codes @ directions + class_parts[y] + shared + spec.noise * torch.randn(n, spec.dim, generator=g)
        if spec.label_noise:
            flipped = torch.rand(n, generator=g) < spec.label_noise
            y = torch.where(flipped, torch.randint(0, spec.classes, (n,), generator=g), y)
        return z.float(), y

    return {"train": split(spec.n_train), "val": split(spec.n_val), "test": split(spec.n_test)}, directions
