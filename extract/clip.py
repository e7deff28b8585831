"""CLIP for the Text concept library (Label-free CBM): image features of the data, text
features of a concept list, both in CLIP's joint space.

The image side is an ordinary feature store: :func:`clip_backbone` wraps ``encode_image`` as a
:class:`~iis.extract.backbones.Backbone`, so :func:`iis.extract.runner.extract_store` fills it with the
same resumable, shardable code as any backbone. The text side is a ``text/`` group that
:func:`write_text_features` adds to that store::

    <store>/text/features  (T, Dc) float32   dims (concept, feature)   raw, not normalised
    <store>/text/words     (T,)    str       dims (concept,)
    <store>/text attrs: clip_model, weights, weights_sha256, random_weights, concepts_path,
                        concepts_sha256, num_concepts, embed_dim

Weights come from a local file only (open_clip's ``pretrained=PATH``), or, for tests, from a
seeded random initialisation behind the explicit flag :data:`RANDOM_FOR_TESTS`. Nothing is
downloaded: models whose tokenizer or text tower would come from the Hugging Face hub are
refused, and the tokenizer is open_clip's ``SimpleTokenizer``, whose BPE vocabulary ships inside
the package.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import open_clip
import torch
import zarr
from iis.extract import store as st
from iis.extract.backbones import Backbone, loaded_with_sha256, state_dict_sha256

from iis.store_format import TEXT_FORMAT, TEXT_GROUP

log = logging.getLogger(__name__)

RANDOM_FOR_TESTS = "random-for-tests"
# Configs this project ships (data/clip/*.json); registered with open_clip on first use.
CONFIG_DIR = Path(str(resources.files("iis.data") / "clip"))
SHIPPED_MODELS = ("iis-tiny-test",)
# open_clip's eval resize modes, as the timm eval transform's crop modes (with crop_pct = 1.0).
_CROP_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}
_REQUIRED_ATTRS = ("clip_model", "weights", "weights_sha256", "random_weights", "concepts_path")


class ClipError(Exception):
    """A CLIP model that cannot be built offline: unknown name, missing or unfit weights file,
    random weights without :data:`RANDOM_FOR_TESTS`. The message says what to change."""


@dataclass
class ClipModel:
    """A CLIP model ready to embed images and concept words, and what is needed to reproduce it."""

    model: torch.nn.Module  # open_clip CLIP, eval mode, float32
    name: str  # open_clip model name, e.g. "ViT-B-32" or "iis-tiny-test"
    weights: str  # absolute path of the weights file, or RANDOM_FOR_TESTS
    weights_sha256: str  # sha256 of the file; for random weights, state_dict_sha256 of the model
    seed: int  # the seed of a random initialisation (unused for a file)
    data_config: dict  # timm-style: input_size (3, H, W), mean, std, interpolation, crop_pct, crop_mode
    embed_dim: int  # Dc, the joint embedding width
    tokenizer: Callable[[list[str]], torch.Tensor]  # T strings -> (T, context_length) int64

    @property
    def random_weights(self) -> bool:
        return self.weights == RANDOM_FOR_TESTS


def create_clip(*, model: str, weights: str | Path, seed: int = 0) -> ClipModel:
    """Build an open_clip model with local weights, in eval mode, on the CPU.

    model: an open_clip model name (``open_clip.list_models()``) or a config shipped in
        ``data/clip/`` (``iis-tiny-test``). ``hf-hub:``/``local-dir:`` names are refused.
    weights: a local checkpoint file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``; a state dict,
        optionally under ``"state_dict"``), loaded strictly; or :data:`RANDOM_FOR_TESTS` for a
        seeded random initialisation. Any other string is a path.
    seed: seeds the random initialisation without touching the caller's global RNG state.
    Raises ClipError for an unknown model, a model that needs the hub, or unusable weights.
    """
    _check_model(model)
    random_init = isinstance(weights, str) and weights == RANDOM_FOR_TESTS
    if random_init:
        net = _create(model, pretrained=None, seed=seed)
        source, digest = RANDOM_FOR_TESTS, state_dict_sha256(net)
    else:
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            hint = (f" (random weights need weights={RANDOM_FOR_TESTS!r}, and are for tests only)"
                    if str(weights).lower().startswith("random") else "")
            raise ClipError(f"CLIP weights file {path} does not exist; give a local checkpoint of {model}{hint}")
        try:
            net, digest = loaded_with_sha256(path, lambda: _create(model, pretrained=str(path), seed=seed),
                                             error=ClipError)
        except ClipError:
            raise
        except Exception as exc:  # torch, safetensors and strict loading raise many types
            raise ClipError(f"cannot load CLIP weights {path} into {model}: {type(exc).__name__}: {exc}") from exc
        source = str(path)
    net.eval()
    return ClipModel(
        model=net,
        name=model,
        weights=source,
        weights_sha256=digest,
        seed=seed,
        data_config=clip_data_config(open_clip.get_model_preprocess_cfg(net)),
        embed_dim=int(open_clip.get_model_config(model)["embed_dim"]),
        tokenizer=open_clip.get_tokenizer(model),
    )


def clip_data_config(preprocess_cfg: dict) -> dict:
    """open_clip's eval preprocessing as the data config :mod:`iis.extract.backbones` uses.

    ``preprocess_cfg``: ``size`` (int or (H, W)), ``mean``, ``std``, ``interpolation``,
    ``resize_mode`` (``shortest`` | ``squash`` | ``longest``). With ``crop_pct = 1.0`` the timm
    eval transform then resizes and crops as open_clip does (``longest`` pads with the mean
    colour, where open_clip pads with ``fill_color``).
    """
    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode not in _CROP_MODES:
        raise ClipError(f"open_clip resize_mode {mode!r} is not supported; known: {sorted(_CROP_MODES)}")
    return {
        "input_size": (3, int(height), int(width)),
        "interpolation": preprocess_cfg.get("interpolation", "bicubic"),
        "mean": tuple(float(m) for m in preprocess_cfg["mean"]),
        "std": tuple(float(s) for s in preprocess_cfg["std"]),
        "crop_pct": 1.0,
        "crop_mode": _CROP_MODES[mode],
    }


class _ImageEncoder(torch.nn.Module):
    """``encode_image`` as a module: (B, 3, H, W) float32 -> (B, Dc) raw (not normalised) embeddings."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=False)


def clip_backbone(clip: ClipModel) -> Backbone:
    """The CLIP image encoder as a :class:`Backbone`, for :func:`iis.extract.runner.extract_store`.

    The module shares its parameters with ``clip.model``: moving one moves both.
    """
    weights_source = f"{RANDOM_FOR_TESTS}:seed={clip.seed}" if clip.random_weights else f"file:{clip.weights}"
    return Backbone(
        model=_ImageEncoder(clip.model).eval(),
        backbone=f"clip:{clip.name}",
        data_config=dict(clip.data_config),
        weights_source=weights_source,
        weights_sha256=clip.weights_sha256,
        feature_dim=clip.embed_dim,
    )


def read_concepts(path: Path) -> list[str]:
    """Read a concept list: UTF-8, one concept per line.

    Whitespace is stripped (inner runs collapse to one space), ``#`` comment lines are skipped,
    blank lines and duplicates (case-insensitive; the first one is kept) are dropped with one
    WARNING that names their line numbers. Raises ValueError when no concept is left.
    """
    path = Path(path)
    concepts: list[str] = []
    first_line: dict[str, int] = {}
    blank: list[int] = []
    duplicates: list[str] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        text = " ".join(raw.split())
        if not text:
            blank.append(number)
        elif text.startswith("#"):
            continue
        elif text.casefold() in first_line:
            duplicates.append(f"line {number} {text!r} (= line {first_line[text.casefold()]})")
        else:
            first_line[text.casefold()] = number
            concepts.append(text)
    if blank or duplicates:
        cleaned = []
        if blank:
            cleaned.append(f"{len(blank)} blank line(s) dropped (lines {', '.join(map(str, blank))})")
        if duplicates:
            cleaned.append(f"{len(duplicates)} duplicate(s) dropped: {'; '.join(duplicates)}")
        log.warning("concept list %s: %s", path, "; ".join(cleaned))
    if not concepts:
        raise ValueError(f"concept list {path} holds no concepts (one per line; '#' starts a comment)")
    return concepts


def concepts_sha256(concepts: list[str]) -> str:
    """Hex sha256 of a cleaned concept list, as ``"\\n".join(concepts) + "\\n"`` in UTF-8."""
    return hashlib.sha256(("\n".join(concepts) + "\n").encode("utf-8")).hexdigest()


def encode_text(clip: ClipModel, concepts: list[str], *, batch_size: int = 256) -> np.ndarray:
    """Embed concept words with the text tower, on the device ``clip.model`` is on.

    Returns ``(T, Dc)`` float32 raw text embeddings (not normalised), one row per concept.
    """
    if not concepts:
        raise ValueError("no concepts to encode")
    device = next(clip.model.parameters()).device
    rows = []
    with torch.inference_mode():
        for start in range(0, len(concepts), batch_size):
            tokens = clip.tokenizer(list(concepts[start:start + batch_size])).to(device)
            rows.append(clip.model.encode_text(tokens, normalize=False).float().cpu().numpy())
    return np.concatenate(rows).astype(np.float32, copy=False)


def text_attrs(clip: ClipModel, concepts_path: Path | str) -> dict:
    """The ``attrs`` :func:`write_text_features` expects, for this model and concept list."""
    return {
        "clip_model": clip.name,
        "weights": clip.weights,
        "weights_sha256": clip.weights_sha256,
        "random_weights": clip.random_weights,
        "concepts_path": str(concepts_path),
    }


def write_text_features(store_path: Path, *, concepts: list[str], features: np.ndarray, attrs: dict) -> None:
    """Add the ``text/`` group (words and their CLIP text features) to an existing CLIP store.

    features: ``(T, Dc)`` float32 from :func:`encode_text`, ``T = len(concepts)``, ``Dc`` the
        store's ``feature_dim``.
    attrs: ``clip_model``, ``weights``, ``weights_sha256``, ``random_weights``, ``concepts_path``
        (see :func:`text_attrs`); ``weights_sha256`` must equal the store's, so the words and the
        images live in the same CLIP space.
    Written once. A finished group with the same concepts and weights is left alone (resume); one
    with other concepts or weights is a StoreError naming the store. The attributes are written
    last, so an interrupted write is redone.
    """
    store_path = Path(store_path)
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"text attrs lack {missing}; build them with text_attrs()")
    group = st.open_store(store_path, mode="r+")
    features = np.asarray(features, dtype=np.float32)
    dim = int(group.attrs["feature_dim"])
    if features.shape != (len(concepts), dim):
        raise ValueError(f"text features have shape {features.shape}, expected ({len(concepts)}, {dim})")
    if not np.isfinite(features).all():
        raise ValueError("text features hold NaN or inf")
    if attrs["weights_sha256"] != group.attrs.get("weights_sha256"):
        raise st.StoreError(
            f"{store_path}: its images were embedded by CLIP weights {group.attrs.get('weights_sha256')}, "
            f"the text by {attrs['weights_sha256']}; both must come from the same CLIP"
        )
    digest = concepts_sha256(concepts)
    if attrs.get("concepts_sha256", digest) != digest:
        raise ValueError(f"attrs give concepts_sha256 {attrs['concepts_sha256']}, but the concepts hash to {digest}")
    if TEXT_GROUP in group:
        stored = dict(group[TEXT_GROUP].attrs)
        if stored.get("format") == TEXT_FORMAT:
            if stored.get("concepts_sha256") == digest and stored.get("weights_sha256") == attrs["weights_sha256"]:
                log.info("%s: text features already written (%d concepts)", store_path, len(concepts))
                return
            raise st.StoreError(
                f"{store_path}: holds text features of other concepts or weights "
                f"(concepts {stored.get('concepts_path')}, sha256 {stored.get('concepts_sha256')}; now "
                f"{attrs['concepts_path']}, sha256 {digest}); remove {store_path / TEXT_GROUP} or pick another store"
            )
        log.warning("%s: redoing an unfinished text/ group", store_path)
    rows = len(concepts)
    # The attributes go last: their format marker marks the group finished.
    st.write_text_group(group, np.asarray(concepts, dtype=str), features, {
        **{k: attrs[k] for k in _REQUIRED_ATTRS},
        "random_weights": bool(attrs["random_weights"]),
        "concepts_sha256": digest,
        "num_concepts": rows,
        "embed_dim": dim,
        "normalized": False,
        "open_clip": open_clip.__version__,
        "format": TEXT_FORMAT,
    })
    log.info("%s: wrote text features of %d concepts", store_path, rows)


def read_text_features(store_path: Path) -> tuple[list[str], np.ndarray, dict]:
    """The words ``(T,)``, features ``(T, Dc)`` float32 and attrs of a store's finished ``text/`` group."""
    group = zarr.open_group(str(store_path), mode="r", zarr_format=3)
    if TEXT_GROUP not in group or group[TEXT_GROUP].attrs.get("format") != TEXT_FORMAT:
        raise st.StoreError(f"{store_path}: no finished text/ group; run the CLIP text extraction")
    text = group[TEXT_GROUP]
    words = np.asarray(text["words"][:]).astype(object).astype(str).tolist()
    return words, np.asarray(text["features"][:], dtype=np.float32), dict(text.attrs)


# --------------------------------------------------------------------------------------------------


_registered: set[Path] = set()


def _check_model(name: str) -> None:
    """Register a shipped config if ``name`` is one; refuse names that are unknown or need the hub."""
    if name.startswith(("hf-hub:", "local-dir:")):
        raise ClipError(f"CLIP model {name!r}: give an open_clip model name and a local weights file instead")
    if name in SHIPPED_MODELS:
        config = CONFIG_DIR / f"{name}.json"
        if not config.is_file():
            raise ClipError(f"CLIP model {name!r} needs its config {config}, which is missing from this install")
        if config not in _registered:
            open_clip.add_model_config(config)
            _registered.add(config)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ClipError(f"unknown CLIP model {name!r}; see open_clip.list_models() for the known names")
    text_cfg = cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg or "siglip" in name.lower():
        raise ClipError(
            f"CLIP model {name!r} takes its tokenizer or text tower from the Hugging Face hub, which this "
            "offline tool does not use; pick a model with open_clip's built-in tokenizer (e.g. ViT-B-32)"
        )
    if "multimodal_cfg" in cfg:
        raise ClipError(f"CLIP model {name!r} is a captioning (CoCa) model; its image embedding differs")


def _create(name: str, *, pretrained: str | None, seed: int) -> torch.nn.Module:
    """open_clip.create_model on the CPU in float32 under a private, seeded RNG; never downloads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(
            name, pretrained=pretrained, precision="fp32", device="cpu",
            pretrained_image=False, pretrained_text=False, require_pretrained=pretrained is not None,
        )
