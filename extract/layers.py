"""Layers of a backbone for stage 1: which depths can be extracted, and one forward pass for all.

A *layer* is one of

- ``stages.<i>``: the output of the ``i``-th entry of timm's ``feature_info`` (the same index as
  timm's ``forward_intermediates``; ``stages.1`` of resnet10t is module ``layer1``), pooled to
  ``(B, C)``. A CNN map ``(B, C, H, W)`` is averaged over ``H x W`` (pooling ``avg``); a ViT's
  tokens ``(B, N, C)`` are pooled as the model's head pools them: the class token (``cls``) for
  ``global_pool='token'``, the mean of the patch tokens, prefix tokens left out (``avg``),
  for ``global_pool='avg'``. ``stages.<i>.cls`` and ``stages.<i>.avg`` name a token pooling
  explicitly (both can be asked for); a suffix equal to the default is dropped, so each
  (layer, pooling) has one name.
- ``final``: exactly what stage 1 has always stored, the model's pooled pre-logit features.
- ``all``: every ``stages.<i>`` that ``feature_info`` reports, then ``final``.

``depth`` places a layer in ``[0, 1]``: ``stages.<i>`` of ``n`` stages has depth
``(i + 1) / (n + 1)`` and ``final`` has 1.0; it depends on the model only, never on which layers
a run asks for.

:class:`LayerForward` computes every requested layer from one forward pass per batch: timm's
``forward_intermediates`` where the model has it and it agrees with the model (checked once on a
probe batch: its intermediates equal the ``feature_info`` modules' outputs and its final features
give, bit for bit, what ``model(x)`` gives), else forward hooks on the ``feature_info`` modules
during ``model(x)``. With only ``final`` asked for it is ``model(x)``, as always.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FINAL = "final"
ALL = "all"
POOLINGS = ("avg", "cls")
# The attributes a `final` store has always had (see runner.store_attrs); kept as they are, so the
# `final` store of a layered run equals, byte for byte, the store of a run without layers.
FINAL_LAYER_ATTR = "pre_logits"

_STAGE = re.compile(r"^stages\.(\d+)(?:\.(avg|cls))?$")


@dataclass(frozen=True)
class Stage:
    """One entry of timm's ``feature_info``."""

    index: int
    module: str  # the module whose output it is, e.g. "layer1" or "blocks.3"
    channels: int
    reduction: int


@dataclass(frozen=True)
class Layer:
    """One requested layer, resolved against a model.

    Attributes:
        name: canonical name, ``final``, ``stages.1`` or ``stages.3.avg``; path-safe.
        index: the ``feature_info`` index; None for ``final``.
        module: the ``feature_info`` module name; None for ``final``.
        pooling: ``avg`` or ``cls``; None for ``final`` (the model's own head pools it).
        depth: position in ``[0, 1]``; ``final`` is 1.0.
    """

    name: str
    index: int | None
    module: str | None
    pooling: str | None
    depth: float

    @property
    def is_final(self) -> bool:
        return self.index is None


class LayerError(ValueError):
    """A layer name a model does not have; the message lists the ones it has."""


def stages(model: torch.nn.Module) -> list[Stage]:
    """The stages timm's ``feature_info`` reports for ``model`` (empty when it reports none)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list | tuple):
        info = getattr(info, "info", None) or []  # a FeatureInfo object keeps its list in .info
    out = []
    for i, entry in enumerate(info):
        if not isinstance(entry, dict) or "module" not in entry:
            return []
        out.append(Stage(index=i, module=str(entry["module"]), channels=int(entry.get("num_chs", 0)),
                         reduction=int(entry.get("reduction", 0))))
    return out


def prefix_tokens(model: torch.nn.Module) -> int:
    """How many prefix (class, distillation, register) tokens lead the model's token sequence."""
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def default_pooling(model: torch.nn.Module) -> str | None:
    """How a stage's output is pooled by default: ``cls`` for a class-token head, else ``avg``.

    None for a head that pools in a way no intermediate layer can (attention pooling ``map``,
    max pooling): such a model's layers need an explicit ``.avg`` or ``.cls``.
    """
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        if pool == "token":
            return "cls" if prefix_tokens(model) else "avg"
        if pool == "avg":
            return "avg"
        return None
    pool_type = getattr(pool, "pool_type", None)  # timm's SelectAdaptivePool2d
    if pool is None or pool_type in (None, "", "avg", "fast", "fastavg"):
        return "avg"
    return None


def _depth(index: int | None, n_stages: int) -> float:
    return 1.0 if index is None else (index + 1) / (n_stages + 1)


def available_layers(model: torch.nn.Module) -> list[str]:
    """Every layer name ``model`` accepts by default pooling: ``stages.0`` … ``stages.<n-1>``, ``final``."""
    return [f"stages.{s.index}" for s in stages(model)] + [FINAL]


def _describe(model: torch.nn.Module) -> str:
    named = [f"stages.{s.index} ({s.module})" for s in stages(model)]
    text = ", ".join([*named, FINAL, ALL])
    if prefix_tokens(model):
        text += "; a stage may end in .avg or .cls to choose the token pooling"
    return text


def resolve_layers(model: torch.nn.Module, layers: str | Sequence[str], *, model_name: str = "model") -> list[Layer]:
    """Resolve layer names against ``model``: canonical, deduplicated, ordered by depth.

    Args:
        model: the timm model (its ``feature_info``, ``global_pool`` and prefix tokens are read).
        layers: ``"all"``, a single name, or a list of names (``final``, ``stages.<i>``,
            ``stages.<i>.avg``, ``stages.<i>.cls``; ``all`` may appear in a list).
        model_name: named in errors.

    Raises:
        LayerError: an unknown name, or a pooling the model cannot do; the message lists the
            layers the model has.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise LayerError(f"{model_name}: no layers given; available: {_describe(model)}")
    found = stages(model)
    default = default_pooling(model)
    resolved: dict[str, Layer] = {}
    for raw in names:
        if not isinstance(raw, str):
            raise LayerError(f"{model_name}: layer {raw!r} is not a name; available: {_describe(model)}")
        if raw == ALL:
            if found and default is None:
                raise LayerError(
                    f"{model_name}: `all` needs a default pooling, but the head pools with "
                    f"{getattr(model, 'global_pool', None)!r}, which no intermediate layer can; list the layers "
                    "with .avg or .cls instead")
            expanded = [f"stages.{s.index}" for s in found] + [FINAL]
        else:
            expanded = [raw]
        for name in expanded:
            layer = _resolve_one(model, name, found, default, model_name=model_name)
            resolved.setdefault(layer.name, layer)
    return sorted(resolved.values(), key=lambda la: (la.depth, la.name))


def _resolve_one(model, name: str, found: list[Stage], default: str | None, *, model_name: str) -> Layer:
    if name == FINAL:
        return Layer(name=FINAL, index=None, module=None, pooling=None, depth=1.0)
    match = _STAGE.match(name)
    if not match or int(match.group(1)) >= len(found):
        raise LayerError(f"{model_name} has no layer {name!r}; available: {_describe(model)}")
    index, pooling = int(match.group(1)), match.group(2)
    if pooling == "cls" and not prefix_tokens(model):
        raise LayerError(f"{model_name}: layer {name!r} asks for the class token, but the model has none; "
                         f"available: {_describe(model)}")
    if pooling is None:
        if default is None:
            raise LayerError(
                f"{model_name}: layer {name!r}: the head pools with {getattr(model, 'global_pool', None)!r}, "
                f"which an intermediate layer cannot; name the pooling: stages.{index}.avg or stages.{index}.cls")
        pooling = default
    canonical = f"stages.{index}" if pooling == default else f"stages.{index}.{pooling}"
    stage = found[index]
    return Layer(name=canonical, index=index, module=stage.module, pooling=pooling,
                 depth=_depth(index, len(found)))


def layer_names(backbone: str, layers: str | Sequence[str], *, img_size: int | None = None) -> list[str]:
    """The canonical layer names of ``layers`` for a timm model name, without building its weights.

    For config checks and for listing the stores a model entry makes (``layers: all`` expands
    here). The model is instantiated on the ``meta`` device: no memory, no download, well under
    a second. Raises :class:`LayerError` (a ValueError) as :func:`resolve_layers` does.
    """
    import timm

    def create():
        try:
            return timm.create_model(backbone, num_classes=0, **({"img_size": img_size} if img_size else {}))
        except TypeError as exc:  # CNNs take no img_size
            if "img_size" not in str(exc):
                raise
            return timm.create_model(backbone, num_classes=0)

    try:
        with torch.device("meta"):
            model = create()
    except Exception:  # a model whose initialisation needs real tensors: build it on the CPU
        model = create()
    return [la.name for la in resolve_layers(model, layers, model_name=backbone)]


def layer_model_name(model_name: str, layer: str) -> str:
    """The model name of one layer's store: ``final`` keeps the model's name, others are ``<model>@<layer>``."""
    return model_name if layer == FINAL else f"{model_name}@{layer}"


def layer_store_path(path: Path, layer: str) -> Path:
    """The store of one layer beside the model's store ``<model>.zarr``: ``<model>@<layer>.zarr``.

    ``final`` is the model's store itself, so a run without layers and the ``final`` of a
    layered run are the same store.
    """
    path = Path(path)
    if layer == FINAL:
        return path
    stem = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.name
    suffix = ".zarr" if path.name.endswith(".zarr") else ""
    return path.with_name(f"{stem}@{layer}{suffix}")


def layer_attrs(layer: Layer, *, base_model: str, model: torch.nn.Module) -> dict:
    """The attributes a non-final layer's store adds to (or changes in) the model's store attributes."""
    n = len(stages(model))
    how = {"avg": "mean over positions (H x W of a map; the tokens of a sequence, prefix tokens excluded)",
           "cls": "the class token"}[layer.pooling]
    return {
        "layer": layer.name,
        "pooling": layer.pooling,
        "pooling_detail": f"{how}, of the output of module {layer.module!r} (feature_info[{layer.index}])",
        "depth": layer.depth,
        "base_model": base_model,
        "layer_module": layer.module,
        "layer_index": layer.index,
        "num_stages": n,
    }


# --------------------------------------------------------------------------------------------------
# One forward pass for every layer


def _pool(x: torch.Tensor, pooling: str, *, prefix: int, channels_last: bool = False) -> torch.Tensor:
    """``(B, D)`` from a stage output: a map ``(B, C, H, W)`` or tokens ``(B, N, C)``. Accumulates in float32."""
    if x.ndim == 4:
        if pooling != "avg":
            raise ValueError(f"pooling {pooling!r} of a feature map; only avg applies")
        return x.mean(dim=(1, 2) if channels_last else (2, 3), dtype=torch.float32)
    if x.ndim == 3:
        if pooling == "cls":
            return x[:, 0].float()
        return x[:, prefix:].mean(dim=1, dtype=torch.float32)
    raise ValueError(f"a stage output of shape {tuple(x.shape)} is neither a map (B, C, H, W) nor tokens (B, N, C)")


class LayerForward:
    """``images -> {layer name: (B, D) features}`` for a set of layers, from one forward pass.

    ``mode`` is ``plain`` (only ``final``: ``model(x)``), ``intermediates`` (timm's
    ``forward_intermediates``) or ``hooks`` (forward hooks on the ``feature_info`` modules
    during ``model(x)``). Which one is fixed per (model, device, autocast) by :meth:`probe`,
    never by which layers a batch needs, so a layer's bytes do not depend on the other layers
    of its run.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[Layer]):
        self.model = model
        self.layers = list(layers)
        self.prefix = prefix_tokens(model)
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.modules = dict(model.named_modules())
        self._indices = sorted({la.index for la in self.layers if not la.is_final})
        self.mode = "plain" if not self._indices else ("intermediates" if self._has_intermediates() else "hooks")
        self.dims: dict[str, int] = {}

    # -- the two ways of getting a stage's output

    def _has_intermediates(self) -> bool:
        fn = getattr(self.model, "forward_intermediates", None)
        if fn is None:
            return False
        params = inspect.signature(fn).parameters
        needed = {"indices", "intermediates_only", "stop_early"}
        if not needed <= params.keys():
            return False
        if self.prefix and "return_prefix_tokens" not in params:
            return False  # cannot reach the class token through it
        return True

    def _token_intermediates(self) -> bool:
        return "return_prefix_tokens" in inspect.signature(self.model.forward_intermediates).parameters

    def _run_intermediates(self, images: torch.Tensor, indices: list[int], final: bool):
        kwargs = {"indices": indices, "intermediates_only": not final, "stop_early": not final}
        if self._token_intermediates():
            kwargs.update(output_fmt="NLC", return_prefix_tokens=True)
        out = self.model.forward_intermediates(images, **kwargs)
        if final:
            feats, inter = out
            head = self.model.forward_head(feats)
        else:
            inter, head = out, None
        stage_out = {}
        for index, item in zip(indices, inter, strict=True):
            if isinstance(item, tuple | list):  # (patch tokens (B, L, C), prefix tokens (B, P, C))
                spatial, prefix = item
                stage_out[index] = ("split", spatial, prefix)
            elif item.ndim == 3:
                stage_out[index] = ("split", item, None)
            else:
                stage_out[index] = ("map", item, None)
        return head, stage_out

    def _pool_intermediate(self, entry, pooling: str) -> torch.Tensor:
        kind, x, prefix = entry
        if kind == "map":
            return _pool(x, pooling, prefix=0)
        if pooling == "cls":
            if prefix is None:
                raise ValueError("the class token is not among the intermediates")
            return prefix[:, 0].float()
        return x.mean(dim=1, dtype=torch.float32)

    def _run_hooks(self, images: torch.Tensor, indices: list[int]):
        captured: dict[int, torch.Tensor] = {}
        handles = []
        by_index = {s.index: s.module for s in stages(self.model)}
        for index in indices:
            def hook(_module, _inputs, output, index=index):
                if not isinstance(output, torch.Tensor):
                    raise ValueError(f"module {by_index[index]!r} returns {type(output).__name__}, not a tensor; "
                                     "its layer cannot be hooked")
                captured[index] = output
            handles.append(self.modules[by_index[index]].register_forward_hook(hook))
        try:
            head = self.model(images)
        finally:
            for h in handles:
                h.remove()
        return head, captured

    def _pool_hooked(self, x: torch.Tensor, pooling: str) -> torch.Tensor:
        return _pool(x, pooling, prefix=self.prefix, channels_last=self.nhwc and x.ndim == 4)

    # -- public

    def probe(self, images: torch.Tensor) -> None:
        """Fix the mode and the feature dimension of each layer from one small batch.

        ``forward_intermediates`` is kept only when, on ``images``, its stage outputs pool to
        what hooks on the ``feature_info`` modules give, and its final features give what
        ``model(x)`` gives, bit for bit (so ``final`` stays today's bytes).
        """
        if self.mode == "intermediates":
            reason = self._check_intermediates(images)
            if reason:
                log.info("layers: %s; using forward hooks on feature_info modules instead", reason)
                self.mode = "hooks"
        out = self(images, [la.name for la in self.layers])
        self.dims = {name: int(v.shape[1]) for name, v in out.items()}

    def _check_intermediates(self, images: torch.Tensor) -> str | None:
        try:
            head, via_fi = self._run_intermediates(images, self._indices, final=True)
            ref, via_hooks = self._run_hooks(images, self._indices)
        except Exception as exc:  # a model whose forward_intermediates does not take these arguments
            return f"forward_intermediates failed ({type(exc).__name__}: {exc})"
        if not torch.equal(head, ref):
            return "forward_intermediates' final features differ from model(x)"
        for la in self.layers:
            if la.is_final:
                continue
            a = self._pool_intermediate(via_fi[la.index], la.pooling)
            b = self._pool_hooked(via_hooks[la.index], la.pooling)
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                return f"forward_intermediates' {la.name} differs from module {la.module!r}'s output"
        return None

    def __call__(self, images: torch.Tensor, active: Sequence[str]) -> dict[str, torch.Tensor]:
        """Features of the ``active`` layers for one batch, each ``(B, D)`` on the model's device."""
        asked = set(active)
        want = [la for la in self.layers if la.name in asked]
        final = any(la.is_final for la in want)
        indices = sorted({la.index for la in want if not la.is_final})
        if self.mode == "plain" or not indices:
            return {FINAL: self.model(images)} if final else {}
        if self.mode == "intermediates":
            head, got = self._run_intermediates(images, indices, final=final)
            pooled = {la.name: self._pool_intermediate(got[la.index], la.pooling) for la in want if not la.is_final}
        else:
            head, got = self._run_hooks(images, indices)
            pooled = {la.name: self._pool_hooked(got[la.index], la.pooling) for la in want if not la.is_final}
        if final:
            pooled[FINAL] = head
        return pooled


def probe_batch(input_size: Sequence[int], *, device: torch.device, n: int = 2) -> torch.Tensor:
    """A fixed, seeded batch of normalised-looking images for :meth:`LayerForward.probe`."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn((n, *[int(v) for v in input_size]), generator=gen).to(device)
