"""An IIS ranking of models with its confidence (``ranking.parquet``).

Per (dataset, library, num_concepts, protocol, grid, library_source) the models are ordered by IIS
(mean over library seeds), and for each one the probability that its IIS exceeds the next one's is estimated
by a bootstrap that resamples test images and library seeds together:

- test images: one multinomial draw of image counts per resample, shared by every model and
  head, since all models of a dataset are scored on the same test images (a paired bootstrap,
  like :func:`iis.analyze.metrics.score_ci`);
- library seeds: each model's IIS in a resample is the mean over its seeds drawn with
  replacement; models with the same seeds draw the same ones (a seed builds the same prototype
  draws for every model).

The bootstrap needs each head's per-image correctness, which only the task that fitted it has:
:func:`save_correctness` keeps it beside the tables (``<results>/correct/``), so models analysed
by earlier runs can be ranked with later ones. Also per row: the joint interval of IIS over
images and seeds, the Kendall τ between the orders that different library seeds give (how
stable the ranking is), and accuracy-adjusted IIS (the residual of IIS regressed on standard
top-1 across the models: more or less interpretable than its accuracy predicts).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from iis.analyze.tables import key_value
from iis.analyze.tasks import STANDARD, TaskResult
from iis.analyze.versioning import joined_caveats
from scipy import stats
from scipy.integrate import trapezoid

from iis.store_format import atomic_file, check_name

log = logging.getLogger(__name__)

CORRECT_DIR = "correct"  # under the results folder
# `library_source` too: a model scored with another store's elements (`analysis.library_from`) has IIS
# rows of their own, which must not be averaged with those of its own elements.
GROUP_KEYS = ["dataset", "library", "num_concepts", "protocol", "grid", "library_source"]
# How far the IIS of a kept per-image file may lie from its iis.parquet row and still be that row's.
_IIS_TOLERANCE = 1e-9
_CELLS = 1 << 24  # resample-by-image cells per bootstrap chunk (64 MiB of float32 counts)


@dataclass(frozen=True)
class Correctness:
    """One (model, library, K, seed, protocol, grid)'s per-image test results.

    Attributes:
        test_ids: ``(N,)`` str, the test images in order.
        standard: ``(N,)`` bool, the standard head's correctness.
        heads: ``(R, N)`` bool, each interpretable head's correctness, rows in ``ratios`` order.
        ratios: ``(R,)`` float64, ascending.
    """

    test_ids: np.ndarray
    standard: np.ndarray
    heads: np.ndarray
    ratios: np.ndarray


def correctness_path(results: Path, *, model: str, library: str, num_concepts: int, seed: int, protocol: str,
                     grid: str, library_source: str | None = None) -> Path:
    """``<results>/correct/<model>/<library>-K<K>-seed<s>-<protocol>-g<hash of grid>.npz``, with
    ``-e<hash of library_source>`` before the suffix for a library built from another store's elements."""
    check_name(model, what="model")
    check_name(library, what="library")
    digest = hashlib.sha1(grid.encode()).hexdigest()[:12]
    source = "" if library_source is None else f"-e{hashlib.sha1(str(library_source).encode()).hexdigest()[:12]}"
    return Path(results) / CORRECT_DIR / model / f"{library}-K{num_concepts}-seed{seed}-{protocol}-g{digest}{source}.npz"


def save_correctness(results: Path, done: Sequence[TaskResult], *, models: Mapping[str, str], grid: str) -> int:
    """Write the per-image correctness of every library result in ``done``, paired with the
    standard head's of the same store, seed and protocol. Returns the number of files written.

    Args:
        results: the results folder.
        done: task results of one analysis run.
        models: store path -> model name (the tables' ``model``).
        grid: the run's ``grid`` key.
    """
    standard = {(r.spec.store, r.spec.seed, r.spec.protocol): r for r in done if r.spec.library == STANDARD}
    written = 0
    for res in done:
        spec = res.spec
        base = standard.get((spec.store, spec.seed, spec.protocol))
        if spec.library == STANDARD or base is None:
            continue
        order = np.argsort([row["sparsity"] for row in res.accuracy_rows], kind="stable")
        path = correctness_path(results, model=models[spec.store], library=spec.library,
                                num_concepts=spec.num_concepts, seed=spec.seed, protocol=spec.protocol, grid=grid,
                                library_source=spec.elements_store)
        path.parent.mkdir(parents=True, exist_ok=True)
        heads = np.asarray(res.test_correct, dtype=bool)[order]
        with atomic_file(path) as tmp, open(tmp, "wb") as fh:
            # Bits, not bytes: a 50k-image test set with 9 heads is 56 kB per file.
            np.savez(fh, test_ids=np.asarray(res.test_ids, dtype=str), n=np.int64(heads.shape[1]),
                     standard=np.packbits(np.asarray(base.test_correct[0], dtype=bool)),
                     heads=np.packbits(heads, axis=1),
                     ratios=np.array([res.accuracy_rows[i]["sparsity"] for i in order], dtype=np.float64),
                     grid=np.array(grid))
        written += 1
    return written


def load_correctness(path: Path) -> Correctness | None:
    """What :func:`save_correctness` wrote, or None when there is no such file."""
    if not Path(path).is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        n = int(data["n"])
        return Correctness(test_ids=data["test_ids"], standard=np.unpackbits(data["standard"], count=n).astype(bool),
                           heads=np.unpackbits(data["heads"], axis=1, count=n).astype(bool), ratios=data["ratios"])


def correctness_iis(found: Correctness) -> float:
    """The IIS that per-image results give: trapezoid of each head's top-1 over the standard head's."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(trapezoid(found.heads.mean(axis=1) / found.standard.mean(), found.ratios))


def iis_bootstrap(standard: Sequence[np.ndarray], heads: Sequence[np.ndarray], ratios: Sequence[float], *,
                  n_resamples: int, seed: int = 0) -> np.ndarray:
    """Each model's IIS in every resample of test images and library seeds.

    Args:
        standard: per model, ``(S_m, N)`` bool: the standard head's correctness at each seed.
        heads: per model, ``(S_m, R, N)`` bool: each ratio's head's correctness at each seed.
        ratios: ``(R,)`` ascending sparsity ratios of the heads.
        n_resamples: ``B``.

    Returns:
        ``(B, M)`` float64: model ``m``'s IIS (mean over its resampled seeds) in resample ``b``.
    """
    return bootstrap_scores(standard, heads, ratios, n_resamples=n_resamples, seed=seed)[1]


def bootstrap_scores(standard: Sequence[np.ndarray], heads: Sequence[np.ndarray], ratios: Sequence[float], *,
                     n_resamples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each model's standard top-1 and IIS in every resample of test images and seeds.

    Arguments as :func:`iis_bootstrap`. Models with the same number of seeds draw the same seed
    positions in a resample, and every model the same images: a difference of two models'
    samples is a paired bootstrap of their difference.

    Returns:
        ``(top1, iis)``, each ``(B, M)`` float64: model ``m``'s standard-head test top-1 and its
        IIS, means over its resampled seeds, in resample ``b``.
    """
    if len(standard) != len(heads) or not standard:
        raise ValueError(f"need one standard and one head array per model, got {len(standard)} and {len(heads)}")
    grid = np.asarray(ratios, dtype=np.float64)
    n = standard[0].shape[-1]
    rows, spans = [], []
    for std, hd in zip(standard, heads):
        s, r, width = hd.shape
        if std.shape != (s, width) or width != n or r != grid.shape[0]:
            raise ValueError(f"correctness shapes {std.shape} and {hd.shape} do not match {n} images, {grid.shape[0]} ratios")
        spans.append((len(rows), s))
        for k in range(s):
            rows += [std[k], *hd[k]]
    correct = np.asarray(rows, dtype=np.float32)  # (H, N), H = sum over models of S_m * (R + 1)
    rng = np.random.default_rng(seed)
    seed_draws = rng.random((n_resamples, max(s for _, s in spans)))
    out = np.empty((n_resamples, len(spans)))
    top1 = np.empty((n_resamples, len(spans)))
    chunk = max(1, min(n_resamples, _CELLS // max(1, n)))
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=stop - start).astype(np.float32)
        accuracy = (counts @ correct.T) / n  # (b, H)
        for m, (first, s) in enumerate(spans):
            block = accuracy[:, first:first + s * (1 + grid.shape[0])].reshape(-1, s, 1 + grid.shape[0])
            with np.errstate(divide="ignore", invalid="ignore"):
                score = trapezoid(block[:, :, 1:] / block[:, :, :1], grid, axis=-1)  # (b, S_m)
            picks = np.floor(seed_draws[start:stop, :s] * s).astype(np.int64)
            out[start:stop, m] = np.take_along_axis(score, picks, axis=1).mean(axis=1)
            top1[start:stop, m] = np.take_along_axis(block[:, :, 0], picks, axis=1).mean(axis=1)
    return top1, out


def exceed_probability(samples: np.ndarray, first: int, second: int) -> float:
    """P(IIS of ``first`` > IIS of ``second``) over ``samples (B, M)``; a tie counts one half,
    so a model against itself is exactly 0.5."""
    diff = samples[:, first] - samples[:, second]
    diff = diff[np.isfinite(diff)]
    if not diff.size:
        return math.nan
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def seed_kendall_tau(iis: pd.DataFrame) -> tuple[float, int]:
    """Mean Kendall τ between the model orders of every pair of library seeds that all models
    share, and the number of pairs. ``iis`` holds columns ``model, seed, iis``; NaN without two
    common seeds or two models."""
    table = iis.pivot_table(index="model", columns="seed", values="iis", aggfunc="mean").dropna(axis=1)
    if table.shape[0] < 2 or table.shape[1] < 2:
        return math.nan, 0
    taus = [stats.kendalltau(table[a], table[b]).statistic for a, b in itertools.combinations(table.columns, 2)]
    taus = [t for t in taus if np.isfinite(t)]
    return (float(np.mean(taus)) if taus else math.nan), len(taus)


def accuracy_adjusted(top1: np.ndarray, iis: np.ndarray) -> np.ndarray:
    """Residuals of the least-squares line of IIS on standard top-1 across models: ``(M,)``.
    Positive: more interpretable than its accuracy predicts. NaN for fewer than three models or
    one accuracy."""
    x, y = np.asarray(top1, dtype=np.float64), np.asarray(iis, dtype=np.float64)
    if x.shape[0] < 3 or np.ptp(x) == 0:
        return np.full(x.shape, math.nan)
    fit = stats.linregress(x, y)
    return y - (fit.intercept + fit.slope * x)


def ranking_rows(iis_table: pd.DataFrame, *, results: Path, n_resamples: int, confidence: float = 0.95,
                 seed: int = 0) -> list[dict]:
    """``ranking.parquet`` rows: one per model of each (dataset, library, num_concepts, protocol, grid,
    library_source).

    Args:
        iis_table: ``iis.parquet`` rows.
        results: the results folder whose ``correct/`` files hold the per-image correctness.
        n_resamples: bootstrap resamples (0: no probabilities and no intervals).
        confidence: level of the IIS intervals.
    """
    rows = []
    alpha = (1 - confidence) / 2
    if "library_source" not in iis_table:
        iis_table = iis_table.assign(library_source=None)
    for key, table in iis_table.groupby(GROUP_KEYS, sort=True, dropna=False):
        where = {k: (None if pd.isna(v) else v) for k, v in zip(GROUP_KEYS, key)}
        per_model = table.groupby("model", sort=True).agg(
            standard_top1=("standard_top1", "mean"), iis=("iis", "mean"), iis_normalized=("iis_normalized", "mean"),
            seeds=("seed", lambda s: sorted(int(v) for v in set(s))))
        # Highest IIS first; ties keep name order, so the table does not depend on row order.
        per_model = per_model.sort_values("iis", ascending=False, kind="stable")
        models = per_model.index.tolist()
        samples = _samples(table, where, models, per_model["seeds"].tolist(), results=results,
                           n_resamples=n_resamples, seed=seed) if n_resamples > 0 else None
        tau, pairs = seed_kendall_tau(table[["model", "seed", "iis"]])
        adjusted = accuracy_adjusted(per_model["standard_top1"].to_numpy(), per_model["iis"].to_numpy())
        caveat = joined_caveats(table)
        for i, model in enumerate(models):
            low = high = p_next = math.nan
            if samples is not None:
                finite = samples[:, i][np.isfinite(samples[:, i])]
                if finite.size:
                    low, high = (float(v) for v in np.quantile(finite, [alpha, 1 - alpha]))
                if i + 1 < len(models):
                    p_next = exceed_probability(samples, i, i + 1)
            rows.append({
                **where, "model": model, "rank": i + 1, "n_models": len(models),
                "n_seeds": len(per_model.iloc[i]["seeds"]), "standard_top1": float(per_model.iloc[i]["standard_top1"]),
                "iis": float(per_model.iloc[i]["iis"]), "iis_normalized": float(per_model.iloc[i]["iis_normalized"]),
                "iis_ci_low": low, "iis_ci_high": high,
                "next_model": models[i + 1] if i + 1 < len(models) else None, "p_above_next": p_next,
                "seed_kendall_tau": tau, "seed_pairs": pairs, "iis_adjusted": float(adjusted[i]),
                "bootstrap": n_resamples if samples is not None else 0, "caveat": caveat,
            })
        log.info("ranking %s/%s K=%s grid %s: %s", where["dataset"], where["library"], where["num_concepts"],
                 where["grid"], " > ".join(models))
    return rows


def _samples(table: pd.DataFrame, where: dict, models: list[str], seeds: list[list[int]], *, results: Path,
             n_resamples: int, seed: int) -> np.ndarray | None:
    """The ``(B, M)`` bootstrap of :func:`iis_bootstrap` for ``models`` (ranked order), or None
    when some model's per-image correctness is missing, is not that of its ``table`` row (another
    run's, or one whose tables were never committed), or the models' test images differ."""
    standard, heads, ids, ratios = [], [], None, None
    for model, model_seeds in zip(models, seeds):
        per_seed = []
        for s in model_seeds:
            found = load_correctness(correctness_path(
                results, model=model, library=where["library"], num_concepts=int(where["num_concepts"]), seed=s,
                protocol=where["protocol"], grid=where["grid"], library_source=where["library_source"]))
            row_iis = table.loc[(table["model"] == model) & (table["seed"] == s), "iis"]
            file_iis = None if found is None else correctness_iis(found)
            if file_iis is not None and not all(abs(file_iis - v) <= _IIS_TOLERANCE for v in row_iis):
                log.warning("ranking %s/%s grid %s: the per-image results of %s seed %d are not those of its "
                            "iis.parquet row (IIS %.6f against %s); no probabilities for this ranking",
                            where["library"], where["num_concepts"], where["grid"], model, s,
                            file_iis, ", ".join(f"{v:.6f}" for v in row_iis))
                return None
            if found is None:
                log.warning("ranking %s/%s grid %s: no per-image results of %s seed %d (analysed before they "
                            "were kept; rerun `iis analyze` for it); no probabilities for this ranking",
                            where["library"], where["num_concepts"], where["grid"], model, s)
                return None
            if ids is None:
                ids, ratios = found.test_ids, found.ratios
            elif not (np.array_equal(ids, found.test_ids) and np.array_equal(ratios, found.ratios)):
                log.warning("ranking %s/%s grid %s: %s seed %d was scored on other test images or ratios; "
                            "no probabilities for this ranking", where["library"], where["num_concepts"],
                            where["grid"], model, s)
                return None
            per_seed.append(found)
        standard.append(np.stack([c.standard for c in per_seed]))
        heads.append(np.stack([c.heads for c in per_seed]))
    return iis_bootstrap(standard, heads, ratios, n_resamples=n_resamples, seed=seed)


def ranking_current(iis: pd.DataFrame, ranking: pd.DataFrame) -> bool:
    """Whether ``ranking`` has a row for every (group, model) of ``iis``."""
    if iis.empty:
        return True
    if ranking.empty:
        return False

    def pairs(df: pd.DataFrame) -> set[tuple]:
        columns = df.reindex(columns=[*GROUP_KEYS, "model"])  # a table from before `library_source`: null
        return {tuple(key_value(v) for v in row) for row in columns.itertuples(index=False, name=None)}

    return pairs(iis) <= pairs(ranking)
