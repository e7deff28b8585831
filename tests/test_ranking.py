"""The IIS ranking with its confidence (issue 11): ``ranking.parquet``, written with the other
tables; the probability that each model's IIS exceeds the next one's from a bootstrap over test
images and library seeds; the Kendall τ between seeds' rankings; accuracy-adjusted IIS. Also the
reference protocol's caveat on every row it fitted."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from iis.analyze import tables
from iis.analyze.metrics import score_ci
from iis.analyze.pipeline import ClusterOptions, analyze_stores
from iis.analyze.ranking import (
    accuracy_adjusted,
    correctness_path,
    exceed_probability,
    iis_bootstrap,
    load_correctness,
    ranking_current,
    ranking_rows,
    seed_kendall_tau,
)
from test_dask import SMALL, _write_stores

RATIOS = [0.0, 0.5, 0.9]
SYNC = ClusterOptions(synchronous=True, threads=1)


def _model(rng: np.random.Generator, std: float, heads: list[float], *, seeds: int = 1, n: int = 500):
    """Per-image correctness ``(S, N)`` and ``(S, R, N)`` with the given accuracies."""
    return (rng.random((seeds, n)) < std,
            np.stack([np.stack([rng.random(n) < p for p in heads]) for _ in range(seeds)]))


def test_far_apart_models_get_a_probability_above_095_and_a_duplicate_about_half():
    rng = np.random.default_rng(0)
    good, bad = (_model(rng, 0.9, [0.9, 0.85, 0.8], seeds=2, n=2000), _model(rng, 0.9, [0.9, 0.6, 0.3], seeds=2, n=2000))
    samples = iis_bootstrap([good[0], bad[0], good[0]], [good[1], bad[1], good[1]], RATIOS, n_resamples=1000)
    assert samples.shape == (1000, 3)
    # The two differ by far more than their intervals (each a few hundredths wide).
    low, high = score_ci(good[0][0], good[1][0], RATIOS, n_resamples=500)
    gap = np.trapezoid([1, 0.85 / 0.9, 0.8 / 0.9], RATIOS) - np.trapezoid([1, 0.6 / 0.9, 0.3 / 0.9], RATIOS)
    assert gap > 5 * (high - low)
    assert exceed_probability(samples, 0, 1) > 0.95 and exceed_probability(samples, 1, 0) < 0.05
    # The same model listed twice: equal in every resample, so exactly one half.
    assert exceed_probability(samples, 0, 2) == pytest.approx(0.5)
    # Its bootstrap centres on its IIS.
    point = np.mean([np.trapezoid(good[1][s].mean(1) / good[0][s].mean(), RATIOS) for s in range(2)])
    assert np.median(samples[:, 0]) == pytest.approx(point, abs=0.01)


def test_close_models_get_a_probability_near_half():
    rng = np.random.default_rng(1)
    a, b = _model(rng, 0.9, [0.9, 0.7, 0.5]), _model(rng, 0.9, [0.9, 0.7, 0.5])
    p = exceed_probability(iis_bootstrap([a[0], b[0]], [a[1], b[1]], RATIOS, n_resamples=1000), 0, 1)
    assert 0.05 < p < 0.95


def test_seeds_are_resampled_too():
    """Two seeds of one model that disagree widen its interval beyond what images alone give."""
    rng = np.random.default_rng(2)
    one = _model(rng, 0.9, [0.9, 0.8, 0.7])
    other = _model(rng, 0.9, [0.9, 0.5, 0.2])
    both = (np.concatenate([one[0], other[0]]), np.concatenate([one[1], other[1]]))
    spread = iis_bootstrap([both[0]], [both[1]], RATIOS, n_resamples=2000)[:, 0]
    images_only = iis_bootstrap([one[0]], [one[1]], RATIOS, n_resamples=2000)[:, 0]
    assert np.ptp(np.quantile(spread, [0.025, 0.975])) > 3 * np.ptp(np.quantile(images_only, [0.025, 0.975]))


def test_iis_bootstrap_refuses_mismatched_shapes():
    rng = np.random.default_rng(3)
    a = _model(rng, 0.9, [0.9, 0.8, 0.7])
    with pytest.raises(ValueError, match="do not match"):
        iis_bootstrap([a[0]], [a[1]], [0.0, 0.5], n_resamples=10)
    with pytest.raises(ValueError, match="one standard and one head array per model"):
        iis_bootstrap([a[0]], [], RATIOS, n_resamples=10)


def test_seed_kendall_tau_and_accuracy_adjusted_iis():
    rows = [{"model": m, "seed": s, "iis": v} for s in (0, 1, 2) for m, v in zip("abcd", (0.9, 0.8, 0.7, 0.6))]
    assert seed_kendall_tau(pd.DataFrame(rows)) == (1.0, 3)
    flipped = [{**r, "iis": -r["iis"]} if r["seed"] == 2 else r for r in rows]
    tau, pairs = seed_kendall_tau(pd.DataFrame(flipped))
    assert pairs == 3 and tau == pytest.approx((1 - 1 - 1) / 3)
    assert np.isnan(seed_kendall_tau(pd.DataFrame(rows[:4]))[0])  # one seed: nothing to compare
    top1 = np.array([0.6, 0.7, 0.8, 0.9])
    iis = 0.5 * top1 + np.array([0.0, 0.05, 0.0, 0.0])  # b lies above the line
    adjusted = accuracy_adjusted(top1, iis)
    assert adjusted.argmax() == 1 and adjusted.sum() == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(accuracy_adjusted(top1[:2], iis[:2])).all()


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> tuple[Path, dict[str, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("ranking")
    stores = _write_stores(root / "stores", SMALL, block_rows=64)
    out = analyze_stores(stores, results=root / "results", libraries=["prototype"], num_concepts=8, ratios=RATIOS,
                         seeds=[0, 1], bootstrap=300, cluster=SYNC)
    return root / "results", out


def test_ranking_is_written_with_the_other_tables(analysed):
    results, out = analysed
    ranking = pd.read_parquet(results / "ranking.parquet")
    pd.testing.assert_frame_equal(tables.read_table(results, "ranking"), out["ranking"])
    assert sorted(ranking.model) == ["m0", "m1", "m2"] and ranking["rank"].tolist() == [1, 2, 3]
    iis = out["iis"]
    means = iis.groupby("model").iis.mean().sort_values(ascending=False)
    assert ranking.model.tolist() == means.index.tolist()
    np.testing.assert_allclose(ranking.iis, means.to_numpy())
    assert ranking.next_model.tolist()[:2] == ranking.model.tolist()[1:] and ranking.next_model.isna().iloc[-1]
    assert ranking.p_above_next.iloc[:2].between(0.5, 1).all() and ranking.p_above_next.isna().iloc[-1]
    assert (ranking.iis_ci_low <= ranking.iis).all() and (ranking.iis <= ranking.iis_ci_high).all()
    assert (ranking.n_seeds == 2).all() and (ranking.seed_pairs == 1).all() and (ranking.bootstrap == 300).all()
    assert ranking.seed_kendall_tau.between(-1, 1).all() and ranking.iis_adjusted.notna().all()
    # The per-image results behind it are kept beside the tables.
    saved = load_correctness(correctness_path(results, model="m0", library="prototype", num_concepts=8, seed=1,
                                              protocol="default", grid="0,0.5,0.9"))
    assert saved.heads.shape == (3, SMALL["test"]) and saved.standard.shape == (SMALL["test"],)
    acc = out["accuracy"]
    top1 = acc[(acc.model == "m0") & (acc.library == "prototype") & (acc.seed == 1)].sort_values("sparsity").test_top1
    np.testing.assert_allclose(saved.heads.mean(axis=1), top1.to_numpy())
    assert ranking_current(iis, ranking) and not ranking_current(iis, ranking.iloc[:2])


def test_per_image_results_that_are_not_their_rows_give_no_probabilities(analysed, tmp_path, caplog):
    """A kept per-image file that does not reproduce its iis.parquet row (a run that died before its
    commit, another run's file) must not feed the ranking's bootstrap."""
    import shutil

    results, out = analysed
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    assert not np.isnan(ranking_rows(out["iis"], results=copy, n_resamples=50)[0]["p_above_next"])
    paths = {m: correctness_path(copy, model=m, library="prototype", num_concepts=8, seed=0, protocol="default",
                                 grid="0,0.5,0.9") for m in ("m0", "m1")}
    shutil.copyfile(paths["m1"], paths["m0"])  # m0's file now holds m1's results
    with caplog.at_level(logging.WARNING, logger="iis.analyze.ranking"):
        rows = ranking_rows(out["iis"], results=copy, n_resamples=50)
    assert "the per-image results of m0 seed 0 are not those of its iis.parquet row" in caplog.text
    assert all(np.isnan(r["p_above_next"]) and np.isnan(r["iis_ci_low"]) for r in rows)


def test_reference_protocol_rows_are_marked_and_warned(analysed, tmp_path, caplog):
    stores = sorted((analysed[0].parent / "stores").glob("*.zarr"))
    with caplog.at_level(logging.WARNING, logger="iis.analyze.pipeline"):
        out = analyze_stores(stores, results=tmp_path, libraries=["prototype"], num_concepts=8, ratios=RATIOS,
                             seeds=[0], bootstrap=0, protocol="reference", cluster=SYNC)
    assert "selects each head's epoch on the test set" in caplog.text
    for name in ("accuracy", "iis", "correlation", "ranking"):
        table = out[name]
        assert len(table) and table.caveat.eq("selected on test").all(), name
    # Without bootstrap the ranking still orders the models, without probabilities.
    assert out["ranking"].p_above_next.isna().all() and (out["ranking"].bootstrap == 0).all()


def test_report_shows_the_ranking_and_joint_interval_bars(analysed):
    from iis.apps.report import write_report

    results, out = analysed
    page = write_report(results=results).read_text()
    section = page[page.index("<section id='ranking'>"):]
    section = section[: section.index("</section>")]
    ranking = out["ranking"]
    # Rows in rank order, each with its probability of beating the next.
    assert [section.index(f"<td>{m}</td>") for m in ranking.model] == sorted(
        section.index(f"<td>{m}</td>") for m in ranking.model)
    assert f"{ranking.p_above_next.iloc[0]:.2f}" in section and "Kendall τ between the rankings" in section
    assert "over test images and library seeds together (ranking.parquet)" in page
