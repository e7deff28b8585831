"""The front door: `iis pipelines`, `iis init`, `iis info`, the logging setup and the progress lines."""

from __future__ import annotations

import inspect
import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from iis.analyze.pipeline import ClusterOptions
from iis.apps.explain import explain_split
from iis.extract import store as st

from iis.cli import build_parser, main
from iis.logs import _ThirdPartyFilter, levels
from iis.progress import LogProgress, format_seconds, progress
from iis.store_format import BLOCK_ROWS

SIZES = {"train": 10, "val": 4, "test": 6}


def _store(path, *, complete: bool = True, text: str | None = None):
    """A small store made with stage 1's writer; the last elements block is left undone when not ``complete``."""
    n = 5
    elements = st.ElementProvenance(
        source_id=np.array([f"img{i}" for i in range(n)]), source_index=np.arange(n), label=np.arange(n) % 2,
        box=np.tile([0, 0, 4, 4], (n, 1)), kind=np.array(["grid"] * n), segment=np.full(n, -1))
    group = st.create_store(path, split_sizes=SIZES, feature_dim=3, elements=elements, block_rows=4,
                            attrs={"model": "m1", "dataset": "toy", "classes": ["a", "b"], "pipeline": "p",
                                   "backbone": "resnet10t", "weights": "random:seed=0"})
    rng = np.random.default_rng(0)
    for part, rows in {**SIZES, st.ELEMENTS: n}.items():
        for b in range(st.num_blocks(rows, 4)):
            if not complete and part == st.ELEMENTS and b == 1:
                continue
            span = st.block_slice(b, rows=rows, block_rows=4)
            cols = {"features": rng.normal(size=(span.stop - span.start, 3)).astype(np.float16)}
            if part != st.ELEMENTS:
                k = span.stop - span.start
                cols.update(labels=np.arange(k) % 2, ids=np.array([f"{part}{i}" for i in range(span.start, span.stop)]),
                            valid=np.array([not (part == "train" and i == 2) for i in range(span.start, span.stop)]))
            st.write_block(group, part, b, **cols)
    if text is not None:
        group.create_group("text").attrs.update({"format": text} if text else {})
    st.finalize_store(group, path)
    return path


def test_pipelines_lists_the_shipped_ones_from_an_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pipelines", "--libraries"]) == 0
    out = capsys.readouterr().out
    for name in ("smoke", "smoke-text", "demo"):
        assert any(line.split()[:2] == [name, "shipped"] for line in out.splitlines()), name
    assert "1. shipped (" in out and "digits (builtin)" in out
    assert "top5_cutoff: float = 0.25" in out and "epochs: int = 30" in out  # the registry's options
    assert "init: 'anchors' | 'random' = 'anchors'" in out  # a choice shows its values


def test_init_then_pipelines_shows_both_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0 and (tmp_path / "pipelines.yaml").is_file()
    assert main(["init"]) == 2  # never overwrites
    assert main(["pipelines"]) == 0
    out = capsys.readouterr().out
    assert "1. pipelines.yaml" in out and "2. shipped" in out
    assert any(line.split()[:2] == ["imagenet-subset", "pipelines.yaml"] for line in out.splitlines())


def test_pipelines_marks_an_invalid_pipeline_and_fails(tmp_path, capsys, caplog):
    config = tmp_path / "p.yaml"
    config.write_text(
        "pipelines:\n"
        "  bad:\n"
        "    dataset: {source: builtin, name: digits}\n"
        "    models: [{name: a, backbone: resnet10t}]\n"
        "    store: cache/bad\n"
        "    results: results/bad\n"
        "    analysis: {num_concepts: sixteen, libraries: [prototyp]}\n"
        "  elsewhere:\n"  # its dataset is on another machine: listed as valid (inputs are not checked)
        "    dataset: {source: imagefolder, root: /no/such/folder}\n"
        "    models: [{name: a, backbone: resnet50}]\n"
        "    store: cache/e\n"
        "    results: results/e\n")
    assert main(["pipelines", "--config", str(config)]) == 2
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "[INVALID: pipelines.bad.analysis." in lines["bad"] and "(and 1 more)]" in lines["bad"]
    assert "INVALID" not in lines["elsewhere"] and "INVALID" not in lines["demo"]
    assert "1 pipeline(s) marked INVALID above" in caplog.text


@pytest.mark.parametrize("arg", ["newdir/", "sub/dir", "conf"])
def test_init_into_a_new_folder_writes_pipelines_yaml_there(arg, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["init", arg]) == 0
    written = tmp_path / arg.rstrip("/") / "pipelines.yaml"
    assert written.is_file() and "imagenet-subset" in written.read_text()
    # Not ./pipelines.yaml: the hint says to pass it with --config.
    assert f"`iis run imagenet-subset --config {Path(arg.rstrip('/')) / 'pipelines.yaml'}`" in caplog.text


def test_init_to_a_named_file_outside_the_folder_asks_for_config(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "conf/my.yaml"]) == 0 and (tmp_path / "conf" / "my.yaml").is_file()
    assert "`iis pipelines --config conf/my.yaml`" in caplog.text
    caplog.clear()
    assert main(["init", "pipelines.yaml"]) == 0
    assert "then `iis run imagenet-subset` (`iis pipelines` lists it" in caplog.text


def test_info_on_a_store(tmp_path, capsys):
    path = _store(tmp_path / "m1.zarr", text="iis-clip-text")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"store {path}" in out and "model       m1 (pipeline p, dataset toy, 2 classes)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["train"] == ["10", "3/3", "1"] and rows["test"] == ["6", "2/2", "0"]
    assert rows["elements"] == ["5", "2/2", "-"] and "complete    yes" in out
    assert "text/" in out and "unfinished" not in out


def test_info_on_an_incomplete_store_and_a_half_written_text_group(tmp_path, capsys):
    path = _store(tmp_path / "m1.zarr", complete=False, text="")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "complete    no: blocks still to fill in elements" in out
    assert {line.split()[0]: line.split()[2] for line in out.splitlines() if line.startswith("  elements")} == {"elements": "1/2"}
    assert "text/       unfinished" in out


def test_info_on_a_folder_of_stores_and_on_results(tmp_path, capsys):
    _store(tmp_path / "stores" / "m1.zarr")
    assert main(["info", str(tmp_path / "stores")]) == 0
    assert "store " in capsys.readouterr().out
    results = tmp_path / "results"
    (results / "libraries" / "m1").mkdir(parents=True)
    (results / "libraries" / "m1" / "prototype-K4-seed0-default.npz").write_bytes(b"")
    keys = {"pipeline": "p", "dataset": "toy", "seed": 0}
    pd.DataFrame([{**keys, "model": m, "library": lib, "analysis_version": f"0.1.0+{m}"} for m in ("m1", "m2")
                  for lib in ("standard", "prototype")]).to_parquet(results / "accuracy.parquet")
    pd.DataFrame([{**keys, "model": "m1", "library": "text", "caveat": "random CLIP weights"}]).to_parquet(
        results / "iis.parquet")
    assert main(["info", str(results)]) == 0
    out = capsys.readouterr().out
    assert "tables      accuracy (4 rows), iis (1 row)" in out
    assert "models      2: m1, m2" in out and "libraries   prototype, text" in out
    assert "pipelines   p; datasets toy" in out and "caveats     random CLIP weights" in out
    assert "analysis    0.1.0+m1, 0.1.0+m2" in out
    assert "saved       1 concept libraries" in out and "report      none yet" in out
    # The fine-tuning arms' tables (results/<pipeline>/finetune) get no report of their own.
    arms = results / "finetune"
    arms.mkdir()
    shutil.copy(results / "accuracy.parquet", arms / "accuracy.parquet")
    pd.DataFrame([{**keys, "library": "prototype"}]).to_parquet(results / "finetune_delta.parquet")
    assert main(["info", str(arms)]) == 0
    out = capsys.readouterr().out
    assert f"the pipeline's report is {results / 'report.html'}" in out and "none yet" not in out


def test_a_store_missing_an_array_is_refused_by_name_and_its_folder_still_listed(tmp_path, capsys, caplog):
    good = _store(tmp_path / "stores" / "a.zarr")
    damaged = _store(tmp_path / "stores" / "b.zarr")
    shutil.rmtree(damaged / "train" / "features")  # e.g. a copy cut short
    # Stage 2 refuses it in one line naming the part and the array, before any task.
    assert main(["analyze", "--store", str(damaged), "--results", str(tmp_path / "R"), "--synchronous"]) == 2
    assert f"{damaged}: damaged store, train/ has no features array(s); re-extract it" in caplog.text
    assert not (tmp_path / "R").exists()
    # `iis info` shows the damage, and a folder lists its other stores too.
    assert main(["info", str(damaged)]) == 0
    out = capsys.readouterr().out
    assert "train     damaged: no features array(s)" in out and "complete    no: damaged train" in out
    foreign = tmp_path / "stores" / "c.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"format": "other"}}')
    assert main(["info", str(tmp_path / "stores")]) == 0
    out = capsys.readouterr().out
    assert f"store {good}" in out and f"store {damaged}" in out
    assert f"store {foreign}\n  unreadable  {foreign}: not an iis feature store" in out


def test_info_refuses_what_it_cannot_read(tmp_path, caplog):
    assert main(["info", str(tmp_path / "absent")]) == 2
    assert "absent: no such file or folder" in caplog.text
    assert main(["info", str(tmp_path)]) == 2
    assert "neither a feature store" in caplog.text


def test_help_states_the_defaults_their_owners_hold():
    """The CLI passes None for what is not given; its help text quotes the owners' defaults."""
    sub = build_parser()._subparsers._group_actions[0].choices
    helps = {a.dest: a.help for a in sub["analyze"]._actions}
    assert f"(default {ClusterOptions().workers})" in helps["workers"]
    assert f"(default {ClusterOptions().threads})" in helps["threads"]
    assert {a.dest: a.default for a in sub["analyze"]._actions}["workers"] is None
    assert f"(default {BLOCK_ROWS})" in {a.dest: a.help for a in sub["import-h5"]._actions}["block_rows"]
    explain = {a.dest: a for a in sub["explain"]._actions}
    owner = inspect.signature(explain_split).parameters
    for name in ("limit", "top"):
        assert explain[name].default is None and f"(default {owner[name].default})" in explain[name].help


@pytest.mark.parametrize(("verbosity", "own", "dask_info_shown"),
                         [(-1, logging.WARNING, False), (0, logging.INFO, False), (1, logging.DEBUG, True)])
def test_log_levels(verbosity, own, dask_info_shown):
    mine, third = levels(verbosity)
    assert mine == own
    keep = _ThirdPartyFilter(third).filter

    def record(name, level):
        return logging.LogRecord(name, level, __file__, 1, "m", None, None)

    assert keep(record("distributed.scheduler", logging.INFO)) is dask_info_shown
    assert keep(record("distributed.nanny", logging.WARNING)) and keep(record("iis.analyze", logging.INFO))
    assert keep(record("distributedx", logging.INFO))  # only the package and its children


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_lines_are_spaced_and_carry_rate_and_eta(caplog):
    clock = _Clock()
    bar = LogProgress(total=40, desc="analyze", unit="task", logger=logging.getLogger("t"), interval=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"), bar:
        for step in range(40):
            clock.now = 2.0 * (step + 1)  # one task every 2 s
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    # One line per 30 s at most (at 30, 60 s), then the closing line.
    assert lines[0] == "analyze: 15/40 task (38%), 0.5 task/s, ETA 50 s"
    assert lines[1] == "analyze: 30/40 task (75%), 0.5 task/s, ETA 20 s"
    assert lines[2] == "analyze: 40/40 task in 1 min 20 s (0.5 task/s)" and len(lines) == 3


def test_log_progress_wraps_iterables_and_stays_silent_on_errors(caplog):
    clock = _Clock()
    with caplog.at_level(logging.INFO, logger="t"):
        assert list(LogProgress(range(3), desc="x", logger=logging.getLogger("t"), clock=clock)) == [0, 1, 2]
        assert caplog.records[-1].getMessage().startswith("x: 3/3 it in 0 s")
        caplog.clear()
        with pytest.raises(RuntimeError), LogProgress(total=5, desc="y", logger=logging.getLogger("t"), clock=clock) as bar:
            bar.update()
            raise RuntimeError
        assert not caplog.records


def test_progress_is_a_tqdm_bar_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    bar = progress(total=3, desc="d", stream=Tty())
    assert type(bar).__module__.startswith("tqdm")
    bar.close()
    assert isinstance(progress(total=3, desc="d", stream=io.StringIO()), LogProgress)
    assert [format_seconds(s) for s in (8, 185, 7620, float("inf"))] == ["8 s", "3 min 05 s", "2 h 07 min", "?"]
