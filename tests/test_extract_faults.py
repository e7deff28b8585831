"""Stage 1 under faults and bad input: finite or invalid, labels checked, stores that explain themselves.

Each test is a probe of issue 13 that passed silently (or crashed) before: NaN/inf and float16
overflow rows, bad HDF5 labels and names, half-made stores, changed settings on resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import h5py
import numpy as np
import pytest
import torch
import zarr
from iis.analyze.store import open_feature_store
from iis.extract import store as st
from iis.extract.backbones import create_backbone
from iis.extract.datasets import ImageDataset, Split
from iis.extract.elements import plan_elements
from iis.extract.h5io import export_h5, import_h5
from iis.extract.runner import ExtractOptions, extract_store

from iis.cli import main
from iis.store_format import ROW_NONFINITE, ROW_OK, ROW_OVERFLOW, ROW_UNREADABLE, check_labels

DIM = 4
SIZES = {"train": 10, "val": 5, "test": 6}


# ------------------------------------------------------------------------------------------------
# Helpers


def _tiny_dataset(seed: int = 0) -> ImageDataset:
    """21 random 12x12 grey images in two classes, split 10/5/6, pixels in memory."""
    rng = np.random.default_rng(seed)
    n = sum(SIZES.values())
    images = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
    order = rng.permutation(n)
    splits, positions, start = {}, {}, 0
    for split, size in SIZES.items():
        rows = order[start:start + size]
        start += size
        splits[split] = Split(ids=np.array([f"tiny/{i:02d}" for i in rows]), labels=(rows % 2).astype(np.int64))
        positions[split] = rows
    return ImageDataset(name="tiny", classes=["even", "odd"], splits=splits, images=images, positions=positions)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(backbone="resnet10t", weights="random", img_size=32, seed=0)


class _Scaled(torch.nn.Module):
    """A backbone whose features are multiplied by ``factor`` (finite in float32)."""

    def __init__(self, model: torch.nn.Module, factor: float):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factor


def _extract(path, dataset, backbone, **options):
    opts = ExtractOptions(**{"batch_size": 4, "block_rows": 4, "device": "cpu", **options})
    return extract_store(path, dataset=dataset, backbone=backbone, model_name="r10", element_plans=[],
                         elements_config=None, options=opts)


def _new_store(path, *, dtype="float16", classes=("a", "b", "c")):
    return st.create_store(path, split_sizes={"train": 6, "val": 2, "test": 2}, feature_dim=DIM,
                           attrs={"model": "m", "dataset": "d", "classes": list(classes)}, elements=None,
                           block_rows=3, dtype=dtype)


def _tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Finite or invalid: the writer


def test_writer_marks_nonfinite_and_overflow_rows_invalid(tmp_path):
    group = _new_store(tmp_path / "s.zarr")
    features = np.ones((3, DIM), dtype=np.float32)
    features[0, 1] = np.nan  # the backbone gave NaN
    features[1, 2] = 1e6  # finite, but beyond float16's 65504
    counts = st.write_block(group, "train", 0, features=features, labels=np.array([0, 1, 2]),
                            ids=np.array(["x", "y", "z"]), valid=np.ones(3, dtype=bool))
    assert counts == {"unreadable": 0, "nonfinite": 1, "overflow": 1}
    assert group["train/valid"][:3].tolist() == [False, False, True]
    assert group["train/reason"][:3].tolist() == [ROW_NONFINITE, ROW_OVERFLOW, ROW_OK]
    unreadable = np.full((3, DIM), np.nan, dtype=np.float32)
    unreadable[2] = 1.0  # one good row, so that the usable train rows cover two classes
    st.write_block(group, "train", 1, features=unreadable, labels=np.array([0, 0, 1]),
                   ids=np.array(["u", "v", "w"]), valid=np.array([False, True, True]))
    assert group["train/reason"][3:6].tolist() == [ROW_UNREADABLE, ROW_NONFINITE, ROW_OK]
    for split in ("val", "test"):
        st.write_block(group, split, 0, features=np.zeros((2, DIM)), labels=np.array([0, 1]),
                       ids=np.array(["p", "q"]), valid=np.ones(2, dtype=bool))
    assert st.finalize_store(group, tmp_path / "s.zarr")
    summary = group.attrs["summary"]
    assert summary["invalid"]["train"] == 4
    assert summary["unreadable"]["train"] == 1 and summary["nonfinite"]["train"] == 2
    assert summary["overflow"]["train"] == 1
    # The reader never hands the bad rows to a head.
    train = open_feature_store(tmp_path / "s.zarr").read_split("train")
    assert np.isfinite(train.x.numpy()).all() and train.ids.tolist() == ["z", "w"]


def test_writer_refuses_labels_outside_the_classes(tmp_path):
    group = _new_store(tmp_path / "s.zarr")
    for bad, match in ((np.array([0, 1, 3]), "label 3 at row 2 is out of range for 3 classes"),
                       (np.array([0, -1, 1]), "label -1 at row 1 is negative"),
                       (np.array([0.0, 0.7, 1.0]), "label 0.7 at row 1 is not a whole number")):
        with pytest.raises(ValueError, match=match):
            st.write_block(group, "train", 0, features=np.zeros((3, DIM)), labels=bad,
                           ids=np.array(["x", "y", "z"]), valid=np.ones(3, dtype=bool))
    assert not group["train/done"][0]


def test_check_labels_accepts_whole_floats_and_names_the_place():
    assert check_labels(np.array([0.0, 2.0]), 3, where="w").tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"^f\.h5 /val: label nan at row 7"):
        check_labels(np.array([1.0, np.nan]), 3, where="f.h5 /val", first_row=6)


def test_float16_overflow_is_detected_and_named(tmp_path, backbone, caplog):
    """A backbone whose features exceed float16 must not give a 'complete, 0 invalid' store of infs."""
    loud = dataclasses.replace(backbone, model=_Scaled(backbone.model, 1e9))
    path = tmp_path / "loud.zarr"
    with caplog.at_level(logging.WARNING):
        assert _extract(path, _tiny_dataset(), loud, dtype="float16")
    summary = zarr.open_group(str(path), mode="r").attrs["summary"]
    assert summary["invalid"] == SIZES and summary["overflow"] == {**SIZES, "elements": 0}
    assert summary["unreadable"] == {s: 0 for s in SIZES}
    assert "extract.dtype: float32" in caplog.text and "overflow float16" in caplog.text
    assert not np.asarray(zarr.open_group(str(path), mode="r")["train/valid"][:]).any()
    # The same backbone in float32 is finite: every row valid.
    assert _extract(tmp_path / "wide.zarr", _tiny_dataset(), loud, dtype="float32")
    wide = zarr.open_group(str(tmp_path / "wide.zarr"), mode="r").attrs["summary"]
    assert wide["invalid"] == {s: 0 for s in SIZES}


def test_nonfinite_backbone_rows_are_invalid_not_silent(tmp_path, backbone, caplog):
    class _NanFirst(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = self.model(x)
            out[0, 0] = float("nan")  # the first row of every batch
            return out

    broken = dataclasses.replace(backbone, model=_NanFirst(backbone.model))
    path = tmp_path / "nan.zarr"
    with caplog.at_level(logging.WARNING):
        assert _extract(path, _tiny_dataset(), broken)
    summary = zarr.open_group(str(path), mode="r").attrs["summary"]
    batches = {s: -(-n // 4) for s, n in SIZES.items()}  # one NaN row per batch of 4
    assert summary["nonfinite"] == {**batches, "elements": 0} and summary["invalid"] == batches
    assert "NaN/inf features" in caplog.text
    train = open_feature_store(path).read_split("train")
    assert len(train.labels) == SIZES["train"] - batches["train"] and np.isfinite(train.x.numpy()).all()


# ------------------------------------------------------------------------------------------------
# import-h5


def _h5(path, *, labels=None, classes=("a", "b"), model="elsewhere", features=None):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["model"], f.attrs["dataset"] = model, "d"
        if classes is not None:
            f.attrs["classes"] = list(classes)
        for split, n in SIZES.items():
            f[f"{split}/features"] = rng.normal(size=(n, DIM)).astype(np.float32)
            f[f"{split}/labels"] = np.arange(n) % 2
        for key, values in (labels or {}).items():
            del f[f"{key}/labels"]
            f[f"{key}/labels"] = values
        for key, values in (features or {}).items():
            del f[f"{key}/features"]
            f[f"{key}/features"] = values
    return path


def test_import_marks_nonfinite_rows_invalid_and_counts_them(tmp_path):
    feats = np.ones((SIZES["train"], DIM), dtype=np.float32)
    feats[2, 0], feats[5, 3] = np.inf, np.nan
    src = _h5(tmp_path / "f.h5", features={"train": feats})
    import_h5(src, tmp_path / "s.zarr")
    summary = zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["summary"]
    assert summary["invalid"]["train"] == 2 and summary["nonfinite"]["train"] == 2
    store = open_feature_store(tmp_path / "s.zarr")
    assert store.read_split("train").x.shape[0] == SIZES["train"] - 2


def test_import_overflowing_float16_is_counted(tmp_path):
    feats = np.ones((SIZES["val"], DIM), dtype=np.float32)
    feats[1] = 1e5
    import_h5(_h5(tmp_path / "f.h5", features={"val": feats}), tmp_path / "s.zarr", dtype="float16")
    summary = zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["summary"]
    assert summary["overflow"]["val"] == 1 and summary["invalid"]["val"] == 1


@pytest.mark.parametrize(("labels", "classes", "match"), [
    ({"train": np.array([0, 0.7, 1, 0, 1, 0, 1, 0, 1, 0])}, ("a", "b"), r"/train/labels: label 0\.7 at row 1"),
    ({"val": np.array([0, 1, -1, 0, 1])}, ("a", "b"), r"/val/labels: label -1 at row 2 is negative"),
    ({"test": np.array([0, 1, 0, 5, 1, 0])}, ("a", "b"), r"/test/labels: label 5 at row 3 is out of range for 2"),
    ({"train": np.array(["a"] * 10, dtype=object)}, ("a", "b"), r"/train/labels: labels must be integers"),
])
def test_import_refuses_bad_labels_and_leaves_nothing(tmp_path, labels, classes, match):
    src = _h5(tmp_path / "f.h5", labels=labels, classes=classes)
    with pytest.raises(ValueError, match=match) as info:
        import_h5(src, tmp_path / "s.zarr")
    assert str(src) in str(info.value)
    assert list(tmp_path.iterdir()) == [src]


def test_import_refuses_a_traversal_model_name(tmp_path):
    src = _h5(tmp_path / "f.h5", model="../../../x")
    with pytest.raises(ValueError, match="model '../../../x' is not a safe name"):
        import_h5(src, tmp_path / "s.zarr")
    # The same name hidden in an exported file's iis_attrs.
    good = tmp_path / "good.zarr"
    import_h5(_h5(tmp_path / "g.h5"), good)
    export_h5(good, tmp_path / "e.h5")
    with h5py.File(tmp_path / "e.h5", "r+") as f:
        attrs = json.loads(f.attrs["iis_attrs"])
        f.attrs["iis_attrs"] = json.dumps({**attrs, "model": "a/b"})
    with pytest.raises(ValueError, match="not a safe name"):
        import_h5(tmp_path / "e.h5", tmp_path / "t.zarr")
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "t.zarr").exists()


def test_import_of_a_non_hdf5_file_is_one_line(tmp_path, caplog):
    src = tmp_path / "notes.h5"
    src.write_text("this is not HDF5\n")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        import_h5(src, tmp_path / "s.zarr")
    with caplog.at_level(logging.ERROR):
        assert main(["import-h5", str(src), str(tmp_path / "s.zarr")]) == 2
    assert "Traceback" not in caplog.text and not (tmp_path / "s.zarr").exists()
    assert main(["import-h5", str(_h5(tmp_path / "f.h5")), str(tmp_path / "s.zarr"), "--block-rows", "0"]) == 2


def test_a_failed_import_leaves_nothing_behind(tmp_path, monkeypatch):
    src = _h5(tmp_path / "f.h5")
    calls = {"n": 0}
    real = st.write_block

    def dies_on_third_block(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C halfway through the blocks
        return real(*args, **kw)

    monkeypatch.setattr(st, "write_block", dies_on_third_block)
    with pytest.raises(KeyboardInterrupt):
        import_h5(src, tmp_path / "s.zarr", block_rows=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]  # no store, no hidden build folder
    monkeypatch.setattr(st, "write_block", real)
    import_h5(src, tmp_path / "s.zarr", block_rows=2)  # and a rerun succeeds
    assert open_feature_store(tmp_path / "s.zarr").read_split("val").x.shape == (SIZES["val"], DIM)


def test_export_import_round_trip_keeps_reasons(tmp_path):
    feats = np.ones((SIZES["test"], DIM), dtype=np.float32)
    feats[4] = np.nan
    import_h5(_h5(tmp_path / "f.h5", features={"test": feats}), tmp_path / "a.zarr")
    export_h5(tmp_path / "a.zarr", tmp_path / "a.h5")
    import_h5(tmp_path / "a.h5", tmp_path / "b.zarr")
    assert _tree(tmp_path / "a.zarr") == _tree(tmp_path / "b.zarr")


# ------------------------------------------------------------------------------------------------
# Stores that explain themselves


def test_interrupted_creation_is_recreated_not_refused(tmp_path, backbone, caplog):
    path = tmp_path / "r10.zarr"
    # What a create_store killed right after its zarr.json appeared left behind (before the
    # format marker, which goes last): a group with no attributes and some of its parts.
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.create_group("train").create_array("features", shape=(10, 512), chunks=(4, 512), dtype="float16")
    assert st.interrupted_creation(path)
    with pytest.raises(st.StoreError, match="creation was interrupted.*rerun `iis extract`"):
        st.open_store(path)  # what export-h5 or a waiting shard sees: the cause, not "foreign"
    with caplog.at_level(logging.WARNING):
        assert _extract(path, _tiny_dataset(), backbone)
    assert "creation was interrupted" in caplog.text
    clean = tmp_path / "clean.zarr"
    assert _extract(clean, _tiny_dataset(), backbone)
    assert _tree(path) == _tree(clean)


def test_a_foreign_folder_is_never_deleted(tmp_path, backbone):
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").attrs["owner"] = "someone else"
    assert not st.interrupted_creation(foreign)
    with pytest.raises(st.StoreError, match="not an iis feature store"):
        _extract(foreign, _tiny_dataset(), backbone)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        _extract(plain, _tiny_dataset(), backbone)
    assert (plain / "notes.txt").read_text() == "mine" and dict(zarr.open_group(str(foreign)).attrs)


def test_an_interrupted_create_store_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "_write_provenance", boom)
    prov = st.ElementProvenance(source_id=np.array(["a"]), source_index=np.array([0]), label=np.array([0]),
                                box=np.array([[0, 0, 1, 1]]), kind=np.array(["grid"]), segment=np.array([-1]))
    with pytest.raises(KeyboardInterrupt):
        st.create_store(tmp_path / "s.zarr", split_sizes={"train": 1, "val": 1, "test": 1}, feature_dim=2,
                        attrs={}, elements=prov, block_rows=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("change", "match"), [
    ({"dtype": "float32"}, r"dtype \(extract\.dtype\): the store was made with float16, this run asks float32"),
    ({"block_rows": 8}, r"block_rows \(extract\.block_rows\): the store was made with 4, this run asks 8"),
])
def test_changed_settings_are_refused_by_name(tmp_path, backbone, change, match):
    path = tmp_path / "r10.zarr"
    opts = {"dtype": "float16", "block_rows": 4}
    assert _extract(path, _tiny_dataset(), backbone, **{k: v for k, v in opts.items() if k != "block_rows"})
    before = _tree(path)
    ex = ExtractOptions(batch_size=4, device="cpu", **{**opts, **change})
    with pytest.raises(st.StoreError, match=match) as info:
        extract_store(path, dataset=_tiny_dataset(), backbone=backbone, model_name="r10", element_plans=[],
                      elements_config=None, options=ex)
    assert "Delete the store" in str(info.value) and str(path) in str(info.value)
    assert _tree(path) == before


def test_a_store_records_how_its_values_were_computed(tmp_path, backbone):
    assert _extract(tmp_path / "r10.zarr", _tiny_dataset(), backbone)
    attrs = zarr.open_group(str(tmp_path / "r10.zarr"), mode="r").attrs
    # On CPU nothing is autocast, whatever extract.amp says.
    assert (attrs["device_type"], attrs["autocast"], attrs["batch_size"]) == ("cpu", "none", 4)


def test_another_batch_size_is_refused_on_resume_and_across_shards(tmp_path, backbone):
    path = tmp_path / "r10.zarr"
    assert not _extract(path, _tiny_dataset(), backbone, shard=(0, 2))  # batch_size 4
    before = _tree(path)
    for shard in ((1, 2), (0, 2)):  # the other shard, and the coordinator resuming
        ex = ExtractOptions(batch_size=2, block_rows=4, device="cpu", shard=shard, wait_seconds=0)
        with pytest.raises(st.StoreError) as info:
            extract_store(path, dataset=_tiny_dataset(), backbone=backbone, model_name="r10", element_plans=[],
                          elements_config=None, options=ex)
        assert str(path) in str(info.value)
        assert "batch_size (extract.batch_size): the store was made with 4, this run asks 2" in str(info.value)
    assert _tree(path) == before
    assert _extract(path, _tiny_dataset(), backbone, shard=(1, 2))  # the same settings finish it


def test_a_store_computed_on_another_device_is_refused(tmp_path, backbone):
    path = tmp_path / "r10.zarr"
    assert not _extract(path, _tiny_dataset(), backbone, shard=(0, 2))
    # As a store begun on a GPU under bfloat16 autocast records itself.
    zarr.open_group(str(path), mode="r+").attrs.update({"device_type": "cuda", "autocast": "bfloat16"})
    with pytest.raises(st.StoreError) as info:
        _extract(path, _tiny_dataset(), backbone, shard=(1, 2), wait_seconds=0)
    text = str(info.value)
    assert "device type (extract.device, --device): the store was made with cuda, this run asks cpu" in text
    assert "autocast dtype (extract.amp on CUDA; none on CPU): the store was made with bfloat16, this run " \
           "asks none" in text


def test_a_store_made_before_the_compute_settings_resumes_with_one_warning(tmp_path, backbone, caplog):
    path = tmp_path / "r10.zarr"
    assert not _extract(path, _tiny_dataset(), backbone, shard=(0, 2))
    group = zarr.open_group(str(path), mode="r+")
    for key in ("device_type", "autocast", "batch_size"):
        del group.attrs[key]
    with caplog.at_level(logging.WARNING):
        # Unknown is not refused, not even with another batch size.
        assert _extract(path, _tiny_dataset(), backbone, shard=(1, 2), batch_size=2)
    warned = [r.getMessage() for r in caplog.records if "made before iis recorded" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0] and "batch_size" in warned[0]
    assert "batch_size" not in zarr.open_group(str(path), mode="r").attrs  # metadata is the coordinator's


def test_other_rows_of_the_same_sizes_are_refused(tmp_path, backbone):
    path = tmp_path / "r10.zarr"
    assert _extract(path, _tiny_dataset(seed=0), backbone)
    with pytest.raises(st.StoreError, match=r"rows \(the ids and labels of each split"):
        _extract(path, _tiny_dataset(seed=1), backbone)  # same sizes, other ids


def test_another_element_plan_is_refused(tmp_path, backbone):
    ds = _tiny_dataset()
    plans = plan_elements(ds, images_per_class=1, grid=2, slic=False, seed=0)
    other = plan_elements(ds, images_per_class=1, grid=2, slic=False, seed=1)
    assert [p.source_id for p in plans] != [p.source_id for p in other]
    opts = ExtractOptions(batch_size=4, block_rows=4, device="cpu")
    kw = dict(dataset=ds, backbone=backbone, model_name="r10", elements_config={"grid": 2}, options=opts)
    assert extract_store(tmp_path / "r10.zarr", element_plans=plans, **kw)
    with pytest.raises(st.StoreError, match="element plan"):
        extract_store(tmp_path / "r10.zarr", element_plans=other, **kw)


def test_bad_option_values_are_refused_before_any_work(tmp_path):
    for bad in ({"block_rows": 0}, {"batch_size": 0}, {"num_workers": -1}, {"dtype": "float64"},
                {"shard": (2, 2)}):
        with pytest.raises(ValueError, match=next(iter(bad)) if "shard" not in bad else "shard"):
            ExtractOptions(**bad)
    with pytest.raises(ValueError, match="block_rows must be a positive integer"):
        st.create_store(tmp_path / "s.zarr", split_sizes={"train": 1, "val": 1, "test": 1}, feature_dim=2,
                        attrs={}, elements=None, block_rows=0)
    with pytest.raises(ValueError, match="block_rows"):
        import_h5(tmp_path / "absent.h5", tmp_path / "t.zarr", block_rows=0)
    assert list(tmp_path.iterdir()) == []


def test_unavailable_device_is_refused_before_the_store_exists(tmp_path, backbone, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        extract_store(tmp_path / "r10.zarr", dataset=_tiny_dataset(), backbone=backbone, model_name="r10",
                      element_plans=[], elements_config=None, options=ExtractOptions(device="cuda"))
    assert not (tmp_path / "r10.zarr").exists()
