"""Every expected failure of the CLI is one line with exit status 2 (issue 13); `-v` adds the
traceback; Ctrl-C is one line and 130; Dask's INFO chatter stays off once the CLI silences it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_dask import CLI_ANALYSIS, SMALL, _child_env, _write_store

import iis.cli
from iis.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
IIS = Path(sys.executable).parent / "iis"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _write_store(tmp_path_factory.mktemp("store") / "m0.zarr", model="m0", noise=1.0, seed=0, sizes=SMALL,
                        block_rows=64)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(("argv", "flag"), [
    (["analyze", "smoke", "--workers", "0"], "--workers"),
    (["run", "smoke", "--workers", "0"], "--workers"),
    (["analyze", "smoke", "--threads", "0"], "--threads"),
    (["import-h5", "a.h5", "b.zarr", "--block-rows", "0"], "--block-rows"),
    (["analyze", "smoke", "--workers", "two"], "--workers"),
    (["extract", "smoke", "--num-workers", "-1"], "--num-workers"),
])
def test_bad_counts_are_refused_at_parse_time(argv, flag, capsys):
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert f"argument {flag}" in line and "--help" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_before_any_store(tmp_path, capsys):
    shutil.copy(ROOT / "pipelines.yaml", tmp_path / "pipelines.yaml")
    assert main(["extract", "smoke", "--config", str(tmp_path / "pipelines.yaml"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in _one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["pipelines.yaml"]  # no cache/, no store


def test_unknown_device_is_refused(capsys):
    assert main(["run", "smoke", "--device", "tpu9"]) == 2
    assert "unknown device 'tpu9'" in _one_error_line(capsys)


def _analyze(store: Path, results: Path, *extra: str) -> int:
    return main(["analyze", "--store", str(store), "--results", str(results), "--synchronous", *CLI_ANALYSIS, *extra])


def _errors(caplog) -> list:
    return [r for r in caplog.records if r.levelname == "ERROR"]


def test_too_many_concepts_is_one_line_naming_the_store(store, tmp_path, caplog):
    assert _analyze(store, tmp_path / "R", "--num-concepts", "41") == 2
    (error,) = _errors(caplog)
    assert str(store) in error.getMessage() and "only 40 visual elements" in error.getMessage()
    assert not error.exc_info and not (tmp_path / "R").exists()


def test_permission_error_is_one_line_and_verbose_adds_the_traceback(store, tmp_path, caplog, monkeypatch):
    from iis.analyze import tables

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tables.tempfile, "mkstemp", refuse)
    assert _analyze(store, tmp_path / "R") == 2
    (error,) = _errors(caplog)
    assert "results folder is not writable" in error.getMessage() and not error.exc_info
    caplog.clear()
    assert main(["-v", "analyze", "--store", str(store), "--results", str(tmp_path / "R"), "--synchronous",
                 *CLI_ANALYSIS]) == 2
    assert _errors(caplog)[0].exc_info  # -v: the traceback is there


@pytest.mark.parametrize("argv", [["-v", "info", "{path}"], ["info", "{path}", "-v"], ["info", "{path}", "--verbose"]])
def test_verbose_adds_the_traceback_before_or_after_the_command(argv, tmp_path, caplog):
    missing = str(tmp_path / "absent")
    assert main([a.format(path=missing) for a in argv]) == 2
    (error,) = _errors(caplog)
    assert "no such file or folder" in error.getMessage() and error.exc_info
    caplog.clear()
    # Without it, one line; and a -q after the command quiets the run as one before it does.
    assert main(["info", missing]) == 2 and not _errors(caplog)[0].exc_info
    assert build_parser().parse_args(["info", missing, "-q"]).quiet
    assert not build_parser().parse_args(["-v", "info", missing]).quiet


def test_a_wrong_name_is_said_before_any_slow_work(monkeypatch, caplog):
    import iis.jobs

    # `iis run` names an unknown pipeline before announcing (and doing) the slow imports.
    assert main(["run", "nosuch"]) == 2
    assert "no pipeline 'nosuch'; known: " in caplog.text and "loading torch" not in caplog.text

    def no_dataset(cfg):
        raise AssertionError("the dataset was loaded before the models were checked")

    monkeypatch.setattr(iis.jobs, "_load_dataset", no_dataset)
    assert main(["extract", "demo", "--model", "nosuch"]) == 2
    assert "pipeline 'demo' has no model nosuch; known: " in caplog.text and "r10@e2" in caplog.text


def test_explicit_mode_says_what_is_wrong(tmp_path, caplog):
    store = str(tmp_path / "m.zarr")
    assert main(["analyze", "--store", store]) == 2
    assert _errors(caplog)[0].getMessage().endswith("and no pipeline: --results DIR is missing")
    caplog.clear()
    assert main(["analyze", "demo", "--store", store, "--results", str(tmp_path)]) == 2
    assert _errors(caplog)[0].getMessage().endswith("and no pipeline: a pipeline (demo) was named too")


def test_ctrl_c_is_one_line(monkeypatch, caplog):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(iis.cli._COMMANDS, "report", interrupted)
    assert main(["report", "smoke"]) == 130
    (error,) = _errors(caplog)
    assert error.getMessage() == "interrupted; rerun to resume" and not error.exc_info


@pytest.mark.parametrize(("module", "name"), [("iis.extract.clip", "ClipError"),
                                               ("iis.extract.datasets", "ImageLoadError")])
def test_clip_and_image_errors_are_one_line(module, name, monkeypatch, caplog):
    """Both live in modules that import torch, which the CLI names without importing."""
    import importlib

    error = getattr(importlib.import_module(module), name)

    def failing(args):
        raise error(f"{name} says what to change")

    monkeypatch.setitem(iis.cli._COMMANDS, "report", failing)
    assert main(["report", "smoke"]) == 2
    (record,) = _errors(caplog)
    assert record.getMessage() == f"{name} says what to change" and not record.exc_info
    caplog.clear()
    assert main(["-v", "report", "smoke"]) == 2
    assert _errors(caplog)[0].exc_info  # -v: the traceback is there


@pytest.mark.slow
def test_dask_info_lines_stay_silenced(store, tmp_path):
    """Importing distributed reset its logger to INFO, so a LocalCluster's nanny and scheduler
    lines came back after the CLI had silenced them; worker processes logged INFO as well."""
    proc = subprocess.run([str(IIS), "analyze", "--store", str(store), "--results", str(tmp_path / "R"),
                           *CLI_ANALYSIS, "--workers", "1"], env=_child_env(), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chatter = [line for line in proc.stderr.splitlines() if "INFO distributed" in line or "distributed." in line]
    assert not chatter, "\n".join(chatter[:10])
    assert "Dask dashboard" in proc.stderr  # our own INFO lines are still there
