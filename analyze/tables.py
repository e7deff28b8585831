"""The Parquet tables: schemas, atomic writes, and keyed upserts.

Column names are a contract documented in the README. A rerun replaces the rows with the
same key instead of adding duplicates; every write goes to a temporary file in the same
folder, then replaces the table in one rename.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from iis.store_format import atomic_file

MODEL_KEYS = ["pipeline", "dataset", "model", "backbone", "weights"]

SCHEMAS: dict[str, pa.Schema] = {
    "accuracy": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()),
        ("backbone", pa.string()), ("weights", pa.string()), ("library", pa.string()),
        ("num_concepts", pa.int64()), ("sparsity", pa.float64()), ("seed", pa.int64()),
        ("val_top1", pa.float64()), ("test_top1", pa.float64()), ("test_top5", pa.float64()),
        ("test_top1_ci_low", pa.float64()), ("test_top1_ci_high", pa.float64()),
        ("active_concepts", pa.int64()), ("n_train", pa.int64()), ("n_val", pa.int64()),
        ("n_test", pa.int64()), ("fit_seconds", pa.float64()), ("protocol", pa.string()),
        ("caveat", pa.string()),
    ]),
    "iis": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()),
        ("backbone", pa.string()), ("weights", pa.string()), ("library", pa.string()),
        ("num_concepts", pa.int64()), ("seed", pa.int64()), ("standard_top1", pa.float64()),
        ("iis", pa.float64()), ("iis_normalized", pa.float64()), ("iis_ci_low", pa.float64()),
        ("iis_ci_high", pa.float64()), ("ratios", pa.list_(pa.float64())), ("arr", pa.list_(pa.float64())),
        ("protocol", pa.string()), ("caveat", pa.string()),
    ]),
    "correlation": pa.schema([
        ("dataset", pa.string()), ("library", pa.string()), ("num_concepts", pa.int64()),
        ("protocol", pa.string()), ("n_models", pa.int64()), ("models", pa.list_(pa.string())),
        ("pearson_r", pa.float64()), ("pearson_p", pa.float64()), ("spearman_rho", pa.float64()),
        ("spearman_p", pa.float64()), ("kendall_tau", pa.float64()), ("kendall_p", pa.float64()),
        ("caveat", pa.string()),
    ]),
    "concepts": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()),
        ("library", pa.string()), ("num_concepts", pa.int64()), ("sparsity", pa.float64()),
        ("seed", pa.int64()), ("concept", pa.int64()), ("word", pa.string()),
        ("element_index", pa.list_(pa.int64())), ("source_id", pa.list_(pa.string())),
        ("box", pa.list_(pa.list_(pa.int64()))), ("kept", pa.bool_()), ("drop_reason", pa.string()),
        ("drop_value", pa.float64()), ("library_file", pa.string()), ("caveat", pa.string()),
    ]),
    "explanations": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()),
        ("library", pa.string()), ("num_concepts", pa.int64()), ("sparsity", pa.float64()),
        ("seed", pa.int64()), ("split", pa.string()), ("image_id", pa.string()), ("image_index", pa.int64()),
        ("true", pa.int64()), ("pred", pa.int64()), ("true_name", pa.string()), ("pred_name", pa.string()),
        ("correct", pa.bool_()), ("logit", pa.float64()), ("bias", pa.float64()),
        ("concept", pa.list_(pa.int64())), ("contribution", pa.list_(pa.float64())),
        ("activation", pa.list_(pa.float64())), ("word", pa.list_(pa.string())),
        ("source_id", pa.list_(pa.list_(pa.string()))), ("box", pa.list_(pa.list_(pa.list_(pa.int64())))),
    ]),
    "finetune": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()), ("lambda", pa.float64()),
        ("seed", pa.int64()), ("epochs", pa.int64()), ("ratio", pa.float64()), ("library", pa.string()),
        ("num_concepts", pa.int64()), ("standard_top1_before", pa.float64()), ("standard_top1_after", pa.float64()),
        ("iis_before", pa.float64()), ("iis_after", pa.float64()), ("finetuned_model", pa.string()),
        ("seconds", pa.float64()),
    ]),
}

KEYS: dict[str, list[str]] = {
    "accuracy": [*MODEL_KEYS, "library", "num_concepts", "sparsity", "seed", "protocol"],
    "iis": [*MODEL_KEYS, "library", "num_concepts", "seed", "protocol"],
    "correlation": ["dataset", "library", "num_concepts", "protocol"],
    "concepts": ["pipeline", "dataset", "model", "library", "num_concepts", "sparsity", "seed", "concept"],
    "explanations": ["pipeline", "model", "library", "num_concepts", "sparsity", "seed", "split", "image_id"],
    "finetune": ["pipeline", "model", "lambda", "seed", "epochs"],
}


def table_path(results: Path, name: str) -> Path:
    """``<results>/<name>.parquet``."""
    return Path(results) / f"{name}.parquet"


def write_atomic(df: pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> None:
    """Write a Parquet file atomically (see :func:`atomic_file`); absent schema columns are null."""
    if schema is not None:
        df = df.reindex(columns=schema.names)
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def read_table(results: Path, name: str) -> pd.DataFrame:
    """A table as a DataFrame; an absent table is an empty frame with the right columns."""
    path = table_path(results, name)
    if not path.exists():
        return SCHEMAS[name].empty_table().to_pandas()
    return pq.read_table(path).to_pandas()


def _conform(df: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """``df`` as it reads back from Parquet: schema columns, schema dtypes, nulls as NaN/None."""
    return pa.Table.from_pandas(df.reindex(columns=schema.names), schema=schema,
                                preserve_index=False).to_pandas()


def _key_frame(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    # Both sides went through _conform, so a null key reads the same on each.
    if df.empty:
        return pd.Series([], dtype=object)
    return df[keys].astype(object).map(repr).agg("\x1f".join, axis=1)


def upsert(results: Path, name: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Replace the rows of table ``name`` that share a key with ``rows``; add the others.

    Returns:
        The whole table as written, sorted by its key.
    """
    schema, keys = SCHEMAS[name], KEYS[name]
    rows = _conform(rows, schema)
    existing = read_table(results, name)
    if len(existing):
        existing = _conform(existing, schema)
        existing = existing[~_key_frame(existing, keys).isin(set(_key_frame(rows, keys)))]
        merged = pd.concat([existing, rows], ignore_index=True) if len(rows) else existing
    else:
        merged = rows
    merged = merged.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)
    write_atomic(merged, table_path(results, name), schema)
    return merged
