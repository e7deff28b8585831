"""The fine-tuning comparison as table rows: ``finetune.parquet`` and ``finetune_delta.parquet``.

``finetune`` has one row per (model, λ, training seed, scoring library): standard top-1 and IIS
before and after, each a mean over the analysis (library) seeds. ``finetune_delta`` has one row
per (model, λ, scoring library): the paired difference λ − 0 of standard top-1 and of IIS over
every (training seed, library seed) pair, with a percentile bootstrap interval that resamples
test images and those pairs together (:func:`iis.analyze.ranking.bootstrap_scores`, on the
per-image correctness every analysis keeps under ``<results>/correct/``). Both arms are scored
on the same test images with the same seeds, so the bootstrap is paired: each resample draws
one set of images and one set of seed pairs for both arms.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from iis.analyze.ranking import bootstrap_scores, correctness_path, load_correctness

log = logging.getLogger(__name__)

PROTOCOL = "default"  # fine-tuned models are analysed with the default protocol only


@dataclass(frozen=True)
class Comparison:
    """What was compared, for the key and value columns of every row.

    Attributes:
        pipeline, dataset: the rows' keys.
        start: the model fine-tuning started from.
        lam: λ of the treated arm (the control is 0).
        arms: ``{(λ, training seed): fine-tuned model name}`` for both arms and every seed.
        libraries: the scoring libraries.
        num_concepts: ``K``.
        grid: the analysis' ``grid`` key.
        library_seeds: the analysis seeds every arm is scored with.
        settings: value columns shared by every row (epochs, steps, ratio, holdout, …).
        weights: ``{model: its tables' weights key}`` for the start model and every arm, so rows
            of an earlier run under the same name (other weights, e.g. another budget) are not read.
    """

    pipeline: str
    dataset: str
    start: str
    lam: float
    arms: Mapping[tuple[float, int], str]
    libraries: Sequence[str]
    num_concepts: int
    grid: str
    library_seeds: Sequence[int]
    settings: Mapping[str, object]
    weights: Mapping[str, str]

    @property
    def seeds(self) -> list[int]:
        """The training seeds, ascending."""
        return sorted({seed for _, seed in self.arms})


def _scored(iis: pd.DataFrame, c: Comparison, model: str, library: str) -> pd.DataFrame:
    """``model``'s IIS rows for ``library`` at every library seed of ``c``, indexed by seed."""
    rows = iis[(iis["model"] == model) & (iis["library"] == library) & (iis["num_concepts"] == c.num_concepts)
               & (iis["protocol"] == PROTOCOL) & (iis["grid"] == c.grid) & (iis["pipeline"] == c.pipeline)
               & iis["library_source"].isna() & iis["seed"].isin(list(c.library_seeds))
               & (iis["weights"] == c.weights[model])]
    found = rows.set_index("seed").sort_index()
    if sorted(found.index) != sorted(c.library_seeds):
        raise RuntimeError(f"fine-tuning: iis.parquet lacks {model}'s {library} rows for seeds "
                           f"{sorted(set(c.library_seeds) - set(found.index))} (grid {c.grid})")
    return found


def arm_rows(iis: pd.DataFrame, c: Comparison, seconds: Mapping[tuple[float, int], float]) -> list[dict]:
    """``finetune.parquet`` rows: one per (arm, training seed, library), means over library seeds.

    Args:
        iis: ``iis.parquet`` holding the start model's and every arm's rows.
        seconds: ``{(λ, seed): training wall time}``.
    """
    rows = []
    for library in c.libraries:
        before = _scored(iis, c, c.start, library)
        for (lam, seed), model in sorted(c.arms.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
            after = _scored(iis, c, model, library)
            rows.append({
                "pipeline": c.pipeline, "dataset": c.dataset, "model": c.start, "lambda": lam, "seed": seed,
                **c.settings, "library": library, "num_concepts": c.num_concepts, "grid": c.grid,
                "library_seeds": [int(s) for s in c.library_seeds],
                "standard_top1_before": float(before["standard_top1"].mean()),
                "standard_top1_after": float(after["standard_top1"].mean()),
                "iis_before": float(before["iis"].mean()), "iis_after": float(after["iis"].mean()),
                "finetuned_model": model, "seconds": float(seconds[(lam, seed)]),
            })
    return rows


def delta_rows(iis: pd.DataFrame, c: Comparison, *, results: Path, n_resamples: int, confidence: float = 0.95,
               seed: int = 0) -> list[dict]:
    """``finetune_delta.parquet`` rows: per library, λ − 0 in standard top-1 and IIS, with intervals.

    The point estimates are the mean, over (training seed, library seed) pairs, of the λ arm's
    value minus the λ = 0 arm's (from ``iis``); the intervals are percentiles of the same
    difference over ``n_resamples`` paired resamples of test images and pairs. Without the
    per-image results (``n_resamples`` 0, or files missing) the intervals are null.
    """
    rows = []
    alpha = (1 - confidence) / 2
    pairs = [(s, ls) for s in c.seeds for ls in sorted(c.library_seeds)]
    for library in c.libraries:
        values = {}
        for lam in (c.lam, 0.0):
            scored = {s: _scored(iis, c, c.arms[(lam, s)], library) for s in c.seeds}
            values[lam] = {what: np.array([scored[s].loc[ls, what] for s, ls in pairs], dtype=np.float64)
                           for what in ("standard_top1", "iis")}
        top1_delta = values[c.lam]["standard_top1"] - values[0.0]["standard_top1"]
        iis_delta = values[c.lam]["iis"] - values[0.0]["iis"]
        intervals = {"top1": (math.nan, math.nan), "iis": (math.nan, math.nan)}
        n_test = None
        samples = _paired_samples(c, library, pairs, results=results, n_resamples=n_resamples, seed=seed) \
            if n_resamples > 0 else None
        if samples is not None:
            n_test, (top1, iis_s) = samples
            for what, boot in (("top1", top1), ("iis", iis_s)):
                diff = boot[:, 0] - boot[:, 1]
                diff = diff[np.isfinite(diff)]
                if diff.size:
                    intervals[what] = tuple(float(v) for v in np.quantile(diff, [alpha, 1 - alpha]))
        row = {
            "pipeline": c.pipeline, "dataset": c.dataset, "model": c.start, "lambda": c.lam, **c.settings,
            "library": library, "num_concepts": c.num_concepts, "grid": c.grid, "seeds": c.seeds,
            "library_seeds": [int(s) for s in sorted(c.library_seeds)], "n_pairs": len(pairs), "n_test": n_test,
            "top1_lambda": float(values[c.lam]["standard_top1"].mean()),
            "top1_zero": float(values[0.0]["standard_top1"].mean()),
            "top1_delta": float(top1_delta.mean()),
            "top1_delta_ci_low": intervals["top1"][0], "top1_delta_ci_high": intervals["top1"][1],
            "iis_lambda": float(values[c.lam]["iis"].mean()), "iis_zero": float(values[0.0]["iis"].mean()),
            "iis_delta": float(iis_delta.mean()),
            "iis_delta_ci_low": intervals["iis"][0], "iis_delta_ci_high": intervals["iis"][1],
            "bootstrap": n_resamples if samples is not None else 0, "confidence": confidence,
        }
        rows.append(row)
        log.info("fine-tune %s lambda=%g vs 0, %s: top-1 %+.4f [%.4f, %.4f], IIS %+.4f [%.4f, %.4f] "
                 "(%d seed pairs)", c.start, c.lam, library, row["top1_delta"], row["top1_delta_ci_low"],
                 row["top1_delta_ci_high"], row["iis_delta"], row["iis_delta_ci_low"], row["iis_delta_ci_high"],
                 len(pairs))
    return rows


def _paired_samples(c: Comparison, library: str, pairs: list[tuple[int, int]], *, results: Path,
                    n_resamples: int, seed: int) -> tuple[int, tuple[np.ndarray, np.ndarray]] | None:
    """``(N test images, (top1, iis))``, each ``(B, 2)``: the λ arm, then the λ = 0 arm, over the same
    resampled images and seed pairs; None when some per-image result is missing or misaligned."""
    standard, heads, ids, ratios = [], [], None, None
    for lam in (c.lam, 0.0):
        per_pair = []
        for s, ls in pairs:
            model = c.arms[(lam, s)]
            found = load_correctness(correctness_path(results, model=model, library=library,
                                                      num_concepts=c.num_concepts, seed=ls, protocol=PROTOCOL,
                                                      grid=c.grid))
            if found is None:
                log.warning("fine-tune %s: no per-image results of %s seed %d; no interval", library, model, ls)
                return None
            if ids is None:
                ids, ratios = found.test_ids, found.ratios
            elif not (np.array_equal(ids, found.test_ids) and np.array_equal(ratios, found.ratios)):
                log.warning("fine-tune %s: %s seed %d was scored on other test images or ratios; no interval",
                            library, model, ls)
                return None
            per_pair.append(found)
        standard.append(np.stack([p.standard for p in per_pair]))
        heads.append(np.stack([p.heads for p in per_pair]))
    return len(ids), bootstrap_scores(standard, heads, ratios, n_resamples=n_resamples, seed=seed)
