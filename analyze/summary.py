"""From task results to table rows: ARR, IIS with its bootstrap interval, and correlations."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from iis.analyze.metrics import (
    accuracy_retention,
    correlation,
    interpretability_score,
    normalized_score,
    score_ci,
)
from iis.analyze.tables import grid_key
from iis.analyze.tasks import STANDARD, TaskResult

log = logging.getLogger(__name__)


def iis_rows(
    results: list[TaskResult], *, model_keys: dict[str, dict], bootstrap: int
) -> list[dict]:
    """One ``iis.parquet`` row per (model, library, num_concepts, seed).

    Args:
        results: every task's result; each library result is paired with the standard-head
            result of the same store and seed.
        model_keys: store path -> the model's key columns (pipeline, dataset, model, …).
        bootstrap: resamples for the IIS interval; 0 disables it.
    """
    standard = {(r.spec.store, r.spec.seed, r.spec.protocol): r for r in results if r.spec.library == STANDARD}
    rows = []
    for res in results:
        spec = res.spec
        if spec.library == STANDARD:
            continue
        base = standard.get((spec.store, spec.seed, spec.protocol))
        if base is None:
            raise RuntimeError(f"no standard-head result for {spec.store} seed {spec.seed}")
        if not np.array_equal(base.test_ids, res.test_ids):
            raise RuntimeError(f"{spec.store}: test images differ between the standard head and {spec.library}")
        by_ratio = {row["sparsity"]: row for row in res.accuracy_rows}
        ratios = sorted(by_ratio)
        standard_top1 = float(base.accuracy_rows[0]["test_top1"])
        arr = accuracy_retention(np.array([by_ratio[s]["test_top1"] for s in ratios]), standard_top1)
        order = np.argsort([row["sparsity"] for row in res.accuracy_rows], kind="stable")
        low = high = float("nan")
        if bootstrap > 0:
            low, high = score_ci(base.test_correct[0], res.test_correct[order], ratios,
                                 n_resamples=bootstrap, seed=spec.seed)
        rows.append({
            **model_keys[spec.store], "library": spec.library,
            "num_concepts": res.accuracy_rows[0]["num_concepts"], "seed": spec.seed,
            "standard_top1": standard_top1, "iis": interpretability_score(ratios, arr),
            "iis_normalized": normalized_score(ratios, arr), "iis_ci_low": low, "iis_ci_high": high,
            "ratios": [float(s) for s in ratios], "arr": [float(a) for a in arr], "protocol": spec.protocol,
            "caveat": res.accuracy_rows[0].get("caveat"), "grid": grid_key(spec.ratios), "bootstrap": bootstrap,
            "library_source": spec.elements_store,
        })
    return rows


def correlated(iis_table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``iis_table`` that correlations compare: the pooled pre-logit (``final``) features.

    Other layers (``layers:``) are compared along depth, in the report's depth section.
    """
    if "layer" not in iis_table:
        return iis_table
    return iis_table[iis_table["layer"].isna() | (iis_table["layer"] == "final")]


def correlation_rows(iis_table: pd.DataFrame, *, n_resamples: int = 9999, seed: int = 0) -> list[dict]:
    """One ``correlation.parquet`` row per (dataset, library, num_concepts, protocol, grid).

    Each model counts once: its standard top-1 and IIS are averaged over seeds first. IIS of two
    ratio grids are areas over different spans, so models are only compared within one grid.
    """
    rows = []
    keys = ["dataset", "library", "num_concepts", "protocol", "grid", "library_source"]
    # Models are compared at their pooled pre-logit features, as the paper does.
    iis_table = correlated(iis_table)
    for key, group in iis_table.groupby(keys, sort=True, dropna=False):
        per_model = group.groupby("model", sort=True)[["standard_top1", "iis"]].mean()
        stats = correlation(per_model["standard_top1"].to_numpy(), per_model["iis"].to_numpy(),
                            n_resamples=n_resamples, seed=seed)
        caveats = sorted({c for c in group["caveat"].dropna()}) if "caveat" in group else []
        rows.append({**dict(zip(keys, key)), **stats, "models": per_model.index.tolist(),
                     "caveat": "; ".join(caveats) or None})
        log.info("%s/%s K=%s grid %s: %d models, pearson r=%.3f spearman rho=%.3f", key[0], key[1], key[2],
                 key[4], stats["n_models"], stats["pearson_r"], stats["spearman_rho"])
    return rows
