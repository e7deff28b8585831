"""The extraction loop: fill a store block by block, resumably, optionally as one shard of n.

Batches never straddle a block, so a block's features do not depend on which process or
which run computed it: an interrupted run resumes to the same bytes, and shards 0/n … n-1/n
together equal one unsharded run.

With ``layers`` (:func:`extract_layers`), one forward pass per batch fills one store per layer of
the model (:mod:`iis.extract.layers`); each store resumes and shards on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import platform
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from iis.extract import store as st
from iis.extract.backbones import Backbone, element_transform, image_transform, normalize_batch
from iis.extract.datasets import ImageDataset, ImageLoadError
from iis.extract.elements import ElementPlan, render_element, slic_segments_of
from iis.extract.layers import (
    FINAL,
    LayerForward,
    layer_attrs,
    layer_model_name,
    layer_store_path,
    probe_batch,
    resolve_layers,
)
from iis.extract.rowcache import RowCache, bind, cache_for
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from iis.progress import progress
from iis.store_format import BLOCK_ROWS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractOptions:
    """How to run a backbone over the data; none of these change the stored values' meaning.

    ``batch_size``, the device type and ``amp`` (on CUDA) change the values in their last bits,
    so a store records them (:func:`compute_attrs`) and a resume or a shard must use the same.

    Attributes:
        batch_size: images per forward pass (a block is cut into batches of this size).
        block_rows: rows per block and per chunk; fixed when a store is created.
        dtype: stored feature dtype, ``float16`` or ``float32``.
        num_workers: DataLoader worker processes (0 decodes in the main process).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        amp: autocast dtype on CUDA, ``bfloat16`` or ``float16``; ignored on CPU.
        shard: ``(index, count)``; shard 0 is the coordinator that creates the store.
        wait_seconds: how long a non-coordinator shard waits for the store to appear (and, in a
            pipeline, for shard 0's training of a `train:` model; `extract.wait_seconds`).
        row_cache_mb: MiB of transformed input rows kept for the next model over the same
            dataset object in this process (:mod:`iis.extract.rowcache`); None: a share of RAM;
            0: none. Used only with ``num_workers=0``.
    """

    batch_size: int = 64
    block_rows: int = BLOCK_ROWS
    dtype: str = "float16"
    num_workers: int = 0
    device: str = "auto"
    amp: str = "bfloat16"
    shard: tuple[int, int] = (0, 1)
    wait_seconds: float = 600.0
    row_cache_mb: int | None = None

    def __post_init__(self) -> None:
        # Refused here, by name, so that a bad value never reaches a DataLoader or a store.
        for name in ("batch_size", "block_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"extract {name} must be a positive integer, got {value!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"extract num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.row_cache_mb is not None and (isinstance(self.row_cache_mb, bool)
                                              or not isinstance(self.row_cache_mb, int) or self.row_cache_mb < 0):
            raise ValueError(f"extract row_cache_mb must be an integer >= 0, got {self.row_cache_mb!r}")
        if self.dtype not in st.FEATURE_DTYPES:
            raise ValueError(f"extract dtype must be one of {st.FEATURE_DTYPES}, got {self.dtype!r}")
        if self.amp not in ("bfloat16", "float16"):
            raise ValueError(f"extract amp must be bfloat16 or float16, got {self.amp!r}")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
        if self.wait_seconds < 0:
            raise ValueError(f"wait_seconds must be >= 0, got {self.wait_seconds!r}")


class _ImageRows(Dataset):
    """Rows of one split as uint8 tensors; an unreadable image yields ``valid=False``.

    With a ``cache``, readable rows are kept under (transform, split, index) for the next model.
    """

    def __init__(self, dataset: ImageDataset, split: str, transform: Callable, size: tuple[int, int, int],
                 cache: RowCache | None = None):
        self.dataset, self.split, self.transform, self.size = dataset, split, transform, size
        self.cache, self.key = bind(cache, transform)

    def __len__(self) -> int:
        return len(self.dataset.splits[self.split].labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        def make() -> torch.Tensor:
            return self.transform(self.dataset.load(self.split, index))

        try:
            row = make() if self.cache is None else self.cache.get_or_make((self.key, self.split, index), make)
        except ImageLoadError as err:
            # Never substitute another image: the row keeps its place, marked invalid.
            log.warning("invalid sample %s[%d]: %s", self.split, index, err)
            return torch.zeros(self.size, dtype=torch.uint8), False
        return row, True


class _ElementRows(Dataset):
    """Visual elements as uint8 tensors, rendered from their train source images.

    Plans come grouped by source image (:func:`~iis.extract.elements.plan_elements`), so the
    last source image and its SLIC labels are kept for the next element: each image is loaded
    and segmented once, not once per element (the demo's 770 elements come from 100 images).
    With a ``cache``, rendered elements are kept for the next model.
    """

    def __init__(self, dataset: ImageDataset, plans: Sequence[ElementPlan], transform: Callable,
                 fill: tuple[int, int, int], cache: RowCache | None = None):
        self.dataset, self.plans, self.transform, self.fill = dataset, plans, transform, fill
        self._source: tuple[int, Image.Image, dict[int, np.ndarray]] | None = None  # (index, image, {n: labels})
        # Kept under (transform, fill, plan): the fill (the backbone's mean colour) is part of the render.
        self.cache, self.key = bind(cache, transform)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        plan = self.plans[index]
        if self.cache is None:
            return self._render(plan), True
        return self.cache.get_or_make((self.key, self.fill, plan), lambda: self._render(plan)), True

    def _render(self, plan: ElementPlan) -> torch.Tensor:
        if self._source is None or self._source[0] != plan.source_index:
            self._source = (plan.source_index, self.dataset.load("train", plan.source_index), {})
        _, image, segments = self._source
        labels = None
        if plan.kind == "slic" and plan.slic_segments >= 1:
            labels = segments.get(plan.slic_segments)
            if labels is None:
                labels = segments[plan.slic_segments] = slic_segments_of(image, n_segments=plan.slic_segments)
        return self.transform(render_element(image, plan, fill=self.fill, segments=labels))


class _BlockBatches(Sampler[list[int]]):
    """Batches of row indices, cut at block boundaries so every block is batched alike."""

    def __init__(self, blocks: Sequence[int], *, rows: int, block_rows: int, batch_size: int):
        self.blocks, self.rows, self.block_rows, self.batch_size = blocks, rows, block_rows, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for block in self.blocks:
            span = st.block_slice(block, rows=self.rows, block_rows=self.block_rows)
            for start in range(span.start, span.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, span.stop)))

    def __len__(self) -> int:
        sizes = (_block_size(b, rows=self.rows, block_rows=self.block_rows) for b in self.blocks)
        return sum(math.ceil(n / self.batch_size) for n in sizes)


def _block_size(block: int, *, rows: int, block_rows: int) -> int:
    span = st.block_slice(block, rows=rows, block_rows=block_rows)
    return span.stop - span.start


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a device: use cpu, cuda, cuda:N or auto ({err})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return resolved


def store_attrs(*, dataset: ImageDataset, backbone: Backbone, model_name: str, pipeline: str | None,
                elements: dict | None, project_version: str) -> dict:
    """The attributes a store is created with, and compared against on resume."""
    cfg = backbone.data_config
    return {
        "model": model_name,
        "pipeline": pipeline,
        "backbone": backbone.backbone,
        "weights": backbone.weights_source,
        "weights_sha256": backbone.weights_sha256,
        # A CLIP image store (iis.extract.clip.clip_backbone) holds projected image embeddings.
        **({"layer": "image_embedding", "pooling": "open_clip encode_image (projected, not normalised)"}
           if backbone.backbone.startswith("clip:") else
           {"layer": "pre_logits", "pooling": "model default (timm forward_head pre_logits)"}),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        # uint8 per image, normalised per batch: values differ from per-image float
        # normalisation in the last bit, so a store is never resumed across the two.
        "preprocess": "timm eval transform to uint8; normalised per batch in float32",
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "elements": elements,
        "versions": {
            "iis": project_version,
            "torch": torch.__version__.split("+")[0],
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
    }


def rows_digest(dataset: ImageDataset, plans: Sequence[ElementPlan]) -> dict[str, str]:
    """sha256 of each split's ids and labels and of the element plan: what the rows are.

    Compared on resume, so a store is never filled with the rows of another split or seed even
    when the sizes agree.
    """
    out = {}
    for split in st.SPLITS:
        meta = dataset.splits[split]
        h = hashlib.sha256()
        for sample_id, label in zip(meta.ids.tolist(), meta.labels.tolist()):
            h.update(f"{sample_id}\t{int(label)}\n".encode())
        out[split] = h.hexdigest()
    h = hashlib.sha256()
    for plan in plans:
        h.update(f"{plan.source_index}\t{plan.source_id}\t{plan.label}\t{plan.kind}\t{list(plan.box)}\t"
                 f"{plan.segment}\t{plan.slic_segments}\n".encode())
    out[st.ELEMENTS] = h.hexdigest()
    return out


def _open_or_create(path: Path, *, attrs: dict, dataset: ImageDataset, feature_dim: int,
                    plans: Sequence[ElementPlan], opts: ExtractOptions):
    index, _count = opts.shard
    sizes = {s: len(dataset.splits[s].labels) for s in st.SPLITS}
    if index != 0:
        group = st.wait_for_store(path, timeout=opts.wait_seconds)
    elif (path / "zarr.json").exists() and not st.interrupted_creation(path):
        group = st.open_store(path, mode="r+")
    else:
        if st.interrupted_creation(path):  # only that: any other folder at `path` is refused by create_store
            log.warning("%s: its creation was interrupted (no format marker, no block done); creating it anew",
                        path)
            shutil.rmtree(path)
        return st.create_store(
            path, split_sizes=sizes, feature_dim=feature_dim, attrs=attrs,
            elements=_provenance(plans) if plans else None, block_rows=opts.block_rows, dtype=opts.dtype,
        )
    expected = {k: v for k, v in attrs.items() if k != "versions"}  # a resume may use a newer patch release
    expected.update(feature_dtype=opts.dtype, block_rows=opts.block_rows, feature_dim=feature_dim,
                    split_sizes=sizes, num_elements=len(plans))
    unknown = [k for k in COMPUTE_ATTRS if k not in group.attrs]
    if unknown:
        log.warning("%s: made before iis recorded how its values were computed (%s); resuming without "
                    "checking that this run (%s) computes alike", path, ", ".join(unknown),
                    ", ".join(f"{k}={expected[k]}" for k in unknown))
    # Stores made before iis recorded `rows_sha256` or the compute settings are compared without them.
    st.check_settings(group, path, expected, optional=("rows_sha256", *COMPUTE_ATTRS))
    return group


# The store attributes that record how the values were computed (:func:`compute_attrs`).
COMPUTE_ATTRS = ("device_type", "autocast", "batch_size")


def compute_attrs(device: torch.device, opts: ExtractOptions) -> dict:
    """What decides the computed values besides the weights and the rows, recorded in a store's
    attributes and compared on resume and across shards: kernels and their rounding differ
    between device types, autocast dtypes and batch sizes.

    Returns:
        ``{"device_type": "cpu" | "cuda" | …, "autocast": "bfloat16" | "float16" | "none",
        "batch_size": int}``; ``autocast`` is ``"none"`` where :func:`autocast` does nothing
        (a string, so that a store made before these attributes, which lacks the key, is told
        apart from one computed without autocast).
    """
    return {"device_type": device.type, "autocast": opts.amp if device.type == "cuda" else "none",
            "batch_size": opts.batch_size}


def _provenance(plans: Sequence[ElementPlan]) -> st.ElementProvenance:
    return st.ElementProvenance(
        source_id=np.array([p.source_id for p in plans], dtype=str),
        source_index=np.array([p.source_index for p in plans], dtype=np.int64),
        label=np.array([p.label for p in plans], dtype=np.int64),
        box=np.array([p.box for p in plans], dtype=np.int32).reshape(-1, 4),
        kind=np.array([p.kind for p in plans], dtype=str),
        segment=np.array([p.segment for p in plans], dtype=np.int32),
    )


def autocast(device: torch.device, amp: str = "bfloat16"):
    """Autocast to ``amp`` (bfloat16 or float16) on CUDA; nothing on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[amp]
    return torch.autocast("cuda", dtype=dtype)


@dataclass
class _Target:
    """One store being filled: a layer of the model."""

    layer: str
    path: Path
    group: object  # zarr.Group, open r+


def _to_numpy(out: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each layer's ``(B, D)`` features as float32 numpy, in one device-to-host copy."""
    if len(names) == 1:
        return {names[0]: out[names[0]].float().cpu().numpy()}
    tensors = [out[n].float() for n in names]
    joined = torch.cat(tensors, dim=1).cpu().numpy()
    cuts = np.cumsum([t.shape[1] for t in tensors])[:-1]
    return dict(zip(names, np.split(joined, cuts, axis=1), strict=True))


def _fill_part(targets: Sequence[_Target], part: str, rows_dataset: Dataset, *, split_meta,
               forward: LayerForward, data_config: dict, device: torch.device, opts: ExtractOptions) -> int:
    """Compute and write this shard's pending blocks of one part, for every store at once.

    A block is computed when any store still needs it (one forward pass gives every layer) and
    written only to the stores whose ``done`` lacks it, so a finished store is never rewritten.
    Returns the rows computed.
    """
    first = targets[0].group
    rows = first[part]["features"].shape[0]
    block_rows = int(first.attrs["block_rows"])
    total = st.num_blocks(rows, block_rows)
    mine = st.shard_blocks(total, shard=opts.shard[0], num_shards=opts.shard[1])
    needs: dict[int, list[_Target]] = {}
    for target in targets:
        done = st.done_blocks(target.group, part)
        for b in mine:
            if not done[b]:
                needs.setdefault(b, []).append(target)
    pending = sorted(needs)
    if not pending:
        return 0
    log.info("%s: %d of %d blocks to compute (shard %d/%d)", part, len(pending), total, *opts.shard)
    loader = DataLoader(
        rows_dataset,
        batch_sampler=_BlockBatches(pending, rows=rows, block_rows=block_rows, batch_size=opts.batch_size),
        num_workers=opts.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    dtype = str(first.attrs["feature_dtype"])
    invalid = {t.layer: dict.fromkeys(("unreadable", "nonfinite", "overflow"), 0) for t in targets}
    written = dict.fromkeys(invalid, 0)
    block_iter = iter(pending)
    block = next(block_iter)
    span = st.block_slice(block, rows=rows, block_rows=block_rows)
    feats: dict[str, list[np.ndarray]] = {t.layer: [] for t in needs[block]}
    valids: list[np.ndarray] = []
    bar = progress(total=sum(_block_size(b, rows=rows, block_rows=block_rows) for b in pending),
                   desc=part, unit="img", logger=log, smoothing=0.1)
    with torch.inference_mode(), bar:
        for images, valid in loader:
            images = normalize_batch(images.to(device, non_blocking=True), data_config)
            images = images.contiguous(memory_format=torch.channels_last)
            active = list(feats)
            with autocast(device, opts.amp):
                out = forward(images, active)
            out = _to_numpy(out, active)
            valid = valid.numpy().astype(bool)
            for name in active:
                out[name][~valid] = np.nan  # an unreadable image has no features, loudly
                feats[name].append(out[name])  # float32: the writer casts to the store dtype and checks every row
            valids.append(valid)
            bar.update(len(valid))
            if sum(len(v) for v in valids) == span.stop - span.start:
                for target in needs[block]:
                    columns = {"features": np.concatenate(feats[target.layer])}
                    if split_meta is not None:
                        columns["labels"] = split_meta.labels[span].astype(np.int64)
                        columns["ids"] = np.asarray(split_meta.ids[span], dtype=str)
                        columns["valid"] = np.concatenate(valids)
                    counts = st.write_block(target.group, part, block, **columns)
                    seen = invalid[target.layer]
                    if (counts["nonfinite"] or counts["overflow"]) and not (seen["nonfinite"] or seen["overflow"]):
                        # Said at once, so an overflowing backbone can be stopped before it fills the store.
                        log.warning("%s: %s block %d: %s", target.path, part, block,
                                    st.describe_invalid({k: counts[k] for k in ("nonfinite", "overflow")},
                                                        dtype=dtype))
                    for k in seen:
                        seen[k] += counts[k]
                    written[target.layer] += span.stop - span.start
                valids = []
                block = next(block_iter, None)
                if block is not None:
                    span = st.block_slice(block, rows=rows, block_rows=block_rows)
                    feats = {t.layer: [] for t in needs[block]}
    for target in targets:
        text = st.describe_invalid(invalid[target.layer], dtype=dtype)
        if text:
            log.warning("%s: %s: %d of %d rows written marked invalid: %s", target.path, part,
                        sum(invalid[target.layer].values()), written[target.layer], text)
    return sum(_block_size(b, rows=rows, block_rows=block_rows) for b in pending)


def extract_store(
    path: Path,
    *,
    dataset: ImageDataset,
    backbone: Backbone,
    model_name: str,
    element_plans: Sequence[ElementPlan],
    elements_config: dict | None,
    options: ExtractOptions,
    pipeline: str | None = None,
    project_version: str = "0",
    layers: str | Sequence[str] | None = None,
) -> bool:
    """Fill (or resume filling) the store at ``path`` with this shard's blocks.

    Args:
        path: the store directory.
        dataset: the image dataset and its splits.
        backbone: the created backbone (model in eval mode, resolved data config).
        model_name: the pipeline's id for this model, recorded as attribute ``model``.
        element_plans: the visual elements to embed (may be empty).
        elements_config: how the elements were planned, recorded in the attributes.
        options: batch size, block size, dtype, device, shard.
        pipeline: the pipeline's name, recorded in the attributes.
        project_version: recorded in the attributes.
        layers: None (the pooled pre-logit features only, as always), or layers to extract in
            the same pass, one store each; see :func:`extract_layers`.

    Returns:
        True when the store (with ``layers``: every layer's store) is complete after this call
        (every shard's blocks are done).
    """
    status = extract_layers(path, dataset=dataset, backbone=backbone, model_name=model_name,
                            element_plans=element_plans, elements_config=elements_config, options=options,
                            pipeline=pipeline, project_version=project_version,
                            layers=[FINAL] if layers is None else layers)
    return all(status.values())


def extract_layers(
    path: Path,
    *,
    dataset: ImageDataset,
    backbone: Backbone,
    model_name: str,
    element_plans: Sequence[ElementPlan],
    elements_config: dict | None,
    options: ExtractOptions,
    layers: str | Sequence[str],
    pipeline: str | None = None,
    project_version: str = "0",
) -> dict[str, bool]:
    """Fill (or resume) one store per requested layer of a model, from one forward pass per batch.

    ``layers`` is ``"all"`` or a list of ``final``, ``stages.<i>`` (the ``i``-th entry of timm's
    ``feature_info``), ``stages.<i>.avg`` / ``stages.<i>.cls`` (a ViT's token pooling named
    explicitly); see :mod:`iis.extract.layers`. ``final`` goes to ``path`` itself
    (``<model>.zarr``) and equals, byte for byte, the store of a run without layers; every other
    layer goes beside it, to ``<model>@<layer>.zarr`` (:func:`~iis.extract.layers.layer_store_path`),
    as model ``<model>@<layer>`` with the attributes ``layer``, ``pooling``, ``depth`` and
    ``base_model``. Each store keeps its own resume markers and shard ranges: a block is computed
    when any store lacks it and written only where it is missing, so a finished store is never
    rewritten. The visual elements are embedded at every layer in the same pass.

    Raises:
        iis.extract.layers.LayerError: an unknown layer name (the message lists the model's layers).

    Returns:
        ``{store model name: complete}``, e.g. ``{"r10@stages.1": True, "r10": True}``, in depth order.
    """
    path = Path(path)
    device = resolve_device(options.device)  # before any store exists: a bad device leaves nothing behind
    resolved = resolve_layers(backbone.model, layers, model_name=model_name)
    base_attrs = store_attrs(dataset=dataset, backbone=backbone, model_name=model_name, pipeline=pipeline,
                             elements=elements_config, project_version=project_version)
    base_attrs["rows_sha256"] = rows_digest(dataset, element_plans)
    base_attrs.update(compute_attrs(device, options))
    # Channels-last on every device: on CPU too, oneDNN's convolutions run 1.2-4x faster in it
    # (benchmarks/README.md, "Channels-last on CPU"); a ViT is indifferent.
    model = backbone.model.to(device).eval().to(memory_format=torch.channels_last)
    forward = LayerForward(model, resolved)
    dims = {FINAL: backbone.feature_dim}
    if forward.mode != "plain":
        probe = probe_batch(backbone.data_config["input_size"], device=device)
        probe = probe.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(device, options.amp):
            forward.probe(probe)
        dims.update(forward.dims)
        log.info("%s: layers %s by %s", model_name, ", ".join(f"{la.name} (D={dims[la.name]})" for la in resolved),
                 "forward_intermediates" if forward.mode == "intermediates" else "forward hooks")
    targets = []
    for layer in resolved:
        name = layer_model_name(model_name, layer.name)
        attrs = dict(base_attrs)
        if not layer.is_final:
            attrs.update(model=name, **layer_attrs(layer, base_model=model_name, model=backbone.model))
        target_path = layer_store_path(path, layer.name)
        group = _open_or_create(target_path, attrs=attrs, dataset=dataset, feature_dim=dims[layer.name],
                                plans=element_plans, opts=options)
        targets.append(_Target(layer=layer.name, path=target_path, group=group))
    size = tuple(backbone.data_config["input_size"])
    # DataLoader workers would each fill a copy of their own, then drop it.
    cache = cache_for(dataset, None if options.row_cache_mb is None else options.row_cache_mb * 2**20) \
        if options.num_workers == 0 else None
    for split in st.SPLITS:
        rows = _ImageRows(dataset, split, image_transform(backbone.data_config, uint8=True), size, cache)
        _fill_part(targets, split, rows, split_meta=dataset.splits[split], forward=forward,
                   data_config=backbone.data_config, device=device, opts=options)
    if element_plans:
        fill = tuple(int(round(255 * m)) for m in backbone.data_config["mean"])
        rows = _ElementRows(dataset, element_plans, element_transform(backbone.data_config, uint8=True), fill, cache)
        _fill_part(targets, st.ELEMENTS, rows, split_meta=None, forward=forward,
                   data_config=backbone.data_config, device=device, opts=options)
    status = {}
    for target in targets:
        complete = st.finalize_store(target.group, target.path)
        if not complete:
            log.info("%s: this shard is done; other shards still have blocks to fill", target.path)
        status[layer_model_name(model_name, target.layer)] = complete
    return status
