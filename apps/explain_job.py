"""Application 2 on a results folder: explain one model's predictions and record them.

:mod:`iis.apps.explain` explains a split with a saved library; this module finds that library
among stage 2's outputs, compares with the standard head's accuracy, and upserts
``explanations.parquet``. It takes paths and names, never a pipeline config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from iis.analyze import tables
from iis.analyze.artifacts import library_path
from iis.analyze.libraries import get_library
from iis.apps.explain import default_explain_model, explain_split


def explain_model(*, store: Path, results: Path, model: str, library: str, num_concepts: int, seed: int,
                  ratio: float, split: str = "test", images: Sequence[str] | None = None,
                  limit: int | None = None, top: int | None = None, pipeline: str | None = None) -> dict:
    """Explain ``model``'s predictions with ``g ∘ g_s ∘ a`` at ``ratio`` and upsert ``explanations.parquet``.

    Args:
        store: the model's feature store.
        results: the results folder stage 2 wrote (its ``libraries/`` and ``accuracy.parquet``).
        model, library, num_concepts, seed: which saved library (protocol ``default``).
        ratio: the sparsity ratio of the head.
        split: ``train``, ``val`` or ``test``.
        images: ids of the images to explain; None takes the first ``limit``.
        limit, top: images explained and concepts listed per image; None keeps
            :func:`~iis.apps.explain.explain_split`'s defaults.
        pipeline: the ``pipeline`` key of the rows (and named in the "run analyze first" hint).

    Returns:
        ``{"split", "interpretable_top1", "standard_top1", "accuracy_lost", "n_images", "rows"}``;
        ``standard_top1`` is NaN off the test split.
    """
    results = Path(results)
    lib_file = library_path(results / "libraries", model=model, library=library, num_concepts=num_concepts,
                            seed=seed, protocol="default", ratio=ratio if get_library(library).per_ratio else None)
    if not lib_file.is_file():
        run = f"`iis analyze {pipeline}`" if pipeline else "`iis analyze`"
        raise FileNotFoundError(f"{lib_file}: no saved library; run {run} first "
                                f"(with {library} in analysis.libraries and seed {seed})")
    given = {k: v for k, v in (("limit", limit), ("top", top)) if v is not None}
    result = explain_split(store=store, library_file=lib_file, ratio=ratio, split=split, image_ids=images, **given)
    acc = tables.read_table(results, "accuracy")
    std = acc[(acc.model == model) & (acc.library == "standard") & (acc.seed == seed) & (acc.protocol == "default")]
    standard_top1 = float(std.test_top1.iloc[0]) if len(std) and split == "test" else float("nan")
    rows = result.rows.assign(pipeline=pipeline or "", seed=seed)
    tables.upsert(results, "explanations", rows)
    summary = {"split": split, "interpretable_top1": result.interpretable_top1, "standard_top1": standard_top1,
               "accuracy_lost": standard_top1 - result.interpretable_top1, "n_images": result.n_images,
               "rows": len(rows)}
    return summary


def best_model(results: Path, *, pipeline: str, models: Sequence[str]) -> str:
    """Of ``models``, the one whose standard head has the best mean **val** top-1 in ``results``
    (the first when none has a row yet); see :func:`iis.apps.explain.default_explain_model`."""
    return default_explain_model(tables.read_table(results, "accuracy"), models=models, pipeline=pipeline)
