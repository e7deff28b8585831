"""Sharded extraction of a trained model: only the coordinator (shard 0) trains; the others wait."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from iis.extract import train

from iis.config import load_pipeline
from iis.jobs import extract_pipeline, train_pipeline_model

TRAINED = textwrap.dedent("""\
    pipelines:
      t:
        dataset: {source: builtin, name: digits, seed: 3}
        models:
          - {name: r10, backbone: resnet10t, img_size: 32, train: {epochs: 1, checkpoints: [0, 1]}}
        elements: {images_per_class: 2, grid: 2}
        extract: {batch_size: 50, block_rows: 128}
        store: cache
        results: results
    """)


class _Stop(Exception):
    """Raised by the stand-ins once they have been called: the test needs nothing further."""


@pytest.fixture
def cfg(tmp_path: Path):
    (tmp_path / "pipelines.yaml").write_text(TRAINED)
    return load_pipeline(tmp_path / "pipelines.yaml", "t")


@pytest.fixture
def calls(monkeypatch) -> list:
    """Stand in for training and for waiting on it, recording which one a shard calls."""
    seen: list = []

    def trainer(**kw):
        seen.append(("train", kw))
        raise _Stop

    def waiter(**kw):
        seen.append(("wait", kw))
        raise _Stop

    monkeypatch.setattr(train, "train_backbone", trainer)
    monkeypatch.setattr(train, "wait_for_training", waiter)
    return seen


@pytest.mark.parametrize(("shard", "expected"), [(None, "train"), ((0, 2), "train"), ((1, 2), "wait"),
                                                  ((2, 3), "wait")])
def test_only_the_coordinator_trains(cfg, calls, shard, expected):
    with pytest.raises(_Stop):
        extract_pipeline(cfg, shard=shard)
    assert [c for c, _ in calls] == [expected]
    kw = calls[0][1]
    assert kw["out_dir"] == cfg.checkpoint_dir("r10")
    if expected == "wait":
        assert kw["timeout"] == 600  # as long as the shard then waits for its store (ExtractOptions)


def test_the_wait_is_the_pipelines_extract_wait_seconds(tmp_path, calls):
    # Training takes longer than a store's creation: a pipeline whose shards start together sets it.
    (tmp_path / "pipelines.yaml").write_text(TRAINED.replace("block_rows: 128}", "block_rows: 128, wait_seconds: 7200}"))
    with pytest.raises(_Stop):
        extract_pipeline(load_pipeline(tmp_path / "pipelines.yaml", "t"), shard=(1, 2))
    assert [c for c, _ in calls] == ["wait"] and calls[0][1]["timeout"] == 7200


def test_a_shard_that_waits_in_vain_names_the_model_and_touches_nothing(cfg):
    from iis.extract.datasets import load_dataset

    out = cfg.checkpoint_dir("r10")
    out.mkdir(parents=True)
    (out / "e0.safetensors").write_bytes(b"an older run's")
    dataset = load_dataset(source="builtin", name="digits", seed=3)
    with pytest.raises(TimeoutError) as info:
        train_pipeline_model(cfg, "r10", dataset=dataset, device="cpu", shard=(1, 2), wait_seconds=0)
    text = str(info.value)
    assert "'t/r10'" in text and str(out) in text and "shard 0 (the coordinator) trains it" in text
    assert [p.name for p in out.iterdir()] == ["e0.safetensors"]
    assert (out / "e0.safetensors").read_bytes() == b"an older run's"
