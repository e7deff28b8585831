"""Where a store's features sit in its network (its layer and depth), and concept libraries built
from another store's visual elements (``analysis.library_from``).

A library is a set of vectors in the feature space of one backbone, with one set of weights, at
one layer. Elements from any other (backbone, weights, layer) live in another space, so a
library built from them would be meaningless there: :func:`check_source` refuses them by name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from iis.analyze.store import FeatureStore, StoreError, open_feature_store

log = logging.getLogger(__name__)

FINAL = "final"  # the layer of a store made without `layers:` (the pooled pre-logit features)


def store_layer(attrs: Mapping) -> dict:
    """``{"layer": str, "depth": float}`` of a store from its attributes.

    A store without ``depth`` holds the pooled pre-logit features (its ``layer`` attribute says
    ``pre_logits``, as every store has since before layers existed): layer ``final``, depth 1.0.
    """
    if attrs.get("depth") is None:
        return {"layer": FINAL, "depth": 1.0}
    return {"layer": str(attrs.get("layer")), "depth": float(attrs["depth"])}


def _space(store: FeatureStore) -> dict[str, object]:
    """What makes two stores' features comparable, named as a user would fix it."""
    attrs = store.attrs
    return {"backbone": attrs.get("backbone"), "weights (sha256)": attrs.get("weights_sha256"),
            "layer": store_layer(attrs)["layer"], "feature_dim": store.feature_dim}


def check_source(store: FeatureStore, source: FeatureStore) -> None:
    """Refuse ``source``'s visual elements for ``store``'s libraries unless both stores share the
    backbone, the weights' sha256, the layer and the feature dimension.

    Raises:
        StoreError: one line naming both stores and every mismatch, with both values.
    """
    mine, theirs = _space(store), _space(source)
    diff = [f"{k} {theirs[k]!r} != {mine[k]!r}" for k in mine if mine[k] != theirs[k]]
    if diff:
        raise StoreError(f"{store.path}: library_from {source.path} holds elements of another feature space "
                         f"({'; '.join(diff)}); use a store of the same backbone, weights and layer")
    if source.num_elements == 0:
        raise StoreError(f"{store.path}: library_from {source.path} has no visual elements; extract it with elements")


def check_sources(stores: Mapping[str, FeatureStore],
                  elements_stores: Mapping[str, Path] | None) -> dict[str, FeatureStore]:
    """Open and check every elements store of ``elements_stores`` (``{store path: elements store}``).

    Returns:
        ``{store path: opened elements store}`` for the stores that take another's elements.

    Raises:
        StoreError: an elements store that is missing, incomplete, or of another feature space.
    """
    out: dict[str, FeatureStore] = {}
    for path, source_path in (elements_stores or {}).items():
        key = str(Path(path))
        if key not in stores:
            raise ValueError(f"library_from names {path}, which is not among the analysed stores")
        source = open_feature_store(Path(source_path))  # a missing or partial store fails by name
        check_source(stores[key], source)
        log.info("%s: libraries from the visual elements of %s", key, source.path)
        out[key] = source
    return out
