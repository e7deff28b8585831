"""Convert a feature store to and from one HDF5 file (h5py).

HDF5 layout::

    /<split>/features (N, D)   /<split>/labels (N,)   /<split>/ids (N,) str, optional on import
    /<split>/valid (N,) bool, optional on import (default: all valid)
    /elements/features (E, D), optional; its provenance columns are optional too
    file attrs: model, dataset, classes (optional), iis_attrs (JSON; written by export)

``export_h5`` followed by ``import_h5`` reproduces the store's arrays and attributes exactly.
Import is how features computed elsewhere enter the pipeline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
from iis.extract import store as st
from iis.extract.backbones import file_sha256

from iis.store_format import BLOCK_ROWS, atomic_file

log = logging.getLogger(__name__)

_PROVENANCE = ("source_id", "source_index", "label", "box", "kind", "segment")


def export_h5(store_path: Path, h5_path: Path) -> None:
    """Write a complete store to one HDF5 file (refuses an incomplete store)."""
    group = st.open_store(store_path)
    st.check_complete(group, store_path)
    attrs = st.creation_attrs(group)
    with atomic_file(h5_path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["model"] = attrs.get("model", "")
        f.attrs["dataset"] = attrs.get("dataset", "")
        if attrs.get("classes") is not None:
            f.attrs["classes"] = np.array(attrs["classes"], dtype=h5py.string_dtype())
        f.attrs["iis_attrs"] = json.dumps(attrs)
        for split in st.SPLITS:
            src, dst = group[split], f.create_group(split)
            dst.create_dataset("features", data=src["features"][:])
            dst.create_dataset("labels", data=src["labels"][:])
            dst.create_dataset("ids", data=src["ids"][:].astype(object), dtype=h5py.string_dtype())
            dst.create_dataset("valid", data=src["valid"][:])
        if attrs.get("num_elements"):
            src, dst = group[st.ELEMENTS], f.create_group(st.ELEMENTS)
            dst.create_dataset("features", data=src["features"][:])
            for name in _PROVENANCE:
                values = src[name][:]
                if values.dtype.kind in "UTO":
                    dst.create_dataset(name, data=values.astype(object), dtype=h5py.string_dtype())
                else:
                    dst.create_dataset(name, data=values)
    log.info("exported %s -> %s", store_path, h5_path)


def _read_str(ds: h5py.Dataset) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in ds[:]], dtype=str)


def _require(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    if key not in f:
        raise ValueError(f"{path}: missing dataset /{key}")
    return f[key]


def _imported_attrs(f: h5py.File, h5_path: Path, classes: list[str]) -> dict:
    if "iis_attrs" in f.attrs:  # a file written by export_h5: restore its attributes exactly
        attrs = json.loads(f.attrs["iis_attrs"])
        for key in ("format", "schema_version", "block_rows", "feature_dtype", "feature_dim",
                    "split_sizes", "num_elements"):
            attrs.pop(key, None)
        return attrs
    for key in ("model", "dataset"):
        if key not in f.attrs:
            raise ValueError(f"{h5_path}: missing file attribute {key!r}")
    digest = file_sha256(Path(h5_path))
    return {
        "model": str(f.attrs["model"]),
        "pipeline": None,
        "backbone": str(f.attrs["model"]),
        "weights": f"imported:{Path(h5_path).name}",
        "weights_sha256": digest,
        "layer": "unknown (imported)",
        "pooling": "unknown (imported)",
        "data_config": None,
        "dataset": str(f.attrs["dataset"]),
        "classes": classes,
        "elements": None,
    }


def import_h5(h5_path: Path, store_path: Path, *, block_rows: int = BLOCK_ROWS, dtype: str | None = None) -> None:
    """Create a complete store from an HDF5 file in the layout above.

    Args:
        h5_path: the HDF5 file.
        store_path: the store to create (must not exist).
        block_rows: rows per block of the new store (a file from export keeps its own).
        dtype: stored feature dtype; default: the file's (float16 stays float16, else float32).
    """
    h5_path = Path(h5_path)
    with h5py.File(h5_path, "r") as f:
        splits = {}
        for split in st.SPLITS:
            features = _require(f, f"{split}/features", h5_path)[:]
            labels = _require(f, f"{split}/labels", h5_path)[:].astype(np.int64)
            if features.ndim != 2 or labels.shape != (features.shape[0],):
                raise ValueError(f"{h5_path}: /{split}: features must be (N, D) and labels (N,), "
                                 f"got {features.shape} and {labels.shape}")
            n = features.shape[0]
            ids = _read_str(f[f"{split}/ids"]) if f"{split}/ids" in f else np.array(
                [f"{split}/{i}" for i in range(n)], dtype=str)
            valid = f[f"{split}/valid"][:].astype(bool) if f"{split}/valid" in f else np.ones(n, dtype=bool)
            splits[split] = (features, labels, ids, valid)
        dims = {s: v[0].shape[1] for s, v in splits.items()}
        if len(set(dims.values())) != 1:
            raise ValueError(f"{h5_path}: splits disagree on feature dimension: {dims}")
        classes = _read_str(f.attrs["classes"]).tolist() if "classes" in f.attrs else [
            str(c) for c in range(int(max(v[1].max(initial=-1) for v in splits.values())) + 1)]
        attrs = _imported_attrs(f, h5_path, classes)
        if "iis_attrs" in f.attrs:
            stored = json.loads(f.attrs["iis_attrs"])
            block_rows = int(stored.get("block_rows", block_rows))
            dtype = dtype or stored.get("feature_dtype")
        dtype = dtype or ("float16" if splits["train"][0].dtype == np.float16 else "float32")
        elements = None
        element_features = None
        if f"{st.ELEMENTS}/features" in f:
            g = f[st.ELEMENTS]
            element_features = g["features"][:]
            e = element_features.shape[0]
            elements = st.ElementProvenance(
                source_id=_read_str(g["source_id"]) if "source_id" in g else np.full(e, "", dtype=str),
                source_index=g["source_index"][:] if "source_index" in g else np.full(e, -1, dtype=np.int64),
                label=g["label"][:] if "label" in g else np.full(e, -1, dtype=np.int64),
                box=g["box"][:] if "box" in g else np.full((e, 4), -1, dtype=np.int32),
                kind=_read_str(g["kind"]) if "kind" in g else np.full(e, "", dtype=str),
                segment=g["segment"][:] if "segment" in g else np.full(e, -1, dtype=np.int32),
            )
    group = st.create_store(
        store_path, split_sizes={s: v[0].shape[0] for s, v in splits.items()},
        feature_dim=dims["train"], attrs=attrs, elements=elements, block_rows=block_rows, dtype=dtype,
    )
    for split, (features, labels, ids, valid) in splits.items():
        _write_all(group, split, block_rows, features=features.astype(dtype), labels=labels, ids=ids, valid=valid)
    if element_features is not None:
        _write_all(group, st.ELEMENTS, block_rows, features=element_features.astype(dtype))
    st.finalize_store(group, store_path)
    log.info("imported %s -> %s", h5_path, store_path)


def _write_all(group, part: str, block_rows: int, **columns: np.ndarray) -> None:
    rows = next(iter(columns.values())).shape[0]
    for block in range(st.num_blocks(rows, block_rows)):
        span = st.block_slice(block, rows=rows, block_rows=block_rows)
        st.write_block(group, part, block, **{k: v[span] for k, v in columns.items()})
