"""Stage 2 on a node that has only the stores: each command checks only what it uses.

A pipeline is extracted, then its dataset folder and its weights file are deleted, as on a CPU
node that mounts only the stores. `analyze` (on a real LocalCluster, in a subprocess whose
stderr is captured), `report` and `explain` still work; `extract` fails naming what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from iis.extract.backbones import create_backbone
from PIL import Image
from safetensors.torch import save_file

from iis.cli import main

PIPELINE = """\
pipelines:
  node:
    dataset: {{source: imagefolder, root: {root}, name: pets, splits: {{val: 0.25, test: 0.25}}}}
    models:
      - {{name: m, backbone: resnet10t, weights: {weights}, img_size: 32}}
    elements: {{images_per_class: 2, grid: 2}}
    extract: {{batch_size: 16, block_rows: 16}}
    store: cache
    results: results
    analysis: {{libraries: [prototype], num_concepts: 4, ratios: [0, 0.5], bootstrap: 0}}
    explain: {{images: 3}}
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> dict[str, Path]:
    """A pipeline extracted, then stripped of its dataset and weights."""
    work = tmp_path_factory.mktemp("node")
    rng = np.random.default_rng(0)
    root = work / "images"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{i:02d}.png")
    weights = work / "m.safetensors"
    save_file(create_backbone(backbone="resnet10t", weights="random", img_size=32, seed=3).model.state_dict(), weights)
    config = work / "pipelines.yaml"
    config.write_text(textwrap.dedent(PIPELINE.format(root=root, weights=weights)))
    assert main(["extract", "node", "--config", str(config)]) == 0
    shutil.rmtree(root)
    weights.unlink()
    return {"work": work, "config": config, "root": root, "weights": weights}


def test_extract_fails_naming_the_missing_paths(node, caplog):
    assert main(["extract", "node", "--config", str(node["config"])]) == 2
    assert f"pipelines.node.dataset.root: directory not found: {node['root']}" in caplog.text
    assert f"pipelines.node.models[0].weights: file not found: {node['weights']}" in caplog.text


@pytest.mark.slow
def test_analyze_on_dask_needs_only_the_stores_and_logs_cleanly(node):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "iis", "analyze", "node", "--config", str(node["config"])],
                          cwd=node["work"], env=env, capture_output=True, text=True, timeout=600)
    err = proc.stderr
    assert proc.returncode == 0, err
    assert (node["work"] / "results" / "iis.parquet").is_file()
    # At the default verbosity: no Dask INFO lines, no traceback, no worker killed at shutdown.
    assert "Traceback" not in err and "CommClosedError" not in err, err
    assert not [line for line in err.splitlines() if " INFO distributed" in line], err
    assert "still alive" not in err and "WARNING distributed" not in err, err
    # stderr is a pipe, not a terminal: progress is a log line, not a bar. Two tasks (standard head
    # and prototype) on two workers: the prototype's grid is split in two parts, three tasks run.
    assert "analyze: 1 library task(s) split in 2 parts (2 task slots)" in err, err
    assert "analyze: 3/3 task in " in err, err


@pytest.mark.slow
def test_report_and_explain_need_no_dataset_or_weights(node, capsys):
    config = str(node["config"])
    assert (node["work"] / "results" / "iis.parquet").is_file() or main(
        ["analyze", "node", "--config", config, "--synchronous"]) == 0
    assert main(["report", "node", "--config", config]) == 0
    assert (node["work"] / "results" / "report.html").is_file()
    assert main(["explain", "node", "--config", config, "--model", "m", "--library", "prototype",
                 "--ratio", "0.5", "--limit", "3"]) == 0
    assert "m prototype s=0.5 (test, " in capsys.readouterr().out
    # Without --model, --library and --ratio: the pipeline's one model, first library, and the
    # analysis ratio nearest 0.9 (its grid is 0, 0.5).
    assert main(["explain", "node", "--config", config, "--limit", "2"]) == 0
    assert "m prototype s=0.5 (test, " in capsys.readouterr().out


def test_stage_two_names_the_missing_store_and_results(tmp_path, caplog):
    config = tmp_path / "pipelines.yaml"
    config.write_text(textwrap.dedent(PIPELINE.format(root=tmp_path / "gone", weights=tmp_path / "gone.pth")))
    assert main(["analyze", "node", "--config", str(config)]) == 2
    assert f"pipeline 'node': no store at {tmp_path / 'cache' / 'm.zarr'}; run `iis extract node` first" in caplog.text
    assert main(["report", "node", "--config", str(config)]) == 2
    assert f"{tmp_path / 'results'}: no tables (iis.parquet) here; run `iis analyze node` first" in caplog.text
    assert main(["explain", "node", "--config", str(config), "--model", "m", "--library", "prototype",
                 "--ratio", "0.5"]) == 2
    assert "no store at" in caplog.text
