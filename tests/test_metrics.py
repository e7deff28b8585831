"""IIS, accuracy retention, bootstrap intervals and correlation (iis.analyze.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from iis.analyze.metrics import (
    accuracy_ci,
    accuracy_retention,
    correlation,
    interpretability_score,
    kendall_tau_b,
    normalized_score,
    score_ci,
)
from scipy import stats

# Hand-computed: 0.5 * (1 + 0.8) / 2 + 0.4 * (0.8 + 0.4) / 2 = 0.45 + 0.24.
RATIOS = [0.0, 0.5, 0.9]
ARR = [1.0, 0.8, 0.4]
IIS = 0.69


def test_score_is_the_trapezoid_over_the_sorted_grid():
    assert interpretability_score(RATIOS, ARR) == pytest.approx(IIS, abs=1e-12)
    # Pairs sort together: shuffled input gives the same area, not the area of a zig-zag.
    assert interpretability_score([0.9, 0.0, 0.5], [0.4, 1.0, 0.8]) == pytest.approx(IIS, abs=1e-12)


def test_normalized_score_divides_by_the_grid_span():
    assert normalized_score(RATIOS, ARR) == pytest.approx(IIS / 0.9, abs=1e-12)
    # A flat ARR of 1 over any grid normalises to exactly 1.
    assert normalized_score([0.1, 0.3, 0.98], [1.0, 1.0, 1.0]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("ratios", "arr"),
    [([0.5], [0.9]), ([], []), ([0.0, 0.5, 0.5], [1.0, 0.9, 0.8]), ([0.0, 0.5], [1.0, 0.9, 0.8])],
    ids=["one-ratio", "empty", "duplicate", "length-mismatch"],
)
def test_invalid_grids_raise(ratios, arr):
    with pytest.raises(ValueError):
        interpretability_score(ratios, arr)
    with pytest.raises(ValueError):
        normalized_score(ratios, arr)


def test_accuracy_retention_is_the_ratio_of_accuracies():
    table = {"standard": 0.80, "ratios": np.array([0.80, 0.72, 0.40])}
    np.testing.assert_allclose(accuracy_retention(table["ratios"], table["standard"]), [1.0, 0.9, 0.5])
    with pytest.raises(ValueError):
        accuracy_retention(table["ratios"], 0.0)


def test_accuracy_ci_contains_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    small, large = rng.random(200) < 0.7, rng.random(5000) < 0.7
    low_s, high_s = accuracy_ci(small, seed=1)
    low_l, high_l = accuracy_ci(large, seed=1)
    assert low_s < small.mean() < high_s
    assert low_l < large.mean() < high_l
    assert high_l - low_l < 0.5 * (high_s - low_s)
    # The binomial standard error fixes the 95% width to about 3.92 * sqrt(p (1 - p) / N).
    assert high_l - low_l == pytest.approx(3.92 * math.sqrt(0.21 / 5000), rel=0.2)
    assert accuracy_ci(small, seed=1) == (low_s, high_s)  # seeded


def test_paired_score_ci_brackets_the_point_score():
    rng = np.random.default_rng(0)
    n = 3000
    standard = rng.random(n) < 0.9
    # Ratio heads mostly right where the standard head is right: paired, as real heads are.
    rows = np.stack([standard & (rng.random(n) < keep) for keep in (0.99, 0.9, 0.6, 0.3)])
    ratios = [0.0, 0.5, 0.9, 0.98]
    point = interpretability_score(ratios, accuracy_retention(rows.mean(axis=1), standard.mean()))
    low, high = score_ci(standard, rows, ratios, seed=3)
    assert low < point < high
    assert high - low < 0.05
    # Rows given in another order, with their ratios, describe the same heads.
    order = [2, 0, 3, 1]
    assert score_ci(standard, rows[order], [ratios[i] for i in order], seed=3) == pytest.approx((low, high))


def test_score_ci_leaves_out_resamples_where_the_standard_head_is_never_right():
    # The standard head right on 1 of 50 images: in about 36% of resamples it is never right, and
    # those resamples have no IIS (retention divides by zero). The interval comes from the rest.
    standard = np.zeros(50, dtype=bool)
    standard[0] = True
    rows = np.stack([standard, standard])
    low, high = score_ci(standard, rows, [0.0, 0.9], seed=0)
    assert math.isfinite(low) and math.isfinite(high)
    assert low == high == pytest.approx(0.9)  # every head right exactly where the standard head is
    # More than half of the resamples without an IIS (here all): no interval, not an infinite one.
    never = np.zeros(50, dtype=bool)
    assert all(math.isnan(v) for v in score_ci(never, np.stack([never, ~never]), [0.0, 0.9], seed=0))


def test_correlation_of_monotone_data_is_perfect_with_exact_p_values():
    x = np.arange(6.0)
    out = correlation(x, np.exp(x))  # monotone but not linear
    assert out["n_models"] == 6
    assert out["spearman_rho"] == pytest.approx(1.0)
    assert out["kendall_tau"] == pytest.approx(1.0)
    assert 0.7 < out["pearson_r"] < 0.99
    # Exact over 6! pairings: only the identity and its reverse are as extreme, two-sided.
    assert out["spearman_p"] == pytest.approx(2 / 720)
    assert out["kendall_p"] == pytest.approx(2 / 720)
    assert out["pearson_p"] == pytest.approx(2 / 720)


def test_correlation_of_unrelated_data_is_not_significant():
    rng = np.random.default_rng(5)
    out = correlation(rng.random(6), rng.random(6))
    assert out["spearman_p"] > 0.05 and out["kendall_p"] > 0.05


@pytest.mark.parametrize(("x", "y"), [([0.5, 0.7], [0.1, 0.3]), ([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])],
                         ids=["two-models", "constant"])
def test_correlation_is_nan_when_undefined(x, y):
    out = correlation(np.array(x), np.array(y))
    assert out["n_models"] == len(x)
    assert all(math.isnan(v) for k, v in out.items() if k != "n_models")


def test_kendall_tau_b_matches_scipy_with_ties_and_batches():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(50, 7)).astype(float)  # many ties
    y = rng.integers(0, 4, size=(50, 7)).astype(float)
    x[0] = 1.0  # a constant sample: undefined
    ours = kendall_tau_b(x, y, axis=1)
    for i in range(50):
        expected = stats.kendalltau(x[i], y[i]).statistic
        if np.isnan(expected):
            assert np.isnan(ours[i])
        else:
            assert ours[i] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(ours[0])
    # Along another axis, and 1-D in, a scalar out.
    np.testing.assert_allclose(kendall_tau_b(x.T, y.T, axis=0)[1:], ours[1:])
    assert kendall_tau_b(np.arange(5.0), np.arange(5.0)[::-1]) == pytest.approx(-1.0)
