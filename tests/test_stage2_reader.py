"""What stage 2 refuses or drops before a head sees it (issue 13): non-finite rows, one-class
splits, labels out of range, unsafe model names, unfinished CLIP text groups, and the checks
that run before any fitting (K against the elements, a writable results folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from iis.analyze import pipeline, tables
from iis.analyze.pipeline import ClusterOptions, analyze_stores
from iis.analyze.store import TEXT_FORMAT, TEXT_GROUP, StoreError, open_feature_store
from test_dask import ANALYSIS, SMALL, _write_store

SYNC = ClusterOptions(synchronous=True, threads=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One complete synthetic store (four classes, 320 train rows, row 3 of train invalid)."""
    return _write_store(tmp_path_factory.mktemp("base") / "m0.zarr", model="m0", noise=1.0, seed=0, sizes=SMALL,
                        block_rows=64)


def _copy(base: Path, folder: Path, name: str = "m0.zarr") -> tuple[Path, zarr.Group]:
    path = folder / name
    shutil.copytree(base, path)
    return path, zarr.open_group(str(path), mode="r+")


def _no_tasks(monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "run_tasks", lambda *a, **k: pytest.fail("a task was scheduled"))


def _tables(results: Path) -> dict[str, pd.DataFrame]:
    return {n: tables.read_table(results, n).drop(columns=["fit_seconds", "library_file"], errors="ignore")
            for n in ("accuracy", "iis")}


def test_nonfinite_rows_are_dropped_counted_and_never_reach_the_heads(base, tmp_path, caplog):
    """Three valid-marked train rows of NaN/inf once gave every head chance accuracy and IIS 1.0.
    Now they are excluded with a warning, and the numbers equal those of a store where the same
    rows are marked invalid."""
    bad, g = _copy(base, tmp_path / "bad")
    features = g["train/features"]
    for row, value in zip((10, 11, 12), (np.nan, np.inf, -np.inf)):
        block = features[row].copy()
        block[5] = value
        features[row] = block
    marked, h = _copy(base, tmp_path / "marked")
    valid = h["train/valid"][:]
    valid[[10, 11, 12]] = False
    h["train/valid"][:] = valid
    with caplog.at_level("WARNING", logger="iis.analyze.store"):
        analyze_stores([bad], results=tmp_path / "R-bad", cluster=SYNC, **ANALYSIS)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(bad) in w and "3 rows" in w and "NaN/inf" in w for w in warnings), warnings
    analyze_stores([marked], results=tmp_path / "R-marked", cluster=SYNC, **ANALYSIS)
    got, want = _tables(tmp_path / "R-bad"), _tables(tmp_path / "R-marked")
    for name in got:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True, obj=name)
    assert (got["iis"].standard_top1 > 0.5).all()  # not chance (0.25), as NaN inputs gave
    split = open_feature_store(bad).read_split("train")
    assert split.n_nonfinite == 3 and split.n_invalid == 1 and torch.isfinite(split.x).all()
    assert open_feature_store(bad).chunked_split("train").n_nonfinite == 3


def test_every_row_nonfinite_is_refused_by_name(base, tmp_path):
    """A float16 overflow makes every row inf: the split has no usable rows, and says so."""
    path, g = _copy(base, tmp_path)
    g["test/features"][:] = np.full(g["test/features"].shape, np.inf, dtype=np.float16)
    with pytest.raises(StoreError, match=r"usable rows of test \(0 of 160\) cover 0 class") as err:
        open_feature_store(path).read_split("test")
    assert str(path) in str(err.value)


def test_one_class_store_is_refused(base, tmp_path, caplog):
    path, g = _copy(base, tmp_path)
    for split in ("train", "val", "test"):
        g[f"{split}/labels"][:] = np.zeros(g[f"{split}/labels"].shape, dtype=np.int64)
    with pytest.raises(StoreError, match="cover 1 class") as err:
        analyze_stores([path], results=tmp_path / "R", cluster=SYNC, **ANALYSIS)
    assert str(path) in str(err.value) and "train" in str(err.value)
    assert not (tmp_path / "R" / "iis.parquet").exists()


def test_class_without_train_rows_is_a_warning(base, tmp_path, caplog):
    path, g = _copy(base, tmp_path)
    labels = g["train/labels"][:]
    labels[labels == 3] = 2
    g["train/labels"][:] = labels
    with caplog.at_level("WARNING", logger="iis.analyze.store"):
        open_feature_store(path).read_split("train")
    assert "1 of 4 classes have no usable rows (c3)" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize(("split", "value"), [("test", 99), ("train", -1)])
def test_label_out_of_range_is_refused(base, tmp_path, split, value):
    path, g = _copy(base, tmp_path)
    labels = g[f"{split}/labels"][:]
    labels[7] = value
    g[f"{split}/labels"][:] = labels
    store = open_feature_store(path)
    with pytest.raises(StoreError, match=rf"{split} has label {value} \(1 rows\) outside \[0, 4\)"):
        store.read_split(split)
    with pytest.raises(StoreError, match=f"label {value}"):
        store.chunked_split(split)  # the streamed path the standard head trains from


def test_projection_that_gives_nonfinite_values_is_refused(base):
    with pytest.raises(StoreError, match="NaN/inf after the concept projection"):
        open_feature_store(base).read_split("val", transform=lambda x: x * float("inf"))


def test_nonfinite_element_is_refused(base, tmp_path):
    path, g = _copy(base, tmp_path)
    block = g["elements/features"][:]
    block[4] = np.nan
    g["elements/features"][:] = block
    with pytest.raises(StoreError, match="1 of 40 visual elements have NaN/inf"):
        open_feature_store(path).read_elements()


def test_model_attribute_cannot_escape_the_results_folder(base, tmp_path, monkeypatch):
    path, g = _copy(base, tmp_path / "stores")
    g.attrs["model"] = "../../x"
    _no_tasks(monkeypatch)
    results = tmp_path / "a" / "b" / "results"
    with pytest.raises(StoreError, match="model attribute is refused") as err:
        analyze_stores([path], results=results, cluster=SYNC, **ANALYSIS)
    assert str(path) in str(err.value)
    assert not results.exists() and not (tmp_path / "a" / "x").exists()


def test_text_group_must_be_finished(base, tmp_path, monkeypatch):
    from iis.extract import clip

    assert (TEXT_GROUP, TEXT_FORMAT) == (clip.TEXT_GROUP, clip.TEXT_FORMAT)  # one marker, two stages
    path, g = _copy(base, tmp_path, "clip.zarr")
    with pytest.raises(StoreError, match="no text/ group"):
        open_feature_store(path).text_group()
    text = g.create_group(TEXT_GROUP)
    text.create_array("words", shape=(2,), dtype=str)  # killed before the marker was written
    _no_tasks(monkeypatch)
    with pytest.raises(StoreError, match=r"clip.zarr/text: unfinished group"):
        analyze_stores([base], results=tmp_path / "R", cluster=SYNC, clip_store=path,
                       **{**ANALYSIS, "libraries": ["text"]})
    text.attrs["format"] = TEXT_FORMAT
    assert open_feature_store(path).text_group().attrs["format"] == TEXT_FORMAT


def test_more_concepts_than_elements_is_refused_before_fitting(base, tmp_path, monkeypatch):
    _no_tasks(monkeypatch)
    with pytest.raises(ValueError, match="K = 41 concepts but the store has only 40 visual elements") as err:
        analyze_stores([base], results=tmp_path / "R", cluster=SYNC, **{**ANALYSIS, "num_concepts": 41})
    assert str(base) in str(err.value)


def test_unwritable_results_folder_is_refused_before_fitting(base, tmp_path, monkeypatch):
    # Tests may run as root, for whom chmod does not stop writes: fail the probe file instead.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    _no_tasks(monkeypatch)
    monkeypatch.setattr(tables.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match="R: results folder is not writable"):
        analyze_stores([base], results=tmp_path / "R", cluster=SYNC, **ANALYSIS)


def test_task_errors_name_their_store(base, tmp_path, monkeypatch):
    def broken(spec):
        raise ValueError("the heads diverged")

    monkeypatch.setattr(pipeline, "run_task", broken)
    with pytest.raises(ValueError, match=r"m0.zarr \(standard, seed 0\): the heads diverged"):
        analyze_stores([base], results=tmp_path / "R", cluster=SYNC, **ANALYSIS)


def test_zero_workers_is_refused_not_a_hang():
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        ClusterOptions(workers=0)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        ClusterOptions(threads=0)


def test_library_paths_refuse_unsafe_names(tmp_path):
    from iis.analyze.artifacts import library_path

    kwargs = dict(library="prototype", num_concepts=8, seed=0, protocol="default", ratio=None)
    assert library_path(tmp_path, model="r10+ft1", **kwargs).parent == tmp_path / "r10+ft1"
    for bad in ("../../x", "a/b", "", "..hidden"):
        with pytest.raises(ValueError, match="not a safe name"):
            library_path(tmp_path, model=bad, **kwargs)
