"""Correlation across models with intervals (issue 11): a bootstrap CI over models beside each
permutation p-value, rows within and across model groups, and a verdict only when the interval
excludes 0."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from iis.analyze import tables
from iis.analyze.metrics import correlation
from iis.analyze.summary import correlation_rows, default_group, direction, final_models, model_groups

COEFFICIENTS = ("pearson", "spearman", "kendall")


def test_planted_rise_gets_an_interval_that_excludes_zero():
    top1 = np.linspace(0.6, 0.95, 8)
    iis = 0.5 * top1 + 0.1  # rises exactly with top-1
    out = correlation(top1, iis, n_resamples=999, bootstrap=1000, seed=0)
    for name in COEFFICIENTS:
        assert 0 < out[f"{name}_ci_low"] <= out[f"{name}_ci_high"] <= 1 + 1e-12, name
    assert direction(out["spearman_ci_low"], out["spearman_ci_high"]) == "positive"
    falling = correlation(top1, -iis, n_resamples=999, bootstrap=1000, seed=0)
    assert falling["kendall_ci_high"] < 0
    assert direction(falling["spearman_ci_low"], falling["spearman_ci_high"]) == "negative"


def test_independent_noise_gets_an_interval_that_holds_zero_in_most_draws():
    holds = {name: 0 for name in COEFFICIENTS}
    for draw in range(20):
        rng = np.random.default_rng(draw)
        top1, iis = rng.uniform(0.6, 0.95, 10), rng.normal(size=10)
        out = correlation(top1, iis, n_resamples=199, bootstrap=1000, seed=draw)
        for name in COEFFICIENTS:
            low, high = out[f"{name}_ci_low"], out[f"{name}_ci_high"]
            assert low <= out[{"pearson": "pearson_r", "spearman": "spearman_rho", "kendall": "kendall_tau"}[name]] <= high
            holds[name] += low <= 0 <= high
    # A 95% interval holds the true 0 about 19 times in 20; percentile intervals of a small
    # sample are somewhat narrow, so "most" is asked, with room.
    assert all(count >= 15 for count in holds.values()), holds


def test_intervals_are_seeded_and_can_be_switched_off():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=9), rng.normal(size=9)
    assert correlation(x, y, n_resamples=99, seed=4) == correlation(x, y, n_resamples=99, seed=4)
    off = correlation(x, y, n_resamples=99, bootstrap=0)
    assert np.isnan(off["spearman_ci_low"]) and not np.isnan(off["spearman_p"])
    assert np.isnan(correlation(x[:2], y[:2])["pearson_ci_low"])  # two models: undefined


def test_direction_says_cannot_tell_when_the_interval_holds_zero():
    assert direction(0.1, 0.8) == "positive" and direction(-0.8, -0.1) == "negative"
    assert direction(-0.2, 0.7) == "cannot tell" and direction(0.0, 0.7) == "cannot tell"
    assert direction(float("nan"), 0.5) == "undefined"
    # Three models in a perfect line: every resample gives 1, yet the permutation p is 1/3.
    three = correlation(np.array([0.5, 0.6, 0.7]), np.array([0.1, 0.2, 0.4]), bootstrap=500)
    assert three["spearman_ci_low"] == pytest.approx(1.0) and three["spearman_ci_high"] == pytest.approx(1.0)
    assert direction(three["spearman_ci_low"], three["spearman_ci_high"], three["spearman_p"]) == "cannot tell"
    assert direction(0.1, 0.8, 0.01) == "positive"


DEMO = [f"{run}@e{e}" for run in ("r10", "mnv3", "vit") for e in (0, 1, 2, 4)] + ["r10@e4+ft0", "r10@e4+ft1"]


def test_default_groups_and_final_models():
    assert default_group("r10@e4+ft1") == "r10" and default_group("resnet50") == "resnet50"
    groups = model_groups(DEMO)
    assert set(groups.values()) == {"r10", "mnv3", "vit"}
    # The last checkpoint is final (e4 after e2, numerically); a fine-tuned copy is not.
    assert final_models(groups) == {"mnv3": "mnv3@e4", "r10": "r10@e4", "vit": "vit@e4"}
    assert final_models({"a@e2": "a", "a@e10": "a"}) == {"a": "a@e10"}
    assert final_models({"x+ft1": "x"}) == {"x": "x+ft1"}
    # Given groups win; the rest fall back to the name.
    assert model_groups(["r10@e4+ft1", "m"], {"r10@e4+ft1": "r10@e4"}) == {"r10@e4+ft1": "r10@e4", "m": "m"}


def _iis_table(models: list[str], top1: np.ndarray, iis: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"dataset": "d", "library": "prototype", "num_concepts": 8, "protocol": "default",
                         "grid": "0,0.5,0.9", "model": models, "seed": 0, "standard_top1": top1, "iis": iis,
                         "caveat": None})


def test_rows_within_and_across_groups():
    rng = np.random.default_rng(0)
    top1 = rng.uniform(0.5, 0.95, len(DEMO))
    table = _iis_table(DEMO, top1, top1 + 0.01 * rng.normal(size=len(DEMO)))
    rows = pd.DataFrame(correlation_rows(table, n_resamples=99, bootstrap=200))
    assert sorted(zip(rows.scope, rows.group.fillna(""))) == [
        ("across", ""), ("all", ""), ("within", "mnv3"), ("within", "r10"), ("within", "vit")]
    by = rows.set_index(["scope", rows.group.fillna("")])
    assert by.loc[("all", ""), "n_models"] == 14
    assert list(by.loc[("across", ""), "models"]) == ["mnv3@e4", "r10@e4", "vit@e4"]
    within = by.loc[("within", "r10")]
    assert within.n_models == 6 and "r10@e4+ft1" in list(within.models)
    # Each row's figures are those of its models alone.
    sub = table.set_index("model").loc[list(within.models)]
    alone = correlation(sub.standard_top1.to_numpy(), sub.iis.to_numpy(), n_resamples=99, bootstrap=200)
    assert within.spearman_rho == pytest.approx(alone["spearman_rho"])
    assert within.spearman_ci_low == pytest.approx(alone["spearman_ci_low"])
    # Models that are each their own group: one row, over all of them.
    solo = correlation_rows(_iis_table(["a", "b", "c", "d"], top1[:4], top1[:4]), n_resamples=99, bootstrap=100)
    assert [r["scope"] for r in solo] == ["all"]


def test_rows_round_trip_and_old_tables_read_as_scope_all(tmp_path):
    top1 = np.linspace(0.5, 0.9, 6)
    rows = pd.DataFrame(correlation_rows(_iis_table([f"m@e{i}" for i in range(6)], top1, top1),
                                         n_resamples=99, bootstrap=100))
    tables.upsert(tmp_path, "correlation", rows)
    back = tables.read_table(tmp_path, "correlation")
    assert set(back.scope) == {"all", "within"} and (back.bootstrap == 100).all()  # one group: no "across"
    assert back.spearman_ci_low.notna().all() or back.n_models.min() < 3
    # A table written before scopes existed: its rows are the all-model rows.
    old = back[back.scope == "all"].drop(columns=["scope", "group", "bootstrap"])
    old.to_parquet(tmp_path / "correlation.parquet")
    assert tables.read_table(tmp_path, "correlation").scope.tolist() == ["all"]


def test_report_states_a_direction_only_when_the_interval_excludes_zero(tmp_path):
    from iis.apps.report import write_report

    rng = np.random.default_rng(0)
    top1 = rng.uniform(0.5, 0.95, len(DEMO))
    table = pd.concat([
        _iis_table(DEMO, top1, top1 + 0.01 * rng.normal(size=len(DEMO))),  # tight rise: positive
        _iis_table(DEMO, top1, rng.normal(size=len(DEMO))).assign(library="cluster"),  # noise
    ])
    rows = pd.DataFrame(correlation_rows(table, n_resamples=99, bootstrap=500))
    tables.upsert(tmp_path, "correlation", rows)
    page = write_report(results=tmp_path).read_text()
    overall = rows[rows.scope == "all"].set_index("library")
    assert overall.loc["prototype", "spearman_ci_low"] > 0
    assert overall.loc["cluster", "spearman_ci_low"] < 0 < overall.loc["cluster", "spearman_ci_high"]
    assert "class='stat positive'><div class='lib'>prototype" in page
    assert "class='stat cannot-tell'><div class='lib'>cluster" in page
    assert "the data cannot tell" in page and "against the paper" not in page
    # The rows within and across groups are shown too.
    assert "across groups (final models)" in page and "within r10" in page
