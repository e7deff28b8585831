"""Rows carry the analysis version that computed them (iis.analyze.versioning): a rerun refits
rows of another version instead of keeping them beside new ones, and a correlation over rows of
several versions says so.

The synthetic stores are those of ``test_dask.py``: three models, four classes, float16 features.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from iis.analyze import pipeline, tables
from iis.analyze.pipeline import ClusterOptions, analyze_stores
from iis.analyze.summary import correlation_rows
from iis.analyze.tasks import TaskResult, TaskSpec
from iis.analyze.versioning import (
    NON_NUMERIC_MODULES,
    NUMERIC_SOURCES,
    analysis_version,
    library_versions,
    source_digest,
)
from test_dask import ANALYSIS, SMALL, _assert_same_tables, _snapshot, _write_stores

import iis

SYNC = ClusterOptions(synchronous=True, threads=1)
OLD = "0.0.1+000000000000"


def test_digest_follows_the_numeric_sources_only(tmp_path):
    (tmp_path / "libraries").mkdir()
    (tmp_path / "heads_default.py").write_text("STEPS = 1000\n")
    (tmp_path / "libraries" / "prototype.py").write_text("K = 1\n")
    (tmp_path / "report.py").write_text("TITLE = 'a'\n")
    patterns = ("heads*.py", "libraries/*.py")
    first = source_digest(tmp_path, patterns)
    assert len(first) == 64 and source_digest(tmp_path, patterns) == first
    (tmp_path / "report.py").write_text("TITLE = 'b'\n")  # not a numeric source
    assert source_digest(tmp_path, patterns) == first
    (tmp_path / "heads_default.py").write_text("STEPS = 300\n")
    changed = source_digest(tmp_path, patterns)
    assert changed != first
    (tmp_path / "heads_batching.py").write_text("")  # a new module that the glob covers
    assert source_digest(tmp_path, patterns) != changed
    with pytest.raises(FileNotFoundError, match="metrics.py"):
        source_digest(tmp_path, (*patterns, "metrics.py"))


def test_every_module_a_task_loads_is_classified():
    """A module of the package that an analysis task loads either decides numbers (its source is
    in the digest) or is named as deciding none: a new module must be put in one list or the other."""
    root = Path(pipeline.__file__).parent
    code = textwrap.dedent("""
        import sys
        import iis.analyze.tasks, iis.analyze.parts, iis.analyze.summary
        print(" ".join(sorted(m for m in sys.modules if m.startswith("iis.analyze"))))
    """)
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    numeric = {p.relative_to(root).with_suffix("").as_posix() for pattern in NUMERIC_SOURCES for p in root.glob(pattern)}
    for module in loaded:
        rel = module.removeprefix("iis.analyze").lstrip(".").replace(".", "/")
        rel = f"{rel}/__init__".lstrip("/") if (root / rel).is_dir() else rel  # a package: its __init__.py
        name = rel.rsplit("/", 1)[-1]
        assert rel in numeric or name in NON_NUMERIC_MODULES, f"{module}: in neither NUMERIC_SOURCES nor NON_NUMERIC_MODULES"
    assert "tasks" in numeric and "heads_default" in numeric and "libraries/prototype" in numeric


def test_the_version_covers_the_sources_and_the_numeric_libraries():
    root = Path(pipeline.__file__).parent
    version = analysis_version()
    digits = hashlib.sha256(f"{source_digest(root)} {library_versions()}".encode()).hexdigest()[:12]
    assert version == f"{iis.__version__}+{digits}"
    assert f"torch={torch.__version__}" in library_versions() and "sklearn=" in library_versions()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    return _write_stores(tmp_path_factory.mktemp("stores"), SMALL, block_rows=64)


def _rewrite(results: Path, model: str, version: str | None) -> None:
    """Mark ``model``'s accuracy and iis rows as computed by ``version``; None: tables written before
    the column (the column is dropped from both files)."""
    for name in ("accuracy", "iis"):
        df = tables.read_table(results, name)
        if version is None:
            path = results / f"{name}.parquet"
            pq.write_table(pa.Table.from_pandas(df.drop(columns="analysis_version"), preserve_index=False), path)
            assert "analysis_version" not in pq.read_schema(path).names
        else:
            df.loc[df["model"] == model, "analysis_version"] = version
            tables.commit(results, {name: df})


@pytest.mark.parametrize("version", [OLD, None], ids=["older-version", "before-the-column"])
def test_rows_of_another_version_are_refitted(stores, tmp_path, monkeypatch, caplog, version):
    results = tmp_path / "R"
    analyze_stores(stores, results=results, cluster=SYNC, **ANALYSIS)
    clean = _snapshot(results)
    assert set(clean["accuracy"]["analysis_version"]) == {analysis_version()}
    assert set(clean["iis"]["analysis_version"]) == {analysis_version()}
    _rewrite(results, "m1", version)

    ran = []
    real = pipeline.run_tasks
    monkeypatch.setattr(pipeline, "run_tasks", lambda specs, cluster: ran.extend(specs) or real(specs, cluster))
    with caplog.at_level(logging.INFO, logger="iis.analyze.pipeline"):
        analyze_stores(stores, results=results, cluster=SYNC, skip_complete=True, **ANALYSIS)
    # Only m1's tasks ran again (its standard head and both libraries; without the column, every
    # model's), and the tables are those of a clean run: old rows were replaced, not kept beside new ones.
    assert sorted({Path(s.store).stem for s in ran}) == (["m1"] if version else ["m0", "m1", "m2"])
    assert len(ran) == (3 if version else 9)
    assert "from analysis version" in caplog.text and (version or "unknown") in caplog.text
    _assert_same_tables(_snapshot(results), clean)


def test_a_correlation_over_several_versions_says_so():
    rows = [{"dataset": "d", "library": "prototype", "num_concepts": 8, "protocol": "default", "grid": "0,0.9",
             "library_source": None, "model": f"m{i}", "seed": 0, "standard_top1": 0.5 + 0.1 * i,
             "iis": 0.3 + 0.1 * i, "caveat": None, "layer": "final",
             "analysis_version": analysis_version() if i else OLD} for i in range(3)]
    mixed = correlation_rows(pd.DataFrame(rows), n_resamples=99, bootstrap=0)
    assert len(mixed) == 1 and "2 analysis versions" in mixed[0]["caveat"] and OLD in mixed[0]["caveat"]
    same = correlation_rows(pd.DataFrame([{**r, "analysis_version": OLD} for r in rows]), n_resamples=99,
                            bootstrap=0)
    assert same[0]["caveat"] is None


def test_models_left_from_another_version_are_flagged_in_correlation_and_ranking(stores, tmp_path, caplog):
    """A run that analyses some stores again leaves the others' rows of the older version in the
    folder: the tables derived over every model say so, and the run warns once."""
    results = tmp_path / "R"
    analyze_stores(stores, results=results, cluster=SYNC, **ANALYSIS)
    assert tables.read_table(results, "correlation")["caveat"].isna().all()
    _rewrite(results, "m1", OLD)
    with caplog.at_level(logging.WARNING, logger="iis.analyze.pipeline"):
        analyze_stores([stores[0], stores[2]], results=results, cluster=SYNC, **ANALYSIS)
    assert f"iis.parquet holds models of other analysis versions than this one ({analysis_version()}): " \
           f"{OLD}: m1;" in caplog.text
    for name in ("correlation", "ranking"):
        caveats = tables.read_table(results, name)["caveat"]
        assert len(caveats) and caveats.str.contains(f"2 analysis versions ({OLD}, ", regex=False).all(), name
        assert caveats.str.contains("analyse their models again", regex=False).all(), name


def test_workers_on_other_code_are_reported(caplog):
    spec = TaskSpec(store="/stores/m0.zarr", library="prototype", seed=0, num_concepts=8, ratios=(0.0, 0.5))

    def result(version):
        return TaskResult(spec, [{"analysis_version": version}], [], np.zeros((1, 1), bool), np.array(["a"]))

    with caplog.at_level(logging.WARNING, logger="iis.analyze.pipeline"):
        pipeline._check_versions([result(analysis_version())])
        assert not caplog.records
        pipeline._check_versions([result(analysis_version()), result(OLD)])
    assert f"some tasks ran analysis version {OLD}, this process is {analysis_version()}" in caplog.text
