"""Convert a feature store to and from one HDF5 file (h5py).

HDF5 layout::

    /<split>/features (N, D)   /<split>/labels (N,)   /<split>/ids (N,) str, optional on import
    /<split>/valid (N,) bool, optional on import (default: all valid)
    /<split>/reason (N,) int8, optional (why a row is invalid; written by export)
    /elements/features (E, D), optional; its provenance columns and reason are optional too
    /text/features (T, D) float32, /text/words (T,) str, /text attrs: iis_attrs (JSON), optional:
        a CLIP store's concept words and their text features; only as written by export
    file attrs: model, dataset, classes (optional), iis_attrs (JSON; written by export)

``export_h5`` followed by ``import_h5`` reproduces the store's arrays and attributes exactly, its
``text/`` group included (an unfinished one, which readers refuse, is left out with a warning).
Import is how features computed elsewhere enter the pipeline, so it checks what it takes in:
labels must be whole class indices within ``classes``, the model name must be a safe name (it
becomes a file name), and rows with NaN/inf features (or values that overflow the store dtype)
are stored ``valid=false`` and counted in the summary. The store is built beside its path and
renamed into place, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
from iis.extract import store as st
from iis.extract.backbones import file_sha256

from iis.store_format import (
    BLOCK_ROWS,
    FEATURE_DTYPES,
    TEXT_FORMAT,
    TEXT_GROUP,
    atomic_file,
    check_labels,
    check_name,
)

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
            if "reason" in src:
                dst.create_dataset("reason", data=src["reason"][:])
        if attrs.get("num_elements"):
            src, dst = group[st.ELEMENTS], f.create_group(st.ELEMENTS)
            dst.create_dataset("features", data=src["features"][:])
            if "reason" in src:
                dst.create_dataset("reason", data=src["reason"][:])
            for name in _PROVENANCE:
                values = src[name][:]
                if values.dtype.kind in "UTO":
                    dst.create_dataset(name, data=values.astype(object), dtype=h5py.string_dtype())
                else:
                    dst.create_dataset(name, data=values)
        if TEXT_GROUP in group:
            _export_text(group, store_path, f)
    log.info("exported %s -> %s", store_path, h5_path)


def _export_text(group, store_path: Path, f: h5py.File) -> None:
    """Copy a finished ``text/`` group: words ``(T,)``, features ``(T, D)`` and its attributes as JSON."""
    text = group[TEXT_GROUP]
    attrs = json.loads(json.dumps(dict(text.attrs)))
    if attrs.get("format") != TEXT_FORMAT:
        # Its format marker is written last, so this is an interrupted write that readers refuse anyway.
        log.warning("%s: unfinished %s/ group (its writing was interrupted) left out of the export",
                    store_path, TEXT_GROUP)
        return
    dst = f.create_group(TEXT_GROUP)
    dst.create_dataset("features", data=text["features"][:])
    words = np.asarray(text["words"][:]).astype(object)
    dst.create_dataset("words", data=words, dtype=h5py.string_dtype())
    dst.attrs["iis_attrs"] = json.dumps(attrs)


def _read_str(ds: h5py.Dataset) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in ds[:]], dtype=str)


def _attr_str(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value.item())
    return str(value)


def _require(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    if key not in f:
        raise ValueError(f"{path}: missing dataset /{key}")
    if not isinstance(f[key], h5py.Dataset):
        raise ValueError(f"{path}: /{key} is a group, expected a dataset")
    return f[key]


def _column(f: h5py.File, key: str, path: Path, rows: int, *, width: int | None = None) -> np.ndarray:
    values = _require(f, key, path)
    shape = (rows,) if width is None else (rows, width)
    if values.shape != shape:
        raise ValueError(f"{path}: /{key} has shape {values.shape}, expected {shape}")
    return _read_str(values) if values.dtype.kind in "SOU" else values[:]


def _imported_attrs(f: h5py.File, h5_path: Path, classes: list[str]) -> dict:
    if "iis_attrs" in f.attrs:  # a file written by export_h5: restore its attributes exactly
        try:
            attrs = json.loads(_attr_str(f.attrs["iis_attrs"]))
        except ValueError as err:
            raise ValueError(f"{h5_path}: file attribute iis_attrs is not valid JSON ({err})") from None
        if not isinstance(attrs, dict):
            raise ValueError(f"{h5_path}: file attribute iis_attrs is not a JSON object")
        for key in ("format", "schema_version", "block_rows", "feature_dtype", "feature_dim",
                    "split_sizes", "num_elements"):
            attrs.pop(key, None)
        check_name(attrs.get("model"), what=f"{h5_path}: iis_attrs model")
        return attrs
    for key in ("model", "dataset"):
        if key not in f.attrs:
            raise ValueError(f"{h5_path}: missing file attribute {key!r}")
    model = check_name(_attr_str(f.attrs["model"]), what=f"{h5_path}: file attribute model")
    digest = file_sha256(Path(h5_path))
    return {
        "model": model,
        "pipeline": None,
        "backbone": model,
        "weights": f"imported:{Path(h5_path).name}",
        "weights_sha256": digest,
        "layer": "unknown (imported)",
        "pooling": "unknown (imported)",
        "data_config": None,
        "dataset": _attr_str(f.attrs["dataset"]),
        "classes": classes,
        "elements": None,
    }


def _read_split(f: h5py.File, split: str, h5_path: Path) -> dict[str, np.ndarray]:
    features = _require(f, f"{split}/features", h5_path)
    if features.ndim != 2:
        raise ValueError(f"{h5_path}: /{split}/features must be (N, D), got shape {features.shape}")
    if features.dtype.kind not in "fiu":
        raise ValueError(f"{h5_path}: /{split}/features has dtype {features.dtype}, expected floats")
    n = features.shape[0]
    out = {"features": features[:], "labels": _column(f, f"{split}/labels", h5_path, n)}
    out["ids"] = (_column(f, f"{split}/ids", h5_path, n).astype(str) if f"{split}/ids" in f
                  else np.array([f"{split}/{i}" for i in range(n)], dtype=str))
    out["valid"] = (_column(f, f"{split}/valid", h5_path, n).astype(bool) if f"{split}/valid" in f
                    else np.ones(n, dtype=bool))
    if f"{split}/reason" in f:
        out["reason"] = _column(f, f"{split}/reason", h5_path, n).astype(np.int8)
    return out


def _read_elements(f: h5py.File, h5_path: Path, dim: int):
    key = f"{st.ELEMENTS}/features"
    features = _require(f, key, h5_path)
    if features.ndim != 2 or features.shape[1] != dim:
        raise ValueError(f"{h5_path}: /{key} has shape {features.shape}, expected (E, {dim})")
    e = features.shape[0]
    g = f[st.ELEMENTS]

    def column(name: str, fill, width=None):
        if name in g:
            return _column(f, f"{st.ELEMENTS}/{name}", h5_path, e, width=width)
        return np.full((e,) if width is None else (e, width), fill)

    provenance = st.ElementProvenance(
        source_id=column("source_id", "").astype(str), source_index=column("source_index", -1),
        label=column("label", -1), box=column("box", -1, width=4),
        kind=column("kind", "").astype(str), segment=column("segment", -1),
    )
    columns = {"features": features[:]}
    if "reason" in g:
        columns["reason"] = column("reason", 0).astype(np.int8)
    return provenance, columns


def _read_text(f: h5py.File, h5_path: Path, dim: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Words ``(T,)`` str, features ``(T, dim)`` float32 and attributes of the file's ``/text`` group."""
    g = f[TEXT_GROUP]
    if not isinstance(g, h5py.Group):
        raise ValueError(f"{h5_path}: /{TEXT_GROUP} is a dataset, expected a group")
    if "iis_attrs" not in g.attrs:
        raise ValueError(f"{h5_path}: /{TEXT_GROUP} lacks its attribute iis_attrs; only a text group written by "
                         "`iis export-h5` can be imported")
    try:
        attrs = json.loads(_attr_str(g.attrs["iis_attrs"]))
    except ValueError as err:
        raise ValueError(f"{h5_path}: /{TEXT_GROUP} attribute iis_attrs is not valid JSON ({err})") from None
    if not isinstance(attrs, dict) or attrs.get("format") != TEXT_FORMAT:
        raise ValueError(f"{h5_path}: /{TEXT_GROUP} attribute iis_attrs is not that of a finished text group "
                         f"(format {TEXT_FORMAT!r})")
    features = _require(f, f"{TEXT_GROUP}/features", h5_path)
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] != dim:
        raise ValueError(f"{h5_path}: /{TEXT_GROUP}/features has shape {features.shape}, expected (T, {dim}), T >= 1")
    if features.dtype.kind != "f":
        raise ValueError(f"{h5_path}: /{TEXT_GROUP}/features has dtype {features.dtype}, expected floats")
    values = features[:].astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"{h5_path}: /{TEXT_GROUP}/features hold NaN or inf")
    words = _column(f, f"{TEXT_GROUP}/words", h5_path, values.shape[0]).astype(str)
    if attrs.get("num_concepts", len(words)) != len(words):
        raise ValueError(f"{h5_path}: /{TEXT_GROUP} holds {len(words)} concepts, its iis_attrs say "
                         f"num_concepts={attrs['num_concepts']}")
    return words, values, attrs


def import_h5(h5_path: Path, store_path: Path, *, block_rows: int = BLOCK_ROWS, dtype: str | None = None) -> None:
    """Create a complete store from an HDF5 file in the layout above.

    Args:
        h5_path: the HDF5 file.
        store_path: the store to create (must not exist).
        block_rows: rows per block of the new store (a file from export keeps its own).
        dtype: stored feature dtype; default: the file's (float16 stays float16, else float32).

    Raises:
        FileNotFoundError, FileExistsError, ValueError: with a message naming the file (or the
            store), the dataset and the offending value. Nothing is left at ``store_path``.
    """
    h5_path, store_path = Path(h5_path), Path(store_path)
    st.check_block_rows(block_rows)
    if dtype is not None and dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    if not h5_path.is_file():
        raise FileNotFoundError(f"{h5_path}: no such file")
    if store_path.exists() and not (store_path.is_dir() and not any(store_path.iterdir())):
        raise FileExistsError(f"{store_path}: already exists; delete it or pick another store path")
    try:
        f = h5py.File(h5_path, "r")
    except OSError as err:
        raise ValueError(f"{h5_path}: not a readable HDF5 file ({err})") from None
    with f:
        splits = {split: _read_split(f, split, h5_path) for split in st.SPLITS}
        dims = {s: v["features"].shape[1] for s, v in splits.items()}
        if len(set(dims.values())) != 1:
            raise ValueError(f"{h5_path}: splits disagree on feature dimension: {dims}")
        if "classes" in f.attrs:
            classes = [_attr_str(c) for c in np.atleast_1d(f.attrs["classes"])]
            num_classes = len(classes)
        else:
            classes, num_classes = None, None
        for split, data in splits.items():
            data["labels"] = check_labels(data["labels"], num_classes, where=f"{h5_path}: /{split}/labels")
        if classes is None:
            top = max((int(v["labels"].max(initial=-1)) for v in splits.values()), default=-1)
            classes = [str(c) for c in range(top + 1)]
        attrs = _imported_attrs(f, h5_path, classes)
        if isinstance(attrs.get("classes"), list) and len(attrs["classes"]) != len(classes):
            for split, data in splits.items():
                check_labels(data["labels"], len(attrs["classes"]), where=f"{h5_path}: /{split}/labels")
        if "iis_attrs" in f.attrs:
            stored = json.loads(_attr_str(f.attrs["iis_attrs"]))
            block_rows = st.check_block_rows(stored.get("block_rows", block_rows))
            dtype = dtype or stored.get("feature_dtype")
        dtype = dtype or ("float16" if splits["train"]["features"].dtype == np.float16 else "float32")
        elements, element_columns = None, None
        if f"{st.ELEMENTS}/features" in f:
            elements, element_columns = _read_elements(f, h5_path, dims["train"])
        text = _read_text(f, h5_path, dims["train"]) if TEXT_GROUP in f else None
    with st.building(store_path) as tmp:
        group = st.create_store(
            tmp, split_sizes={s: v["features"].shape[0] for s, v in splits.items()},
            feature_dim=dims["train"], attrs=attrs, elements=elements, block_rows=block_rows, dtype=dtype,
            atomic=False,
        )
        for split, columns in splits.items():
            _write_all(group, split, block_rows, **columns)
        if element_columns is not None:
            _write_all(group, st.ELEMENTS, block_rows, **element_columns)
        if text is not None:
            st.write_text_group(group, *text)
        st.finalize_store(group, store_path)
    log.info("imported %s -> %s", h5_path, store_path)


def _write_all(group, part: str, block_rows: int, **columns: np.ndarray) -> None:
    rows = next(iter(columns.values())).shape[0]
    for block in range(st.num_blocks(rows, block_rows)):
        span = st.block_slice(block, rows=rows, block_rows=block_rows)
        st.write_block(group, part, block, **{k: v[span] for k, v in columns.items()})
