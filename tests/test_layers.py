"""Stage 1 at every depth (issue 12): layer names, one forward pass for all layers, one store each.

Per-layer features equal a pooled forward hook on the same module; `final` equals, byte for byte,
the store of a run without layers; resume (after SIGKILL) and shards hold per layer.
"""

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
import torch
import zarr
from iis.analyze.store import open_feature_store
from iis.extract.backbones import create_backbone, image_transform, normalize_batch
from iis.extract.layers import (
    LayerError,
    LayerForward,
    available_layers,
    layer_model_name,
    layer_names,
    layer_store_path,
    resolve_layers,
    stages,
)
from iis.extract.runner import ExtractOptions, extract_layers

from iis import __version__
from iis.config import load_pipeline
from iis.jobs import _load_dataset, _plan_elements, extract_pipeline
from iis.store_format import check_name

DIGITS = "{source: builtin, name: digits, seed: 3}"
MODELS = {"r10": ("resnet10t", 32), "vit": ("test_vit", 32)}


def _yaml(tmp_path: Path, *, extract: str = "{batch_size: 50, block_rows: 128}", img_size: int = 32) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(f"""\
        pipelines:
          t:
            dataset: {DIGITS}
            models:
              - {{name: r10, backbone: resnet10t, img_size: {img_size}}}
              - {{name: vit, backbone: test_vit, img_size: {img_size}}}
            elements: {{images_per_class: 2, grid: 2}}
            extract: {extract}
            store: cache
            results: results
        """))
    return path


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _extract(cfg, model: str, layers, **options) -> dict[str, bool]:
    """Extract ``layers`` of one model of a pipeline, as `iis extract` does for a plain model."""
    entry = cfg.model(model)
    backbone = create_backbone(backbone=entry.backbone, weights=entry.weights, img_size=entry.img_size,
                               seed=entry.seed)
    dataset = _load_dataset(cfg)
    ex = cfg.extract
    opts = ExtractOptions(batch_size=ex.batch_size, block_rows=ex.block_rows, dtype=ex.dtype, device="cpu",
                          **options)
    return extract_layers(cfg.store_path(model), dataset=dataset, backbone=backbone, model_name=model,
                          element_plans=_plan_elements(cfg, dataset), elements_config=cfg.elements.model_dump(),
                          options=opts, layers=layers, pipeline=cfg.name, project_version=__version__)


# ------------------------------------------------------------------------------------------------
# Layer names


@pytest.fixture(scope="module")
def models():
    return {name: create_backbone(backbone=bb, weights="random", img_size=size, seed=0).model
            for name, (bb, size) in MODELS.items()}


def test_layer_names_depths_and_pooling(models):
    r10, vit = models["r10"], models["vit"]
    assert [s.module for s in stages(r10)] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert available_layers(r10) == ["stages.0", "stages.1", "stages.2", "stages.3", "stages.4", "final"]
    layers = resolve_layers(r10, ["final", "stages.3", "stages.1", "stages.1.avg"])  # deduplicated, by depth
    assert [(la.name, la.module, la.pooling) for la in layers] == [
        ("stages.1", "layer1", "avg"), ("stages.3", "layer3", "avg"), ("final", None, None)]
    assert [la.depth for la in layers] == [2 / 6, 4 / 6, 1.0]
    assert [la.name for la in resolve_layers(r10, "all")] == available_layers(r10)
    # A ViT's stages pool as its head does (class token); mean pooling is asked for by name.
    vit_layers = resolve_layers(vit, ["stages.2", "stages.2.cls", "stages.2.avg", "final"])
    assert [(la.name, la.pooling) for la in vit_layers] == [("stages.2", "cls"), ("stages.2.avg", "avg"),
                                                            ("final", None)]
    assert vit_layers[0].depth == 3 / 7 and resolve_layers(vit, "all")[-2].name == "stages.5"
    with pytest.raises(LayerError, match=r"has no layer 'layer9'.*stages\.0 \(act1\), .*stages\.4 \(layer4\), final"):
        resolve_layers(r10, ["layer9"], model_name="r10")
    with pytest.raises(LayerError, match="has no layer 'stages.5'"):
        resolve_layers(r10, ["stages.5"])
    with pytest.raises(LayerError, match="class token"):
        resolve_layers(r10, ["stages.1.cls"])
    # From a timm name alone (config checks), without building weights.
    assert layer_names("test_vit", "all", img_size=32) == [f"stages.{i}" for i in range(6)] + ["final"]
    assert layer_names("resnet10t", ["stages.2.avg", "final"]) == ["stages.2", "final"]
    # Store names and paths: path-safe, `final` is the model's own store.
    for model in ("r10", "r10@e2"):
        for layer in ("stages.1", "stages.3.avg", "final"):
            check_name(layer_model_name(model, layer), what="model")
    assert layer_model_name("r10@e2", "stages.1") == "r10@e2@stages.1" and layer_model_name("r10", "final") == "r10"
    assert layer_store_path(Path("cache/r10@e2.zarr"), "stages.1") == Path("cache/r10@e2@stages.1.zarr")
    assert layer_store_path(Path("cache/r10.zarr"), "final") == Path("cache/r10.zarr")


def test_unknown_layer_leaves_nothing_behind(tmp_path):
    cfg = load_pipeline(_yaml(tmp_path), "t")
    with pytest.raises(LayerError, match=r"available: stages\.0 \(act1\)"):
        _extract(cfg, "r10", ["stages.1", "blocks.3"])
    assert not cfg.store.exists() or not any(cfg.store.glob("*.zarr"))


@pytest.mark.parametrize("model", ["r10", "vit"])
def test_intermediates_and_hooks_give_the_same_features(models, model):
    net = models[model]
    layers = resolve_layers(net, ["all", "stages.1.avg"] if model == "vit" else "all")
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = [la.name for la in layers]
    by_fi, by_hooks = LayerForward(net, layers), LayerForward(net, layers)
    by_hooks.mode = "hooks"
    with torch.inference_mode():
        by_fi.probe(x[:2])
        assert by_fi.mode == "intermediates"
        a, b = by_fi(x, names), by_hooks(x, names)
        assert torch.equal(a["final"], net(x))
        # A subset (no `final`: forward_intermediates stops early) gives the same bits.
        early = by_fi(x, names[:2])
    assert list(a) == list(b) == names and list(early) == names[:2]
    for name in names:
        assert torch.equal(a[name], b[name]), name
    for name in names[:2]:
        assert torch.equal(a[name], early[name]), name
    assert by_fi.dims == {name: a[name].shape[1] for name in names}


def test_forward_intermediates_that_disagree_with_the_model_are_not_used(models, monkeypatch):
    net = models["r10"]
    layers = resolve_layers(net, ["stages.2", "final"])
    original = net.forward_intermediates

    def fused(x, indices=None, stop_early=False, intermediates_only=False):
        # As a model whose forward_intermediates computes its final features in another way.
        out = original(x, indices=indices, stop_early=stop_early, intermediates_only=intermediates_only)
        return out if intermediates_only else (out[0] * (1 + 1e-6), out[1])

    monkeypatch.setattr(net, "forward_intermediates", fused)
    forward = LayerForward(net, layers)
    assert forward.mode == "intermediates"  # until the probe
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        forward.probe(x[:2])
        out = forward(x, ["stages.2", "final"])
        assert forward.mode == "hooks" and torch.equal(out["final"], net(x))


# ------------------------------------------------------------------------------------------------
# Features equal a manual forward


def _rows(dataset, split, data_config):
    transform = image_transform(data_config, uint8=True)
    meta = dataset.splits[split]
    return torch.stack([transform(dataset.load(split, i)) for i in range(len(meta.labels))])


def _hooked(model, module: str, images: torch.Tensor, pool, batch: int = 100) -> np.ndarray:
    """``pool`` of ``module``'s output under a plain forward hook, in batches other than the run's."""
    out = []
    captured = {}
    handle = dict(model.named_modules())[module].register_forward_hook(
        lambda _m, _i, output: captured.__setitem__("x", output))
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                model(images[start:start + batch])
                out.append(pool(captured["x"]).numpy())
    finally:
        handle.remove()
    return np.concatenate(out)


@pytest.mark.parametrize("model", ["r10", "vit"])
def test_layer_features_equal_a_pooled_forward_hook(tmp_path, model):
    cfg = load_pipeline(_yaml(tmp_path, extract="{batch_size: 64, block_rows: 256, dtype: float32}"), "t")
    layers = ["all", "stages.2.avg"] if model == "vit" else "all"
    status = _extract(cfg, model, layers)
    assert all(status.values()) and status[model] is True
    entry = cfg.model(model)
    backbone = create_backbone(backbone=entry.backbone, weights="random", img_size=32, seed=0)
    net, cfg_data = backbone.model.eval(), backbone.data_config
    dataset = _load_dataset(cfg)
    images = {s: normalize_batch(_rows(dataset, s, cfg_data), cfg_data) for s in ("val", "test")}
    resolved = resolve_layers(net, layers)
    assert len(status) == len(resolved) == (7 + 1 if model == "vit" else 6)
    checked = 0
    for layer in resolved:
        name = layer_model_name(model, layer.name)
        store = open_feature_store(cfg.store_path(name))
        attrs = store.attrs
        assert attrs["model"] == name
        if layer.is_final:
            assert attrs["layer"] == "pre_logits" and "depth" not in attrs  # today's store, unchanged
            pool = None
        else:
            assert (attrs["layer"], attrs["pooling"], attrs["depth"], attrs["base_model"], attrs["layer_module"]) == (
                layer.name, layer.pooling, layer.depth, model, layer.module)
            if layer.pooling == "cls":
                def pool(x):
                    return x[:, 0]
            elif model == "vit":
                def pool(x):
                    return x[:, net.num_prefix_tokens:].mean(dim=1)
            else:
                def pool(x):
                    return x.mean(dim=(2, 3))
        for split, x in images.items():
            stored = store.read_split(split)
            assert len(stored.ids) == len(x)  # digits has no invalid rows
            if pool is None:
                with torch.inference_mode():
                    manual = net(x).numpy()
            else:
                manual = _hooked(net, layer.module, x, pool)
            assert stored.x.shape == manual.shape
            np.testing.assert_allclose(stored.x.numpy(), manual, rtol=0, atol=1e-5)
            checked += 1
    assert checked == 2 * len(resolved)


def test_elements_are_embedded_at_every_layer(tmp_path, models):
    cfg = load_pipeline(_yaml(tmp_path, extract="{batch_size: 64, block_rows: 256, dtype: float32}"), "t")
    _extract(cfg, "r10", ["stages.2", "final"])
    plain = open_feature_store(cfg.store_path("r10")).read_elements()
    staged = open_feature_store(cfg.store_path("r10@stages.2")).read_elements()
    assert len(plain) == len(staged) == 10 * 2 * 4
    assert plain.features.shape[1] == 512 and staged.features.shape[1] == 128
    assert list(plain.source_ids) == list(staged.source_ids)


# ------------------------------------------------------------------------------------------------
# `final` unchanged, finished stores untouched, one code path's bytes


@pytest.mark.parametrize("model", ["r10", "vit"])
def test_final_is_byte_identical_to_a_run_without_layers(tmp_path, model):
    plain = load_pipeline(_yaml(tmp_path / "plain"), "t")
    layered = load_pipeline(_yaml(tmp_path / "layered"), "t")
    assert extract_pipeline(plain, models=[model]) == {model: True}  # today's `iis extract`
    assert _extract(layered, model, ["stages.1", "stages.3", "final"]) == {
        f"{model}@stages.1": True, f"{model}@stages.3": True, model: True}
    assert _tree(plain.store_path(model)) == _tree(layered.store_path(model))


def test_finished_stores_are_never_rewritten_and_layers_do_not_depend_on_each_other(tmp_path, monkeypatch):
    one = load_pipeline(_yaml(tmp_path / "one"), "t")
    both = load_pipeline(_yaml(tmp_path / "both"), "t")
    assert _extract(one, "r10", ["final"]) == {"r10": True}
    files = {p: p.stat().st_mtime_ns for p in one.store_path("r10").rglob("*") if p.is_file()}
    # A later run adds a layer: the finished `final` store is not touched, the new one is filled.
    assert _extract(one, "r10", ["stages.2", "final"]) == {"r10@stages.2": True, "r10": True}
    assert {p: p.stat().st_mtime_ns for p in one.store_path("r10").rglob("*") if p.is_file()} == files
    # Each layer's bytes are those of a run that asked for it alone or with others...
    assert _extract(both, "r10", ["stages.2"]) == {"r10@stages.2": True}
    assert _tree(one.store_path("r10@stages.2")) == _tree(both.store_path("r10@stages.2"))
    # ...and those of forward hooks, the way for models without forward_intermediates.
    hooks = load_pipeline(_yaml(tmp_path / "hooks"), "t")
    monkeypatch.setattr(LayerForward, "_has_intermediates", lambda self: False)
    assert _extract(hooks, "r10", ["stages.2", "final"]) == {"r10@stages.2": True, "r10": True}
    for name in ("r10@stages.2", "r10"):
        assert _tree(one.store_path(name)) == _tree(hooks.store_path(name))


def test_shards_hold_per_layer(tmp_path):
    one = load_pipeline(_yaml(tmp_path / "one", extract="{batch_size: 40, block_rows: 100}"), "t")
    two = load_pipeline(_yaml(tmp_path / "two", extract="{batch_size: 40, block_rows: 100}"), "t")
    layers = ["stages.2", "stages.5.avg", "final"]
    names = ["vit@stages.2", "vit@stages.5.avg", "vit"]
    assert _extract(one, "vit", layers) == dict.fromkeys(names, True)
    assert _extract(two, "vit", layers, shard=(0, 2)) == dict.fromkeys(names, False)
    with pytest.raises(Exception, match="incomplete"):
        open_feature_store(two.store_path("vit@stages.2"))
    assert _extract(two, "vit", layers, shard=(1, 2)) == dict.fromkeys(names, True)
    for name in names:
        assert _tree(one.store_path(name)) == _tree(two.store_path(name))


# ------------------------------------------------------------------------------------------------
# Resume across layers after SIGKILL

_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_layers import _extract
from iis.config import load_pipeline
_extract(load_pipeline({yaml!r}, "t"), "r10", {layers!r})
"""


@pytest.mark.slow
def test_resume_across_layers_after_sigkill_is_byte_identical(tmp_path):
    # img_size 96 slows the forward pass enough to kill the process between blocks.
    text = dict(extract="{batch_size: 32, block_rows: 64}", img_size=96)
    layers = ["stages.1", "stages.3", "final"]
    names = ["r10@stages.1", "r10@stages.3", "r10"]
    cfg_a, cfg_b = load_pipeline(_yaml(tmp_path / "a", **text), "t"), load_pipeline(_yaml(tmp_path / "b", **text), "t")
    assert _extract(cfg_a, "r10", layers) == dict.fromkeys(names, True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    code = _CHILD.format(tests=str(Path(__file__).parent), yaml=str(tmp_path / "b" / "pipelines.yaml"), layers=layers)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done_dir = cfg_b.store_path("r10") / "train" / "done" / "c"  # `final` is written last of a block
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (done_dir.exists() and len(list(done_dir.iterdir())) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for name in names:
        done = np.asarray(zarr.open_group(str(cfg_b.store_path(name)), mode="r")["train/done"][:])
        assert 0 < done.sum() < done.size, f"the kill should land mid-run ({name})"
        with pytest.raises(Exception, match="incomplete"):
            open_feature_store(cfg_b.store_path(name))
    assert _extract(cfg_b, "r10", layers) == dict.fromkeys(names, True)  # resumes every layer
    for name in names:
        assert _tree(cfg_a.store_path(name)) == _tree(cfg_b.store_path(name))
