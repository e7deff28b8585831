"""The Parquet tables: schemas, keyed upserts, and commits that are safe to share.

Column names are a contract documented in the README. A rerun replaces the rows with the
same key instead of adding duplicates.

A results folder may be written by several runs at once (two `iis analyze` on one pipeline, a
Slurm array): every read-merge-write happens under an exclusive lock on the folder
(:func:`results_lock`), so a second writer waits and then merges into what the first wrote.
The tables of one run are committed together (:func:`commit`): every table goes to a temporary
file first, then ``manifest.json`` records the pending renames, then the renames happen. A run
killed between two renames leaves the manifest saying so, and the next holder of the lock
finishes them, so the folder always converges to the tables of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from iis.store_format import atomic_file

log = logging.getLogger(__name__)

LOCK_FILE = ".iis-results.lock"
MANIFEST_FILE = "manifest.json"

MODEL_KEYS = ["pipeline", "dataset", "model", "backbone", "weights"]
# Where in the network a model's features come from (`layers:`): the store's `layer` (`final` for
# the pooled pre-logit features) and its `depth` in [0, 1]. Values, not keys: the model name of a
# layer's store already carries the layer (`r10@stages.1`).
LAYER_COLUMNS = [("layer", pa.string()), ("depth", pa.float64())]
# Fine-tuning settings that both fine-tuning tables carry as values: the optimizer steps per arm
# (null: whole epochs), the loss's library and the share of element source images held out for it.
_FINETUNE_SETTINGS = [("steps", pa.int64()), ("loss_library", pa.string()), ("holdout", pa.float64())]
# `library_source` (a key): the store whose visual elements built the library (`analysis.library_from`);
# null for the store's own elements.

SCHEMAS: dict[str, pa.Schema] = {
    "accuracy": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()),
        ("backbone", pa.string()), ("weights", pa.string()), ("library", pa.string()),
        ("num_concepts", pa.int64()), ("sparsity", pa.float64()), ("seed", pa.int64()),
        ("val_top1", pa.float64()), ("test_top1", pa.float64()), ("test_top5", pa.float64()),
        ("test_top1_ci_low", pa.float64()), ("test_top1_ci_high", pa.float64()),
        ("active_concepts", pa.int64()), ("n_train", pa.int64()), ("n_val", pa.int64()),
        ("n_test", pa.int64()), ("fit_seconds", pa.float64()), ("protocol", pa.string()),
        ("caveat", pa.string()), ("grid", pa.string()), ("bootstrap", pa.int64()),
        *LAYER_COLUMNS, ("library_source", pa.string()),
        # The head's L2 strength (scikit-learn's C) and learning rate (concept heads: C chosen on
        # val, the rate set by it; the standard head: the pair chosen on val); null for the
        # reference protocol, which fixes neither this way.
        ("inverse_l2", pa.float64()), ("learning_rate", pa.float64()),
        # The code that computed the row (iis.analyze.versioning): rows of another version are refitted.
        ("analysis_version", pa.string()),
    ]),
    "iis": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()),
        ("backbone", pa.string()), ("weights", pa.string()), ("library", pa.string()),
        ("num_concepts", pa.int64()), ("seed", pa.int64()), ("standard_top1", pa.float64()),
        ("iis", pa.float64()), ("iis_normalized", pa.float64()), ("iis_ci_low", pa.float64()),
        ("iis_ci_high", pa.float64()), ("ratios", pa.list_(pa.float64())), ("arr", pa.list_(pa.float64())),
        ("protocol", pa.string()), ("caveat", pa.string()), ("grid", pa.string()), ("bootstrap", pa.int64()),
        *LAYER_COLUMNS, ("library_source", pa.string()), ("analysis_version", pa.string()),
    ]),
    "correlation": pa.schema([
        ("dataset", pa.string()), ("library", pa.string()), ("num_concepts", pa.int64()),
        ("protocol", pa.string()), ("n_models", pa.int64()), ("models", pa.list_(pa.string())),
        ("pearson_r", pa.float64()), ("pearson_p", pa.float64()), ("spearman_rho", pa.float64()),
        ("spearman_p", pa.float64()), ("kendall_tau", pa.float64()), ("kendall_p", pa.float64()),
        ("caveat", pa.string()), ("grid", pa.string()), ("library_source", pa.string()),
        ("scope", pa.string()), ("group", pa.string()),
        ("pearson_ci_low", pa.float64()), ("pearson_ci_high", pa.float64()), ("spearman_ci_low", pa.float64()),
        ("spearman_ci_high", pa.float64()), ("kendall_ci_low", pa.float64()), ("kendall_ci_high", pa.float64()),
        ("bootstrap", pa.int64()),
    ]),
    "ranking": pa.schema([
        ("dataset", pa.string()), ("library", pa.string()), ("num_concepts", pa.int64()), ("protocol", pa.string()),
        ("grid", pa.string()), ("model", pa.string()), ("rank", pa.int64()), ("n_models", pa.int64()),
        ("n_seeds", pa.int64()), ("standard_top1", pa.float64()), ("iis", pa.float64()),
        ("iis_normalized", pa.float64()), ("iis_ci_low", pa.float64()), ("iis_ci_high", pa.float64()),
        ("next_model", pa.string()), ("p_above_next", pa.float64()), ("seed_kendall_tau", pa.float64()),
        ("seed_pairs", pa.int64()), ("iis_adjusted", pa.float64()), ("bootstrap", pa.int64()),
        ("caveat", pa.string()), ("library_source", pa.string()),
    ]),
    "concepts": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()),
        ("library", pa.string()), ("num_concepts", pa.int64()), ("sparsity", pa.float64()),
        ("seed", pa.int64()), ("concept", pa.int64()), ("word", pa.string()),
        ("element_index", pa.list_(pa.int64())), ("source_id", pa.list_(pa.string())),
        ("box", pa.list_(pa.list_(pa.int64()))), ("kept", pa.bool_()), ("drop_reason", pa.string()),
        ("drop_value", pa.float64()), ("library_file", pa.string()), ("caveat", pa.string()),
        *LAYER_COLUMNS, ("library_source", pa.string()),
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
        ("rest", pa.float64()), ("n_rest", pa.int64()),
    ]),
    "finetune": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()), ("lambda", pa.float64()),
        ("seed", pa.int64()), ("epochs", pa.int64()), ("ratio", pa.float64()), ("library", pa.string()),
        ("num_concepts", pa.int64()), ("standard_top1_before", pa.float64()), ("standard_top1_after", pa.float64()),
        ("iis_before", pa.float64()), ("iis_after", pa.float64()), ("finetuned_model", pa.string()),
        ("seconds", pa.float64()), *_FINETUNE_SETTINGS, ("grid", pa.string()),
        ("library_seeds", pa.list_(pa.int64())),
    ]),
    "finetune_delta": pa.schema([
        ("pipeline", pa.string()), ("dataset", pa.string()), ("model", pa.string()), ("lambda", pa.float64()),
        ("epochs", pa.int64()), ("ratio", pa.float64()), *_FINETUNE_SETTINGS, ("library", pa.string()),
        ("num_concepts", pa.int64()), ("grid", pa.string()), ("seeds", pa.list_(pa.int64())),
        ("library_seeds", pa.list_(pa.int64())), ("n_pairs", pa.int64()), ("n_test", pa.int64()),
        ("top1_lambda", pa.float64()), ("top1_zero", pa.float64()), ("top1_delta", pa.float64()),
        ("top1_delta_ci_low", pa.float64()), ("top1_delta_ci_high", pa.float64()),
        ("iis_lambda", pa.float64()), ("iis_zero", pa.float64()), ("iis_delta", pa.float64()),
        ("iis_delta_ci_low", pa.float64()), ("iis_delta_ci_high", pa.float64()),
        ("bootstrap", pa.int64()), ("confidence", pa.float64()),
    ]),
}

KEYS: dict[str, list[str]] = {
    "accuracy": [*MODEL_KEYS, "library", "num_concepts", "sparsity", "seed", "protocol", "grid", "library_source"],
    "iis": [*MODEL_KEYS, "library", "num_concepts", "seed", "protocol", "grid", "library_source"],
    "correlation": ["dataset", "library", "num_concepts", "protocol", "grid", "library_source", "scope", "group"],
    "ranking": ["dataset", "library", "num_concepts", "protocol", "grid", "library_source", "model"],
    "concepts": ["pipeline", "dataset", "model", "library", "num_concepts", "sparsity", "seed", "concept",
                 "library_source"],
    "explanations": ["pipeline", "model", "library", "num_concepts", "sparsity", "seed", "split", "image_id"],
    # `library` is the scoring library (`loss_library` the one the loss trained with).
    "finetune": ["pipeline", "model", "lambda", "seed", "epochs", "library"],
    "finetune_delta": ["pipeline", "model", "lambda", "epochs", "library"],
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


def grid_key(ratios: Sequence[float]) -> str:
    """The ``grid`` key of a sparsity grid: its sorted ratios, each in the shortest decimal form
    that reads back as the same float, joined by commas (``[0.9, 0, 0.5]`` -> ``"0,0.5,0.9"``)."""
    return ",".join(np.format_float_positional(float(r), trim="-") for r in sorted(float(r) for r in ratios))


def read_table(results: Path, name: str) -> pd.DataFrame:
    """A table as a DataFrame; an absent table is an empty frame with the right columns.

    A table written before a column existed reads with that column null; an old ``iis`` row's
    ``grid`` is derived from its ``ratios``.
    """
    path = table_path(results, name)
    if not path.exists():
        return SCHEMAS[name].empty_table().to_pandas()
    df = pq.read_table(path).to_pandas()
    missing = [c for c in SCHEMAS[name].names if c not in df.columns]
    if missing:
        df = df.reindex(columns=[*df.columns, *missing])
        if name == "iis" and "grid" in missing:
            df["grid"] = df["ratios"].map(grid_key)
        if name == "correlation" and "scope" in missing:  # written before groups: every row is over all models
            df["scope"] = "all"
        if "layer" in missing:  # tables from before `layers:` hold the pooled pre-logit features only
            df["layer"], df["depth"] = "final", 1.0
    return df


def _conform(df: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """``df`` as it reads back from Parquet: schema columns, schema dtypes, nulls as NaN/None."""
    if df.empty:  # no rows: its columns may be untyped (a frame of no records)
        return schema.empty_table().to_pandas()
    return pa.Table.from_pandas(df.reindex(columns=schema.names), schema=schema,
                                preserve_index=False).to_pandas()


def key_value(value: object) -> object:
    """A key cell as comparable across reads: null (None, NaN, NA) -> None, numbers -> float, else str.

    An integer key column that holds a null reads back from Parquet as float64 (``64.0``), one
    without as int64 (``64``): the same key must compare equal either way.
    """
    if value is None or value is pd.NA or (isinstance(value, float | np.floating) and np.isnan(value)):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    return str(value)


def _key_frame(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    # Both sides went through _conform, so their columns have the schema's types; the values are
    # normalised too (key_value), as a column's dtype still depends on whether it holds a null.
    if df.empty:
        return pd.Series([], dtype=object)
    # Column by column: a row-wise join took 30 s on a 200k-row table, this well under a second.
    joined = _key_column(df[keys[0]])
    for key in keys[1:]:
        joined = joined + "\x1f" + _key_column(df[key])
    return joined


def _key_column(column: pd.Series) -> pd.Series:
    """Each cell of a key column as the ``repr`` of its :func:`key_value`."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        values = column.astype("float64")  # vectorised: numbers -> float, nulls -> NaN
        return values.map(repr).where(values.notna(), repr(None))
    return column.astype(object).map(lambda v: repr(key_value(v)))


def merge(results: Path, name: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Table ``name`` with ``rows`` upserted: rows sharing a key with ``rows`` are replaced, the
    others added; sorted by the key. Reads, never writes: :func:`commit` writes.

    Call it under :func:`results_lock`, or another writer's rows may be lost between the read
    and the commit.
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
    return merged.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)


def replace(name: str, rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` as table ``name`` is written, sorted by its key: for a table derived whole from
    another (``correlation``, ``ranking`` from ``iis``), whose old rows must not linger."""
    return _conform(rows, SCHEMAS[name]).sort_values(KEYS[name], na_position="first", kind="stable"
                                                      ).reset_index(drop=True)


def upsert(results: Path, name: str, rows: pd.DataFrame, *, run: Mapping | None = None) -> pd.DataFrame:
    """Replace the rows of table ``name`` that share a key with ``rows``; add the others.

    Locked and committed like a whole run (see the module docstring); ``run`` goes into the manifest.

    Returns:
        The whole table as written, sorted by its key.
    """
    with results_lock(results):
        merged = merge(results, name, rows)
        commit(results, {name: merged}, run=run)
    return merged


# ------------------------------------------------------------------------------------------
# Sharing a results folder: the lock, the manifest, the commit


_held = threading.local()  # folders this thread holds the lock of: nested use is a no-op


def check_writable(results: Path) -> None:
    """Raise :class:`PermissionError` naming ``results`` when tables cannot be written there.

    Creates the folder if needed and writes (then removes) one empty file in it, so a read-only
    or missing-permission folder is found before minutes of fitting, not after.
    """
    results = Path(results)
    try:
        results.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".iis-write-check.", dir=results)
        os.close(fd)
        os.unlink(probe)
    except PermissionError:
        raise PermissionError(f"{results}: results folder is not writable; fix its permissions "
                              "or choose another folder (--results, or the pipeline's results:)") from None


@contextlib.contextmanager
def results_lock(results: Path) -> Iterator[None]:
    """Hold the exclusive lock of a results folder (``<results>/.iis-results.lock``).

    Another process (or thread) holding it makes this wait, with one log line saying so. On
    entry a commit that a killed run left half done is finished (:func:`recover`). Re-entrant
    within a thread.
    """
    results = Path(results)
    key = str(results.resolve())
    held = getattr(_held, "folders", None)
    if held is None:
        held = _held.folders = set()
    if key in held:
        yield
        return
    check_writable(results)
    lock = FileLock(str(results / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another run is writing these tables; waiting for its lock (%s)", results, LOCK_FILE)
        lock.acquire()
    held.add(key)
    try:
        recover(results)
        yield
    finally:
        held.discard(key)
        lock.release()


def read_manifest(results: Path) -> dict:
    """``<results>/manifest.json``: the last run that committed tables here; ``{}`` if none."""
    path = Path(results) / MANIFEST_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _write_manifest(results: Path, manifest: Mapping) -> None:
    with atomic_file(Path(results) / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _rename(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def recover(results: Path) -> list[str]:
    """Finish a commit that a killed run left half done; remove table temporaries it left behind.

    Call under the lock. Returns the tables whose rename was finished here.
    """
    results = Path(results)
    manifest = read_manifest(results)
    finished = []
    pending = manifest.get("pending") or {}
    for name, tmp_name in sorted(pending.items()):
        tmp = results / tmp_name
        if tmp.exists():  # written in full before the manifest listed it; only the rename was lost
            _rename(tmp, table_path(results, name))
            finished.append(name)
    if pending:
        log.warning("%s: finished the commit of an interrupted run (%s)", results,
                    ", ".join(finished) or "its renames had all happened")
        _write_manifest(results, {**manifest, "pending": {}, "state": "committed"})
    # A run killed before its manifest listed its temporaries leaves them orphaned: nobody else
    # writes tables while we hold the lock, so any left is garbage.
    for name in SCHEMAS:
        for orphan in results.glob(f".{name}.parquet.*.tmp"):
            orphan.unlink(missing_ok=True)
    return finished


def commit(results: Path, frames: Mapping[str, pd.DataFrame], *, run: Mapping | None = None) -> None:
    """Write several tables as one change: all temporaries, the manifest, then all renames.

    Call under :func:`results_lock`. ``frames`` maps table names to whole tables (as
    :func:`merge` returns them); ``run`` names the run in the manifest (pipeline, models, grid, …).
    """
    results = Path(results)
    temps: dict[str, Path] = {}
    try:
        for name, df in frames.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.parquet.", suffix=".tmp", dir=results)
            os.close(fd)
            temps[name] = Path(tmp)
            table = pa.Table.from_pandas(df.reindex(columns=SCHEMAS[name].names), schema=SCHEMAS[name],
                                         preserve_index=False)
            pq.write_table(table, tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a table should read like any file
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    manifest = {**(run or {}), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "tables": sorted(frames), "rows": {n: int(len(df)) for n, df in frames.items()}}
    # From here on the commit is decided: a kill leaves "pending" for the next lock holder to finish.
    _write_manifest(results, {**manifest, "state": "committing",
                              "pending": {n: t.name for n, t in temps.items()}})
    for name, tmp in temps.items():
        _rename(tmp, table_path(results, name))
    _write_manifest(results, {**manifest, "state": "committed", "pending": {}})
