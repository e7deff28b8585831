"""Stage 2 on real Dask clusters: the tables do not depend on where the tasks ran.

Three small synthetic stores (class means + noise, so heads and IIS are non-trivial and differ
between models) are analysed

1. synchronously, in this process: the reference;
2. on a ``LocalCluster`` through :func:`iis.analyze.pipeline.analyze_stores`;
3. by the ``iis analyze`` CLI against a ``dask scheduler`` with two ``dask worker`` processes;
4. the same, with one worker SIGKILLed while it executes a task;

and every table must equal the reference except the ``fit_seconds`` timing column. Reruns and
refused stores are checked synchronously.

Determinism across processes holds because every task pins torch/BLAS to ``threads`` threads
and seeds its own generators; workers get ``OMP_NUM_THREADS=1`` as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import iis.analyze.pipeline
import numpy as np
import pandas as pd
import pytest
import zarr
from iis.analyze import tables
from iis.analyze.pipeline import WORKER_PRELOAD, ClusterOptions, analyze_stores, shared_cluster
from iis.analyze.store import StoreError
from iis.analyze.tasks import TaskSpec, build_task, dense_task, merge_parts, run_part, run_task
from iis.extract import store as st

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASK = BIN / "dask"
IIS = BIN / "iis"

DIM, CLASSES, ELEMENTS = 32, 4, 40
NOISE = (1.0, 2.0, 3.0)  # one model each: increasingly overlapping classes, so IIS differs
SMALL = {"train": 320, "val": 160, "test": 160}
# The kill test needs tasks that last long enough (about a second each) to be caught executing.
BIG = {"train": 20000, "val": 4000, "test": 4000}
LIBRARIES = ["prototype", "cluster"]
ANALYSIS = dict(libraries=LIBRARIES, num_concepts=8, ratios=[0.0, 0.5, 0.9], seeds=[0], bootstrap=50)
CLI_ANALYSIS = ["--libraries", ",".join(LIBRARIES), "--num-concepts", "8", "--ratios", "0,0.5,0.9",
                "--seeds", "0", "--bootstrap", "50"]
COMPARED = ("accuracy", "iis", "concepts", "correlation")
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
SYNC = ClusterOptions(synchronous=True, threads=1)


# ------------------------------------------------------------------------------------------
# Synthetic stores
# ------------------------------------------------------------------------------------------


def _write_store(path: Path, *, model: str, noise: float, seed: int, sizes: dict[str, int],
                 block_rows: int) -> Path:
    """A complete store: features ``mean[y] + noise * N(0, 1)`` (float16), elements near the means."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(CLASSES, DIM))
    element_labels = np.repeat(np.arange(CLASSES), ELEMENTS // CLASSES)
    provenance = st.ElementProvenance(
        source_id=np.array([f"train/{i}" for i in range(ELEMENTS)]), source_index=np.arange(ELEMENTS),
        label=element_labels, box=np.tile([0, 0, 8, 8], (ELEMENTS, 1)),
        kind=np.array(["grid"] * ELEMENTS), segment=np.full(ELEMENTS, -1),
    )
    group = st.create_store(path, split_sizes=sizes, feature_dim=DIM, block_rows=block_rows, elements=provenance,
                            attrs={"model": model, "dataset": "synthetic", "backbone": "planted",
                                   "weights": "random", "classes": [f"c{i}" for i in range(CLASSES)]})
    for split, n in sizes.items():
        labels = rng.integers(0, CLASSES, n)
        columns = {"features": (means[labels] + noise * rng.normal(size=(n, DIM))).astype(np.float16),
                   "labels": labels, "ids": np.array([f"{split}/{i}" for i in range(n)]),
                   "valid": np.ones(n, dtype=bool)}
        if split == "train":  # one unreadable image: NaN features, excluded by the reader
            columns["valid"][3] = False
            columns["features"][3] = np.nan
        for b in range(st.num_blocks(n, block_rows)):
            span = st.block_slice(b, rows=n, block_rows=block_rows)
            st.write_block(group, split, b, **{k: v[span] for k, v in columns.items()})
    features = (means[element_labels] + 0.5 * noise * rng.normal(size=(ELEMENTS, DIM))).astype(np.float16)
    for b in range(st.num_blocks(ELEMENTS, block_rows)):
        st.write_block(group, st.ELEMENTS, b, features=features[st.block_slice(b, rows=ELEMENTS, block_rows=block_rows)])
    assert st.finalize_store(group, path)
    return path


def _write_stores(root: Path, sizes: dict[str, int], block_rows: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [_write_store(root / f"m{i}.zarr", model=f"m{i}", noise=noise, seed=i, sizes=sizes, block_rows=block_rows)
            for i, noise in enumerate(NOISE)]


def _normalized(results: Path, name: str) -> pd.DataFrame:
    """A table as compared: no timing column, library files relative to ``results``, plain
    tuples for list cells, rows sorted by key."""
    df = tables.read_table(results, name).drop(columns=["fit_seconds"], errors="ignore")
    if "library_file" in df:
        df["library_file"] = [None if f is None else Path(f).relative_to(results).as_posix()
                              for f in df["library_file"]]

    def plain(value):
        if isinstance(value, np.ndarray | list | tuple):
            return tuple(plain(v) for v in value)
        return value

    for column in df.columns:
        if pd.api.types.is_object_dtype(df[column]):  # list cells (strings too, before pandas 3)
            df[column] = df[column].map(plain)
    return df.sort_values(tables.KEYS[name], na_position="first", kind="stable").reset_index(drop=True)


def _snapshot(results: Path) -> dict[str, pd.DataFrame]:
    return {name: _normalized(results, name) for name in COMPARED}


def _assert_same_tables(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame]) -> None:
    for name in COMPARED:
        assert len(want[name]), f"the reference {name} table is empty"
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True, obj=f"{name}.parquet")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    return _write_stores(tmp_path_factory.mktemp("stores"), SMALL, block_rows=64)


@pytest.fixture(scope="module")
def reference_results(stores, tmp_path_factory) -> Path:
    """The results folder of the synchronous run every other run must reproduce."""
    results = tmp_path_factory.mktemp("reference")
    analyze_stores(stores, results=results, cluster=SYNC, **ANALYSIS)
    return results


@pytest.fixture(scope="module")
def reference(reference_results) -> dict[str, pd.DataFrame]:
    """The tables of the synchronous run every other run must reproduce."""
    snapshot = _snapshot(reference_results)
    # The fixture is meant to be non-trivial: models differ, concepts carry class information.
    iis = snapshot["iis"]
    assert len(iis) == len(NOISE) * len(LIBRARIES) and iis["iis"].between(0.3, 1.0).all()
    assert iis.groupby("model").standard_top1.first().is_monotonic_decreasing
    assert len(snapshot["accuracy"]) == len(NOISE) * (1 + len(LIBRARIES) * 3)
    return snapshot


@pytest.fixture(scope="module")
def big_stores(tmp_path_factory) -> list[Path]:
    return _write_stores(tmp_path_factory.mktemp("big-stores"), BIG, block_rows=1024)


@pytest.fixture(scope="module")
def big_reference(big_stores, tmp_path_factory) -> dict[str, pd.DataFrame]:
    results = tmp_path_factory.mktemp("big-reference")
    analyze_stores(big_stores, results=results, cluster=SYNC, **ANALYSIS)
    return _snapshot(results)


# ------------------------------------------------------------------------------------------
# A real scheduler and workers, as separate processes
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = {**os.environ, **THREAD_ENV}
    # Workers unpickle iis.analyze.tasks.run_task by reference: they must import this checkout.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _start(cmd: list, log: Path, cwd: Path) -> subprocess.Popen:
    # Own session (process group), so teardown can kill it with everything it spawned.
    with open(log, "ab") as out:
        return subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env=_child_env(), start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(folder.glob("*.log")))


class DaskProcesses:
    """``dask scheduler`` plus ``workers`` × ``dask worker`` (1 thread each), and a client to watch them."""

    def __init__(self, folder: Path, *, workers: int, nanny: bool):
        from distributed import Client

        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        port = _free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        try:
            self.procs.append(_start([DASK, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
                                     folder / "scheduler.log", folder))
            for i in range(workers):
                cmd = [DASK, "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                       "--no-dashboard", "--death-timeout", "60", "--name", f"w{i}", "--preload", WORKER_PRELOAD]
                self.procs.append(_start(cmd + ([] if nanny else ["--no-nanny"]), folder / f"worker{i}.log", folder))
            self.client = Client(self.address, timeout="60s")
            self.client.wait_for_workers(workers, timeout=90)
        except BaseException:
            self.close()
            raise

    @property
    def worker_processes(self) -> list[subprocess.Popen]:
        return self.procs[1:]

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        for proc in reversed(self.procs):
            _stop(proc)


@contextlib.contextmanager
def dask_processes(folder: Path, *, workers: int = 2, nanny: bool = True) -> Iterator[DaskProcesses]:
    folder.mkdir(parents=True, exist_ok=True)
    cluster = DaskProcesses(folder, workers=workers, nanny=nanny)
    try:
        yield cluster
    finally:
        cluster.close()


def _cli_analyze(stores: list[Path], results: Path, scheduler: str, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [IIS, "analyze", *(a for s in stores for a in ("--store", s)), "--results", results, *CLI_ANALYSIS,
           "--scheduler", scheduler, *extra]
    return _start(cmd, log, results.parent)


def _on_workers():
    """Probes for ``Client.run``: ``(executing, executed)``.

    Built inside a function so that cloudpickle ships them by value: the workers cannot import
    this test module.
    """

    def executing(dask_worker) -> list[str]:
        """The keys the worker's thread is computing right now."""
        return [str(ts.key) for ts in dask_worker.state.executing]

    def executed(key: str, dask_worker) -> bool:
        """Whether the worker's log shows ``key`` executing at some point."""
        return any("executing" in entry for entry in dask_worker.state.story(key))

    return executing, executed


_executing, _executed = _on_workers()


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------


def _has_heartbeat_filter() -> bool:
    from iis.analyze.dask_worker import ClosingHeartbeatFilter

    return any(isinstance(f, ClosingHeartbeatFilter) for f in logging.getLogger("distributed.worker").filters)


@pytest.mark.slow
def test_local_cluster_matches_synchronous_run(stores, reference, tmp_path):
    # Two analyses share one LocalCluster, as `iis run` shares it between the models and the
    # fine-tuning arms; it starts on first use and is closed when the block ends.
    with shared_cluster(ClusterOptions(workers=2, threads=1)) as cluster:
        assert cluster.shared is not None and cluster.shared.address is None
        analyze_stores(stores, results=tmp_path / "results", cluster=cluster, **ANALYSIS)
        first = cluster.shared.address
        from distributed import Client

        # Every worker loaded the preload that quiets the shutdown race's heartbeat error.
        with Client(first, timeout="30s") as client:
            assert set(client.run(_has_heartbeat_filter).values()) == {True}
        analyze_stores(stores[:1], results=tmp_path / "again", cluster=cluster, **ANALYSIS)
        assert first is not None and cluster.shared.address == first
    assert cluster.shared.address is None
    _assert_same_tables(_snapshot(tmp_path / "results"), reference)
    again = _snapshot(tmp_path / "again")["accuracy"]
    assert set(again["model"]) == {"m0"} and len(again) == (reference["accuracy"]["model"] == "m0").sum()


@pytest.mark.slow
def test_split_ratio_grid_matches_synchronous_run(stores, reference, reference_results, tmp_path, caplog):
    """Every library's grid split over two tasks (one library build shared by both, merged where
    the tables are written): the same tables, and the same saved libraries and heads."""
    results = tmp_path / "results"
    with caplog.at_level("INFO", logger="iis.analyze.pipeline"):
        analyze_stores(stores, results=results, cluster=ClusterOptions(workers=2, threads=1, head_parts=2), **ANALYSIS)
    assert any("6 library task(s) split in 2/2/2/2/2/2 parts" in r.getMessage() for r in caplog.records)
    _assert_same_tables(_snapshot(results), reference)
    saved = sorted(p.relative_to(reference_results) for p in (reference_results / "libraries").rglob("*.npz"))
    assert len(saved) == len(NOISE) * len(LIBRARIES)
    for path in saved:
        with np.load(reference_results / path) as want, np.load(results / path) as got:
            assert sorted(got.files) == sorted(want.files)
            for name in want.files:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{path}: {name}")


def test_parts_merged_in_any_order_are_the_whole_task(stores, tmp_path):
    """Parts come back in whatever order they finish; merged, they are the task run whole. A part
    fitted on another build of the library is refused, not saved beside the wrong concepts."""
    spec = TaskSpec(store=str(stores[2]), library="cluster", seed=0, num_concepts=8, ratios=(0.0, 0.5, 0.9),
                    bootstrap=20, library_dir=str(tmp_path / "whole"))
    whole = run_task(spec)
    split = replace(spec, library_dir=str(tmp_path / "split"))
    lib = build_task(split)
    # As run_tasks runs a split grid: the dense heads trained once and shared; one part here trains
    # them itself instead, as a part run on its own does.
    dense = dense_task(split, lib)
    parts = [run_part(replace(split, part=(0.0, 0.9)), lib, dense), run_part(replace(split, part=(0.5,)), lib)]
    merged = merge_parts(split, lib, parts[::-1])

    def timeless(rows):
        return [{k: v for k, v in row.items() if k != "fit_seconds"} for row in rows]

    assert timeless(merged.accuracy_rows) == timeless(whole.accuracy_rows)
    assert [r["sparsity"] for r in merged.accuracy_rows] == [0.0, 0.5, 0.9]
    np.testing.assert_array_equal(merged.test_correct, whole.test_correct)
    assert len({tuple(row) for row in whole.test_correct}) > 1  # the heads differ: a mix-up would show
    files = [Path(r.concept_rows[0]["library_file"]) for r in (whole, merged)]
    assert [{**r, "library_file": None} for r in merged.concept_rows] == \
        [{**r, "library_file": None} for r in whole.concept_rows]
    with np.load(files[0]) as want, np.load(files[1]) as got:
        for name in want.files:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    other = build_task(replace(split, seed=1))
    with pytest.raises(RuntimeError, match="different builds of the library"):
        merge_parts(split, lib, [parts[0], run_part(replace(split, part=(0.5,)), other)])
    with pytest.raises(RuntimeError, match="not the grid"):
        merge_parts(split, lib, parts[:1])
    # Dense heads trained on another library's activations are refused, not started from.
    prototype = replace(split, library="prototype")
    with pytest.raises(ValueError, match="other train activations"):
        run_part(replace(split, part=(0.5,)), lib, dense_task(prototype, build_task(prototype)))


@pytest.mark.slow
def test_split_per_ratio_library_matches_synchronous_run(stores, tmp_path, caplog):
    """End2End builds a library per ratio: each part builds and fits its own ratios."""
    analysis = {**ANALYSIS, "libraries": ["end2end"], "options": {"end2end": {"epochs": 2}}}
    analyze_stores(stores[:1], results=tmp_path / "sync", cluster=SYNC, **analysis)
    with caplog.at_level("INFO", logger="iis.analyze.pipeline"):
        analyze_stores(stores[:1], results=tmp_path / "split", cluster=ClusterOptions(workers=2, threads=1),
                       **analysis)
    assert any("1 library task(s) split in 2 parts" in r.getMessage() for r in caplog.records)
    for name in COMPARED:
        pd.testing.assert_frame_equal(_normalized(tmp_path / "split", name), _normalized(tmp_path / "sync", name),
                                      check_exact=True, obj=f"{name}.parquet")
    assert len(_normalized(tmp_path / "sync", "concepts")["sparsity"].unique()) == 3  # a build per ratio
    saved = sorted(p.relative_to(tmp_path / "sync") for p in (tmp_path / "sync" / "libraries").rglob("*.npz"))
    assert len(saved) == 3
    for path in saved:
        with np.load(tmp_path / "sync" / path) as want, np.load(tmp_path / "split" / path) as got:
            for name in want.files:
                if name == "meta":  # JSON; its build time differs
                    got_meta, want_meta = (json.loads(str(m["meta"])) for m in (got, want))
                    for meta in (got_meta, want_meta):
                        meta["info"].pop("fit_seconds")
                    assert got_meta == want_meta
                    continue
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{path}: {name}")


@pytest.mark.slow
def test_cli_on_external_scheduler_matches_synchronous_run(stores, reference, tmp_path):
    results = tmp_path / "R2"
    with dask_processes(tmp_path / "dask", nanny=True) as cluster:
        cli = _cli_analyze(stores, results, cluster.address, tmp_path / "dask" / "cli.log")
        try:
            code = cli.wait(timeout=240)
        finally:
            _stop(cli)
        assert code == 0, _logs(tmp_path / "dask")
        # Every task ran on the external workers (not in a LocalCluster of the CLI's own).
        keys = [f"iis-m{i}-{lib}-K8-seed0-default" for i in range(len(NOISE)) for lib in ("standard", *LIBRARIES)]
        ran = {key: cluster.client.run(_executed, key) for key in keys}
        assert all(any(where.values()) for where in ran.values()), ran
    _assert_same_tables(_snapshot(results), reference)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--head-parts", "2")], ids=["whole-grids", "split-grids"])
def test_worker_killed_mid_task_is_recomputed(big_stores, big_reference, tmp_path, extra):
    """SIGKILL a worker while it executes a task; the scheduler reschedules it on the survivor.

    Workers run with ``--no-nanny``, so the killed process *is* the worker (its pid is the one
    ``Client.run(os.getpid)`` reports) and nothing restarts it: the job can only finish because
    the remaining worker recomputes the lost task from its spec (tasks receive paths, not data).
    With split grids the victim may also hold a shared library build, which is built again.
    """
    folder = tmp_path / "dask"
    results = tmp_path / "R3"
    with dask_processes(folder, nanny=False) as cluster:
        pids = cluster.client.run(os.getpid)
        assert sorted(pids.values()) == sorted(p.pid for p in cluster.worker_processes)
        cli = _cli_analyze(big_stores, results, cluster.address, folder / "cli.log", extra)
        try:
            deadline = time.monotonic() + 180
            busy: dict[str, list[str]] = {}
            while not busy:
                assert cli.poll() is None, f"the run ended before a task was caught executing\n{_logs(folder)}"
                assert time.monotonic() < deadline, f"no task seen executing\n{_logs(folder)}"
                busy = {addr: keys for addr, keys in cluster.client.run(_executing).items() if keys}
                time.sleep(0.01)
            victim, keys = next(iter(busy.items()))
            os.kill(pids[victim], signal.SIGKILL)
            code = cli.wait(timeout=300)
        finally:
            _stop(cli)
        assert code == 0, _logs(folder)
        killed = next(p for p in cluster.worker_processes if p.pid == pids[victim])
        assert killed.wait(timeout=10) == -signal.SIGKILL
        survivor = next(addr for addr in pids if addr != victim)
        # The task that was lost with the victim was computed again, on the survivor.
        assert cluster.client.run(_executed, keys[0], workers=[survivor])[survivor], keys[0]
        assert "iis-" in keys[0]
    _assert_same_tables(_snapshot(results), big_reference)


def test_rerun_replaces_rows(stores, reference, tmp_path, monkeypatch):
    results = tmp_path / "results"
    analyze_stores(stores, results=results, cluster=SYNC, **ANALYSIS)
    first = _snapshot(results)
    counts = {name: len(tables.read_table(results, name)) for name in COMPARED}
    analyze_stores(stores, results=results, cluster=SYNC, **ANALYSIS)
    assert {name: len(tables.read_table(results, name)) for name in COMPARED} == counts
    _assert_same_tables(_snapshot(results), first)
    _assert_same_tables(first, reference)
    # With every row present, skip_complete schedules nothing at all.
    monkeypatch.setattr(iis.analyze.pipeline, "run_tasks", lambda *a, **k: pytest.fail("tasks ran"))
    analyze_stores(stores, results=results, cluster=SYNC, skip_complete=True, **ANALYSIS)
    _assert_same_tables(_snapshot(results), first)


def _partial_store(stores: list[Path], folder: Path) -> Path:
    path = folder / "partial.zarr"
    shutil.copytree(stores[0], path)
    zarr.open_group(str(path), mode="r+")["train/done"][1] = False  # block 1 of train not written
    return path


def _foreign_group(stores: list[Path], folder: Path) -> Path:
    path = folder / "foreign.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs["format"] = "someone-elses-features"
    group.create_array("features", shape=(4, DIM), dtype="float32")
    return path


@pytest.mark.parametrize(("make", "reason"), [(_partial_store, r"incomplete store.*train: blocks 1 "),
                                              (_foreign_group, "foreign store")], ids=["partial", "foreign"])
def test_bad_store_is_refused_before_any_task(stores, tmp_path, monkeypatch, make, reason):
    bad = make(stores, tmp_path)
    monkeypatch.setattr(iis.analyze.pipeline, "run_tasks", lambda *a, **k: pytest.fail("a task was scheduled"))
    results = tmp_path / "results"
    # The bad store comes last: every store is checked before anything is scheduled.
    with pytest.raises(StoreError, match=reason) as err:
        analyze_stores([*stores, bad], results=results, cluster=SYNC, **ANALYSIS)
    assert str(bad) in str(err.value)
    assert not results.exists()


def test_cli_refuses_partial_store_in_one_line(stores, tmp_path, caplog):
    """The CLI reports a refused store as one logged line and exit code 2, not a traceback."""
    from iis.cli import main

    bad = _partial_store(stores, tmp_path)
    code = main(["analyze", "--store", str(bad), "--results", str(tmp_path / "R"), "--synchronous", *CLI_ANALYSIS])
    assert code == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(bad) in errors[0].getMessage() and not errors[0].exc_info
    assert not (tmp_path / "R").exists()
