"""The backbone trainer: learning, exact checkpoints, determinism, the extra loss, reruns, bad images."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from iis.extract.backbones import create_backbone, state_dict_sha256
from iis.extract.datasets import ImageDataset, Split, load_dataset
from iis.extract.train import (
    TrainOptions,
    _param_groups,
    checkpoint_path,
    load_checkpoint_into,
    train_backbone,
    train_transform,
    wait_for_training,
)
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

NAME = "resnet10t"
SIZE = 32
INIT_SEED = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Runs compared with each other share a thread count; one thread also keeps the module fast
    # when the CPU is shared (two OpenMP threads on a busy core pair slow down tenfold).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _subset(dataset: ImageDataset, n: int) -> ImageDataset:
    """The first ``n`` train samples (all ten classes occur among them); val and test unchanged."""
    train = dataset.splits["train"]
    splits = dict(dataset.splits, train=Split(ids=train.ids[:n], labels=train.labels[:n]))
    positions = dict(dataset.positions, train=dataset.positions["train"][:n])
    return replace(dataset, splits=splits, positions=positions)


@pytest.fixture(scope="module")
def digits(one_thread) -> ImageDataset:
    return load_dataset(source="builtin", name="digits")


def _probe() -> torch.Tensor:
    return torch.linspace(-2, 2, 4 * 3 * SIZE * SIZE).reshape(4, 3, SIZE, SIZE)


def _pre_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _train(dataset, out_dir, **kw):
    options = kw.pop("options", TrainOptions(epochs=1, checkpoints=(1,), batch_size=16, lr=1e-2))
    return train_backbone(dataset=dataset, backbone=kw.pop("backbone", NAME), weights="random", img_size=SIZE,
                          init_seed=kw.pop("init_seed", INIT_SEED), options=options, out_dir=out_dir, **kw)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """Three epochs on 512 digits, checkpoints 0, 1, 3; the final model's state and outputs kept."""
    out = tmp_path_factory.mktemp("trained")
    seen: dict = {}

    def keep(epoch: int, model: torch.nn.Module) -> None:
        seen.setdefault("epochs", []).append(epoch)
        seen["training"] = model.training
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["pre_logits"] = _pre_logits(model, _probe())
        seen["logits"] = model(_probe()).detach()

    options = TrainOptions(epochs=3, checkpoints=(3, 0, 1), batch_size=64, lr=2e-3)
    result = _train(_subset(digits, 512), out, options=options, on_epoch_end=keep)
    return result, out, seen, options


@pytest.fixture(scope="module")
def small(digits):
    return _subset(digits, 128)


@pytest.fixture(scope="module")
def small_plain(small, tmp_path_factory):
    """One epoch on 128 digits, no extra loss: the reference for determinism and the extra loss."""
    out = tmp_path_factory.mktemp("plain")
    return _train(small, out), out


def test_loss_falls_and_the_head_learns(trained):
    result, _, seen, _ = trained
    assert len(result.train_loss) == len(result.val_top1) == 3 and seen["epochs"] == [1, 2, 3]
    assert result.train_loss[-1] < 0.5 * result.train_loss[0]
    assert result.val_top1[-1] > 0.5  # ten classes: chance is 0.1
    assert not seen["training"]  # on_epoch_end sees the model in eval mode


def test_checkpoints_exactly_the_listed_epochs(trained):
    result, out, _, _ = trained
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["e0.safetensors", "e1.safetensors", "e3.safetensors"]
    assert result.checkpoints == {e: checkpoint_path(out, e) for e in (0, 1, 3)}
    record = json.loads((out / "train.json").read_text())
    assert record["train_loss"] == result.train_loss and record["val_top1"] == result.val_top1
    assert record["versions"] == {"torch": torch.__version__.split("+")[0], "timm": timm.__version__}
    assert record["options"]["checkpoints"] == [0, 1, 3] and record["settings"]["init_seed"] == INIT_SEED
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temp files behind


def test_checkpoint_reloads_bit_exactly(trained):
    result, _, seen, _ = trained
    fresh = timm.create_model(NAME, num_classes=10).eval()
    load_checkpoint_into(fresh, result.checkpoints[3])
    fresh = fresh.to(memory_format=torch.channels_last)  # as trained: the same layout gives the same bits
    state = fresh.state_dict()
    assert state.keys() == seen["state"].keys() and "fc.weight" in state
    assert all(torch.equal(state[k], seen["state"][k]) for k in state)
    with torch.no_grad():
        assert torch.equal(fresh(_probe()), seen["logits"])


def test_stage1_loads_a_checkpoint_as_the_trained_features(trained):
    result, _, seen, _ = trained
    backbone = create_backbone(backbone=NAME, weights=str(result.checkpoints[3]), img_size=SIZE, seed=99)
    with torch.no_grad():  # channels-last, as extraction runs it
        features = backbone.model.to(memory_format=torch.channels_last)(_probe())
    assert features.shape == (4, backbone.feature_dim)
    assert torch.equal(features, seen["pre_logits"])


def test_epoch0_is_the_initial_random_backbone(trained):
    result, _, _, _ = trained
    initial = create_backbone(backbone=NAME, weights="random", img_size=SIZE, seed=INIT_SEED)

    def sha(path: Path) -> str:
        return state_dict_sha256(create_backbone(backbone=NAME, weights=str(path), img_size=SIZE, seed=0).model)

    assert sha(result.checkpoints[0]) == initial.weights_sha256
    assert sha(result.checkpoints[3]) != initial.weights_sha256


def test_same_seed_same_bytes_other_seed_other_bytes(small, small_plain, tmp_path):
    _, plain_dir = small_plain
    again = _train(small, tmp_path / "again")
    other = _train(small, tmp_path / "other", options=TrainOptions(epochs=1, checkpoints=(1,), batch_size=16, lr=1e-2, seed=1))
    reference = checkpoint_path(plain_dir, 1).read_bytes()
    assert again.checkpoints[1].read_bytes() == reference
    assert other.checkpoints[1].read_bytes() != reference


def test_worker_processes_do_not_change_the_result(small, small_plain, tmp_path):
    _, plain_dir = small_plain
    options = TrainOptions(epochs=1, checkpoints=(1,), batch_size=16, lr=1e-2, num_workers=2)
    workers = _train(small, tmp_path, options=options)
    assert workers.checkpoints[1].read_bytes() == checkpoint_path(plain_dir, 1).read_bytes()


def test_extra_loss_sees_pre_logits_and_trains_the_backbone(small, small_plain, tmp_path):
    _, plain_dir = small_plain
    calls: list[tuple[tuple, int, int, float]] = []
    target = torch.nn.Parameter(torch.zeros(()))

    def shrink(z: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        calls.append((tuple(z.shape), len(y), step, float(z.detach().norm(dim=1).mean())))
        return 10.0 * z.pow(2).sum(dim=1).mean() + (target - 3.0).pow(2)

    result = _train(small, tmp_path, extra_loss=shrink, extra_params=[target],
                    extra_config={"kind": "shrink", "weight": 10.0})
    assert [c[2] for c in calls] == list(range(128 // 16))
    assert all(shape == (16, 512) and n == 16 for shape, n, _, _ in calls)
    # Pushing z to zero shrinks it within one epoch (plain training keeps its norm within a few %).
    assert calls[-1][3] < 0.9 * calls[0][3]
    plain, pushed = load_file(str(checkpoint_path(plain_dir, 1))), load_file(str(result.checkpoints[1]))
    assert not torch.equal(plain["layer4.0.conv1.weight"], pushed["layer4.0.conv1.weight"])
    assert 0.0 < float(target.detach()) < 3.0  # extra_params are optimised too
    record = json.loads((tmp_path / "train.json").read_text())
    assert record["settings"]["extra_loss"] == {"kind": "shrink", "weight": 10.0}


def test_max_steps_cuts_the_last_epoch_short_and_is_recorded(small, small_plain, tmp_path):
    """A budget below one epoch (fine-tuning's `steps`): exactly that many steps, the checkpoint of
    the cut epoch is written, and the record tells it apart from a whole epoch."""
    _, plain_dir = small_plain
    steps: list[int] = []

    def count(z, y, step):
        steps.append(step)
        return z.sum() * 0.0

    options = TrainOptions(epochs=1, checkpoints=(1,), batch_size=16, lr=1e-2, max_steps=3)
    result = _train(small, tmp_path, options=options, extra_loss=count)
    assert steps == [0, 1, 2] and result.checkpoints[1].is_file()
    assert result.checkpoints[1].read_bytes() != checkpoint_path(plain_dir, 1).read_bytes()
    assert json.loads((tmp_path / "train.json").read_text())["settings"]["options"]["max_steps"] == 3
    # An unset budget is left out of the record, so records from before it existed still match.
    assert "max_steps" not in json.loads((plain_dir / "train.json").read_text())["settings"]["options"]
    with pytest.raises(ValueError, match="max_steps 3 ends training before epoch 2"):
        _train(small, tmp_path / "two", options=replace(options, epochs=2, checkpoints=(2,)))


def test_rerun_with_the_same_settings_does_not_train(trained, digits):
    result, out, _, options = trained
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    def fail(epoch, model):
        raise AssertionError("trained again")

    # Runtime-only options (device, workers) and a subset of the checkpoints still match.
    for opts in (options, replace(options, device="cpu", checkpoints=(3, 0))):
        again = _train(_subset(digits, 512), out, options=opts, on_epoch_end=fail)
        assert again.skipped and again.train_loss == result.train_loss and again.val_top1 == result.val_top1
        assert again.checkpoints == {e: checkpoint_path(out, e) for e in opts.checkpoints}
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_other_settings_train_again_and_drop_stale_checkpoints(small_plain, small, tmp_path):
    _, plain_dir = small_plain
    out = tmp_path / "copy"
    shutil.copytree(plain_dir, out)
    result = _train(small, out, init_seed=INIT_SEED + 1, options=TrainOptions(epochs=0, checkpoints=(0,)))
    assert not result.skipped and sorted(p.name for p in out.glob("*.safetensors")) == ["e0.safetensors"]
    assert json.loads((out / "train.json").read_text())["settings"]["init_seed"] == INIT_SEED + 1
    assert result.train_loss == []
    initial = create_backbone(backbone=NAME, weights="random", img_size=SIZE, seed=INIT_SEED + 1)
    reloaded = create_backbone(backbone=NAME, weights=str(result.checkpoints[0]), img_size=SIZE)
    assert state_dict_sha256(reloaded.model) == initial.weights_sha256


def _wait(dataset, out_dir, **kw):
    return wait_for_training(dataset=dataset, backbone=NAME, weights="random", img_size=SIZE,
                             init_seed=kw.pop("init_seed", INIT_SEED),
                             options=TrainOptions(epochs=1, checkpoints=(1,), batch_size=16, lr=1e-2),
                             out_dir=out_dir, name="p/r10", **kw)


def test_a_waiting_shard_touches_nothing_and_names_what_it_waits_for(small, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "e1.safetensors").write_bytes(b"stale, from an older run")  # a trainer would remove it
    with pytest.raises(TimeoutError) as info:
        _wait(small, out, timeout=0, poll=0.01)
    assert "'p/r10'" in str(info.value) and str(out) in str(info.value) and "no train.json" in str(info.value)
    assert [p.name for p in out.iterdir()] == ["e1.safetensors"]
    assert (out / "e1.safetensors").read_bytes() == b"stale, from an older run"


def test_a_waiting_shard_returns_the_coordinators_training(small_plain, small, tmp_path):
    result, plain_dir = small_plain
    out = tmp_path / "ckpt"
    out.mkdir()

    def coordinator() -> None:  # writes as the trainer does: checkpoints first, train.json last
        shutil.copy(plain_dir / "e1.safetensors", out / "e1.safetensors")
        shutil.copy(plain_dir / "train.json", out / "train.json")

    timer = threading.Timer(0.3, coordinator)
    timer.start()
    try:
        waited = _wait(small, out, timeout=60, poll=0.02)
    finally:
        timer.join()
    assert waited.skipped and waited.train_loss == result.train_loss and waited.val_top1 == result.val_top1
    assert waited.checkpoints == {1: checkpoint_path(out, 1)}
    # A finished training of other settings is not this one: the shard keeps waiting, then says so.
    with pytest.raises(TimeoutError, match=r"made with other settings \(train.json\)"):
        _wait(small, out, init_seed=INIT_SEED + 1, timeout=0.2, poll=0.02)


def test_unreadable_images_are_skipped_not_replaced(digits, tmp_path, caplog):
    root = tmp_path / "folder"
    for label in (0, 1):
        (root / str(label)).mkdir(parents=True)
        rows = np.flatnonzero(digits.splits["train"].labels == label)[:15]
        for i in rows:
            Image.fromarray(digits.images[digits.positions["train"][i]]).save(root / str(label) / f"{i}.png")
    data = load_dataset(source="imagefolder", root=root, val_fraction=0.2, test_fraction=0.1)
    bad = str(data.splits["train"].ids[3])
    (root / bad).write_bytes(b"not a png")
    labels_seen: list[int] = []

    def count(z, y, step):
        labels_seen.extend(y.tolist())
        return z.sum() * 0.0

    with caplog.at_level(logging.WARNING, logger="iis.extract.train"):
        _train(data, tmp_path / "out", backbone="test_resnet", extra_loss=count,
               options=TrainOptions(epochs=1, checkpoints=(1,), batch_size=64))
    good = np.delete(data.splits["train"].labels, 3)
    assert sorted(labels_seen) == sorted(good.tolist())  # every readable image once, the bad one never
    assert any(bad in r.getMessage() for r in caplog.records)


def test_options_are_checked_and_normalised():
    assert TrainOptions(epochs=3, checkpoints=(3, 0)).checkpoints == (0, 3)
    with pytest.raises(ValueError, match="outside"):
        TrainOptions(epochs=2, checkpoints=(3,))
    with pytest.raises(ValueError, match="distinct"):
        TrainOptions(epochs=2, checkpoints=(1, 1))
    with pytest.raises(ValueError, match="lr"):
        TrainOptions(epochs=2, checkpoints=(1,), lr=0)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        TrainOptions(epochs=1, checkpoints=(1,), max_steps=0)


def test_train_transform_never_flips_and_makes_grayscale_rgb():
    config = {"input_size": (3, SIZE, SIZE), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    tf = train_transform(config)
    steps = tf.transforms[1].transforms
    assert not any(isinstance(t, (transforms.RandomHorizontalFlip, transforms.RandomVerticalFlip,
                                  transforms.ColorJitter)) for t in steps)
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    out = tf(image)
    assert out.shape == (3, SIZE, SIZE) and torch.equal(out[0], out[1])


def test_loaded_state_has_no_foreign_keys(trained):
    result, _, _, _ = trained
    keys = set(load_file(str(result.checkpoints[0])))
    assert keys == set(timm.create_model(NAME, num_classes=10).state_dict())


def test_extra_params_get_their_own_rate_and_no_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    head = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2))]
    shared = _param_groups(model, head, weight_decay=0.05)
    assert [len(g["params"]) for g in shared] == [2, 4]  # matrices decay, vectors do not: head included
    groups = _param_groups(model, head, weight_decay=0.05, extra_lr=1e-2)
    assert [len(g["params"]) for g in groups] == [1, 3, 2]
    assert groups[2]["lr"] == 1e-2 and groups[2]["weight_decay"] == 0.0 and "lr" not in groups[0]
    optimizer = torch.optim.AdamW(groups, lr=5e-4)
    for p in (*model.parameters(), *head):
        p.grad = torch.ones_like(p)
    optimizer.step()  # Adam's first step moves each entry by about its group's rate
    assert torch.allclose(head[0], torch.full((2, 3), -1e-2), atol=1e-6)
    assert torch.allclose(model[1].bias, torch.full((3,), -5e-4), atol=1e-6)
