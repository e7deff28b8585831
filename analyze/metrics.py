"""Accuracy retention, the Inherent Interpretability Score, their uncertainty, and correlation.

METHOD.md, "Accuracy retention and the score" and "Correlation between interpretability and
classifiability". Pure numpy/scipy functions on arrays; bootstraps and permutation tests are
scipy's (``scipy.stats.bootstrap``, ``scipy.stats.permutation_test``), with vectorised statistics.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from scipy.integrate import trapezoid

logger = logging.getLogger(__name__)


def _sorted_grid(ratios: Sequence[float], arr: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a ratio grid and its values, and sort both by ratio: two ``(R,)`` arrays.

    ``arr`` may carry leading batch dimensions (its last axis runs over the ratios).
    """
    grid = np.asarray(ratios, dtype=np.float64)
    values = np.asarray(arr, dtype=np.float64)
    if grid.ndim != 1 or grid.shape[0] != values.shape[-1]:
        raise ValueError(f"{grid.shape[0] if grid.ndim == 1 else grid.shape} ratios but {values.shape[-1]} values")
    if grid.shape[0] < 2:
        raise ValueError(f"the score needs at least two sparsity ratios, got {grid.shape[0]}")
    if np.unique(grid).shape[0] != grid.shape[0]:
        raise ValueError(f"duplicate sparsity ratios in {grid.tolist()}")
    order = np.argsort(grid, kind="stable")
    return grid[order], values[..., order]


def interpretability_score(ratios: Sequence[float], arr: Sequence[float]) -> float:
    """IIS: the trapezoid-rule area under ``ARR(s)`` over the sorted ratio grid, in units of ``s``.

    Args:
        ratios: ``(R,)`` sparsity ratios, any order, no duplicates, ``R >= 2``.
        arr: ``(R,)`` accuracy retention at each ratio, paired with ``ratios``.

    Raises:
        ValueError: fewer than two ratios, duplicate ratios, or a length mismatch.
    """
    grid, values = _sorted_grid(ratios, arr)
    return float(trapezoid(values, grid))


def normalized_score(ratios: Sequence[float], arr: Sequence[float]) -> float:
    """``IIS / (s_max - s_min)``: the mean retention over the grid's span, near ``[0, 1]``."""
    grid, _ = _sorted_grid(ratios, arr)
    return interpretability_score(ratios, arr) / float(grid[-1] - grid[0])


def accuracy_retention(ratio_top1: np.ndarray, standard_top1: float) -> np.ndarray:
    """``ARR(s) = acc(g ∘ g_s ∘ a) / acc(h)``: ``(R,)`` float64 from ``(R,)`` accuracies.

    Raises:
        ValueError: when the standard head's accuracy is not positive (ARR is undefined).
    """
    if not standard_top1 > 0:
        raise ValueError(f"accuracy retention is undefined for a standard-head accuracy of {standard_top1}")
    return np.asarray(ratio_top1, dtype=np.float64) / float(standard_top1)


def accuracy_ci(
    correct: np.ndarray, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap over test images of a top-1 accuracy.

    Args:
        correct: ``(N,)`` bool, per-image correctness.

    Returns:
        ``(low, high)`` in ``[0, 1]``.
    """
    sample = np.asarray(correct, dtype=np.float64)
    if sample.ndim != 1 or sample.shape[0] < 2:
        raise ValueError(f"need a 1-D correctness vector of at least two images, got shape {sample.shape}")
    result = stats.bootstrap(
        (sample,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
        method="percentile", vectorized=True, axis=-1, rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def score_ci(
    standard_correct: np.ndarray,
    ratio_correct: np.ndarray,
    ratios: Sequence[float],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired percentile bootstrap over test images of the IIS.

    Each resample draws one set of test images and recomputes every accuracy on it, the
    standard head's included, so the correlation between heads (same images) is kept.

    Args:
        standard_correct: ``(N,)`` bool, the standard head's per-image correctness.
        ratio_correct: ``(R, N)`` bool, each ratio's head's per-image correctness.
        ratios: ``(R,)`` the sparsity ratios of the rows of ``ratio_correct``.

    Returns:
        ``(low, high)`` of the IIS. A resample in which the standard head gets no image right has
        no IIS (its retention divides by zero); such resamples are left out, and when they are
        more than half the interval is NaN.
    """
    standard = np.asarray(standard_correct, dtype=np.float64)
    rows = np.asarray(ratio_correct, dtype=np.float64)
    if rows.ndim != 2 or standard.ndim != 1 or rows.shape[1] != standard.shape[0]:
        raise ValueError(f"expected (N,) and (R, N) correctness, got {standard.shape} and {rows.shape}")
    grid, by_ratio = _sorted_grid(ratios, rows.T)

    def statistic(standard_sample: np.ndarray, *ratio_samples: np.ndarray, axis: int = -1) -> np.ndarray:
        # Resamples arrive batched: every sample is (..., N), so accuracies are (..., R).
        accuracy = np.stack([s.mean(axis=axis) for s in ratio_samples], axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            retention = accuracy / standard_sample.mean(axis=axis)[..., None]
        return trapezoid(retention, grid, axis=-1)

    with warnings.catch_warnings():
        # Degenerate resamples (the standard head never right) give inf or NaN; counted below.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap(
            (standard, *by_ratio.T), statistic, n_resamples=n_resamples, confidence_level=confidence,
            method="percentile", vectorized=True, paired=True, axis=-1, rng=np.random.default_rng(seed),
        )
    return _finite_percentile_interval(result.bootstrap_distribution, n_resamples, confidence)


def _finite_percentile_interval(distribution: np.ndarray, n_resamples: int, confidence: float) -> tuple[float, float]:
    """The percentile interval of a bootstrap distribution's finite values; NaN when fewer than
    half of the ``n_resamples`` are finite (an interval from the rest would be a guess)."""
    values = np.asarray(distribution, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size * 2 < n_resamples:
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


CORRELATIONS = (("pearson", "pearson_r"), ("spearman", "spearman_rho"), ("kendall", "kendall_tau"))


def correlation(x: np.ndarray, y: np.ndarray, *, n_resamples: int = 9999, bootstrap: int = 2000,
                confidence: float = 0.95, seed: int = 0) -> dict:
    """Pearson, Spearman and Kendall correlation across models, with permutation p-values and
    bootstrap intervals.

    Coefficients come from ``scipy.stats.pearsonr``, ``spearmanr`` and ``kendalltau``. Each
    p-value is a two-sided ``scipy.stats.permutation_test`` over pairings: exact when
    ``n! <= n_resamples``, else ``n_resamples`` random pairings (seeded). Each interval is a
    percentile ``scipy.stats.bootstrap`` over models (pairs ``(x_i, y_i)`` resampled together),
    seeded: it says how far the coefficient could move with another set of models like these.

    Args:
        x: ``(n,)`` float, e.g. each model's standard-head test top-1.
        y: ``(n,)`` float, e.g. each model's IIS.
        n_resamples: pairings of the permutation tests.
        bootstrap: resamples of the intervals; 0 leaves them NaN.
        confidence: the intervals' level.

    Returns:
        ``n_models, pearson_r, pearson_p, pearson_ci_low, pearson_ci_high``, and the same four for
        ``spearman_rho`` / ``spearman_*`` and ``kendall_tau`` / ``kendall_*``; every value but
        ``n_models`` is NaN when ``n < 3`` or either input is constant.
    """
    first = np.asarray(x, dtype=np.float64)
    second = np.asarray(y, dtype=np.float64)
    if first.ndim != 1 or first.shape != second.shape:
        raise ValueError(f"x and y must be 1-D and of equal length, got {first.shape} and {second.shape}")
    n = int(first.shape[0])
    out = {"n_models": n, **{f"{name}_{part}": math.nan for name, _ in CORRELATIONS
                             for part in ("p", "ci_low", "ci_high")},
           **{column: math.nan for _, column in CORRELATIONS}}
    if n < 3 or np.ptp(first) == 0 or np.ptp(second) == 0:
        logger.info("correlation undefined for %d model(s) or constant input; reporting NaN", n)
        return out
    out["pearson_r"] = float(stats.pearsonr(first, second).statistic)
    out["spearman_rho"] = float(stats.spearmanr(first, second).statistic)
    out["kendall_tau"] = float(stats.kendalltau(first, second).statistic)
    # Permuting one sample against the other fixed enumerates the n! pairings exactly once each
    # (scipy's recipe for correlation); Spearman permutes ranks, which is permuting then ranking.
    rank_first, rank_second = stats.rankdata(first), stats.rankdata(second)
    tests = (
        ("pearson_p", first, lambda v, axis=-1: _pearson_against(v, second, axis), True),
        ("spearman_p", rank_first, lambda v, axis=-1: _pearson_against(v, rank_second, axis), True),
        ("kendall_p", first, lambda v, axis=-1: kendall_tau_b(v, np.broadcast_to(second, v.shape), axis=axis), True),
    )
    for key, sample, statistic, vectorized in tests:
        result = stats.permutation_test(
            (sample,), statistic, permutation_type="pairings", vectorized=vectorized,
            n_resamples=n_resamples, alternative="two-sided", rng=np.random.default_rng(seed),
            batch=_pair_batch(n),
        )
        out[key] = float(result.pvalue)
    if bootstrap > 0:
        out.update(correlation_ci(first, second, n_resamples=bootstrap, confidence=confidence, seed=seed))
    return out


def correlation_ci(x: np.ndarray, y: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> dict:
    """Percentile bootstrap intervals over models of Pearson's r, Spearman's ρ and Kendall's τ.

    Args:
        x: ``(n,)`` float; y: ``(n,)`` float, paired with ``x``; ``n >= 3``.

    Returns:
        ``{pearson,spearman,kendall}_ci_{low,high}``. A resample that draws one model ``n`` times
        (or only tied values) has no coefficient; such resamples are left out, and when they are
        more than half the interval is NaN.
    """
    first, second = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def pearson(a, b, axis=-1):
        return stats.pearsonr(a, b, axis=axis).statistic

    def spearman(a, b, axis=-1):
        return stats.pearsonr(stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis), axis=axis).statistic

    out = {}
    for (name, _), statistic in zip(CORRELATIONS, (pearson, spearman, kendall_tau_b)):
        with warnings.catch_warnings():
            # Degenerate resamples (a constant side) are expected and give NaN; counted below.
            warnings.simplefilter("ignore", (stats.ConstantInputWarning, RuntimeWarning))
            result = stats.bootstrap(
                (first, second), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
                batch=_pair_batch(len(first)),
            )
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _finite_percentile_interval(
            result.bootstrap_distribution, n_resamples, confidence)
    return out


def kendall_tau_b(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Kendall's τ-b of ``x`` against ``y`` along ``axis``, for many samples at once.

    ``scipy.stats.kendalltau`` takes one pair of 1-D samples; a permutation test or bootstrap
    called it once per resample, seconds for nine models. Over all pairs ``i, j``:
    ``τ_b = Σ sign(x_i - x_j) sign(y_i - y_j) / sqrt(Σ |sign(x_i - x_j)| · Σ |sign(y_i - y_j)|)``,
    which is scipy's τ-b (ties counted the same way); NaN where a sample is constant.

    Args:
        x, y: same shape ``(..., n, ...)``; the ``n`` models lie along ``axis``.

    Returns:
        The coefficients, ``axis`` removed.
    """
    a = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    b = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    sign_a = np.sign(a[..., :, None] - a[..., None, :])
    sign_b = np.sign(b[..., :, None] - b[..., None, :])
    concordance = (sign_a * sign_b).sum(axis=(-2, -1))
    untied = np.abs(sign_a).sum(axis=(-2, -1)) * np.abs(sign_b).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return concordance / np.sqrt(untied)


def _pair_batch(n: int) -> int:
    """Resamples per vectorised call, so that :func:`kendall_tau_b`'s ``n x n`` sign matrices stay
    near 64 MB whatever the number of models."""
    return max(1, (1 << 23) // (n * n))


def _pearson_against(batch: np.ndarray, fixed: np.ndarray, axis: int) -> np.ndarray:
    """Pearson's r of every resample in ``batch (..., n)`` against one fixed ``(n,)`` sample."""
    return stats.pearsonr(batch, np.broadcast_to(fixed, batch.shape), axis=axis).statistic
