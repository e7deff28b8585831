"""One stage-2 task (iis.analyze.tasks.run_task) on a small synthetic store, in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from iis.analyze import tasks
from iis.analyze.store import FeatureStore
from iis.analyze.tasks import TaskSpec, run_task
from iis.extract import store as st

DIM, CLASSES = 24, 4
SIZES = {"train": 1200, "val": 300, "test": 400}


def _store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    means = rng.normal(size=(CLASSES, DIM)) * 0.8
    group = st.create_store(path, split_sizes=SIZES, feature_dim=DIM, block_rows=256,
                            elements=st.ElementProvenance(
                                source_id=np.array(["train/0"] * 8), source_index=np.zeros(8, dtype=np.int64),
                                label=np.arange(8) % CLASSES, box=np.tile([0, 0, 4, 4], (8, 1)),
                                kind=np.array(["grid"] * 8), segment=np.full(8, -1)),
                            attrs={"model": "m", "dataset": "synthetic", "backbone": "planted", "weights": "random",
                                   "classes": [f"c{i}" for i in range(CLASSES)]})
    for split, n in SIZES.items():
        labels = rng.integers(0, CLASSES, n)
        columns = {"features": (means[labels] + rng.normal(size=(n, DIM))).astype(np.float16), "labels": labels,
                   "ids": np.array([f"{split}/{i}" for i in range(n)]), "valid": np.ones(n, dtype=bool)}
        for b in range(st.num_blocks(n, 256)):
            span = st.block_slice(b, rows=n, block_rows=256)
            st.write_block(group, split, b, **{k: v[span] for k, v in columns.items()})
    features = (means[np.arange(8) % CLASSES] + 0.3 * rng.normal(size=(8, DIM))).astype(np.float16)
    st.write_block(group, st.ELEMENTS, 0, features=features)
    assert st.finalize_store(group, path)
    return path


def test_standard_head_holds_train_within_the_budget_and_streams_beyond(tmp_path, monkeypatch):
    path = _store(tmp_path / "m.zarr")
    reads: list[str] = []
    original = FeatureStore.read_split

    def spy(self, split, **kwargs):
        reads.append(split)
        return original(self, split, **kwargs)

    monkeypatch.setattr(FeatureStore, "read_split", spy)
    seen_train = []
    original_fit = tasks.fit_heads

    def fit_spy(**kwargs):
        seen_train.append(kwargs["train"][0])
        return original_fit(**kwargs)

    monkeypatch.setattr(tasks, "fit_heads", fit_spy)
    spec = dict(store=str(path), library="standard", seed=0, num_concepts=0, ratios=(0.0,), bootstrap=0)
    # The store is float16: held as stored, 2 bytes a feature.
    held = run_task(TaskSpec(**spec, memory_budget=2 * SIZES["train"] * DIM))  # exactly fits
    assert "train" in reads
    assert seen_train[-1].dtype == torch.float16 and tuple(seen_train[-1].shape) == (SIZES["train"], DIM)
    reads.clear()
    streamed = run_task(TaskSpec(**spec, memory_budget=2 * SIZES["train"] * DIM - 1))  # one byte short
    assert "train" not in reads
    # Held in float16 or in float32, the values and so the head are the same, bit for bit.
    monkeypatch.setattr(FeatureStore, "read_split", lambda self, split, **kw: original(self, split, **{
        **kw, "stored_dtype": False}))
    as_float32 = run_task(TaskSpec(**spec, memory_budget=2 * SIZES["train"] * DIM))
    assert seen_train[-1].dtype == torch.float32
    same = ("val_top1", "test_top1", "test_top5", "inverse_l2", "learning_rate", "n_train")
    assert [{k: r[k] for k in same} for r in as_float32.accuracy_rows] == [{k: r[k] for k in same}
                                                                          for r in held.accuracy_rows]
    np.testing.assert_array_equal(as_float32.test_correct, held.test_correct)
    held_top1, streamed_top1 = held.accuracy_rows[0]["test_top1"], streamed.accuracy_rows[0]["test_top1"]
    assert held_top1 > 0.6  # chance is 0.25
    # Streaming shuffles within chunks, holding shuffles all rows: the same model, another batch order.
    assert abs(held_top1 - streamed_top1) < 0.03
    assert held.accuracy_rows[0]["n_train"] == streamed.accuracy_rows[0]["n_train"] == SIZES["train"]
    # The default budget is a share of this machine's RAM: far above this store.
    assert tasks.memory_budget(None) > 2 * SIZES["train"] * DIM


@pytest.mark.parametrize("protocol", ["default", "fixed-scale"])
def test_fixed_scale_protocol_reaches_the_heads(tmp_path, protocol):
    path = _store(tmp_path / "m.zarr")
    result = run_task(TaskSpec(store=str(path), library="prototype", seed=0, num_concepts=8, ratios=(0.0, 0.5),
                               bootstrap=0, protocol=protocol, library_dir=str(tmp_path / "libs")))
    from iis.analyze.artifacts import load_library

    _, heads = load_library(Path(result.concept_rows[0]["library_file"]))
    assert (heads.input_scale is not None) == (protocol == "default")
    assert heads.protocol == protocol and f"-{protocol}" in result.concept_rows[0]["library_file"]
    assert {row["protocol"] for row in result.accuracy_rows} == {protocol}


def test_memory_budget_flag_reaches_every_task(tmp_path, monkeypatch):
    from iis.analyze import pipeline

    from iis.cli import main

    path = _store(tmp_path / "m.zarr")
    seen: list[TaskSpec] = []

    def capture(specs, options):
        seen.extend(specs)
        raise KeyboardInterrupt  # stop before fitting: the specs are what is checked

    monkeypatch.setattr(pipeline, "run_tasks", capture)
    rc = main(["analyze", "--store", str(path), "--results", str(tmp_path / "r"), "--libraries", "prototype",
               "--num-concepts", "4", "--synchronous", "--memory-budget-mb", "3"])
    assert rc == 130 and seen and {s.memory_budget for s in seen} == {3 * 2**20}
    assert main(["analyze", "--store", str(path), "--results", str(tmp_path / "r"), "--memory-budget-mb", "0"]) == 2
