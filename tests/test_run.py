"""The main job end to end on the shipped `smoke` pipeline, and interpretable prediction."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from iis.analyze.artifacts import load_library
from iis.analyze.store import open_feature_store
from iis.apps.explain import explain_features, explain_split
from iis.extract.backbones import create_backbone

from iis.cli import main

ROOT = Path(__file__).resolve().parents[1]
TUNED = [f"r10-random+ft{lam}-s{seed}" for lam in (1, 0) for seed in (0, 1)]  # the smoke pipeline's arms


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """`iis run smoke` once, in a scratch copy of the shipped pipelines.yaml."""
    work = tmp_path_factory.mktemp("smoke")
    shutil.copy(ROOT / "pipelines.yaml", work / "pipelines.yaml")
    assert main(["run", "smoke", "--config", str(work / "pipelines.yaml")]) == 0
    return work


@pytest.mark.slow
def test_run_smoke_writes_every_table_and_the_report(smoke):
    results = smoke / "results" / "smoke"
    for name in ("accuracy", "iis", "correlation", "concepts", "explanations", "finetune"):
        assert (results / f"{name}.parquet").is_file(), name
    acc = pd.read_parquet(results / "accuracy.parquet")
    # 2 models, each x (standard + 2 libraries x 3 ratios); the fine-tuned arms are measured in a
    # results folder of their own, so they do not count as models of the pipeline.
    assert len(acc) == 2 * (1 + 2 * 3)
    assert set(acc.model) == {"r10-random", "vit-random"}
    assert set(acc.library) == {"standard", "prototype", "cluster"}
    iis = pd.read_parquet(results / "iis.parquet")
    assert len(iis) == 4 and iis.ratios.map(list).eq([[0.0, 0.5, 0.9]] * 4).all()
    arms = pd.read_parquet(results / "finetune" / "iis.parquet")
    assert sorted(arms.model) == sorted(TUNED * 2) and set(arms.library) == {"prototype", "cluster"}
    # ARR is the ratio of the table's own accuracies, and IIS their trapezoid.
    row = iis.iloc[0]
    lib = acc[(acc.model == row.model) & (acc.library == row.library)].sort_values("sparsity")
    std = acc[(acc.model == row.model) & (acc.library == "standard")].test_top1.item()
    np.testing.assert_allclose(row.arr, lib.test_top1.to_numpy() / std)
    np.testing.assert_allclose(row.iis, np.trapezoid(row.arr, row.ratios))
    corr = pd.read_parquet(results / "correlation.parquet")
    overall = corr[corr.scope == "all"]
    assert overall.set_index("library").n_models.to_dict() == {"prototype": 2, "cluster": 2}
    assert sorted(corr.scope) == ["all", "all"]
    # Application 1: both arms at both seeds, same start, each measured like any other model, by
    # every library of the pipeline.
    ft = pd.read_parquet(results / "finetune.parquet")
    assert len(ft) == 2 * 2 * 2 and (ft.model == "r10-random").all() and set(ft.finetuned_model) == set(TUNED)
    assert all(libs == ["cluster", "prototype"] for libs in ft.groupby(["lambda", "seed"]).library.apply(sorted))
    for r in ft.itertuples():
        base = iis[(iis.model == "r10-random") & (iis.library == r.library)].iloc[0]
        tuned = arms[(arms.model == r.finetuned_model) & (arms.library == r.library)].iloc[0]
        assert (r.iis_before, r.standard_top1_before) == (base.iis, base.standard_top1)
        assert (r.iis_after, r.standard_top1_after) == (tuned.iis, tuned.standard_top1)
    # The paired difference λ - 0 per library, over 2 training seeds x 1 library seed, with intervals.
    delta = pd.read_parquet(results / "finetune_delta.parquet").set_index("library")
    assert sorted(delta.index) == ["cluster", "prototype"] and (delta.n_pairs == 2).all()
    for lib, d in delta.iterrows():
        arms = ft[ft.library == lib].pivot_table(index="seed", columns="lambda", values="iis_after")
        assert d.iis_delta == pytest.approx((arms[1.0] - arms[0.0]).mean())
        assert d.iis_delta_ci_low <= d.iis_delta <= d.iis_delta_ci_high and d.bootstrap == 200
    html = (results / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "r10-random" in html and "Δ IIS" in html
    # A second run skips what is complete and leaves the tables as they were.
    before = {n: pd.read_parquet(results / f"{n}.parquet") for n in ("accuracy", "iis")}
    assert main(["run", "smoke", "--config", str(smoke / "pipelines.yaml")]) == 0
    for name, frame in before.items():
        pd.testing.assert_frame_equal(pd.read_parquet(results / f"{name}.parquet"), frame)


def _identity(elements, i: int) -> tuple:
    """A visual element as itself, whichever store holds it: its source image, box, kind, segment."""
    return (str(elements.source_ids[i]), tuple(int(v) for v in elements.boxes[i]), str(elements.kinds[i]),
            int(elements.segments[i]))


@pytest.mark.slow
def test_finetune_scores_with_unseen_library_seeds(smoke):
    """Issue 11: no element of the loss's library (nor another crop of its source images) is among
    the elements of any library that scores "IIS after", and every scoring library was built after
    fine-tuning, from the fine-tuned model's own features."""
    results, cache = smoke / "results" / "smoke", smoke / "cache" / "smoke"
    base = open_feature_store(cache / "r10-random.zarr")
    base_elements = base.read_elements()
    loss, loss_sources = set(), set()
    for model in TUNED:
        checkpoint = Path(open_feature_store(cache / f"{model}.zarr").attrs["weights"].removeprefix("file:"))
        record = json.loads((checkpoint.parent / "train.json").read_text())["settings"]["extra_loss"]
        if "+ft0-" in model:
            assert record is None  # plain fine-tuning has no library
            continue
        members = record["library_elements"]  # indices into the start model's elements
        assert len(members) == 16
        loss |= {_identity(base_elements, i) for i in members}
        loss_sources |= {str(base_elements.source_ids[i]) for i in members}
    assert len(loss) > 16  # each training seed draws its own library
    concepts = pd.read_parquet(results / "finetune" / "concepts.parquet")
    for model in TUNED:
        store = open_feature_store(cache / f"{model}.zarr")
        elements = store.read_elements()
        scoring = {_identity(elements, i) for i in range(len(elements))}
        # The store holds no loss element and no crop of a loss image, so no library built from it
        # can, at any seed; it holds every other element of the pipeline.
        assert not scoring & loss and not set(elements.source_ids) & loss_sources
        rest = {_identity(base_elements, i) for i in range(len(base_elements))} - scoring
        assert rest >= loss and {src for src, *_ in rest} == {src for src in loss_sources}
        built = concepts[concepts.model == model]
        assert set(built.library) == {"prototype", "cluster"} and built.library_source.isna().all()
        for row in built.itertuples():
            assert not {_identity(elements, i) for i in row.element_index} & loss
            assert not set(row.source_id) & loss_sources
        # Built after fine-tuning: the store holds the fine-tuned weights' features.
        tuned = create_backbone(backbone="resnet10t", weights=store.attrs["weights"].removeprefix("file:"), img_size=32)
        assert store.attrs["weights_sha256"] == tuned.weights_sha256 != base.attrs["weights_sha256"]


@pytest.mark.slow
def test_explanations_add_up_to_the_logit(smoke):
    results = smoke / "results" / "smoke"
    library_file = results / "libraries" / "r10-random" / "prototype-K16-seed0-default.npz"
    store = open_feature_store(smoke / "cache" / "smoke" / "r10-random.zarr")
    test = store.read_split("test")
    logits, details = explain_features(test.x[:20], library_file=library_file, ratio=0.5, top=None)
    lib, heads = load_library(library_file)
    # The head's learnt per-concept scale and shift are saved and folded into the contributions.
    assert heads.input_scale is not None and heads.input_scale.shape == (3, 2, 16)
    assert not torch.allclose(heads.input_scale[:, 0], torch.ones(3, 16))
    for i, d in enumerate(details):
        assert d["pred"] == int(logits[i].argmax())
        # Every kept concept's w·a plus the bias is exactly the predicted class's logit.
        assert sum(d["contribution"]) + d["bias"] == pytest.approx(d["logit"], abs=1e-4)
        assert len(d["concept"]) == 16 - 8  # k(0.5) of K = 16
        assert d["contribution"] == sorted(d["contribution"], key=abs, reverse=True) and d["rest"] == 0.0
    # The saved head reproduces the accuracy the table reports for that ratio.
    acc = pd.read_parquet(results / "accuracy.parquet")
    reported = acc[(acc.model == "r10-random") & (acc.library == "prototype") & (acc.sparsity == 0.5)].test_top1.item()
    ex = explain_split(store=store.path, library_file=library_file, ratio=0.5, limit=3)
    assert ex.interpretable_top1 == pytest.approx(reported, abs=1e-9)
    assert len(ex.rows) == 3 and ex.rows.box.map(len).eq(5).all()
    assert torch.allclose(lib.activations(test.x[:2]), lib.activations(test.x[:2]))


@pytest.mark.slow
def test_explain_cli_prints_accuracy_lost(smoke, capsys, caplog):
    image = str(open_feature_store(smoke / "cache" / "smoke" / "vit-random.zarr").read_split("test").ids[7])
    caplog.set_level(logging.INFO)
    code = main(["explain", "smoke", "--config", str(smoke / "pipelines.yaml"), "--model", "vit-random",
                 "--library", "cluster", "--ratio", "0.9", "--images", image, "--top", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and "accuracy lost" in out and "vit-random cluster s=0.9" in out
    # The figure once: on stdout, not again as a log record.
    assert (out + err + caplog.text).count("interpretable top-1") == 1
    rows = pd.read_parquet(smoke / "results" / "smoke" / "explanations.parquet")
    mine = rows[(rows.model == "vit-random") & (rows.library == "cluster")]
    # s = 0.9 of K = 16 keeps k = 2 concepts, so --top 3 lists both.
    assert mine.image_id.tolist() == [image] and len(mine.concept.iloc[0]) == 2


def test_cli_reports_bad_input_in_one_line(tmp_path, caplog):
    assert main(["extract", "nope", "--config", str(ROOT / "pipelines.yaml")]) == 2
    assert "no pipeline 'nope'; known:" in caplog.text
    assert main(["analyze", "--store", str(tmp_path / "absent.zarr"), "--results", str(tmp_path)]) == 2
    assert "absent.zarr: no feature store here" in caplog.text


@pytest.mark.slow
def test_run_after_a_grid_change_adds_the_new_grid_and_never_mixes(smoke, tmp_path):
    """Issue 11/13: editing `analysis.ratios` and rerunning `iis run` computes the new grid's rows
    beside the old ones; correlation is per grid; a rerun with nothing changed commits nothing.

    Runs in the shared smoke folder (stores record absolute checkpoint paths, so it cannot be
    copied) and puts its config and results back afterwards, for the other tests.
    """
    config, results = smoke / "pipelines.yaml", smoke / "results" / "smoke"
    text = config.read_text()
    assert text.count("ratios: [0, 0.5, 0.9]") == 2
    shutil.copytree(results, tmp_path / "results-before")
    try:
        config.write_text(text.replace("ratios: [0, 0.5, 0.9]", "ratios: [0, 0.5, 0.7, 0.9]"))
        assert main(["run", "smoke", "--config", str(config)]) == 0
        iis = pd.read_parquet(results / "iis.parquet")
        assert iis.groupby("grid").size().to_dict() == {"0,0.5,0.7,0.9": 4, "0,0.5,0.9": 4}
        corr = pd.read_parquet(results / "correlation.parquet")
        corr = corr[corr.scope == "all"]
        assert sorted(corr.grid) == ["0,0.5,0.7,0.9"] * 2 + ["0,0.5,0.9"] * 2 and (corr.n_models == 2).all()
        acc = pd.read_parquet(results / "accuracy.parquet")
        assert set(acc[acc.grid == "0,0.5,0.7,0.9"].sparsity.dropna()) == {0.0, 0.5, 0.7, 0.9}
        # Fine-tuning is measured on the new grid's rows.
        ft = pd.read_parquet(results / "finetune.parquet")
        ft = ft[(ft["lambda"] == 1.0) & (ft.seed == 0) & (ft.library == "prototype")]
        arms = pd.read_parquet(results / "finetune" / "iis.parquet")
        tuned = arms[(arms.model == "r10-random+ft1-s0") & (arms.library == "prototype") & (arms.grid == "0,0.5,0.7,0.9")]
        assert ft.grid.item() == "0,0.5,0.7,0.9" and ft.iis_after.item() == tuned.iis.item()
        assert set(pd.read_parquet(results / "finetune_delta.parquet").grid) == {"0,0.5,0.7,0.9"}
        analysed = ("accuracy", "concepts", "iis", "correlation", "ranking")
        stamps = {n: (results / f"{n}.parquet").stat().st_mtime_ns for n in analysed}
        assert main(["run", "smoke", "--config", str(config)]) == 0
        # Nothing changed: the analysis commits nothing (explain, finetune and the report still write).
        assert {n: (results / f"{n}.parquet").stat().st_mtime_ns for n in analysed} == stamps
        assert json.loads((results / "manifest.json").read_text())["state"] == "committed"
    finally:
        config.write_text(text)
        shutil.rmtree(results)
        shutil.copytree(tmp_path / "results-before", results)


@pytest.mark.slow
def test_retrained_arms_are_extracted_and_scored_again(smoke):
    # The arms' names do not hold every training setting: after a change of finetune.lr the arms
    # train again, and their complete stores of the old weights must not be reused.
    from iis.extract.backbones import file_sha256

    config, results, cache = smoke / "pipelines.yaml", smoke / "results" / "smoke", smoke / "cache" / "smoke"
    text = config.read_text()
    old_sha = {arm: open_feature_store(cache / f"{arm}.zarr").attrs["weights_sha256"] for arm in TUNED}
    rows = len(pd.read_parquet(results / "finetune" / "iis.parquet"))
    changed = text.replace("finetune: {model: r10-random, lambda: 1.0,", "finetune: {model: r10-random, lambda: 1.0, lr: 0.002,")
    assert changed != text
    try:
        config.write_text(changed)
        assert main(["finetune", "smoke", "--config", str(config)]) == 0
    finally:
        config.write_text(text)
    for arm in TUNED:
        attrs = open_feature_store(cache / f"{arm}.zarr").attrs
        assert attrs["weights_sha256"] != old_sha[arm]
        assert attrs["weights_sha256"] == file_sha256(Path(attrs["weights"].removeprefix("file:")))
    # The arms' rows were replaced, not kept from the old stores and not doubled.
    assert len(pd.read_parquet(results / "finetune" / "iis.parquet")) == rows


def test_finetune_arms_are_scored_with_the_chosen_libraries_only(monkeypatch):
    # The demo scores its arms with prototype alone (each scoring library is a task per arm).
    import iis.apps.finetune_job

    import iis.jobs
    from iis.config import find_pipeline

    cfg = find_pipeline("demo")
    assert cfg.analysis.libraries == ("prototype", "cluster") and cfg.finetune.scoring_libraries == ("prototype",)
    seen = {}
    monkeypatch.setattr(iis.jobs, "_arms_job", lambda cfg, **kw: "job")
    monkeypatch.setattr(iis.apps.finetune_job, "compare_finetuning", lambda job, **kw: seen.update(kw) or {})
    iis.jobs.finetune_pipeline(cfg)
    assert tuple(seen["libraries"]) == ("prototype",) and set(seen["options"]) == {"prototype"}
    unscoped = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"scoring_libraries": None})})
    iis.jobs.finetune_pipeline(unscoped)
    assert tuple(seen["libraries"]) == ("prototype", "cluster") and set(seen["options"]) == {"prototype", "cluster"}
