"""Backbones for stage 1: timm models that map an image batch to pooled pre-logit features.

Weights come from one of three places, and nothing is ever downloaded:

- ``"random"``: seeded initialisation, for tests and baselines;
- ``"pretrained"``: timm's pretrained weights, read from an existing Hugging Face cache;
- a path: a local checkpoint file (``.pth``, ``.pt``, ``.bin`` or ``.safetensors``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms

from iis.errors import WeightsError

logger = logging.getLogger(__name__)

_HOW_TO_PROVIDE = (
    "Either pre-download the weights into the Hugging Face cache on a machine with network "
    "(e.g. `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` with the same "
    "HF_HOME / HF_HUB_CACHE), or pass a local checkpoint file path as `weights:`."
)


@dataclass
class Backbone:
    """A ready-to-run feature extractor and what is needed to reproduce it."""

    model: torch.nn.Module  # eval mode; (B, 3, H, W) float32 -> (B, D) pooled pre-logit features
    backbone: str  # timm model name
    data_config: (
        dict  # resolved timm data config: input_size (C, H, W), mean, std, interpolation, crop_pct, crop_mode
    )
    weights_source: str  # "random:seed=<s>" | "hf:<hf_hub_id>" | "file:<absolute path>"
    weights_sha256: str  # sha256 of the weights file; for random weights, state_dict_sha256 of the model
    feature_dim: int  # D, the width of model(x): the pooled pre-logit features (see pooled_dim)


def create_backbone(
    *, backbone: str, weights: str | Path, img_size: int | None = None, seed: int = 0
) -> Backbone:
    """Build a timm model with its classifier removed (``num_classes=0``) and load its weights.

    weights: ``"random"``, ``"pretrained"`` or a checkpoint path (see the module docstring).
    img_size: input resolution; passed to models that take it (ViTs resize their position
        embeddings) and always written into ``data_config["input_size"]``.
    seed: seeds random initialisation without touching the caller's global RNG state.
    Raises ValueError for an unknown timm name and WeightsError for unusable weights.
    """
    if not timm.is_model(backbone):
        raise ValueError(f"unknown timm model {backbone!r}; see timm.list_models() for the known names")
    try:
        timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as exc:  # an architecture with an unknown ".tag"
        raise ValueError(f"unknown timm model {backbone!r}: {exc}") from exc
    if isinstance(weights, str) and weights == "random":
        model = _create(backbone, img_size=img_size, seed=seed)
        source, digest = f"random:seed={seed}", None
    elif isinstance(weights, str) and weights == "pretrained":
        model, source, digest = _create_pretrained(backbone, img_size=img_size, seed=seed)
    else:
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist; give an existing checkpoint path")
        model = _create(backbone, img_size=img_size, seed=seed)
        _, digest = loaded_with_sha256(path, lambda: _load_file(model, path, backbone), error=WeightsError)
        source = f"file:{path}"
    model.eval()
    override = {"input_size": (3, img_size, img_size)} if img_size is not None else {}
    data_config = resolve_data_config(override, model=model)
    return Backbone(
        model=model,
        backbone=backbone,
        data_config=data_config,
        weights_source=source,
        weights_sha256=digest or state_dict_sha256(model),
        feature_dim=pooled_dim(model),
    )


def pooled_dim(model: torch.nn.Module) -> int:
    """``D`` of ``model(x)`` for a timm model made with ``num_classes=0``: the pooled pre-logit width.

    Models with a hidden layer in their head (MobileNetV3's ``conv_head``: ``num_features`` 288,
    pre-logits 1024 for ``mobilenetv3_small_050``) report it as ``head_hidden_size``.
    """
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 over every state-dict entry: key, dtype, shape and raw bytes, in key order.

    Two models with equal tensors give the same digest regardless of device or memory layout.
    """
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # Viewed as bytes so that every dtype (bfloat16, bool, ...) hashes without a numpy round-trip.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_transform(data_config: dict, *, uint8: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """timm's evaluation transform (resize, centre crop, normalise) for whole images.

    Accepts mode ``"L"`` or ``"RGB"``; returns (3, H, W) float32 with (H, W) from ``input_size``.
    With ``uint8=True`` it stops before normalising and returns (3, H, W) uint8, for
    :func:`normalize_batch` to finish a whole batch at once (timm's prefetcher convention).
    """
    tf = create_transform(**_transform_args(data_config), is_training=False, use_prefetcher=uint8)
    return transforms.Compose([_ToRGB(), tf])


def element_transform(data_config: dict, *, uint8: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Transform for visual elements: resize to exactly (H, W) with no crop, then normalise.

    Elements are already crops, so cropping again would cut away part of the element.
    Returns (3, H, W) float32, or uint8 before normalisation with ``uint8=True``.
    """
    _, height, width = data_config["input_size"]
    resize = transforms.Resize((height, width), interpolation=str_to_interp_mode(data_config["interpolation"]))
    if uint8:
        return transforms.Compose([_ToRGB(), resize, transforms.PILToTensor()])
    return transforms.Compose(
        [_ToRGB(), resize, transforms.ToTensor(), transforms.Normalize(mean=data_config["mean"], std=data_config["std"])]
    )


def normalize_batch(images: torch.Tensor, data_config: dict) -> torch.Tensor:
    """Finish a uint8 batch ``(B, 3, H, W)`` on its device: float32, scaled and normalised.

    Once per batch instead of once per image: per-image float ops each enter a parallel region,
    which on a busy CPU costs more than the model's forward pass for small inputs (measured in
    benchmarks/extract_overhead.py). On CUDA it also moves a quarter of the bytes.
    """
    mean = torch.tensor(data_config["mean"], device=images.device).view(1, -1, 1, 1) * 255
    std = torch.tensor(data_config["std"], device=images.device).view(1, -1, 1, 1) * 255
    return images.float().sub_(mean).div_(std)


# --------------------------------------------------------------------------------------------------


class _ToRGB:
    """Grayscale (or any other mode) to RGB; a class, not a lambda, so the transform pickles."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def _transform_args(data_config: dict) -> dict:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: data_config[k] for k in keys if k in data_config}


def _create(name: str, *, img_size: int | None, seed: int, **kwargs) -> torch.nn.Module:
    """timm.create_model(name, num_classes=0) under a private, seeded RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if img_size is None:
            return timm.create_model(name, num_classes=0, **kwargs)
        try:
            return timm.create_model(name, num_classes=0, img_size=img_size, **kwargs)
        except TypeError as exc:
            # CNNs take any input size, so their constructors have no img_size; the size then
            # lives only in the data config.
            if "img_size" not in str(exc):
                raise
        torch.manual_seed(seed)
        return timm.create_model(name, num_classes=0, **kwargs)


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def _checkpoint_filter(name: str) -> Callable | None:
    """The checkpoint filter timm pairs with this model family, if any.

    timm's families convert foreign checkpoint layouts and resize position embeddings in a
    module-level ``checkpoint_filter_fn``; applying it here keeps file loading equivalent to
    timm's own pretrained loading.
    """
    module = sys.modules.get(timm.models.model_entrypoint(name.split(".")[0]).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _load_file(model: torch.nn.Module, path: Path, name: str) -> None:
    """Load a checkpoint into ``model`` (no classifier), failing on any missing non-head key."""
    try:
        state_dict = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    heads = _classifier_prefixes(model)
    filter_fn = _checkpoint_filter(name)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as exc:
            raise WeightsError(
                f"weights file {path} does not fit {name}: {type(exc).__name__}: {exc}"
            ) from exc
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even with strict=False
        raise WeightsError(f"weights file {path} does not fit {name}: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(heads)]
    if missing:
        raise WeightsError(
            f"weights file {path} lacks {len(missing)} key(s) of {name}: {', '.join(missing)}. "
            "Is it a checkpoint of this architecture?"
        )
    if result.unexpected_keys:
        logger.warning(
            "weights file %s has keys %s unused by %s", path, ", ".join(result.unexpected_keys), name
        )


_T = TypeVar("_T")


def loaded_with_sha256(path: Path, load: Callable[[], _T], *, error: type[Exception]) -> tuple[_T, str]:
    """``load()`` (which reads the file ``path``) and the file's sha256, taken before and after it.

    A store records the digest of the weights it was computed with; a file replaced while a
    library read it would leave the digest of other weights, so that is an ``error`` instead.
    """
    digest = file_sha256(path)
    result = load()
    if file_sha256(path) != digest:
        raise error(f"weights file {path} changed while it was being loaded; load it again once nothing writes to it")
    return result, digest


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (weights files can be GBs)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Force huggingface_hub offline: it reads HF_HUB_OFFLINE once at import, so patch both."""
    import huggingface_hub.constants as hf_constants

    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _cached_hf_file(hf_hub_id: str, filename: str | None) -> Path | None:
    """The cached file timm would load for ``hf_hub_id`` (safetensors first), or None."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = hf_hub_id.partition("@")
    if filename is None:
        candidates = ["model.safetensors", "pytorch_model.bin"]
    elif filename.endswith(".bin"):
        candidates = [filename[: -len(".bin")] + ".safetensors", filename]
    else:
        candidates = [filename]
    for candidate in candidates:
        found = try_to_load_from_cache(repo_id, candidate, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def _create_pretrained(name: str, *, img_size: int | None, seed: int) -> tuple[torch.nn.Module, str, str]:
    cfg = timm.models.get_pretrained_cfg(name)
    hf_hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    how = _HOW_TO_PROVIDE.format(name=name)
    if not hf_hub_id:
        raise WeightsError(
            f"timm has no Hugging Face hub id for pretrained {name!r}, so it cannot come from the cache. {how}"
        )
    cached = _cached_hf_file(hf_hub_id, getattr(cfg, "hf_hub_filename", None))
    if cached is None:
        raise WeightsError(
            f"pretrained weights for {name!r} ({hf_hub_id}) are not in the Hugging Face cache. {how}"
        )
    try:
        with _hub_offline():
            model = _create(name, img_size=img_size, seed=seed, pretrained=True)
    except Exception as exc:  # hub, torch and safetensors errors alike mean "not usable offline"
        raise WeightsError(
            f"cannot load cached pretrained weights for {name!r} ({hf_hub_id}): {exc}. {how}"
        ) from exc
    return model, f"hf:{hf_hub_id}", file_sha256(cached)
