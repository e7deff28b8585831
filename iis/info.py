"""``iis info PATH``: what a feature store, a folder of stores, or a results folder holds.

A store is summarised even when it is incomplete (that is when one wants to know): its
attributes, each part's rows, done blocks and invalid rows, and a CLIP store's ``text/`` group.
A results folder: its tables and their row counts, the models, libraries, pipelines and
datasets in them, the saved libraries and the report. Nothing is modified.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iis.store_format import (
    ELEMENTS,
    FORMAT,
    PARTS,
    SUMMARY_KEY,
    TEXT_FORMAT,
    TEXT_GROUP,
    StoreError,
    missing_arrays,
)


def _open(path: Path):
    import zarr  # deferred: `iis info` on a results folder needs no Zarr

    try:
        return zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception as err:  # zarr raises several types for unreadable metadata
        raise StoreError(f"{path}: not a readable Zarr v3 group ({err})") from None


def _part_rows(group, part: str) -> tuple[int, int, int, int | None]:
    """``(rows, blocks done, blocks, invalid rows among done blocks)``; invalid is None for elements."""
    g = group[part]
    rows = int(g["features"].shape[0])
    done = np.asarray(g["done"][:], dtype=bool)
    invalid = None
    if part != ELEMENTS and "valid" in g:
        block_rows = int(group.attrs.get("block_rows") or g["features"].chunks[0])
        written = np.repeat(done, block_rows)[:rows]
        invalid = int((~np.asarray(g["valid"][:], dtype=bool) & written).sum())
    return rows, int(done.sum()), int(done.size), invalid


def describe_store(path: Path) -> str:
    """A store's summary; a foreign or unreadable one raises :class:`StoreError` naming it."""
    path = Path(path)
    group = _open(path)
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not an iis feature store (format={attrs.get('format')!r}, expected {FORMAT!r})")
    classes = attrs.get("classes") or []
    sha = str(attrs.get("weights_sha256") or "")
    lines = [
        f"store {path}",
        f"  format      {FORMAT}, schema {attrs.get('schema_version')}",
        f"  model       {attrs.get('model')} (pipeline {attrs.get('pipeline') or '-'}, dataset {attrs.get('dataset')}, "
        f"{len(classes)} classes)",
        f"  backbone    {attrs.get('backbone')}, weights {attrs.get('weights')}" + (f", sha256 {sha[:12]}…" if sha else ""),
        f"  features    D={attrs.get('feature_dim')} {attrs.get('feature_dtype')}, {attrs.get('block_rows')} rows per "
        f"block; layer {attrs.get('layer')}",
    ]
    versions = attrs.get("versions") or {}
    if versions:
        lines.append("  made with   " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(f"  {'part':<9} {'rows':>8} {'blocks done':>12} {'invalid':>8}")
    incomplete, damaged = [], []
    for part in PARTS:
        if part not in group:
            lines.append(f"  {part:<9} missing")
            incomplete.append(part)
            continue
        lacking = missing_arrays(group, part)
        if lacking:
            lines.append(f"  {part:<9} damaged: no {', '.join(lacking)} array(s)")
            damaged.append(part)
            continue
        rows, done, blocks, invalid = _part_rows(group, part)
        lines.append(f"  {part:<9} {rows:>8} {f'{done}/{blocks}':>12} {'-' if invalid is None else invalid:>8}")
        if done < blocks:
            incomplete.append(part)
    summary = attrs.get(SUMMARY_KEY)
    if damaged:
        lines.append(f"  complete    no: damaged {', '.join(damaged)} (delete the store and extract it again)")
    elif incomplete:
        lines.append(f"  complete    no: blocks still to fill in {', '.join(incomplete)} (rerun `iis extract`)")
    else:
        lines.append("  complete    yes" + ("" if summary else " (every block done; the summary is not written yet)"))
    if TEXT_GROUP in group:
        text = dict(group[TEXT_GROUP].attrs)
        if text.get("format") == TEXT_FORMAT:
            lines.append(f"  text/       {text.get('num_concepts')} concept words from {text.get('concepts_path')}, "
                         f"CLIP {text.get('clip_model')}" + (" (random-for-tests weights)" if text.get("random_weights") else ""))
        else:
            lines.append("  text/       unfinished (no finished marker): rerun `iis extract`")
    return "\n".join(lines) + "\n"


def describe_results(path: Path) -> str:
    """A results folder's summary: tables, models, libraries, pipelines, saved libraries, report."""
    import pandas as pd  # deferred: a store needs no pandas

    path = Path(path)
    lines = [f"results {path}"]
    frames = {}
    for file in sorted(path.glob("*.parquet")):
        frames[file.stem] = pd.read_parquet(file)
    lines.append("  tables      " + ", ".join(f"{name} ({len(df)} row{'' if len(df) == 1 else 's'})" for name, df in frames.items()))

    def values(column: str, *tables: str) -> list[str]:
        found: set[str] = set()
        for name in tables or tuple(frames):
            df = frames.get(name)
            if df is not None and column in df:
                found |= {str(v) for v in df[column].dropna().unique() if str(v)}
        return sorted(found)

    models = values("model", "accuracy", "iis")
    libraries = [lib for lib in values("library", "accuracy", "iis") if lib != "standard"]
    lines.append(f"  models      {len(models)}: {', '.join(models) or '-'}")
    lines.append(f"  libraries   {', '.join(libraries) or '-'}")
    lines.append(f"  pipelines   {', '.join(values('pipeline')) or '-'}; datasets {', '.join(values('dataset')) or '-'}")
    versions = values("analysis_version", "accuracy", "iis")
    if versions:  # several: rows of different code (`iis run` refits those of its stores)
        lines.append(f"  analysis    {', '.join(versions)}")
    if "iis" in frames and "caveat" in frames["iis"]:
        caveats = values("caveat", "iis")
        if caveats:
            lines.append(f"  caveats     {'; '.join(caveats)}")
    saved = sorted((path / "libraries").rglob("*.npz")) if (path / "libraries").is_dir() else []
    lines.append(f"  saved       {len(saved)} concept libraries under libraries/")
    report = path / "report.html"
    if report.is_file():
        lines.append(f"  report      {report.name} ({report.stat().st_size // 1024} KiB)")
    elif (path.parent / "finetune_delta.parquet").is_file():
        # The fine-tuning arms' tables (results/<pipeline>/finetune): the pipeline's report covers them.
        lines.append(f"  report      the fine-tuning arms' tables; the pipeline's report is {path.parent / 'report.html'}")
    else:
        lines.append("  report      none yet (`iis report`)")
    return "\n".join(lines) + "\n"


def _describe_or_say_why(path: Path) -> str:
    """One store of a folder: its summary, or why it has none (the folder's other stores still show)."""
    try:
        return describe_store(path)
    except StoreError as err:
        return f"store {path}\n  unreadable  {err}\n"


def describe(path: Path) -> str:
    """The text of ``iis info PATH``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        StoreError: a Zarr group that is not an iis store.
        ValueError: neither a store, a folder of stores, nor a results folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / "zarr.json").is_file():
        return describe_store(path)
    if any(path.glob("*.parquet")):
        return describe_results(path)
    stores = sorted(p for p in path.glob("*.zarr") if (p / "zarr.json").is_file()) if path.is_dir() else []
    if stores:
        return "\n".join(_describe_or_say_why(p) for p in stores)
    raise ValueError(f"{path}: neither a feature store (zarr.json), a folder of stores (*.zarr) nor a results "
                     f"folder (*.parquet)")

