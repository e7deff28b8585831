"""From task results to table rows: ARR, IIS with its bootstrap interval, and correlations."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

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
from iis.analyze.versioning import joined_caveats

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
            "library_source": spec.elements_store, "analysis_version": res.accuracy_rows[0].get("analysis_version"),
        })
    return rows


def correlated(iis_table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``iis_table`` that correlations compare: the pooled pre-logit (``final``) features.

    Other layers (``layers:``) are compared along depth, in the report's depth section.
    """
    if "layer" not in iis_table:
        return iis_table
    return iis_table[iis_table["layer"].isna() | (iis_table["layer"] == "final")]


def default_group(model: str) -> str:
    """The group a model belongs to when the pipeline names none: its name before the first ``@``
    or ``+`` (``r10@e2`` and ``r10@e4+ft1`` are both of ``r10``; ``resnet50`` is its own)."""
    return re.split(r"[@+]", model, maxsplit=1)[0]


def model_groups(models: Sequence[str], groups: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each model's group: ``groups[model]`` where given, else :func:`default_group`."""
    given = groups or {}
    return {m: str(given[m]) if m in given and given[m] else default_group(m) for m in models}


def _training_order(model: str) -> tuple:
    # A fine-tuned copy ("+") is not a later point of its run's training; among the rest the
    # highest "@e<N>" is the last checkpoint; names without an epoch compare in natural order.
    epoch = re.search(r"@e(\d+)", model)
    natural = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", model))
    return ("+" not in model, int(epoch.group(1)) if epoch else -1, natural)


def final_models(groups: Mapping[str, str]) -> dict[str, str]:
    """Each group's final model: its last checkpoint (highest ``@e<N>``), fine-tuned copies
    (names with ``+``) only when the group has nothing else.

    Args:
        groups: model -> group, as :func:`model_groups` returns.

    Returns:
        group -> model.
    """
    members: dict[str, list[str]] = {}
    for model, group in groups.items():
        members.setdefault(group, []).append(model)
    return {group: max(models, key=_training_order) for group, models in sorted(members.items())}


def correlation_rows(iis_table: pd.DataFrame, *, groups: Mapping[str, str] | None = None,
                     n_resamples: int = 9999, bootstrap: int = 2000, seed: int = 0) -> list[dict]:
    """``correlation.parquet`` rows per (dataset, library, num_concepts, protocol, grid).

    Each model counts once: its standard top-1 and IIS are averaged over seeds first. IIS of two
    ratio grids are areas over different spans, so models are only compared within one grid.
    Models of one group (the checkpoints of one run, a fine-tuned copy and its source) are not
    independent, so besides the row over every model (``scope = "all"``) there is, when some
    group has several models, one row over each group's final model (``"across"``, when there
    are three groups or more) and one per group of three or more models (``"within"``, along its
    training; ``group`` names it).

    Args:
        iis_table: ``iis.parquet`` rows.
        groups: model -> group; models not in it get :func:`default_group`.
        n_resamples: pairings of the permutation p-values.
        bootstrap: resamples of the coefficients' intervals over models (0: none).
    """
    rows = []
    keys = ["dataset", "library", "num_concepts", "protocol", "grid", "library_source"]
    # Models are compared at their pooled pre-logit features, as the paper does.
    iis_table = correlated(iis_table)
    if "library_source" not in iis_table:
        iis_table = iis_table.assign(library_source=None)
    for key, table in iis_table.groupby(keys, sort=True, dropna=False):
        per_model = table.groupby("model", sort=True)[["standard_top1", "iis"]].mean()
        base = {**dict(zip(keys, key)), "caveat": joined_caveats(table), "bootstrap": bootstrap}
        member = model_groups(per_model.index.tolist(), groups)
        subsets = [("all", None, per_model.index.tolist())]
        if len(set(member.values())) < len(member):
            finals = sorted(final_models(member).values())
            if len(finals) >= 3:  # fewer have no correlation
                subsets.append(("across", None, finals))
            for group, models in sorted(pd.Series(member).groupby(pd.Series(member)).groups.items()):
                if len(models) >= 3:
                    subsets.append(("within", str(group), sorted(models)))
        for scope, group, models in subsets:
            sub = per_model.loc[models]
            stats = correlation(sub["standard_top1"].to_numpy(), sub["iis"].to_numpy(), n_resamples=n_resamples,
                                bootstrap=bootstrap, seed=seed)
            rows.append({**base, **stats, "scope": scope, "group": group, "models": list(models)})
            log.info("%s/%s K=%s grid %s, %s%s: %d models, spearman rho=%.3f [%.3f, %.3f]", key[0], key[1], key[2],
                     key[4], scope, f" {group}" if group else "", stats["n_models"], stats["spearman_rho"],
                     stats["spearman_ci_low"], stats["spearman_ci_high"])
    return rows


def direction(low: float, high: float, p: float | None = None, *, alpha: float = 0.05) -> str:
    """What an interval of a correlation coefficient lets one say: ``"positive"`` or
    ``"negative"`` when it excludes 0, ``"cannot tell"`` when it holds 0, ``"undefined"`` when
    it was not computed.

    With ``p`` (the coefficient's permutation p-value), a direction also needs ``p < alpha``: a
    bootstrap over very few models can exclude 0 by construction (three models in a perfect
    line resample to ±1 every time) where the permutation test shows the order could be chance.
    """
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "undefined"
    if p is not None and not pd.isna(p) and p >= alpha:
        return "cannot tell"
    if low > 0:
        return "positive"
    if high < 0:
        return "negative"
    return "cannot tell"
