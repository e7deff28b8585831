"""Backbones: seeded random weights, checkpoint files, the offline Hugging Face cache, transforms."""

from __future__ import annotations

import argparse
import hashlib
import socket

import numpy as np
import pytest
import timm
import torch
from iis.extract.backbones import (
    WeightsError,
    create_backbone,
    element_transform,
    image_transform,
    state_dict_sha256,
)
from PIL import Image
from safetensors.torch import save_file

TINY = "test_vit"  # 0.3M parameters; a ViT, so it takes img_size
TINY_CNN = "test_resnet"  # a CNN, whose constructor has no img_size


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) any socket connection attempt."""
    attempts: list = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point huggingface_hub at an empty cache (it reads HF_HOME at import, so patch the constant too)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _features(backbone, size: int = 32) -> torch.Tensor:
    x = torch.linspace(-1, 1, 2 * 3 * size * size).reshape(2, 3, size, size)
    with torch.no_grad():
        return backbone.model(x)


@pytest.mark.parametrize("name", [TINY, TINY_CNN])
def test_random_weights_are_seeded(name):
    a = create_backbone(backbone=name, weights="random", img_size=32, seed=0)
    b = create_backbone(backbone=name, weights="random", img_size=32, seed=0)
    c = create_backbone(backbone=name, weights="random", img_size=32, seed=1)
    assert a.weights_sha256 == b.weights_sha256 == state_dict_sha256(b.model)
    assert a.weights_sha256 != c.weights_sha256
    assert a.weights_source == "random:seed=0"
    fa, fb, fc = _features(a), _features(b), _features(c)
    assert fa.shape == (2, a.feature_dim) and a.feature_dim == a.model.num_features
    torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    assert not torch.allclose(fa, fc)
    assert not a.model.training


def test_random_weights_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_backbone(backbone=TINY, weights="random", seed=7)
    torch.testing.assert_close(torch.rand(3), expected)


def test_state_dict_sha256_sees_a_single_changed_value():
    model = timm.create_model(TINY, num_classes=0)
    before = state_dict_sha256(model)
    assert state_dict_sha256(model) == before
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert state_dict_sha256(model) != before


def test_unknown_backbone():
    with pytest.raises(ValueError, match="no_such_net"):
        create_backbone(backbone="no_such_net", weights="random")


def test_img_size_goes_into_data_config():
    vit = create_backbone(backbone=TINY, weights="random", img_size=48)
    cnn = create_backbone(backbone=TINY_CNN, weights="random", img_size=48)
    default = create_backbone(backbone=TINY, weights="random")
    assert vit.data_config["input_size"] == cnn.data_config["input_size"] == (3, 48, 48)
    assert default.data_config["input_size"] == (3, 160, 160)
    for key in ("mean", "std", "interpolation", "crop_pct", "crop_mode"):
        assert key in vit.data_config
    assert _features(vit, 48).shape == (2, 64)  # the ViT really runs at 48 px


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip(tmp_path, suffix):
    # The source model keeps its classifier head, as a real checkpoint does.
    torch.manual_seed(42)
    source = timm.create_model(TINY, num_classes=10).eval()
    path = tmp_path / f"ckpt{suffix}"
    state = source.state_dict()
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = create_backbone(backbone=TINY, weights=str(path), seed=5)
    assert loaded.weights_source == f"file:{path.resolve()}"
    assert len(loaded.weights_sha256) == 64 and loaded.weights_sha256 != state_dict_sha256(loaded.model)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        torch.testing.assert_close(loaded.model(x), expected)


def test_weights_replaced_while_loading_are_refused(tmp_path, monkeypatch):
    # The file is replaced by another checkpoint right after its weights went into the model: the
    # store would record the sha256 of weights it did not use, so the load is refused instead.
    path = tmp_path / "ckpt.safetensors"
    first, second = (timm.create_model(TINY_CNN, num_classes=0) for _ in range(2))
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, str(path))
    original = torch.nn.Module.load_state_dict

    def load_then_replace(self, *args, **kw):
        result = original(self, *args, **kw)
        save_file({k: v.contiguous() for k, v in second.state_dict().items()}, str(path))
        return result

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Module, "load_state_dict", load_then_replace)
        with pytest.raises(WeightsError, match="changed while it was being loaded"):
            create_backbone(backbone=TINY_CNN, weights=path)
    loaded = create_backbone(backbone=TINY_CNN, weights=path)  # left alone, it loads
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert state_dict_sha256(loaded.model) == state_dict_sha256(second)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model+args", "ema", "ddp"])
def test_checkpoint_layouts_are_read_as_timm_reads_them(tmp_path, layout):
    torch.manual_seed(3)
    source, ema = timm.create_model(TINY_CNN, num_classes=0), timm.create_model(TINY_CNN, num_classes=0)
    state, ema_state = source.state_dict(), ema.state_dict()
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
             "model+args": {"model": state, "args": argparse.Namespace(lr=0.1)},
             "ema": {"state_dict": state, "state_dict_ema": ema_state},
             "ddp": {f"module.{k}": v for k, v in state.items()}}[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(saved, path)
    loaded = create_backbone(backbone=TINY_CNN, weights=path)
    assert state_dict_sha256(loaded.model) == state_dict_sha256(ema if layout == "ema" else source)
    reference = timm.models.load_state_dict(str(path), weights_only=True)  # what timm itself reads
    assert state_dict_sha256(loaded.model) == state_dict_sha256(_with_state(reference))


def _with_state(state: dict) -> torch.nn.Module:
    model = timm.create_model(TINY_CNN, num_classes=0)
    model.load_state_dict(state)
    return model


def test_weights_file_missing_key(tmp_path):
    state = timm.create_model(TINY_CNN, num_classes=10).state_dict()
    dropped = next(k for k in state if k.endswith(".weight") and not k.startswith("fc."))
    del state[dropped]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=dropped.replace(".", r"\.")):
        create_backbone(backbone=TINY_CNN, weights=path)


def test_weights_file_of_another_architecture(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model(TINY_CNN).state_dict(), path)
    with pytest.raises(WeightsError, match="other.pth"):
        create_backbone(backbone=TINY, weights=path)


def test_weights_file_absent(tmp_path):
    with pytest.raises(WeightsError, match="nowhere.pth"):
        create_backbone(backbone=TINY, weights=tmp_path / "nowhere.pth")


def test_pretrained_without_cache_fails_offline(empty_hf_cache, no_network):
    with pytest.raises(WeightsError, match="weights:") as info:
        create_backbone(backbone=TINY, weights="pretrained")
    assert "test_vit" in str(info.value) and "cache" in str(info.value)
    assert no_network == []
    assert not any(empty_hf_cache.iterdir())  # nothing was fetched or created


def test_pretrained_from_a_populated_cache(empty_hf_cache, no_network):
    """A model found in the Hugging Face cache loads with the hub offline, and its file is hashed."""
    hf_hub_id = timm.models.get_pretrained_cfg(TINY).hf_hub_id
    commit = "0" * 40
    repo = empty_hf_cache / ("models--" + hf_hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.manual_seed(3)
    source = timm.create_model(TINY, num_classes=1000).eval()
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))

    loaded = create_backbone(backbone=TINY, weights="pretrained")
    assert loaded.weights_source == f"hf:{hf_hub_id}"
    import hashlib

    assert loaded.weights_sha256 == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(x), source.forward_head(source.forward_features(x), pre_logits=True)
        )
    assert no_network == []


def test_pretrained_without_hub_id(monkeypatch):
    cfg = timm.models.get_pretrained_cfg(TINY)
    monkeypatch.setattr(cfg, "hf_hub_id", None)
    with pytest.raises(WeightsError, match="local checkpoint"):
        create_backbone(backbone=TINY, weights="pretrained")


def test_image_transform_shape_and_grayscale():
    cfg = create_backbone(backbone=TINY, weights="random", img_size=40).data_config
    tf = image_transform(cfg)
    gray = Image.fromarray((np.arange(30 * 50).reshape(30, 50) % 256).astype(np.uint8))
    out = tf(gray)
    assert out.shape == (3, 40, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], out[1])  # gray replicated into every channel
    assert tf(gray.convert("RGB")).shape == (3, 40, 40)


def test_element_transform_resizes_without_crop():
    cfg = {"input_size": (3, 20, 30), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3}
    # A square image with a white frame around black, stretched to 20x30: the frame must survive
    # on every side (resizing the short side and centre-cropping would cut off top and bottom).
    pixels = np.zeros((60, 60), dtype=np.uint8)
    pixels[:9] = pixels[-9:] = pixels[:, :9] = pixels[:, -9:] = 255
    out = element_transform(cfg)(Image.fromarray(pixels))
    assert out.shape == (3, 20, 30)
    for edge in (out[:, 0, :], out[:, -1, :], out[:, :, 0], out[:, :, -1]):
        assert edge.min() > 1.5  # white: (1 - 0.5) / 0.25 = 2
    assert out[:, 10, 15].max() == pytest.approx(-2.0)  # black centre: (0-0.5)/0.25


def test_uint8_transform_then_batch_normalisation_matches_the_float_transform():
    from iis.extract.backbones import element_transform, image_transform, normalize_batch

    config = {"input_size": (3, 24, 24), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
              "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), mode="L"),
              Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8))]
    for make in (image_transform, element_transform):
        raw = torch.stack([make(config, uint8=True)(im) for im in images])
        assert raw.dtype == torch.uint8 and raw.shape == (2, 3, 24, 24)
        expected = torch.stack([make(config)(im) for im in images])
        torch.testing.assert_close(normalize_batch(raw, config), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "resnet10t", "test_vit"])
def test_feature_dim_is_the_width_of_the_pooled_features(name):
    """MobileNetV3's head has a hidden layer: its pre-logits (1024) are wider than num_features (288)."""
    backbone = create_backbone(backbone=name, weights="random", img_size=32, seed=0)
    with torch.no_grad():
        assert backbone.model(torch.zeros(2, 3, 32, 32)).shape == (2, backbone.feature_dim)
