"""Stage 1 end to end: resume after SIGKILL, shards, corrupt images, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from iis.analyze.store import open_feature_store
from PIL import Image

from iis.cli import main
from iis.config import load_pipeline
from iis.jobs import extract_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, *, dataset: str, models: str, extract: str, elements: str = "{images_per_class: 2, grid: 2}") -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(f"""\
        pipelines:
          t:
            dataset: {dataset}
            models:
        {textwrap.indent(models, '      ')}
            elements: {elements}
            extract: {extract}
            store: cache
            results: results
        """))
    return path


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


DIGITS = "{source: builtin, name: digits, seed: 3}"
R10 = "- {name: r10, backbone: resnet10t, img_size: 32}"


def test_extract_writes_a_complete_readable_store(tmp_path):
    cfg = load_pipeline(_yaml(tmp_path, dataset=DIGITS, models=R10, extract="{batch_size: 50, block_rows: 128}"), "t")
    assert extract_pipeline(cfg) == {"r10": True}
    store = open_feature_store(cfg.store_path("r10"))
    sizes = store.attrs["split_sizes"]
    assert sum(sizes.values()) == 1797 and store.feature_dim == 512
    assert store.attrs["backbone"] == "resnet10t" and store.attrs["data_config"]["input_size"] == [3, 32, 32]
    assert store.attrs["weights"].startswith("random") and len(store.attrs["weights_sha256"]) == 64
    train = store.read_split("train")
    assert train.x.shape == (sizes["train"], 512) and torch_all_finite(train.x)
    elements = store.read_elements()
    assert len(elements) == 10 * 2 * 4 and set(elements.kinds) == {"grid"}
    group = zarr.open_group(str(cfg.store_path("r10")), mode="r")
    assert group["train/features"].dtype == np.float16 and group["train/features"].chunks == (128, 512)


def torch_all_finite(x) -> bool:
    return bool(np.isfinite(x.numpy()).all())


def test_shard_order_and_equality(tmp_path):
    text = dict(dataset=DIGITS, models=R10, extract="{batch_size: 40, block_rows: 100}")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = load_pipeline(_yaml(tmp_path / "one", **text), "t")
    two = load_pipeline(_yaml(tmp_path / "two", **text), "t")
    assert extract_pipeline(one) == {"r10": True}
    assert extract_pipeline(two, shard=(0, 2)) == {"r10": False}  # coordinator: creates, fills first half
    with pytest.raises(Exception, match="incomplete"):
        open_feature_store(two.store_path("r10"))
    assert extract_pipeline(two, shard=(1, 2)) == {"r10": True}
    assert _tree(one.store_path("r10")) == _tree(two.store_path("r10"))


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tmp_path):
    # img_size 96 slows the forward pass enough to kill the process between blocks.
    models = "- {name: r10, backbone: resnet10t, img_size: 96}"
    text = dict(dataset=DIGITS, models=models, extract="{batch_size: 32, block_rows: 64}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg_a, cfg_b = _yaml(tmp_path / "a", **text), _yaml(tmp_path / "b", **text)
    assert main(["extract", "t", "--config", str(cfg_a)]) == 0
    store_b = tmp_path / "b" / "cache" / "r10.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "iis", "extract", "t", "--config", str(cfg_b)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done_dir = store_b / "train" / "done" / "c"
    while time.monotonic() < deadline and not (done_dir.exists() and len(list(done_dir.iterdir())) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = np.asarray(zarr.open_group(str(store_b), mode="r")["train/done"][:])
    assert 0 < done.sum() < done.size, "the kill should land mid-run"
    with pytest.raises(Exception, match="incomplete"):
        open_feature_store(store_b)
    assert main(["extract", "t", "--config", str(cfg_b)]) == 0  # resumes from the first block not done
    assert _tree(tmp_path / "a" / "cache" / "r10.zarr") == _tree(store_b)


def test_corrupt_image_is_marked_invalid_not_replaced(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{i:02d}.png")
    (root / "dog" / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cfg = load_pipeline(_yaml(tmp_path, dataset=f"{{source: imagefolder, root: {root}, name: pets, splits: {{val: 0.25, test: 0.25}}}}",
                              models=R10, extract="{batch_size: 8, block_rows: 8}",
                              elements="{images_per_class: 2, grid: 1}"), "t")
    assert extract_pipeline(cfg) == {"r10": True}
    group = zarr.open_group(str(cfg.store_path("r10")), mode="r")
    assert sum(group.attrs["summary"]["invalid"].values()) == 1
    hits = []
    for split in ("train", "val", "test"):
        ids = [str(i) for i in group[f"{split}/ids"][:]]
        if "dog/05.png" in ids:
            row = ids.index("dog/05.png")
            hits.append(split)
            assert not group[f"{split}/valid"][row]
            assert np.isnan(group[f"{split}/features"][row]).all()
            others = np.asarray(group[f"{split}/features"][:])[np.asarray(group[f"{split}/valid"][:])]
            assert np.isfinite(others).all()
        assert sorted(ids) == sorted(set(ids))  # nothing substituted, nothing duplicated
    assert len(hits) == 1
    store = open_feature_store(cfg.store_path("r10"))
    assert "dog/05.png" not in store.read_split(hits[0]).ids


def test_resume_refuses_changed_settings(tmp_path, caplog):
    path = _yaml(tmp_path, dataset=DIGITS, models=R10, extract="{batch_size: 50, block_rows: 128}")
    assert main(["extract", "t", "--config", str(path)]) == 0
    before = _tree(tmp_path / "cache" / "r10.zarr")
    text = path.read_text()
    path.write_text(text.replace("img_size: 32", "img_size: 40"))
    assert main(["extract", "t", "--config", str(path)]) == 2  # a clear error, not a mixed store
    # A changed dtype used to be ignored silently on an existing store.
    path.write_text(text.replace("block_rows: 128}", "block_rows: 128, dtype: float32}"))
    caplog.clear()
    assert main(["extract", "t", "--config", str(path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "made with float16, this run asks float32" in errors[0]
    assert _tree(tmp_path / "cache" / "r10.zarr") == before
