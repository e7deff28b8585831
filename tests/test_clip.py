"""CLIP for the Text library: offline model creation, concept lists, text features, image stores."""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import zarr
from iis.analyze.store import open_feature_store
from iis.extract import clip as xc
from iis.extract import store as st
from iis.extract.datasets import load_dataset
from iis.extract.runner import ExtractOptions, extract_store
from open_clip.transform import PreprocessCfg, image_transform_v2

ROOT = Path(__file__).resolve().parents[1]
TINY = "iis-tiny-test"
CONCEPTS = ["a closed loop at the top", "a vertical straight stroke", "a horizontal bar", "thick pen strokes"]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a connection fails the test: CLIP must work offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny() -> xc.ClipModel:
    return xc.create_clip(model=TINY, weights=xc.RANDOM_FOR_TESTS, seed=0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(source="builtin", name="digits")


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _embed_images(clip: xc.ClipModel, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return clip.model.encode_image(images).numpy()


# -- creation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["random", "RANDOM-FOR-TESTS", "pretrained", "openai"])
def test_random_or_tag_weights_without_the_exact_flag_are_refused(weights):
    with pytest.raises(xc.ClipError, match="does not exist"):
        xc.create_clip(model=TINY, weights=weights)


def test_random_weights_are_seeded_and_deterministic(tiny):
    again = xc.create_clip(model=TINY, weights=xc.RANDOM_FOR_TESTS, seed=0)
    other = xc.create_clip(model=TINY, weights=xc.RANDOM_FOR_TESTS, seed=1)
    assert tiny.weights == xc.RANDOM_FOR_TESTS and tiny.random_weights
    assert tiny.weights_sha256 == again.weights_sha256 != other.weights_sha256
    np.testing.assert_array_equal(xc.encode_text(tiny, CONCEPTS), xc.encode_text(again, CONCEPTS))
    assert not np.allclose(xc.encode_text(tiny, CONCEPTS), xc.encode_text(other, CONCEPTS))
    before = torch.random.get_rng_state()
    xc.create_clip(model=TINY, weights=xc.RANDOM_FOR_TESTS, seed=5)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is untouched


def test_model_description_comes_from_open_clip(tiny):
    assert not tiny.model.training and tiny.embed_dim == 32 and tiny.name == TINY
    assert tiny.data_config == {
        "input_size": (3, 32, 32), "interpolation": "bicubic",
        "mean": tuple(open_clip.OPENAI_DATASET_MEAN), "std": tuple(open_clip.OPENAI_DATASET_STD),
        "crop_pct": 1.0, "crop_mode": "center",
    }
    assert isinstance(tiny.tokenizer, open_clip.SimpleTokenizer)
    assert tiny.tokenizer(CONCEPTS).shape == (4, 77)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_weights_file_reproduces_its_model(tmp_path, tiny, suffix):
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = xc.create_clip(model=TINY, weights=str(path), seed=7)  # the seed must not matter
    assert loaded.weights == str(path.resolve()) and not loaded.random_weights
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(xc.encode_text(loaded, CONCEPTS), xc.encode_text(tiny, CONCEPTS))
    np.testing.assert_array_equal(_embed_images(loaded, _images()), _embed_images(tiny, _images()))


def test_weights_replaced_while_loading_are_refused(tmp_path, tiny, monkeypatch):
    path = tmp_path / "clip.pt"
    torch.save(tiny.model.state_dict(), path)
    original = xc._create

    def create_then_replace(*args, **kwargs):
        net = original(*args, **kwargs)
        path.write_bytes(path.read_bytes() + b"\0")  # another file by the time it is hashed again
        return net

    monkeypatch.setattr(xc, "_create", create_then_replace)
    with pytest.raises(xc.ClipError, match="changed while it was being loaded"):
        xc.create_clip(model=TINY, weights=path)


def test_missing_or_unfit_weights_files_are_named(tmp_path, tiny):
    missing = tmp_path / "nope" / "clip.bin"
    with pytest.raises(xc.ClipError, match=str(missing)):
        xc.create_clip(model=TINY, weights=missing)
    partial = tmp_path / "partial.pt"
    state = tiny.model.state_dict()
    state.pop("text_projection")
    torch.save(state, partial)
    with pytest.raises(xc.ClipError, match="partial.pt"):
        xc.create_clip(model=TINY, weights=partial)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(xc.ClipError, match="garbage.bin"):
        xc.create_clip(model=TINY, weights=garbage)


@pytest.mark.parametrize("name", ["no-such-clip", "hf-hub:timm/ViT-B-16-SigLIP", "ViT-B-16-SigLIP"])
def test_unknown_or_hub_bound_models_are_refused(name):
    with pytest.raises(xc.ClipError, match=name):
        xc.create_clip(model=name, weights=xc.RANDOM_FOR_TESTS)


def test_missing_shipped_config_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(xc, "CONFIG_DIR", tmp_path / "clip")
    with pytest.raises(xc.ClipError, match=str(tmp_path / "clip" / f"{TINY}.json")):
        xc.create_clip(model=TINY, weights=xc.RANDOM_FOR_TESTS)


def test_real_model_tokenizer_is_offline():
    # Only the tokenizer: building ViT-B-32 would take seconds for nothing.
    assert isinstance(open_clip.get_tokenizer("ViT-B-32"), open_clip.SimpleTokenizer)


@pytest.mark.parametrize(("mode", "crop"), [("shortest", "center"), ("squash", "squash"), ("longest", "border")])
def test_data_config_maps_open_clip_resize_modes(mode, crop):
    cfg = xc.clip_data_config({"size": (224, 160), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                               "interpolation": "bilinear", "resize_mode": mode})
    assert cfg["input_size"] == (3, 224, 160) and cfg["crop_mode"] == crop and cfg["crop_pct"] == 1.0
    assert cfg["interpolation"] == "bilinear" and cfg["mean"] == (0.5, 0.5, 0.5)


# -- concept lists --------------------------------------------------------------------------------


def test_read_concepts_cleans_with_a_warning(tmp_path, caplog):
    path = tmp_path / "c.txt"
    path.write_text("# header\n a closed loop \n\nA Closed  Loop\nthick   strokes\n   \n# x\nthick strokes\nhook\n",
                    encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="iis.extract.clip"):
        assert xc.read_concepts(path) == ["a closed loop", "thick strokes", "hook"]
    (record,) = [r for r in caplog.records if r.name == "iis.extract.clip"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "2 blank line(s)" in message and "lines 3, 6" in message
    assert "2 duplicate(s)" in message and "line 4" in message and "line 8" in message


def test_read_concepts_refuses_an_empty_list(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no concepts"):
        xc.read_concepts(path)


def test_concepts_sha256_is_of_the_cleaned_list():
    assert xc.concepts_sha256(["a", "b"]) == hashlib.sha256(b"a\nb\n").hexdigest()
    assert xc.concepts_sha256(["a", "b"]) != xc.concepts_sha256(["b", "a"])


@pytest.mark.parametrize("dataset", ["mnist5k", "digits"])
def test_shipped_lists_load_cleanly(dataset, caplog):
    with caplog.at_level(logging.WARNING):
        concepts = xc.read_concepts(ROOT / "data" / "concepts" / f"{dataset}.txt")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(concepts) >= 30
    classes = (ROOT / "data" / "classes" / f"{dataset}.txt").read_text(encoding="utf-8").split()
    assert classes == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    named = [c for c in concepts if set(c.casefold().split()) & set(classes)]
    assert not named, f"concepts that name a class: {named}"


# -- text features --------------------------------------------------------------------------------


def test_encode_text_shape_and_batching(tiny):
    feats = xc.encode_text(tiny, CONCEPTS)
    assert feats.shape == (4, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(xc.encode_text(tiny, CONCEPTS, batch_size=3), feats, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.linalg.norm(feats, axis=1), 1.0)  # raw, not normalised
    with torch.inference_mode():
        direct = tiny.model.encode_text(open_clip.get_tokenizer(TINY)(CONCEPTS[1:2])).numpy()
    np.testing.assert_allclose(feats[1:2], direct, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def image_store(tmp_path_factory, tiny, digits):
    path = tmp_path_factory.mktemp("clip") / "clip.zarr"
    complete = extract_store(
        path, dataset=digits, backbone=xc.clip_backbone(tiny), model_name="clip", element_plans=[],
        elements_config=None, options=ExtractOptions(batch_size=128, block_rows=512, device="cpu"),
    )
    assert complete
    return path


def test_clip_backbone_fills_an_ordinary_store(image_store, tiny, digits):
    store = open_feature_store(image_store)
    assert store.feature_dim == tiny.embed_dim == 32
    assert store.attrs["backbone"] == f"clip:{TINY}" and store.attrs["weights_sha256"] == tiny.weights_sha256
    assert store.attrs["weights"] == f"{xc.RANDOM_FOR_TESTS}:seed=0"
    assert store.attrs["data_config"]["input_size"] == [3, 32, 32] and store.attrs["num_elements"] == 0
    test = store.read_split("test")
    assert test.x.shape == (len(digits.splits["test"]), 32) and torch.isfinite(test.x).all()
    # The stored rows are encode_image of open_clip's own preprocessing of the same images.
    preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(tiny.model)), is_train=False)
    rows = [0, 7, len(test.ids) - 1]
    images = torch.stack([preprocess(digits.load("test", i).convert("RGB")) for i in rows])
    expected = _embed_images(tiny, images)
    np.testing.assert_allclose(test.x[rows].numpy(), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    assert not np.allclose(test.x[rows[0]].numpy(), test.x[rows[1]].numpy(), atol=1e-2)


def test_text_features_round_trip_and_resume(image_store, tiny, tmp_path, caplog):
    feats = xc.encode_text(tiny, CONCEPTS)
    attrs = xc.text_attrs(tiny, "data/concepts/x.txt")
    xc.write_text_features(image_store, concepts=CONCEPTS, features=feats, attrs=attrs)
    group = zarr.open_group(str(image_store), mode="r")
    assert group["text/features"].metadata.dimension_names == ("concept", "feature")
    assert group["text/words"].metadata.dimension_names == ("concept",)
    words, back, stored = xc.read_text_features(image_store)
    assert words == CONCEPTS and back.dtype == np.float32
    np.testing.assert_array_equal(back, feats)
    assert stored["concepts_sha256"] == xc.concepts_sha256(CONCEPTS) and stored["random_weights"] is True
    assert stored["clip_model"] == TINY and stored["weights_sha256"] == tiny.weights_sha256
    assert stored["concepts_path"] == "data/concepts/x.txt"
    open_feature_store(image_store)  # the extra group leaves the image store readable

    before = (image_store / "text" / "zarr.json").stat().st_mtime_ns
    xc.write_text_features(image_store, concepts=CONCEPTS, features=feats + 1, attrs=attrs)
    assert (image_store / "text" / "zarr.json").stat().st_mtime_ns == before  # a no-op
    np.testing.assert_array_equal(xc.read_text_features(image_store)[1], feats)

    with pytest.raises(st.StoreError, match=str(image_store)):
        xc.write_text_features(image_store, concepts=CONCEPTS[:3], features=feats[:3], attrs=attrs)
    with pytest.raises(st.StoreError, match=str(image_store)):
        xc.write_text_features(image_store, concepts=CONCEPTS, features=feats,
                               attrs={**attrs, "weights_sha256": "0" * 64})


def test_text_features_are_checked_against_the_store(image_store, tiny):
    attrs = xc.text_attrs(tiny, "x.txt")
    with pytest.raises(ValueError, match="shape"):
        xc.write_text_features(image_store, concepts=CONCEPTS, features=np.zeros((4, 16), np.float32), attrs=attrs)
    with pytest.raises(ValueError, match="text_attrs"):
        xc.write_text_features(image_store, concepts=CONCEPTS, features=np.zeros((4, 32), np.float32),
                               attrs={"clip_model": TINY})


def test_an_unfinished_text_group_is_redone(tmp_path, tiny):
    path = tmp_path / "s.zarr"
    st.create_store(path, split_sizes={"train": 2, "val": 1, "test": 1}, feature_dim=32,
                    attrs={"weights_sha256": tiny.weights_sha256}, elements=None, block_rows=4)
    zarr.open_group(str(path), mode="r+").create_group("text")  # as left by a crash before the attrs
    feats = xc.encode_text(tiny, CONCEPTS)
    xc.write_text_features(path, concepts=CONCEPTS, features=feats, attrs=xc.text_attrs(tiny, "x.txt"))
    assert xc.read_text_features(path)[0] == CONCEPTS


def test_clip_backbone_is_encode_image(tiny):
    backbone = xc.clip_backbone(tiny)
    images = _images(3)
    with torch.inference_mode():
        np.testing.assert_array_equal(backbone.model(images).numpy(), _embed_images(tiny, images))
    assert backbone.feature_dim == 32 and backbone.backbone == f"clip:{TINY}"
    assert backbone.weights_sha256 == tiny.weights_sha256
