"""A small seeded backbone trainer: a timm model on a dataset's train split, checkpoints at chosen epochs.

Each checkpoint (``e{epoch}.safetensors``, the full state dict with the classifier) loads through
``create_backbone(weights=<path>)`` like any other weights file, so a checkpoint along training is a
model of its own. The same loop fine-tunes with an extra loss on the pooled features (the
interpretability term of METHOD.md, application 1).

On CPU with ``num_workers=0`` a run is a function of its seeds: shuffling uses a seeded
``torch.Generator`` per epoch, every sample's augmentation is seeded by (seed, epoch, index), and
dropout-like randomness draws from a forked, seeded global RNG. Unreadable images are skipped, never
replaced by others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from iis.extract.backbones import _ToRGB, create_backbone, image_transform
from iis.extract.datasets import ImageDataset, ImageLoadError
from iis.extract.runner import ExtractOptions, autocast, resolve_device
from safetensors.torch import load_file, save_file
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from iis.progress import progress
from iis.store_format import atomic_file

log = logging.getLogger(__name__)

ExtraLoss = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(z: (B, D) pooled pre-logits, y: (B,) int64 labels, global step) -> scalar added to CE(h(z), y)."""

_RECORD = "train.json"
_SCHEMA = 1
# Options that change how fast a run goes, not what it computes; a rerun may differ in them.
_RUNTIME_ONLY = ("num_workers", "device", "checkpoints")


@dataclass(frozen=True)
class TrainOptions:
    """How to train; recorded in ``train.json`` and compared on a rerun."""

    epochs: int  # passes over the train split
    checkpoints: tuple[int, ...]  # epochs after which to save; 0 = the initial weights
    lr: float = 2e-3  # AdamW peak learning rate (after warmup), cosine-decayed to 0 over all steps
    weight_decay: float = 0.05  # AdamW decoupled decay of weights with ndim >= 2 (not biases, norms)
    batch_size: int = 128  # images per step; the last partial batch of an epoch is dropped
    seed: int = 0  # shuffling, augmentation and in-model randomness (dropout, drop-path)
    warmup_epochs: float = 0.0  # linear warmup length, in epochs (fractions allowed)
    # Stop after this many optimizer steps: a budget below whole epochs (the last epoch is cut
    # short and the schedule spans these steps). None: every step of every epoch.
    max_steps: int | None = None
    num_workers: int = 0  # DataLoader workers; results do not depend on it
    device: str = "auto"  # cpu, cuda, cuda:N or auto

    def __post_init__(self) -> None:
        checkpoints = tuple(int(c) for c in self.checkpoints)
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not checkpoints or len(set(checkpoints)) != len(checkpoints):
            raise ValueError(f"checkpoints must be a non-empty list of distinct epochs, got {self.checkpoints}")
        outside = [c for c in checkpoints if not 0 <= c <= self.epochs]
        if outside:
            raise ValueError(f"checkpoints {outside} lie outside 0..epochs={self.epochs}")
        if self.lr <= 0 or self.weight_decay < 0 or self.batch_size < 1 or self.warmup_epochs < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, batch_size >= 1, warmup_epochs >= 0: {self}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        object.__setattr__(self, "checkpoints", tuple(sorted(checkpoints)))


@dataclass
class TrainResult:
    """What a training run produced (or what an earlier, identical run produced)."""

    checkpoints: dict[int, Path]  # epoch -> checkpoint file (.safetensors)
    train_loss: list[float]  # mean training loss (CE + extra) per epoch, epochs 1..E
    val_top1: list[float]  # standard-head val top-1 per epoch, epochs 1..E
    seconds: float  # wall time of the training run
    skipped: bool = False  # True when an earlier run's checkpoints were reused


def checkpoint_path(out_dir: Path, epoch: int) -> Path:
    """The checkpoint file of ``epoch`` under ``out_dir``."""
    return Path(out_dir) / f"e{epoch}.safetensors"


def load_checkpoint_into(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint written by :func:`train_backbone` into ``model`` exactly (strict, every key)."""
    model.load_state_dict(load_file(str(path)), strict=True)


def train_transform(data_config: dict) -> Callable:
    """Light training augmentation: random resized crop (scale 0.8-1, no flips, no colour or auto-augment).

    Digits must not be mirrored, so there is no flip. Accepts mode ``"L"`` or ``"RGB"``; returns
    (3, H, W) float32, normalised like :func:`iis.extract.backbones.image_transform`.
    """
    tf = create_transform(
        input_size=data_config["input_size"], is_training=True, scale=(0.8, 1.0), hflip=0.0,
        color_jitter=None, auto_augment=None, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"],
    )
    return transforms.Compose([_ToRGB(), tf])


# --------------------------------------------------------------------------------------------------
# Data


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _Rows(Dataset):
    """Samples of one split keyed by ``(epoch, index)``; an unreadable image yields ``None``.

    With ``seed`` set, each sample's transform runs under RNGs seeded by (seed, epoch, index), so
    augmentation does not depend on worker count or batch order.
    """

    def __init__(self, dataset: ImageDataset, split: str, transform: Callable, seed: int | None):
        self.dataset, self.split, self.transform, self.seed = dataset, split, transform, seed
        self.labels = dataset.splits[split].labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        epoch, index = key
        try:
            image = self.dataset.load(self.split, index)
        except ImageLoadError as err:
            # Warn once per sample (in the first pass), not every epoch.
            log.log(logging.WARNING if epoch <= 1 else logging.DEBUG, "skipping %s[%d]: %s",
                    self.split, index, err)
            return None
        if self.seed is None:
            return self.transform(image), int(self.labels[index])
        sample_seed = _derive_seed(self.seed, 1, epoch, index)
        state = random.getstate()  # timm's crop draws from Python's random, torchvision's from torch
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(sample_seed)
                # The CPU generator only: torch.manual_seed also queues a seed for every lazy
                # accelerator module, formatting a stack trace each time (1 ms an image on CPU).
                torch.random.default_generator.manual_seed(sample_seed)
                return self.transform(image), int(self.labels[index])
        finally:
            random.setstate(state)


class _EpochOrder(Sampler[tuple[int, int]]):
    """``(epoch, index)`` keys: a seeded permutation per epoch for training, or in order."""

    def __init__(self, size: int, *, seed: int | None):
        self.size, self.seed, self.epoch = size, seed, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.seed is None:
            order = range(self.size)
        else:
            generator = torch.Generator().manual_seed(_derive_seed(self.seed, 0, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        return ((self.epoch, i) for i in order)

    def __len__(self) -> int:
        return self.size


def _collate_readable(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; returns (images, labels, number skipped)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), len(batch)
    images = torch.stack([x for x, _ in kept])
    labels = torch.tensor([y for _, y in kept], dtype=torch.int64)
    return images, labels, len(batch) - len(kept)


def _loader(rows: _Rows, sampler: _EpochOrder, *, batch_size: int, drop_last: bool, num_workers: int,
            device: torch.device) -> DataLoader:
    return DataLoader(rows, sampler=sampler, batch_size=batch_size, drop_last=drop_last,
                      collate_fn=_collate_readable, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


# --------------------------------------------------------------------------------------------------
# Model, schedule, checkpoints


def _build_model(*, backbone: str, weights: str | Path, img_size: int | None, init_seed: int,
                 num_classes: int) -> tuple[torch.nn.Module, dict, str]:
    """The stage-1 backbone with a fresh ``num_classes`` classifier, seeded by ``init_seed``.

    Returns (model, data_config, weights_sha256 of the initial backbone).
    """
    made = create_backbone(backbone=backbone, weights=weights, img_size=img_size, seed=init_seed)
    model = made.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model.reset_classifier(num_classes)
    return model, made.data_config, made.weights_sha256


def _param_groups(model: torch.nn.Module, extra: Sequence[torch.nn.Parameter], weight_decay: float,
                  extra_lr: float | None = None) -> list:
    """AdamW groups: weight decay on matrices only; ``extra`` in a group of its own at ``extra_lr``
    (no decay) when that is given, else with the model's parameters."""
    params = [p for p in model.parameters() if p.requires_grad] + (list(extra) if extra_lr is None else [])
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if extra_lr is not None and extra:
        groups.append({"params": list(extra), "weight_decay": 0.0, "lr": extra_lr})
    return groups


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor at step t: linear warmup to 1, then half a cosine down to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    # Clones break storage sharing (safetensors refuses shared tensors) and drop channels-last.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt"}  # one key only: safetensors writes its metadata map in no fixed order
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def _pre_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(images), pre_logits=True)


@torch.inference_mode()
def _top1(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 of the model's own classifier over the readable samples (NaN when none are)."""
    correct = seen = 0
    for images, labels, _ in loader:
        if len(labels) == 0:
            continue
        images = _to_device(images, device)
        with autocast(device):
            logits = model(images)
        correct += int((logits.argmax(dim=1).cpu() == labels).sum())
        seen += len(labels)
    return correct / seen if seen else float("nan")


def _train_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device,
                 extra_loss: ExtraLoss | None, step: int, desc: str, stop: int) -> tuple[float, int, int, int]:
    """One pass over ``loader``, ended early at global step ``stop``. Returns (mean loss, images
    trained on, unreadable skipped, next step)."""
    head = model.get_classifier()
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
    seen = skipped = 0
    for images, labels, unreadable in progress(loader, desc=desc, unit="batch", logger=log, final=False, leave=False):
        if step >= stop:
            break
        skipped += unreadable
        if len(labels) < 2:  # batch norm cannot train on a single sample
            continue
        images = _to_device(images, device)
        labels = labels.to(device, non_blocking=True)
        with autocast(device):
            z = _pre_logits(model, images)
            loss = F.cross_entropy(head(z).float(), labels)
            if extra_loss is not None:
                loss = loss + extra_loss(z, labels, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        loss_sum += loss.detach().float() * len(labels)
        seen += len(labels)
    return (float(loss_sum) / seen if seen else float("nan")), seen, skipped, step


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------
# Rerun records


def _dataset_digest(dataset: ImageDataset) -> str:
    digest = hashlib.sha256()
    for split in ("train", "val"):
        s = dataset.splits[split]
        digest.update(split.encode())
        digest.update("\n".join(map(str, s.ids)).encode())
        digest.update(np.asarray(s.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _settings(*, dataset: ImageDataset, backbone: str, weights: str | Path, weights_sha256: str,
              img_size: int | None, init_seed: int, options: TrainOptions,
              extra_config: Mapping[str, Any] | None, extra_loss: ExtraLoss | None,
              extra_lr: float | None = None) -> dict:
    """Everything that determines the checkpoints' values; a rerun with equal settings is skipped."""
    extra = None
    if extra_loss is not None:
        extra = dict(extra_config) if extra_config is not None else {
            "callable": getattr(extra_loss, "__qualname__", type(extra_loss).__qualname__)}
        if extra_lr is not None:  # unset is left out, so records written before it existed still match
            extra["extra_lr"] = extra_lr
    # max_steps unset is left out, so records written before it existed still match.
    opts = {k: v for k, v in asdict(options).items()
            if k not in _RUNTIME_ONLY and not (k == "max_steps" and v is None)}
    settings = {
        # A file is known by its digest, so a moved or re-spelled path still matches.
        "backbone": backbone, "weights": weights if weights in ("random", "pretrained") else "file",
        "weights_sha256": weights_sha256,
        "img_size": img_size, "init_seed": init_seed, "dataset": dataset.name,
        "classes": list(dataset.classes), "splits_sha256": _dataset_digest(dataset),
        "options": opts, "extra_loss": extra,
    }
    return json.loads(json.dumps(settings))  # as it reads back from train.json


def _recorded(out_dir: Path, settings: dict, epochs: Sequence[int]) -> tuple[TrainResult | None, str]:
    """The finished result in ``out_dir`` if it was made with ``settings`` and has every checkpoint
    (``train.json``, written last, marks a run finished); else None and why not."""
    record_path = out_dir / _RECORD
    if not record_path.is_file():
        return None, f"no {_RECORD}"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return None, f"unreadable {_RECORD} ({err})"
    if record.get("schema_version") != _SCHEMA or record.get("settings") != settings:
        return None, f"it was made with other settings ({_RECORD})"
    missing = [e for e in epochs if str(e) not in record["checkpoints"] or not checkpoint_path(out_dir, e).is_file()]
    if missing:
        return None, f"it lacks checkpoint(s) of epoch(s) {missing}"
    return TrainResult(checkpoints={e: checkpoint_path(out_dir, e) for e in epochs},
                       train_loss=record["train_loss"], val_top1=record["val_top1"],
                       seconds=record["seconds"], skipped=True), ""


def _reuse(out_dir: Path, settings: dict, epochs: Sequence[int]) -> TrainResult | None:
    """The earlier result in ``out_dir`` if it was made with ``settings`` and has every checkpoint."""
    result, why = _recorded(out_dir, settings, epochs)
    if result is not None:
        log.info("%s: checkpoints %s exist with the same settings; not training again", out_dir, list(epochs))
    elif (out_dir / _RECORD).is_file():
        level = logging.WARNING if why.startswith("unreadable") else logging.INFO
        log.log(level, "%s: %s; training again", out_dir, why)
    return result


def _write_record(out_dir: Path, record: dict) -> None:
    with atomic_file(out_dir / _RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------


def train_backbone(
    *,
    dataset: ImageDataset,
    backbone: str,
    weights: str | Path,
    img_size: int | None,
    init_seed: int,
    options: TrainOptions,
    out_dir: Path,
    extra_loss: ExtraLoss | None = None,
    extra_params: Sequence[torch.nn.Parameter] = (),
    extra_lr: float | None = None,
    extra_config: Mapping[str, Any] | None = None,
    on_train_start: Callable[[torch.nn.Module], None] | None = None,
    on_epoch_end: Callable[[int, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``backbone`` with a fresh linear classifier on ``dataset``'s train split.

    The loss is ``CE(h(z), y) + extra_loss(z, y, step)`` with ``z = (B, D)`` the pooled pre-logit
    features and ``h`` the model's classifier. AdamW over the model's parameters and
    ``extra_params`` (moved in place to the training device), cosine schedule over all steps.

    Args:
        backbone, weights, img_size, init_seed: as for :func:`iis.extract.backbones.create_backbone`;
            ``init_seed`` also seeds the new classifier.
        options: see :class:`TrainOptions`. Epoch 0 is the initial weights, before any step.
        out_dir: receives ``e{epoch}.safetensors`` for each of ``options.checkpoints`` and
            ``train.json``. When ``train.json`` records the same settings (runtime-only options
            aside) and every requested checkpoint exists, nothing is trained and the earlier
            result is returned (and no callback runs); otherwise earlier checkpoints in
            ``out_dir`` are removed first. One process trains into ``out_dir`` at a time; others
            wait for it with :func:`wait_for_training`.
        extra_loss: called inside the forward pass (under autocast on CUDA) with the global step,
            counted from 0.
        extra_lr: peak learning rate of ``extra_params`` (their own group, no weight decay, the
            same schedule); None: ``options.lr``, as the model's. A head learnt from scratch
            beside a fine-tuned backbone needs a larger rate than the backbone's.
        extra_config: a JSON-able description of ``extra_loss`` (e.g. its weight), recorded and
            compared on a rerun; by default the callable's qualified name.
        on_train_start: called once with the model (train mode, on the device) before the first
            step, e.g. to keep a handle for re-embedding a concept library during training.
        on_epoch_end: called after epochs 1..E (after that epoch's checkpoint) with the model in
            eval mode; training resumes in train mode afterwards.

    Returns:
        The checkpoints written, per-epoch mean loss and val top-1, and the wall time.
    """
    out_dir = Path(out_dir)
    model, data_config, weights_sha256 = _build_model(
        backbone=backbone, weights=weights, img_size=img_size, init_seed=init_seed,
        num_classes=len(dataset.classes))
    settings = _settings(dataset=dataset, backbone=backbone, weights=weights, weights_sha256=weights_sha256,
                         img_size=img_size, init_seed=init_seed, options=options,
                         extra_config=extra_config, extra_loss=extra_loss, extra_lr=extra_lr)
    reused = _reuse(out_dir, settings, options.checkpoints)
    if reused is not None:
        return reused
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _RECORD).unlink(missing_ok=True)
    for stale in out_dir.glob("e*.safetensors"):
        stale.unlink()

    device = resolve_device(options.device)
    # Channels-last on every device (as extraction: on CPU a MobileNetV3 trains 2.4x faster).
    model = model.to(device).to(memory_format=torch.channels_last)
    for p in extra_params:
        p.data = p.data.to(device)

    train_rows = _Rows(dataset, "train", train_transform(data_config), seed=options.seed)
    order = _EpochOrder(len(train_rows), seed=options.seed)
    # Dropping the last partial batch keeps batch norm away from a batch of one.
    train_loader = _loader(train_rows, order, batch_size=options.batch_size,
                           drop_last=len(train_rows) >= options.batch_size,
                           num_workers=options.num_workers, device=device)
    val_rows = _Rows(dataset, "val", image_transform(data_config), seed=None)
    val_loader = _loader(val_rows, _EpochOrder(len(val_rows), seed=None), batch_size=options.batch_size,
                         drop_last=False, num_workers=options.num_workers, device=device)

    steps_per_epoch = len(train_loader)
    total_steps = max(1, options.epochs * steps_per_epoch)
    if options.max_steps is not None:
        if options.epochs and math.ceil(options.max_steps / max(1, steps_per_epoch)) < options.epochs:
            raise ValueError(f"max_steps {options.max_steps} ends training before epoch {options.epochs} "
                             f"({steps_per_epoch} steps per epoch); lower epochs or raise max_steps")
        total_steps = min(total_steps, options.max_steps)
    optimizer = torch.optim.AdamW(_param_groups(model, extra_params, options.weight_decay, extra_lr), lr=options.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, round(options.warmup_epochs * steps_per_epoch)))
    log.info("train %s on %s: %d images, %d steps/epoch x %d epochs%s, device %s, checkpoints %s -> %s",
             backbone, dataset.name, len(train_rows), steps_per_epoch, options.epochs,
             f" (stopping after {total_steps} steps)" if options.max_steps is not None else "", device,
             list(options.checkpoints), out_dir)

    written: dict[int, Path] = {}
    losses: list[float] = []
    val_top1: list[float] = []
    skipped_images = 0
    start = time.perf_counter()

    def save(epoch: int) -> None:
        if epoch in options.checkpoints:
            written[epoch] = checkpoint_path(out_dir, epoch)
            _save_checkpoint(model, written[epoch])

    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(options.seed)
        save(0)
        model.train()
        if on_train_start is not None:
            on_train_start(model)
        step = 0
        for epoch in range(1, options.epochs + 1):
            order.epoch = epoch
            epoch_start = time.perf_counter()
            mean_loss, seen, skipped, step = _train_epoch(
                model, train_loader, optimizer, scheduler, device=device, extra_loss=extra_loss, step=step,
                desc=f"train {backbone} e{epoch}/{options.epochs}", stop=total_steps)
            skipped_images += skipped
            if not math.isfinite(mean_loss):
                raise RuntimeError(f"training {backbone}: epoch {epoch} mean loss is {mean_loss}")
            losses.append(mean_loss)
            model.eval()
            val_top1.append(_top1(model, val_loader, device))
            save(epoch)
            log.info("epoch %d/%d: loss %.4f, val top-1 %.4f, %.0f img/s", epoch, options.epochs,
                     mean_loss, val_top1[-1], seen / (time.perf_counter() - epoch_start))
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
            model.train()
    seconds = time.perf_counter() - start
    if skipped_images:
        log.warning("skipped %d unreadable train image reads over %d epochs", skipped_images, options.epochs)

    _write_record(out_dir, {
        "format": "iis-train",
        "schema_version": _SCHEMA,
        "settings": settings,
        "options": asdict(options),
        "device": str(device),
        "checkpoints": {str(e): p.name for e, p in written.items()},
        "train_loss": losses,
        "val_top1": val_top1,
        "seconds": seconds,
        "skipped_image_reads": skipped_images,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "versions": {"torch": torch.__version__.split("+")[0], "timm": timm.__version__},
    })
    return TrainResult(checkpoints=written, train_loss=losses, val_top1=val_top1, seconds=seconds)


def wait_for_training(
    *,
    dataset: ImageDataset,
    backbone: str,
    weights: str | Path,
    img_size: int | None,
    init_seed: int,
    options: TrainOptions,
    out_dir: Path,
    timeout: float = ExtractOptions.wait_seconds,
    poll: float = 2.0,
    name: str | None = None,
) -> TrainResult:
    """Wait for another process's :func:`train_backbone` with the same arguments to finish in
    ``out_dir``; used by the extraction shards other than the coordinator, which alone trains.

    Nothing in ``out_dir`` is written or removed. Finished means what lets a rerun skip training:
    ``train.json`` records these settings and every checkpoint of ``options.checkpoints`` exists.

    Args:
        dataset, backbone, weights, img_size, init_seed, options, out_dir: as for
            :func:`train_backbone` (without an extra loss, as the pipeline trains).
        timeout: seconds to wait (by default as long as a shard waits for its store);
            ``poll``: seconds between looks.
        name: the model's name in messages (default: ``backbone``).

    Raises:
        TimeoutError: not finished within ``timeout``; the message names the model, ``out_dir``
            and what is missing.
    """
    out_dir = Path(out_dir)
    _, _, weights_sha256 = _build_model(backbone=backbone, weights=weights, img_size=img_size,
                                        init_seed=init_seed, num_classes=len(dataset.classes))
    settings = _settings(dataset=dataset, backbone=backbone, weights=weights, weights_sha256=weights_sha256,
                         img_size=img_size, init_seed=init_seed, options=options,
                         extra_config=None, extra_loss=None)
    deadline = time.monotonic() + timeout
    logged = False
    while True:
        result, why = _recorded(out_dir, settings, options.checkpoints)
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"model {name or backbone!r}: its training in {out_dir} did not finish within {timeout:.0f} s "
                f"({why}); shard 0 (the coordinator) trains it: let it finish, then rerun this shard")
        if not logged:
            log.info("%s: waiting for shard 0 to train %s (%s)", out_dir, name or backbone, why)
            logged = True
        time.sleep(poll)
