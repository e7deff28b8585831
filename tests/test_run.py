"""The main job end to end on the shipped `smoke` pipeline, and interpretable prediction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from iis.analyze.artifacts import load_library
from iis.analyze.store import open_feature_store
from iis.apps.explain import explain_features, explain_split

from iis.cli import main

ROOT = Path(__file__).resolve().parents[1]


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
    # 2 models and 2 fine-tuned ones, each x (standard + 2 libraries x 3 ratios)
    assert len(acc) == 4 * (1 + 2 * 3)
    assert set(acc.model) == {"r10-random", "vit-random", "r10-random+ft1", "r10-random+ft0"}
    assert set(acc.library) == {"standard", "prototype", "cluster"}
    iis = pd.read_parquet(results / "iis.parquet")
    assert len(iis) == 8 and iis.ratios.map(list).eq([[0.0, 0.5, 0.9]] * 8).all()
    # ARR is the ratio of the table's own accuracies, and IIS their trapezoid.
    row = iis.iloc[0]
    lib = acc[(acc.model == row.model) & (acc.library == row.library)].sort_values("sparsity")
    std = acc[(acc.model == row.model) & (acc.library == "standard")].test_top1.item()
    np.testing.assert_allclose(row.arr, lib.test_top1.to_numpy() / std)
    np.testing.assert_allclose(row.iis, np.trapezoid(row.arr, row.ratios))
    corr = pd.read_parquet(results / "correlation.parquet")
    overall = corr[corr.scope == "all"]
    assert overall.set_index("library").n_models.to_dict() == {"prototype": 4, "cluster": 4}
    # r10-random and its two fine-tuned copies are one group: a row along it, none across 2 groups.
    assert sorted(corr.scope) == ["all", "all", "within", "within"] and set(corr.group.dropna()) == {"r10-random"}
    # Application 1: both arms, same start, each measured like any other model.
    ft = pd.read_parquet(results / "finetune.parquet").set_index("lambda")
    assert sorted(ft.index) == [0.0, 1.0] and (ft.model == "r10-random").all()
    base = iis[(iis.model == "r10-random") & (iis.library == "prototype")].iloc[0]
    assert (ft.iis_before == base.iis).all() and (ft.standard_top1_before == base.standard_top1).all()
    tuned = iis[(iis.model == "r10-random+ft1") & (iis.library == "prototype")].iloc[0]
    assert ft.loc[1.0, "iis_after"] == tuned.iis and ft.loc[1.0, "standard_top1_after"] == tuned.standard_top1
    html = (results / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "r10-random" in html
    # A second run skips what is complete and leaves the tables as they were.
    before = {n: pd.read_parquet(results / f"{n}.parquet") for n in ("accuracy", "iis")}
    assert main(["run", "smoke", "--config", str(smoke / "pipelines.yaml")]) == 0
    for name, frame in before.items():
        pd.testing.assert_frame_equal(pd.read_parquet(results / f"{name}.parquet"), frame)


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
def test_explain_cli_prints_accuracy_lost(smoke, capsys):
    image = str(open_feature_store(smoke / "cache" / "smoke" / "vit-random.zarr").read_split("test").ids[7])
    code = main(["explain", "smoke", "--config", str(smoke / "pipelines.yaml"), "--model", "vit-random",
                 "--library", "cluster", "--ratio", "0.9", "--images", image, "--top", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "accuracy lost" in out and "vit-random cluster s=0.9" in out
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
        assert iis.groupby("grid").size().to_dict() == {"0,0.5,0.7,0.9": 8, "0,0.5,0.9": 8}
        corr = pd.read_parquet(results / "correlation.parquet")
        corr = corr[corr.scope == "all"]
        assert sorted(corr.grid) == ["0,0.5,0.7,0.9"] * 2 + ["0,0.5,0.9"] * 2 and (corr.n_models == 4).all()
        acc = pd.read_parquet(results / "accuracy.parquet")
        assert set(acc[acc.grid == "0,0.5,0.7,0.9"].sparsity.dropna()) == {0.0, 0.5, 0.7, 0.9}
        # Fine-tuning is measured on the new grid's rows.
        ft = pd.read_parquet(results / "finetune.parquet").set_index("lambda")
        tuned = iis[(iis.model == "r10-random+ft1") & (iis.library == "prototype") & (iis.grid == "0,0.5,0.7,0.9")]
        assert ft.loc[1.0, "iis_after"] == tuned.iis.item()
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
