"""Rows carry the analysis version that computed them (iis.analyze.versioning): a rerun refits
rows of another version instead of keeping them beside new ones, and a correlation over rows of
several versions says so.

The synthetic stores are those of ``test_dask.py``: three models, four classes, float16 features.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
from iis.analyze import pipeline, tables
from iis.analyze.pipeline import ClusterOptions, analyze_stores
from iis.analyze.summary import correlation_rows
from iis.analyze.versioning import NUMERIC_SOURCES, analysis_version, source_digest
from test_dask import ANALYSIS, SMALL, _assert_same_tables, _snapshot, _write_stores

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


def test_the_package_version_covers_every_numeric_module():
    root = Path(pipeline.__file__).parent
    assert source_digest(root, NUMERIC_SOURCES)  # every pattern still matches a module
    version = analysis_version()
    assert version.startswith("0.") and version.split("+")[1] == source_digest(root)[:12]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    return _write_stores(tmp_path_factory.mktemp("stores"), SMALL, block_rows=64)


def _rewrite(results: Path, model: str, version: str | None) -> None:
    """Mark ``model``'s accuracy and iis rows as computed by ``version`` (None: before the column)."""
    for name in ("accuracy", "iis"):
        df = tables.read_table(results, name)
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
    # Only m1's tasks ran again (its standard head and both libraries), and the tables are those
    # of a clean run: m1's old rows were replaced, not kept beside new ones.
    assert sorted({Path(s.store).stem for s in ran}) == ["m1"] and len(ran) == 3
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
    assert "iis.parquet holds rows from 2 analysis versions" in caplog.text
    for name in ("correlation", "ranking"):
        caveats = tables.read_table(results, name)["caveat"]
        assert len(caveats) and caveats.str.contains(f"2 analysis versions ({OLD}, ", regex=False).all(), name
