"""HDF5 export and import of a CLIP store (its ``text/`` group of concept words goes both ways),
and the zarr version every store relies on."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from iis.analyze.store import open_feature_store
from iis.extract import clip as xc
from iis.extract import store as st
from iis.extract.h5io import export_h5, import_h5
from packaging.requirements import Requirement
from packaging.version import Version

SIZES = {"train": 9, "val": 5, "test": 6}
DIM = 8
WORDS = ["stripes", "wheel", "fur", "ürban sky"]
SHA = "ab" * 32


def _clip_store(path, *, finished: bool = True):
    """A complete store with a ``text/`` group written by stage 1's own writer."""
    rng = np.random.default_rng(0)
    group = st.create_store(path, split_sizes=SIZES, feature_dim=DIM, block_rows=4, dtype="float32",
                            attrs={"model": "clip", "dataset": "d", "classes": ["a", "b", "c"],
                                   "weights_sha256": SHA}, elements=None)
    for split, rows in SIZES.items():
        data = {"features": rng.normal(size=(rows, DIM)), "labels": np.arange(rows) % 3,
                "ids": np.array([f"{split}/{i}" for i in range(rows)]), "valid": np.ones(rows, dtype=bool)}
        for b in range(st.num_blocks(rows, 4)):
            span = st.block_slice(b, rows=rows, block_rows=4)
            st.write_block(group, split, b, **{k: v[span] for k, v in data.items()})
    st.finalize_store(group, path)
    attrs = {"clip_model": "iis-tiny-test", "weights": "w.pt", "weights_sha256": SHA,
             "random_weights": False, "concepts_path": "concepts.txt"}
    feats = rng.normal(size=(len(WORDS), DIM)).astype(np.float32)
    xc.write_text_features(path, concepts=WORDS, features=feats, attrs=attrs)
    if not finished:  # as a crash before the finishing attributes leaves it
        zarr.open_group(str(path / "text"), mode="r+").attrs.put({})
    return feats


def _tree_bytes(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_h5_round_trip_keeps_the_text_group(tmp_path):
    path = tmp_path / "clip.zarr"
    feats = _clip_store(path)
    export_h5(path, tmp_path / "clip.h5")
    import_h5(tmp_path / "clip.h5", tmp_path / "back.zarr")
    back = tmp_path / "back.zarr"
    # Every array, dtype, chunking and attribute, byte for byte.
    assert _tree_bytes(path) == _tree_bytes(back)
    words, values, attrs = xc.read_text_features(back)
    assert words == WORDS and values.dtype == np.float32
    np.testing.assert_array_equal(values, feats)
    assert attrs == dict(zarr.open_group(str(path / "text"), mode="r").attrs)
    assert open_feature_store(back).text_group()["features"].chunks == (len(WORDS), DIM)


def test_an_unfinished_text_group_is_not_exported(tmp_path, caplog):
    path = tmp_path / "clip.zarr"
    _clip_store(path, finished=False)
    export_h5(path, tmp_path / "clip.h5")
    assert "unfinished text/ group" in caplog.text
    with h5py.File(tmp_path / "clip.h5", "r") as f:
        assert "text" not in f
    import_h5(tmp_path / "clip.h5", tmp_path / "back.zarr")
    assert "text" not in zarr.open_group(str(tmp_path / "back.zarr"), mode="r")


def _edit_text(h5_path, edit) -> None:
    with h5py.File(h5_path, "r+") as f:
        edit(f["text"])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda g: g.attrs.__delitem__("iis_attrs"), "lacks its attribute iis_attrs"),
    (lambda g: g.attrs.__setitem__("iis_attrs", json.dumps({"format": "x"})), "not that of a finished text group"),
    (lambda g: (g.__delitem__("words"), g.create_dataset("words", data=np.array([b"a", b"b"]))),
     r"/text/words has shape \(2,\)"),
    (lambda g: (g.__delitem__("features"), g.create_dataset("features", data=np.zeros((4, 3), np.float32))),
     r"/text/features has shape \(4, 3\)"),
    (lambda g: g["features"].__setitem__((0, 0), np.nan), "NaN or inf"),
])
def test_import_checks_the_text_group(tmp_path, edit, message):
    path = tmp_path / "clip.zarr"
    _clip_store(path)
    export_h5(path, tmp_path / "clip.h5")
    _edit_text(tmp_path / "clip.h5", edit)
    with pytest.raises(ValueError, match=message):
        import_h5(tmp_path / "clip.h5", tmp_path / "back.zarr")
    assert not (tmp_path / "back.zarr").exists()


def test_zarr_pin_admits_only_atomic_metadata_writes():
    """Stores rely on LocalStore writing each file atomically (temporary file, then rename), which
    zarr-python has done since 3.1.3 (PR #3412); an older zarr could leave a torn zarr.json."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (zarr_req,) = [r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "zarr"]
    assert not zarr_req.specifier.contains("3.1.2") and zarr_req.specifier.contains("3.1.3")
    assert zarr_req.specifier.contains(Version(zarr.__version__))
