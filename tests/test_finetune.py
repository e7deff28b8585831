"""Fine-tuning comparisons that can be trusted (issue 11, item 1), piece by piece: the loss's
library comes from held-out source images, the paired λ − 0 differences and their bootstrap
intervals. The end-to-end check that no scoring library holds a loss element runs on the
smoke pipeline in ``test_run.py``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from iis.analyze import tables
from iis.analyze.libraries import ElementSet
from iis.analyze.metrics import accuracy_retention, interpretability_score
from iis.analyze.ranking import save_correctness
from iis.analyze.tasks import TaskResult, TaskSpec
from iis.apps.finetune import loss_library_members, split_elements
from iis.apps.finetune_tables import Comparison, arm_rows, delta_rows

RATIOS = [0.0, 0.5, 0.9]
GRID = tables.grid_key(RATIOS)


def _elements(classes: int = 4, images: int = 5, crops: int = 3, dim: int = 8) -> ElementSet:
    """``classes × images × crops`` elements; the crops of one image are consecutive."""
    n = classes * images * crops
    labels = np.repeat(np.arange(classes), images * crops)
    sources = np.repeat(np.arange(classes * images), crops).astype(str)
    return ElementSet(features=np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32), labels=labels,
                      source_ids=sources, boxes=np.zeros((n, 4), np.int32), kinds=np.full(n, "grid"),
                      segments=np.full(n, -1, np.int32))


def test_split_reserves_whole_source_images_of_every_class():
    el = _elements()
    split = split_elements(el.labels, el.source_ids, holdout=0.4, seed=3)
    assert np.intersect1d(split.loss, split.scoring).size == 0
    assert np.array_equal(np.union1d(split.loss, split.scoring), np.arange(len(el)))
    # No source image gives crops to both sides.
    assert not set(el.source_ids[split.loss]) & set(el.source_ids[split.scoring])
    for cls in range(4):
        # round(0.4 * 5) = 2 of each class's 5 images are reserved, 3 left.
        assert len(set(el.source_ids[split.loss][el.labels[split.loss] == cls])) == 2
        assert len(set(el.source_ids[split.scoring][el.labels[split.scoring] == cls])) == 3
    again = split_elements(el.labels, el.source_ids, holdout=0.4, seed=3)
    assert np.array_equal(again.loss, split.loss)
    assert not np.array_equal(split_elements(el.labels, el.source_ids, holdout=0.4, seed=4).loss, split.loss)
    # A tiny share still reserves one image per class, a large one still leaves one.
    assert split_elements(el.labels, el.source_ids, holdout=0.01, seed=0).loss.size == 4 * 3
    assert split_elements(el.labels, el.source_ids, holdout=0.99, seed=0).scoring.size == 4 * 3


def test_split_refuses_a_class_with_one_source_image():
    el = _elements(images=1)
    with pytest.raises(ValueError, match="class 0 has visual elements from 1 source image"):
        split_elements(el.labels, el.source_ids, holdout=0.5, seed=0)


def test_loss_library_is_drawn_from_the_reserved_pool_only():
    el = _elements()
    split = split_elements(el.labels, el.source_ids, holdout=0.4, seed=0)
    members = loss_library_members(el, split.loss, num_concepts=8, num_classes=4, seed=5)
    assert members.shape == (8,) and np.isin(members, split.loss).all()
    assert np.bincount(el.labels[members], minlength=4).tolist() == [2, 2, 2, 2]  # stratified over classes
    assert not np.array_equal(members, loss_library_members(el, split.loss, num_concepts=8, num_classes=4, seed=6))
    with pytest.raises(ValueError, match="needs 25 elements but finetune.holdout reserves only 24"):
        loss_library_members(el, split.loss, num_concepts=25, num_classes=4, seed=0)


# --------------------------------------------------------------------------------------------------
# Paired differences


def _correctness(rng: np.random.Generator, n: int, std: float, heads: list[float]) -> np.ndarray:
    """``(1 + R, N)`` bool: the standard head, then one head per ratio."""
    return np.stack([rng.random(n) < p for p in [std, *heads]])


def _write(results, arms: dict[tuple[float, int], str], correct: dict[tuple[str, int], np.ndarray],
           library_seeds: list[int], n: int) -> pd.DataFrame:
    """Save every (model, library seed)'s per-image results as an analysis does; return the iis rows."""
    ids = np.array([f"t{i}" for i in range(n)])
    rows = []
    for model in ["start", *arms.values()]:
        done = []
        for ls in library_seeds:
            c = correct[(model, ls)]
            spec = dict(store=f"/s/{model}.zarr", seed=ls, num_concepts=16, ratios=tuple(RATIOS))
            done.append(TaskResult(TaskSpec(library="standard", **spec), [{"sparsity": None}], [], c[:1], ids))
            done.append(TaskResult(TaskSpec(library="prototype", **spec), [{"sparsity": r} for r in RATIOS], [],
                                   c[1:], ids))
            top1 = c[1:].mean(axis=1)
            arr = accuracy_retention(top1, c[0].mean())
            rows.append({"pipeline": "p", "dataset": "d", "model": model, "library": "prototype",
                         "num_concepts": 16, "seed": ls, "standard_top1": float(c[0].mean()),
                         "iis": interpretability_score(RATIOS, arr), "protocol": "default", "grid": GRID,
                         "library_source": None, "weights": f"file:/w/{model}"})
        save_correctness(results, done, models={f"/s/{model}.zarr": model}, grid=GRID)
    return pd.DataFrame(rows)


def _comparison(arms, library_seeds) -> Comparison:
    return Comparison(pipeline="p", dataset="d", start="start", lam=1.0, arms=arms, libraries=["prototype"],
                      num_concepts=16, grid=GRID, library_seeds=library_seeds,
                      settings={"epochs": 1, "steps": None, "ratio": 0.9, "loss_library": "prototype", "holdout": 0.3},
                      weights={m: f"file:/w/{m}" for m in ["start", *arms.values()]})


def _arms(seeds) -> dict[tuple[float, int], str]:
    return {(lam, s): f"start+ft{lam:g}-s{s}" for lam in (1.0, 0.0) for s in seeds}


def test_identical_arms_differ_by_exactly_zero_in_every_paired_resample(tmp_path):
    """Paired: both arms see the same resampled images and seeds, so equal arms give [0, 0]. An
    unpaired bootstrap (independent draws per arm) would give an interval of width > 0."""
    rng = np.random.default_rng(0)
    seeds, library_seeds, n = [0, 1, 2], [0, 1], 300
    arms = _arms(seeds)
    correct = {("start", ls): _correctness(rng, n, 0.8, [0.8, 0.6, 0.4]) for ls in library_seeds}
    for s in seeds:
        for ls in library_seeds:
            # Seeds differ from each other, the two arms of a seed do not.
            same = _correctness(rng, n, 0.85, [0.85, 0.7, 0.5])
            correct[(arms[(1.0, s)], ls)] = correct[(arms[(0.0, s)], ls)] = same
    iis = _write(tmp_path, arms, correct, library_seeds, n)
    (row,) = delta_rows(iis, _comparison(arms, library_seeds), results=tmp_path, n_resamples=400)
    assert row["n_pairs"] == 6 and row["n_test"] == n and row["bootstrap"] == 400
    for what in ("top1", "iis"):
        assert row[f"{what}_delta"] == 0.0
        assert (row[f"{what}_delta_ci_low"], row[f"{what}_delta_ci_high"]) == (0.0, 0.0)


def test_a_real_gain_gets_an_interval_above_zero_and_noise_one_around_it(tmp_path):
    rng = np.random.default_rng(1)
    seeds, library_seeds, n = [0, 1, 2], [0], 600
    arms = _arms(seeds)
    correct = {("start", 0): _correctness(rng, n, 0.8, [0.8, 0.6, 0.4])}
    for s in seeds:
        control = _correctness(rng, n, 0.8, [0.8, 0.6, 0.4])
        treated = control.copy()
        # λ fixes 60 of the standard head's mistakes (10 points) and nothing else.
        wrong = np.flatnonzero(~control[0])[:60]
        treated[0, wrong] = True
        correct[(arms[(0.0, s)], 0)], correct[(arms[(1.0, s)], 0)] = control, treated
    iis = _write(tmp_path, arms, correct, library_seeds, n)
    comparison = _comparison(arms, library_seeds)
    (row,) = delta_rows(iis, comparison, results=tmp_path, n_resamples=500)
    assert row["top1_delta"] == pytest.approx(60 / n)
    assert row["top1_delta"] == pytest.approx(row["top1_lambda"] - row["top1_zero"])
    assert 0 < row["top1_delta_ci_low"] < row["top1_delta"] < row["top1_delta_ci_high"]
    # A higher standard top-1 with the same interpretable heads lowers ARR, so IIS falls.
    assert row["iis_delta"] < 0 and row["iis_delta_ci_high"] < 0
    # The arm rows: one per (arm, seed), before = the start model, after = that arm.
    ft = pd.DataFrame(arm_rows(iis, comparison, {k: 1.0 for k in arms}))
    assert len(ft) == 6 and set(ft["standard_top1_before"]) == {correct[("start", 0)][0].mean()}
    treated_rows = ft[ft["lambda"] == 1.0].set_index("seed")
    assert treated_rows.loc[2, "standard_top1_after"] == correct[(arms[(1.0, 2)], 0)][0].mean()

    noise = dict(correct)
    for s in seeds:  # two independent draws of the same accuracies: no real difference
        noise[(arms[(1.0, s)], 0)] = _correctness(rng, n, 0.8, [0.8, 0.6, 0.4])
    other = tmp_path / "noise"
    (row,) = delta_rows(_write(other, arms, noise, library_seeds, n), comparison, results=other, n_resamples=500)
    assert row["top1_delta_ci_low"] < 0 < row["top1_delta_ci_high"]


def test_without_per_image_results_there_is_no_interval(tmp_path):
    rng = np.random.default_rng(2)
    arms = _arms([0])
    correct = {(m, 0): _correctness(rng, 50, 0.8, [0.8, 0.6, 0.4]) for m in ["start", *arms.values()]}
    iis = _write(tmp_path, arms, correct, [0], 50)
    (row,) = delta_rows(iis, _comparison(arms, [0]), results=tmp_path / "elsewhere", n_resamples=100)
    assert np.isnan(row["iis_delta_ci_low"]) and row["bootstrap"] == 0 and np.isfinite(row["iis_delta"])
    # Rows of an earlier run under the same name (other weights) are not read.
    stale = iis[iis.model == "start+ft1-s0"].assign(weights="file:/old/e1.safetensors", iis=-5.0)
    (again,) = delta_rows(pd.concat([stale, iis]), _comparison(arms, [0]), results=tmp_path, n_resamples=0)
    assert again["iis_delta"] == row["iis_delta"]
    with pytest.raises(RuntimeError, match=r"lacks start\+ft1-s0's prototype rows for seeds \[1\]"):
        delta_rows(iis, _comparison(arms, [0, 1]), results=tmp_path, n_resamples=0)


@pytest.mark.slow
def test_the_lambda_arm_records_the_loss_code_and_is_trained_again_when_it_changes(tmp_path, monkeypatch, caplog):
    """The λ arm's training settings name the loss's code (``loss_version``), so a checkpoint made
    by other loss code is not reused; the λ = 0 arm, which has no loss, is reused."""
    import logging

    import torch
    from iis.apps import finetune
    from iis.extract.datasets import load_dataset
    from iis.extract.train import TrainOptions

    dataset = load_dataset(source="builtin", name="digits", seed=0)
    options = TrainOptions(epochs=1, checkpoints=(1,), batch_size=16, max_steps=1, device="cpu")
    kwargs = dict(dataset=dataset, backbone="resnet10t", weights="random", img_size=16, init_seed=0,
                  images=torch.rand(4, 3, 16, 16), lam=1.0, ratio=0.5, options=options, refresh_every=1,
                  out_root=tmp_path, library_elements=(0, 1, 2, 3))
    first = finetune.finetune_arms(**kwargs)
    assert [arm.result.skipped for arm in first] == [False, False]
    record = (tmp_path / "lam1" / "train.json").read_text()
    assert finetune.loss_version() in record and finetune.loss_version().startswith(finetune.analysis_version())
    assert [arm.result.skipped for arm in finetune.finetune_arms(**kwargs)] == [True, True]
    monkeypatch.setattr(finetune, "loss_version", lambda: "0.0.0+other-loss-code")
    with caplog.at_level(logging.INFO, logger="iis.extract.train"):
        again = finetune.finetune_arms(**kwargs)
    assert [arm.result.skipped for arm in again] == [False, True]
    assert "made with other settings" in caplog.text
