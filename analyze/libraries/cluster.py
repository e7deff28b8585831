"""Cluster library: k-means centroids of the L2-normalised visual elements.

METHOD.md, "Concept libraries": k-means++ (seeded) on up to 20,000 normalised elements; the
centroids are re-normalised, and each remembers the elements nearest to it for display.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from iis.analyze.activations import normalize_concepts
from iis.analyze.libraries import register_library
from iis.analyze.libraries.base import ConceptLibrary, LibraryInputs, LibraryOptions

logger = logging.getLogger(__name__)

# METHOD.md caps k-means at this many elements; more are subsampled (seeded).
MAX_KMEANS_ELEMENTS = 20_000
# A few k-means++ restarts, best inertia kept: one restart is sklearn's default for k-means++ and
# is noticeably seed-sensitive at large K; more than a few costs time for little gain.
_N_INIT = 3
# Elements kept per concept for display.
_NUM_MEMBERS = 8
# Bounds the (E, chunk) similarity block when finding each centroid's nearest elements.
_SIMILARITY_BLOCK = 1 << 24


def nearest_members(elements: torch.Tensor, concepts: torch.Tensor, *, count: int) -> list[np.ndarray]:
    """Indices of the ``count`` elements most cosine-similar to each concept, nearest first.

    For unit vectors, cosine order is Euclidean-distance order, so this is "nearest to the
    centroid" as k-means sees it.

    Args:
        elements: ``(E, D)`` float32, L2-normalised rows.
        concepts: ``(K, D)`` float32, L2-normalised rows.
        count: members per concept (fewer when ``E < count``).

    Returns:
        ``K`` int64 arrays of length ``min(count, E)``.
    """
    num_elements = elements.shape[0]
    count = min(count, num_elements)
    block = max(1, _SIMILARITY_BLOCK // max(num_elements, 1))
    members: list[np.ndarray] = []
    for start in range(0, concepts.shape[0], block):
        sims = elements @ concepts[start : start + block].T
        # Ties go to the lower element index, so members do not depend on the sort's whims.
        top = torch.sort(sims, dim=0, descending=True, stable=True).indices[:count]
        members.extend(np.ascontiguousarray(top.T.numpy(), dtype=np.int64))
    return members


class ClusterConfig(LibraryOptions):
    """The cluster library has no settings of its own: ``analysis.options.cluster`` takes no keys."""


@register_library("cluster", options=ClusterConfig)
def build_cluster(
    inputs: LibraryInputs,
    *,
    num_concepts: int,
    seed: int,
    ratio: float | None = None,
    options: ClusterConfig | None = None,
) -> ConceptLibrary:
    """K-means (k-means++, seeded) on the normalised elements; re-normalised centroids.

    Args:
        inputs: only ``inputs.elements.features (E, D)`` is read.
        num_concepts: ``K``; at most ``E`` and at most ``MAX_KMEANS_ELEMENTS``.
        seed: seeds the subsample and sklearn's ``KMeans`` (``random_state``).
        options: none exist (see :class:`ClusterConfig`).
        ratio: unused; clusters do not depend on the sparsity ratio.

    Returns:
        A library with ``vectors (K, D)`` float32 unit rows and, per concept, the (up to 8)
        elements of the full set nearest its centroid. ``info`` holds ``inertia``, ``n_iter``
        and ``n_elements_used``.
    """
    features = torch.from_numpy(np.asarray(inputs.elements.features, dtype=np.float32))
    num_elements = features.shape[0]
    if num_concepts > num_elements:
        raise ValueError(
            f"cluster library wants {num_concepts} concepts but there are only {num_elements} elements"
        )
    if num_concepts < 1:
        raise ValueError(f"num_concepts must be at least 1, got {num_concepts}")
    if num_concepts > MAX_KMEANS_ELEMENTS:
        raise ValueError(
            f"cluster library wants {num_concepts} concepts but k-means runs on at most {MAX_KMEANS_ELEMENTS} elements"
        )
    unit = normalize_concepts(features)
    used = np.arange(num_elements)
    if num_elements > MAX_KMEANS_ELEMENTS:
        rng = np.random.default_rng(seed)
        used = np.sort(rng.choice(num_elements, size=MAX_KMEANS_ELEMENTS, replace=False))
        logger.info("cluster: k-means on %d of %d elements (seed %d)", used.size, num_elements, seed)
    # Imported here: scikit-learn (with scipy.stats) is a third of an analysis process' import time,
    # and only this library and end2end's initialisation use it.
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=num_concepts, init="k-means++", n_init=_N_INIT, random_state=seed)
    kmeans.fit(unit[used].numpy())
    centroids = normalize_concepts(torch.from_numpy(np.asarray(kmeans.cluster_centers_, dtype=np.float32)))
    return ConceptLibrary(
        name="cluster",
        vectors=centroids.numpy(),
        members=nearest_members(unit, centroids, count=_NUM_MEMBERS),
        info={
            "inertia": float(kmeans.inertia_),
            "n_iter": int(kmeans.n_iter_),
            "n_elements_used": int(used.size),
        },
    )
