"""The store contract: stage 1 writes it, stage 2 reads it, HDF5 carries it in and out."""

from __future__ import annotations

import json
import threading
import time

import h5py
import numpy as np
import pytest
import zarr
from iis.analyze.store import StoreError as ReadError
from iis.analyze.store import open_feature_store
from iis.extract import store as st
from iis.extract.h5io import export_h5, import_h5

SIZES = {"train": 23, "val": 7, "test": 11}
DIM = 5


def _provenance(n: int) -> st.ElementProvenance:
    return st.ElementProvenance(
        source_id=np.array([f"img{i}" for i in range(n)]), source_index=np.arange(n),
        label=np.arange(n) % 3, box=np.tile([0, 0, 4, 4], (n, 1)),
        kind=np.array(["grid"] * n), segment=np.full(n, -1),
    )


def _fill(group, part: str, rows: int, rng: np.random.Generator, blocks=None) -> dict:
    block_rows = group.attrs["block_rows"]
    data = {"features": rng.normal(size=(rows, DIM)).astype(np.float16)}
    if part != st.ELEMENTS:
        data.update(labels=rng.integers(0, 3, rows), ids=np.array([f"{part}-{i}" for i in range(rows)]),
                    valid=np.ones(rows, dtype=bool))
        data["valid"][1] = False
    for b in range(st.num_blocks(rows, block_rows)) if blocks is None else blocks:
        span = st.block_slice(b, rows=rows, block_rows=block_rows)
        st.write_block(group, part, b, **{k: v[span] for k, v in data.items()})
    return data


def _make_store(path, *, complete: bool = True):
    group = st.create_store(path, split_sizes=SIZES, feature_dim=DIM, attrs={"model": "m", "dataset": "d",
                            "classes": ["a", "b", "c"]}, elements=_provenance(6), block_rows=4)
    rng = np.random.default_rng(0)
    written = {s: _fill(group, s, n, rng) for s, n in SIZES.items()}
    written[st.ELEMENTS] = _fill(group, st.ELEMENTS, 6, rng, blocks=[0] if not complete else None)
    st.finalize_store(group, path)
    return written


def test_round_trip_through_the_reader(tmp_path):
    path = tmp_path / "m.zarr"
    written = _make_store(path)
    store = open_feature_store(path)
    assert (store.model, store.dataset, store.num_classes, store.feature_dim) == ("m", "d", 3, DIM)
    test = store.read_split("test")
    keep = written["test"]["valid"]
    np.testing.assert_array_equal(test.x.numpy(), written["test"]["features"][keep].astype(np.float32))
    np.testing.assert_array_equal(test.labels.numpy(), written["test"]["labels"][keep])
    assert test.ids.tolist() == written["test"]["ids"][keep].tolist() and test.n_invalid == 1
    proj = store.read_split("train", transform=lambda x: x[:, :2] * 2)
    assert proj.x.shape == (SIZES["train"] - 1, 2)
    elements = store.read_elements()
    assert elements.features.shape == (6, DIM) and elements.source_ids[3] == "img3"
    # Every array carries dimension names, so xarray.open_zarr and friends can label axes.
    group = zarr.open_group(str(path), mode="r")
    assert group["train/features"].metadata.dimension_names == ("sample", "feature")
    assert group["train/features"].chunks == (4, DIM)
    zero = {"train": 0, "val": 0, "test": 0, "elements": 0}
    assert group.attrs["summary"] == {"complete": True, "invalid": {"train": 1, "val": 1, "test": 1},
                                      "unreadable": {"train": 1, "val": 1, "test": 1},
                                      "nonfinite": zero, "overflow": zero}


def test_partial_store_is_refused_by_name(tmp_path):
    path = tmp_path / "partial.zarr"
    _make_store(path, complete=False)
    with pytest.raises(ReadError, match=r"partial\.zarr: incomplete store.*elements: blocks 1 "):
        open_feature_store(path)
    with pytest.raises(st.StoreError, match="elements: blocks 1"):
        st.check_complete(st.open_store(path), path)
    assert "summary" not in st.open_store(path).attrs


def test_foreign_and_unknown_schema_are_refused(tmp_path):
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").attrs["format"] = "something-else"
    with pytest.raises(ReadError, match="foreign store"):
        open_feature_store(tmp_path / "foreign.zarr")
    path = tmp_path / "future.zarr"
    _make_store(path)
    zarr.open_group(str(path), mode="r+").attrs["schema_version"] = 99
    with pytest.raises(ReadError, match="schema_version 99 unknown"):
        open_feature_store(path)
    with pytest.raises(ReadError, match="no feature store"):
        open_feature_store(tmp_path / "absent.zarr")


def test_store_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.zarr"
    _make_store(path)
    with pytest.raises(Exception, match="exist|contains"):
        _make_store(path)


def test_shard_ranges_partition_the_blocks():
    for total in (0, 1, 7, 10):
        for n in (1, 2, 3, 4):
            ranges = [list(st.shard_blocks(total, shard=i, num_shards=n)) for i in range(n)]
            assert sorted(b for r in ranges for b in r) == list(range(total))


def test_a_waiting_shard_refuses_what_is_no_store_at_once(tmp_path):
    # Waiting would not change a foreign folder or an unknown schema; the cause is said at once,
    # not replaced by "not created within" after the timeout.
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").attrs["format"] = "something-else"
    future = tmp_path / "future.zarr"
    _make_store(future)
    zarr.open_group(str(future), mode="r+").attrs["schema_version"] = 99
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    for path, match in ((tmp_path / "foreign.zarr", "not an iis feature store"),
                        (future, "schema_version 99 is not supported"),
                        (plain, r"not a feature store \(no zarr\.json\)")):
        start = time.monotonic()
        with pytest.raises(st.StoreError, match=match):
            st.wait_for_store(path, timeout=5, poll=0.05)
        assert time.monotonic() - start < 2, path


def test_a_waiting_shard_waits_for_a_store_not_there_yet(tmp_path):
    path = tmp_path / "m.zarr"
    with pytest.raises(st.StoreError, match=r"m\.zarr: not created within 0 s; shard 0"):
        st.wait_for_store(path, timeout=0, poll=0.01)
    path.mkdir()  # an empty folder made by hand: the coordinator may still create the store in it
    maker = threading.Timer(0.3, lambda: _make_store(path))
    maker.start()
    try:
        group = st.wait_for_store(path, timeout=60, poll=0.02)
    finally:
        maker.join()
    assert group.attrs["model"] == "m" and not st.missing_blocks(group)


def _tree_bytes(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_h5_round_trip_is_exact(tmp_path):
    path = tmp_path / "m.zarr"
    _make_store(path)
    export_h5(path, tmp_path / "m.h5")
    import_h5(tmp_path / "m.h5", tmp_path / "back.zarr")
    assert _tree_bytes(path) == _tree_bytes(tmp_path / "back.zarr")


def test_export_refuses_partial_store(tmp_path):
    path = tmp_path / "partial.zarr"
    _make_store(path, complete=False)
    with pytest.raises(st.StoreError, match="incomplete"):
        export_h5(path, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_import_hand_made_h5(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "made.h5"
    with h5py.File(src, "w") as f:
        f.attrs["model"] = "clip-elsewhere"
        f.attrs["dataset"] = "birds"
        f.attrs["classes"] = ["sparrow", "wren"]
        for split, n in SIZES.items():
            f[f"{split}/features"] = rng.normal(size=(n, DIM)).astype(np.float32)
            f[f"{split}/labels"] = rng.integers(0, 2, n)
        f["train/ids"] = np.array([f"t{i}" for i in range(SIZES["train"])], dtype=object)
        f["elements/features"] = rng.normal(size=(3, DIM)).astype(np.float32)
    import_h5(src, tmp_path / "imp.zarr", block_rows=8)
    store = open_feature_store(tmp_path / "imp.zarr")
    assert (store.model, store.dataset, store.classes) == ("clip-elsewhere", "birds", ["sparrow", "wren"])
    with h5py.File(src, "r") as f:
        np.testing.assert_array_equal(store.read_split("val").x.numpy(), f["val/features"][:])
    assert store.read_split("train").ids[2] == "t2"
    assert store.read_split("test").ids[0] == "test/0"  # ids are optional on import
    assert store.group.attrs["feature_dtype"] == "float32"
    assert json.loads(json.dumps(store.attrs))["weights"] == "imported:made.h5"


def test_import_rejects_malformed_h5(tmp_path):
    src = tmp_path / "bad.h5"
    with h5py.File(src, "w") as f:
        f.attrs["model"], f.attrs["dataset"] = "m", "d"
        f["train/features"] = np.zeros((4, 3))
        f["train/labels"] = np.zeros(4, dtype=int)
    with pytest.raises(ValueError, match="missing dataset /val/features"):
        import_h5(src, tmp_path / "x.zarr")


def test_chunked_split_yields_the_same_rows_as_a_whole_read(tmp_path):
    path = tmp_path / "m.zarr"
    _make_store(path)
    store = open_feature_store(path)
    whole, chunked = store.read_split("train"), store.chunked_split("train")
    assert chunked.shape == tuple(whole.x.shape) and chunked.num_chunks == 6  # 23 rows in blocks of 4
    rows = [chunked.chunk(i) for i in range(chunked.num_chunks)]
    starts = [start for _, start in rows]
    assert starts == sorted(starts) and starts[0] == 0
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in rows]), whole.x.numpy())
    np.testing.assert_array_equal(chunked.labels.numpy(), whole.labels.numpy())
    assert chunked.ids.tolist() == whole.ids.tolist() and chunked.n_invalid == whole.n_invalid == 1
