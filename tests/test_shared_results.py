"""Results folders that several runs share (issue 13): a lock, one commit for the four tables,
recovery after a kill between renames, and "already done" judged per grid from every table.

The synthetic stores are those of ``test_dask.py``: three models, four classes, float16 features.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from filelock import FileLock
from iis.analyze import pipeline, tables
from iis.analyze.metrics import correlation
from iis.analyze.pipeline import ClusterOptions, analyze_stores
from test_dask import ANALYSIS, CLI_ANALYSIS, SMALL, _assert_same_tables, _child_env, _snapshot, _write_stores

REPO = Path(__file__).resolve().parents[1]
IIS = Path(sys.executable).parent / "iis"
SYNC = ClusterOptions(synchronous=True, threads=1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    return _write_stores(tmp_path_factory.mktemp("stores"), SMALL, block_rows=64)


@pytest.fixture(scope="module")
def clean(stores, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The tables of one uninterrupted run."""
    results = tmp_path_factory.mktemp("clean")
    analyze_stores(stores, results=results, cluster=SYNC, **ANALYSIS)
    return _snapshot(results)


def test_grid_key_is_canonical():
    assert tables.grid_key([0.9, 0, 0.5]) == "0,0.5,0.9"
    assert tables.grid_key([0.1, 0.3]) == "0.1,0.3"  # shortest form that reads back as the same float
    assert tables.grid_key([0.0, 0.99]) != tables.grid_key([0.0, 0.9])


def test_upsert_replaces_a_row_whose_integer_key_reads_back_as_float(tmp_path):
    """An integer key column that holds a null (the standard row's ``num_concepts``) reads back from
    Parquet as float64: the row upserted again with an int64 key must replace it, not sit beside it."""
    base = {"pipeline": "p", "dataset": "d", "model": "m", "backbone": "b", "weights": "w", "seed": 0,
            "protocol": "default", "grid": "0,0.5"}
    standard = {**base, "library": "standard", "test_top1": 0.9}
    concept = {**base, "library": "prototype", "num_concepts": 8, "sparsity": 0.5}
    tables.upsert(tmp_path, "accuracy", pd.DataFrame([standard, {**concept, "test_top1": 0.5}]))
    assert tables.read_table(tmp_path, "accuracy")["num_concepts"].dtype == np.float64  # the null made it float
    acc = tables.upsert(tmp_path, "accuracy", pd.DataFrame([{**concept, "test_top1": 0.6}]))
    assert len(acc) == 2
    assert acc.set_index("library").loc["prototype", "test_top1"] == 0.6
    assert len(tables.read_table(tmp_path, "accuracy")) == 2


def test_commit_writes_a_manifest_naming_the_run(stores, clean, tmp_path):
    results = tmp_path / "R"
    analyze_stores(stores, results=results, cluster=SYNC, pipeline="p", **ANALYSIS)
    manifest = tables.read_manifest(results)
    assert manifest["state"] == "committed" and manifest["pending"] == {}
    assert manifest["tables"] == ["accuracy", "concepts", "correlation", "iis", "ranking"]
    assert manifest["pipeline"] == "p" and manifest["models"] == ["m0", "m1", "m2"]
    assert manifest["grid"] == "0,0.5,0.9" and manifest["rows"]["iis"] == 6 and manifest["time"]
    assert not list(results.glob(".*.tmp"))  # no temporaries left


# ------------------------------------------------------------------------------------------
# A kill between two renames


_KILL_AFTER_FIRST_RENAME = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from iis.analyze import pipeline, tables
    from iis.analyze.pipeline import ClusterOptions, analyze_stores

    real = tables._rename
    def rename_then_die(tmp, final):
        real(tmp, final)
        os.kill(os.getpid(), signal.SIGKILL)  # after the first table is in place, before the others
    tables._rename = rename_then_die
    stores = [Path(p) for p in sys.argv[2:]]
    analyze_stores(stores, results=Path(sys.argv[1]), cluster=ClusterOptions(synchronous=True),
                   libraries=["prototype", "cluster"], num_concepts=8, ratios=[0.0, 0.5, 0.9], seeds=[0],
                   bootstrap=50)
""")


@pytest.mark.slow
def test_kill_between_table_renames_then_rerun_equals_clean_run(stores, clean, tmp_path, monkeypatch):
    results = tmp_path / "R"
    script = tmp_path / "kill.py"
    script.write_text(_KILL_AFTER_FIRST_RENAME)
    proc = subprocess.run([sys.executable, script, results, *stores], env=_child_env(), capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    # Killed mid-commit: one table renamed, the manifest lists the rest as pending.
    manifest = json.loads((results / tables.MANIFEST_FILE).read_text())
    assert manifest["state"] == "committing" and len(manifest["pending"]) == 5  # the five analysis tables
    assert (results / "accuracy.parquet").exists() and not (results / "correlation.parquet").exists()
    # The rerun takes the lock, finishes the commit, and then finds nothing left to compute.
    monkeypatch.setattr(pipeline, "run_tasks", lambda *a, **k: pytest.fail("tasks ran"))
    analyze_stores(stores, results=results, cluster=SYNC, skip_complete=True, **ANALYSIS)
    _assert_same_tables(_snapshot(results), clean)
    assert tables.read_manifest(results)["state"] == "committed"
    assert not list(results.glob(".*.tmp"))


def test_orphaned_temporaries_are_removed_and_missing_tables_recomputed(stores, clean, tmp_path):
    """A run killed before its manifest listed its temporaries: they are garbage, and a table
    missing from the folder (correlation here) makes the rerun recompute it."""
    results = tmp_path / "R"
    analyze_stores(stores, results=results, cluster=SYNC, **ANALYSIS)
    (results / "correlation.parquet").unlink()
    orphan = results / ".iis.parquet.abc123.tmp"
    orphan.write_bytes(b"half a parquet file")
    analyze_stores(stores, results=results, cluster=SYNC, skip_complete=True, **ANALYSIS)
    assert not orphan.exists()
    _assert_same_tables(_snapshot(results), clean)


# ------------------------------------------------------------------------------------------
# Two writers on one folder


_UPSERT_LOOP = textwrap.dedent("""
    import sys
    from pathlib import Path
    import pandas as pd
    from iis.analyze import pipeline, tables

    results, model, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for r in range(rounds):
        rows = pd.DataFrame([{"pipeline": "p", "dataset": "d", "model": model, "backbone": "b", "weights": "w",
                              "library": "standard", "seed": r, "protocol": "default", "grid": "0,0.5",
                              "test_top1": 0.5}])
        tables.upsert(results, "accuracy", rows)
""")


def _big_accuracy(results: Path, rows: int) -> None:
    """An ``accuracy.parquet`` large enough that rewriting it takes a while (about a second)."""
    df = pd.DataFrame({"pipeline": "p", "dataset": "d", "model": [f"old{i}" for i in range(rows)], "backbone": "b",
                       "weights": "w", "library": "standard", "seed": 0, "protocol": "default", "grid": "0,0.5",
                       "test_top1": np.linspace(0, 1, rows), "caveat": "x" * 40})
    results.mkdir(parents=True, exist_ok=True)
    with tables.results_lock(results):
        tables.commit(results, {"accuracy": tables.merge(results, "accuracy", df)})


@pytest.mark.slow
def test_two_writer_processes_lose_no_rows(tmp_path):
    """Two processes upsert into one large table at once; every row of each survives."""
    results = tmp_path / "R"
    big = 200_000
    _big_accuracy(results, big)
    rounds = 4
    procs = [subprocess.Popen([sys.executable, "-c", _UPSERT_LOOP, results, model, str(rounds)], env=_child_env(),
                              stderr=subprocess.PIPE) for model in ("a", "b")]
    errors = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    acc = tables.read_table(results, "accuracy")
    assert len(acc) == big + 2 * rounds
    for model in ("a", "b"):
        assert sorted(acc.loc[acc.model == model, "seed"]) == list(range(rounds))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.slow
def test_two_cli_analyses_on_one_folder_wait_then_merge(stores, clean, tmp_path):
    """Two `iis analyze` on one results folder, both started while a third party holds its lock:
    both say they wait, both exit 0, and the tables hold every model of both, as a single run would."""
    results = tmp_path / "R"
    results.mkdir()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    lock = FileLock(str(results / tables.LOCK_FILE))
    lock.acquire()
    procs = []
    try:
        # One model each, then the third model by both: overlapping keys merge rather than duplicate.
        for log, mine in zip(logs, ([stores[0], stores[2]], [stores[1], stores[2]])):
            cmd = [IIS, "analyze", *(a for s in mine for a in ("--store", s)), "--results", results,
                   *CLI_ANALYSIS, "--synchronous"]
            with open(log, "wb") as out:
                procs.append(subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                              env=_child_env(), cwd=tmp_path))
        _wait_for(lambda: all("waiting for its lock" in p.read_text() for p in logs), 300,
                  "both runs should report that they wait for the lock")
    finally:
        lock.release()
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], "\n".join(p.read_text()[-3000:] for p in logs)
    got = _snapshot(results)
    for name in ("accuracy", "iis", "concepts"):
        pd.testing.assert_frame_equal(got[name], clean[name], check_exact=True, obj=name)
    # Correlation was last computed by whichever run committed second, over all three models.
    assert got["correlation"]["n_models"].tolist() == [3, 3]


# ------------------------------------------------------------------------------------------
# The ratio grid and the bootstrap settings in the keys


def test_grid_change_adds_rows_and_never_mixes_grids(stores, tmp_path, monkeypatch):
    results = tmp_path / "R"
    first = {**ANALYSIS, "ratios": [0.0, 0.5, 0.9]}
    second = {**ANALYSIS, "ratios": [0.0, 0.3, 0.6, 0.9]}
    analyze_stores(stores, results=results, cluster=SYNC, skip_complete=True, **first)
    analyze_stores(stores, results=results, cluster=SYNC, skip_complete=True, **second)
    iis = tables.read_table(results, "iis")
    assert sorted(iis.grid.unique()) == ["0,0.3,0.6,0.9", "0,0.5,0.9"]
    assert iis.groupby("grid").size().tolist() == [6, 6]
    for row in iis.itertuples():
        assert row.grid == tables.grid_key(row.ratios)
    acc = tables.read_table(results, "accuracy")
    lib = acc[acc.library != "standard"]
    assert sorted(lib[lib.grid == "0,0.5,0.9"].sparsity.unique()) == [0.0, 0.5, 0.9]
    assert sorted(lib[lib.grid == "0,0.3,0.6,0.9"].sparsity.unique()) == [0.0, 0.3, 0.6, 0.9]
    # One correlation row per (library, grid), each computed from that grid's IIS alone.
    corr = tables.read_table(results, "correlation")
    assert len(corr) == 4 and set(corr.grid) == set(iis.grid)
    for row in corr.itertuples():
        mine = iis[(iis.grid == row.grid) & (iis.library == row.library)].groupby("model")[["standard_top1", "iis"]].mean()
        want = correlation(mine.standard_top1.to_numpy(), mine.iis.to_numpy())
        assert row.n_models == 3 and row.pearson_r == pytest.approx(want["pearson_r"], abs=1e-12)
    # Nothing changed: nothing runs and nothing is written.
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir() if p.is_file()}
    monkeypatch.setattr(pipeline, "run_tasks", lambda *a, **k: pytest.fail("tasks ran"))
    analyze_stores(stores, results=results, cluster=SYNC, skip_complete=True, **second)
    analyze_stores(stores, results=results, cluster=SYNC, skip_complete=True, **first)
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir() if p.is_file()} == before


def test_bootstrap_change_redoes_the_rows(stores, tmp_path, monkeypatch):
    results = tmp_path / "R"
    analyze_stores(stores[:1], results=results, cluster=SYNC, skip_complete=True, **ANALYSIS)
    ran = []
    real = pipeline.run_tasks
    monkeypatch.setattr(pipeline, "run_tasks", lambda specs, opts: ran.append(len(specs)) or real(specs, opts))
    analyze_stores(stores[:1], results=results, cluster=SYNC, skip_complete=True, **{**ANALYSIS, "bootstrap": 0})
    assert ran == [3]  # standard + two libraries, redone
    table = tables.read_table(results, "iis")
    assert len(table) == 2 and (table.bootstrap == 0).all() and table.iis_ci_low.isna().all()


def test_lost_correlation_row_is_recomputed_without_refitting(stores, clean, tmp_path, monkeypatch):
    results = tmp_path / "R"
    analyze_stores(stores, results=results, cluster=SYNC, **ANALYSIS)
    corr = tables.read_table(results, "correlation")
    with tables.results_lock(results):
        tables.commit(results, {"correlation": corr.iloc[:1]})  # as if a run had lost a row
    monkeypatch.setattr(pipeline, "run_tasks", lambda *a, **k: pytest.fail("tasks ran"))
    analyze_stores(stores, results=results, cluster=SYNC, skip_complete=True, **ANALYSIS)
    _assert_same_tables(_snapshot(results), clean)


def test_results_lock_is_exclusive_between_threads_and_reentrant(tmp_path, caplog):
    import threading

    results = tmp_path / "R"
    order = []
    with tables.results_lock(results):
        with tables.results_lock(results):  # re-entrant in one thread
            pass

        def other():
            with tables.results_lock(results):
                order.append("other")

        thread = threading.Thread(target=other)
        with caplog.at_level("INFO", logger="iis.analyze.tables"):
            thread.start()
            _wait_for(lambda: "waiting for its lock" in caplog.text, 10, "the second writer should say it waits")
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "other"]
    assert os.path.exists(results / tables.LOCK_FILE)
