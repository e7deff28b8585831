"""Prototype library: ``K`` visual elements drawn at random, stratified over classes.

METHOD.md, "Concept libraries". The authors' code takes the first ``K`` elements in folder order,
which covers only the first classes; here every class present among the elements gets as even a
share as its number of elements allows.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from iis.analyze.activations import normalize_concepts
from iis.analyze.libraries import register_library
from iis.analyze.libraries.base import ConceptLibrary, LibraryInputs, LibraryOptions

logger = logging.getLogger(__name__)


def stratified_quotas(class_sizes: np.ndarray, total: int, *, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` draws over classes as evenly as their sizes allow.

    Every class gets ``total // m`` (``m`` classes) or one more; a class with fewer elements than
    its share gives all it has, and the shortfall is spread over the others the same way. The
    classes that get the "one more" are chosen at random, so no class is favoured by its id.

    Args:
        class_sizes: ``(m,)`` int, elements available per class, each ``>= 1``.
        total: draws wanted, ``0 <= total <= class_sizes.sum()``.
        rng: the source of randomness for the remainders.

    Returns:
        ``(m,)`` int64 quotas, ``0 <= quota <= class_sizes``, summing to ``total``.
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    if total > sizes.sum():
        raise ValueError(f"cannot draw {total} from {int(sizes.sum())} elements")
    quotas = np.zeros_like(sizes)
    remaining = int(total)
    while remaining > 0:
        open_classes = np.flatnonzero(quotas < sizes)
        share = remaining // open_classes.size
        if share == 0:
            lucky = rng.choice(open_classes, size=remaining, replace=False)
            quotas[lucky] += 1
            break
        give = np.minimum(share, sizes[open_classes] - quotas[open_classes])
        quotas[open_classes] += give
        remaining -= int(give.sum())
    return quotas


class PrototypeConfig(LibraryOptions):
    """The prototype library has no settings of its own: ``analysis.options.prototype`` takes no keys."""


@register_library("prototype", options=PrototypeConfig)
def build_prototype(
    inputs: LibraryInputs,
    *,
    num_concepts: int,
    seed: int,
    ratio: float | None = None,
    options: PrototypeConfig | None = None,
) -> ConceptLibrary:
    """Draw ``num_concepts`` elements, stratified over classes, as unit-norm concepts.

    Args:
        inputs: the elements (``features (E, D)``, ``labels (E,)``) are all that is read.
        num_concepts: ``K <= E``.
        seed: seeds the draw (a local ``np.random.Generator``).
        options: none exist (see :class:`PrototypeConfig`).
        ratio: unused; prototypes do not depend on the sparsity ratio.

    Returns:
        A library with ``vectors (K, D)`` float32 unit rows, ordered by element index, and
        ``members[k] = [element index]``.
    """
    elements = inputs.elements
    num_elements = len(elements)
    if num_concepts > num_elements:
        raise ValueError(
            f"prototype library wants {num_concepts} concepts but there are only {num_elements} elements"
        )
    if num_concepts < 1:
        raise ValueError(f"num_concepts must be at least 1, got {num_concepts}")
    rng = np.random.default_rng(seed)
    classes, class_sizes = np.unique(elements.labels, return_counts=True)
    quotas = stratified_quotas(class_sizes, num_concepts, rng=rng)
    picked = []
    for cls, quota in zip(classes, quotas, strict=True):
        if quota:
            pool = np.flatnonzero(elements.labels == cls)
            picked.append(rng.choice(pool, size=int(quota), replace=False))
    # Element order, not draw order, so the library reads the same way as the store.
    chosen = np.sort(np.concatenate(picked))
    vectors = normalize_concepts(torch.from_numpy(np.asarray(elements.features[chosen], dtype=np.float32)))
    logger.debug("prototype: %d concepts from %d classes (seed %d)", num_concepts, classes.size, seed)
    return ConceptLibrary(
        name="prototype",
        vectors=vectors.numpy(),
        members=[np.array([i], dtype=np.int64) for i in chosen],
        info={"classes_covered": int(np.count_nonzero(quotas)), "classes_present": int(classes.size)},
    )
