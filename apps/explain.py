"""Interpretable prediction (METHOD.md, application 2): predict with ``g ∘ g_s ∘ a`` and say why.

For each image, the kept concepts are ranked by the magnitude of their contribution
``w_{y,k} · g_s(a)_k`` to the predicted class ``y`` (a large negative one explains as much as a
large positive one). The first ``top`` are listed; ``rest`` is the sum of the contributions not
listed, so that listed contributions + ``rest`` + bias = the logit of ``y`` for every image.
Each concept is shown by its source elements (image id and box) or word.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from iis.analyze.artifacts import load_library
from iis.analyze.store import as_str, open_feature_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explanations:
    """What :func:`explain_split` returns.

    Attributes:
        rows: one row per explained image, in the ``explanations.parquet`` schema (less the
            pipeline keys).
        interpretable_top1: top-1 of ``g ∘ g_s ∘ a`` over every valid image of the split.
        n_images: images the accuracy is over.
    """

    rows: pd.DataFrame
    interpretable_top1: float
    n_images: int


def explain_features(
    features: torch.Tensor,
    *,
    library_file: Path,
    ratio: float,
    top: int | None = 5,
) -> tuple[torch.Tensor, list[dict]]:
    """Predict and explain a batch of backbone features.

    Args:
        features: ``(N, D)`` float32 features from the library's backbone.
        library_file: a library saved by stage 2 (``concepts.parquet`` lists them).
        ratio: the sparsity ratio ``s`` of the head to use.
        top: concepts listed per image, by ``|contribution|``; None lists every kept concept.

    Returns:
        ``(N, C)`` logits, and per image a dict with ``pred``, ``logit``, ``bias``, the ranked
        ``concept``, ``contribution`` and ``activation`` lists, and ``rest``: the sum of the
        contributions of the kept concepts not listed (0 when every one is), so that
        ``sum(contribution) + rest + bias == logit``.
    """
    lib, heads = load_library(library_file)
    r = heads.index(ratio)
    kept = heads.kept_inputs(lib.activations(features), ratio)  # (N, K) g_s(a)
    logits = kept @ heads.weight[r] + heads.bias[r]
    pred = logits.argmax(dim=1)
    # (N, K): contribution of each concept to the predicted class; zero where not kept.
    contrib = kept * heads.weight[r][:, pred].T
    out = []
    for i in range(features.shape[0]):
        nonzero = torch.nonzero(kept[i], as_tuple=True)[0]
        order = nonzero[torch.argsort(contrib[i, nonzero].abs(), descending=True, stable=True)]
        listed, unlisted = (order, order[:0]) if top is None else (order[:top], order[top:])
        # Summed in float64: the identity is checked to 1e-4 on logits of any size.
        rest = float(contrib[i, unlisted].double().sum())
        out.append({
            "pred": int(pred[i]), "logit": float(logits[i, pred[i]]), "bias": float(heads.bias[r, pred[i]]),
            "concept": listed.tolist(), "contribution": contrib[i, listed].tolist(),
            "activation": kept[i, listed].tolist(), "rest": rest, "n_rest": int(unlisted.numel()),
        })
    return logits, out


def _provenance(store, lib_members: list[np.ndarray], words: list[str] | None, concepts: list[int]):
    g = store.group["elements"]
    source_ids = as_str(g["source_id"][:])
    boxes = np.asarray(g["box"][:])
    ids = [source_ids[lib_members[k]].tolist() for k in concepts]
    box = [boxes[lib_members[k]].tolist() for k in concepts]
    word = [words[k] if words else None for k in concepts]
    return ids, box, word


def explain_split(
    *,
    store: Path,
    library_file: Path,
    ratio: float,
    split: str = "test",
    image_ids: Sequence[str] | None = None,
    limit: int | None = 16,
    top: int | None = 5,
) -> Explanations:
    """Explain images of one split of a store with a saved library and its heads.

    Args:
        store: the model's feature store.
        library_file: the saved library (and heads) of that model.
        ratio: sparsity ratio of the head.
        split: which split's images to explain.
        image_ids: explain these ids only (an unknown id is an error); default: the first
            ``limit`` valid images.
        limit: how many images when ``image_ids`` is None; None explains every one.
        top: concepts listed per image, by ``|contribution|`` (None: every kept concept); the
            others are summed in the row's ``rest``.
    """
    fs = open_feature_store(store)
    data = fs.read_split(split)
    lib, _ = load_library(library_file)
    logits, details = explain_features(data.x, library_file=library_file, ratio=ratio, top=top)
    pred = logits.argmax(dim=1)
    accuracy = float((pred == data.labels).double().mean()) if len(data.labels) else float("nan")
    if image_ids is not None:
        where = {v: i for i, v in enumerate(data.ids)}
        missing = [v for v in image_ids if v not in where]
        if missing:
            raise ValueError(f"{store}: no valid {split} image with id {', '.join(missing[:5])}")
        chosen = [where[v] for v in image_ids]
    else:
        chosen = list(range(len(data.ids) if limit is None else min(limit, len(data.ids))))
    classes = fs.classes
    rows = []
    for i in chosen:
        d = details[i]
        source_id, box, word = _provenance(fs, lib.members, lib.words, d["concept"])
        true = int(data.labels[i])
        rows.append({
            "model": fs.model, "dataset": fs.dataset, "library": lib.name, "num_concepts": lib.num_concepts,
            "sparsity": float(ratio), "split": split, "image_id": str(data.ids[i]),
            "image_index": int(data.rows[i]), "true": true, "pred": d["pred"],
            "true_name": classes[true] if classes else str(true),
            "pred_name": classes[d["pred"]] if classes else str(d["pred"]),
            "correct": true == d["pred"], "logit": d["logit"], "bias": d["bias"], "rest": d["rest"],
            "n_rest": d["n_rest"],
            "concept": d["concept"], "contribution": d["contribution"], "activation": d["activation"],
            "word": word, "source_id": source_id, "box": box,
        })
    return Explanations(rows=pd.DataFrame(rows), interpretable_top1=accuracy, n_images=len(data.labels))


def default_explain_model(accuracy: pd.DataFrame, *, models: Sequence[str], pipeline: str | None = None) -> str:
    """The model `iis explain` (and `iis run`) explains when none is named: the best by **val** top-1.

    Chosen on the validation split, never on test: the explained model's test accuracy is then
    a fair figure, not the maximum over models. Uses the standard head's rows of the default
    protocol, averaged over seeds.

    Args:
        accuracy: ``accuracy.parquet`` as a frame.
        models: the candidates, in pipeline order; the first is the answer when none has a row.
        pipeline: keep only this pipeline's rows (None: every row).

    Raises:
        ValueError: ``models`` is empty.
    """
    if not models:
        raise ValueError("no model to explain: the pipeline has no models")
    std = accuracy[(accuracy["library"] == "standard") & (accuracy["protocol"].fillna("default") == "default")
                   & accuracy["model"].isin(list(models))]
    if pipeline is not None:
        std = std[std["pipeline"] == pipeline]
    val = std.groupby("model")["val_top1"].mean().dropna()
    if val.empty:
        return str(models[0])
    # Ties go to the earlier model of the pipeline, so the choice does not depend on row order.
    rank = {m: i for i, m in enumerate(models)}
    return str(max(val.index, key=lambda m: (val[m], -rank[m])))
