"""The text library (METHOD.md, "Text"), on a planted CLIP whose similarities are known exactly.

The planted CLIP gives every image an embedding whose normalised similarity with word ``j``'s
text embedding is a chosen ``p_ij``, at CLIP-like levels (about 0.2, up to 0.35), so the default
cutoffs (0.25, 0.45) apply unchanged. The words:

- ``good0..good3``: ``p`` linear in ``z · w*_j`` plus a little noise, on train and val: kept.
- ``noise``: ``p`` pure noise, unrelated to ``z``: high top-5, dropped at the val filter.
- ``trainonly``: linear in ``z`` on train, noise on val: only a filter measured on **val** drops it.
- ``orth``: a text embedding orthogonal to every image (``p = 0``): dropped at the top-5 filter.
- ``spike``: linear in ``z`` at a low level, with one train image at 0.6: its top-1 similarity
  passes 0.25 but its top-5 mean does not.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from iis.analyze import libraries
from iis.analyze.artifacts import load_library, save_library
from iis.analyze.heads import HeadFit
from iis.analyze.libraries import ConceptLibrary, ElementSet, LibraryInputs, build_library, get_library
from iis.analyze.libraries import text as text_lib
from iis.analyze.libraries.base import TextInputs
from iis.analyze.libraries.text import TextConfig, cubed_cosine_similarity, fit_text_library

DIM = 16
WORDS = ["good0", "good1", "good2", "good3", "noise", "trainonly", "orth", "spike"]
GOOD = WORDS[:4]
LINEAR = {"good0": 0, "good1": 1, "good2": 2, "good3": 3, "trainonly": 4, "spike": 5}
EXPECTED_DROPS = {"noise": "val_similarity", "trainonly": "val_similarity",
                  "orth": "top5_similarity", "spike": "top5_similarity"}


def _elements() -> ElementSet:
    return ElementSet(features=np.zeros((4, DIM), np.float32), labels=np.zeros(4, np.int64),
                      source_ids=np.array(["a"] * 4), boxes=np.zeros((4, 4), np.int32),
                      kinds=np.array(["grid"] * 4), segments=np.full(4, -1, np.int32))


def _similarities(z: np.ndarray, w_true: np.ndarray, rng: np.random.Generator, *, split: str) -> np.ndarray:
    """The planted ``p (N, T)`` for features ``z``."""
    signal = z @ (w_true / np.linalg.norm(w_true, axis=1, keepdims=True)).T  # (N, 6), each ~ N(0, 1)
    p = np.zeros((z.shape[0], len(WORDS)))
    for j, word in enumerate(WORDS):
        noise = rng.normal(size=z.shape[0])
        if word in GOOD or (word == "trainonly" and split == "train"):
            p[:, j] = 0.2 + 0.04 * signal[:, LINEAR[word]] + 0.004 * noise
        elif word in ("noise", "trainonly"):
            p[:, j] = 0.2 + 0.04 * noise
        elif word == "spike":
            p[:, j] = 0.05 + 0.01 * signal[:, LINEAR[word]]
            if split == "train":
                p[0, j] = 0.6
    return p


def _clip_images(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Embeddings whose normalised similarity with the text embeddings of :func:`_text` is ``p``.

    Dimension ``j < T`` carries word ``j`` (``orth``'s stays 0), dimension ``T`` is ``orth``'s
    (0 for every image), and the last dimension pads the row to unit norm; each row is then
    rescaled at random, which normalisation must undo.
    """
    assert (np.sum(p**2, axis=1) < 1).all()
    num, t = p.shape
    u = np.zeros((num, t + 2))
    u[:, :t] = p
    u[:, t + 1] = np.sqrt(1 - np.sum(p**2, axis=1))
    return u * rng.uniform(0.5, 3.0, size=(num, 1))


def _text(rng: np.random.Generator) -> np.ndarray:
    t = len(WORDS)
    emb = np.eye(t, t + 2)
    emb[WORDS.index("orth")] = np.eye(t + 2)[t]
    return emb * rng.uniform(0.5, 3.0, size=(t, 1))


def _planted(seed: int = 0, n_train: int = 600, n_val: int = 300) -> tuple[LibraryInputs, np.ndarray, dict]:
    """Inputs, the true projection of the linear words ``(6, D)``, and the planted ``p`` per split."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(len(LINEAR), DIM))
    # A feature mean far from 0: the similarity must centre its columns.
    offset = rng.normal(size=DIM) * 3
    z = {"train": rng.normal(size=(n_train, DIM)), "val": rng.normal(size=(n_val, DIM))}
    p = {split: _similarities(z[split], w_true, rng, split=split) for split in z}
    clip = {split: _clip_images(p[split], rng) for split in z}
    text = TextInputs(words=list(WORDS), text_features=_text(rng).astype(np.float32),
                      clip_train=torch.tensor(clip["train"], dtype=torch.float32),
                      clip_val=torch.tensor(clip["val"], dtype=torch.float32))
    inputs = LibraryInputs(elements=_elements(), num_classes=2,
                           train_features=torch.tensor(z["train"] + offset, dtype=torch.float32),
                           train_labels=torch.zeros(n_train, dtype=torch.int64),
                           val_features=torch.tensor(z["val"] + offset, dtype=torch.float32),
                           val_labels=torch.zeros(n_val, dtype=torch.int64), text=text)
    return inputs, w_true, p


def _reference_cos3(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """METHOD.md's cos³ similarity per column, in float64: centre, cube, normalise, dot."""
    a = (x - x.mean(axis=0)) ** 3
    b = (y - y.mean(axis=0)) ** 3
    return (a * b).sum(axis=0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))


@pytest.fixture(scope="module")
def planted() -> tuple[LibraryInputs, np.ndarray, dict]:
    return _planted()


@pytest.fixture(scope="module")
def built(planted) -> ConceptLibrary:
    inputs, _, _ = planted
    return build_library("text", inputs, num_concepts=8, seed=0)


# ---- the similarity ---------------------------------------------------------------------------


def test_cubed_cosine_matches_the_definition() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) + 5.0
    y = x ** 2 + rng.normal(size=(50, 3))
    got = cubed_cosine_similarity(torch.tensor(x), torch.tensor(y)).numpy()
    np.testing.assert_allclose(got, _reference_cos3(x, y), rtol=1e-6)
    # Invariant to positive affine maps of either column, and odd in the sign.
    shifted = cubed_cosine_similarity(torch.tensor(3 * x - 7), torch.tensor(y)).numpy()
    np.testing.assert_allclose(shifted, got, rtol=1e-6)
    np.testing.assert_allclose(cubed_cosine_similarity(torch.tensor(-x), torch.tensor(y)).numpy(), -got, rtol=1e-6)
    # A constant column scores 0, not nan.
    const = cubed_cosine_similarity(torch.ones(10, 1), torch.arange(10.0).unsqueeze(1))
    assert const.item() == 0.0


def test_chunked_val_similarity_matches_the_definition(planted, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, w_true, _ = planted
    monkeypatch.setattr(text_lib, "_CHUNK", 64)  # 300 val rows: 5 chunks, the last one short
    text_unit = torch.nn.functional.normalize(torch.as_tensor(inputs.text.text_features), dim=1)
    weight = torch.as_tensor(np.random.default_rng(1).normal(size=(len(WORDS), DIM)), dtype=torch.float32)
    scorer = text_lib._SplitScorer(inputs.val_features, inputs.text.clip_val, text_unit)
    clip = inputs.text.clip_val.double().numpy()
    p = (clip / np.linalg.norm(clip, axis=1, keepdims=True)) @ text_unit.double().numpy().T
    with np.errstate(invalid="ignore"):  # orth's constant column: 0 / 0
        expected = _reference_cos3(inputs.val_features.double().numpy() @ weight.double().numpy().T, p)
    expected[WORDS.index("orth")] = 0.0  # constant p: defined as 0
    np.testing.assert_allclose(scorer(weight).numpy(), expected, atol=1e-5)


# ---- the build --------------------------------------------------------------------------------


def test_projection_recovers_the_planted_relation(planted, built: ConceptLibrary) -> None:
    _, w_true, _ = planted
    assert built.words == GOOD and built.name == "text" and built.ratio is None
    assert built.kind == "projection" and built.vectors.dtype == np.float32 and built.vectors.shape == (4, DIM)
    val_sim = np.asarray(built.info["val_similarity"])
    assert val_sim.min() > 0.9 and val_sim.mean() > 0.9
    # Each row points along its word's true direction, with the sign CLIP's similarity has.
    unit = built.vectors / np.linalg.norm(built.vectors, axis=1, keepdims=True)
    truth = w_true[[LINEAR[w] for w in GOOD]]
    cosines = np.sum(unit * truth / np.linalg.norm(truth, axis=1, keepdims=True), axis=1)
    assert cosines.min() > 0.95
    assert built.info["best_step"] > 0 and built.info["val_history"][-1] <= max(built.info["val_history"])
    assert all(m.dtype == np.int64 and m.size == 0 for m in built.members) and len(built.members) == 4


def test_filters_drop_exactly_the_planted_concepts(planted, built: ConceptLibrary) -> None:
    _, _, p = planted
    assert {d["word"]: d["reason"] for d in built.dropped} == EXPECTED_DROPS
    assert len(built.dropped) == len(EXPECTED_DROPS)
    values = {d["word"]: d["value"] for d in built.dropped}
    top5 = np.sort(p["train"], axis=0)[-5:].mean(axis=0)  # the planted (exact) mean top-5
    for word, reason in EXPECTED_DROPS.items():
        if reason == "top5_similarity":
            assert values[word] <= 0.25
            assert values[word] == pytest.approx(top5[WORDS.index(word)], abs=1e-5)
        else:
            assert values[word] <= 0.45
    # The spike's single image is above the cutoff: a top-1 filter would have kept it.
    assert p["train"][:, WORDS.index("spike")].max() > 0.25
    # The kept words pass both filters, and their recorded top-5 is the planted one.
    assert min(built.info["top5_similarity"]) > 0.25
    np.testing.assert_allclose(built.info["top5_similarity"], top5[:4], atol=1e-5)
    assert built.info["n_words"] == 8 and built.info["n_after_top5"] == 6 and built.info["n_after_val"] == 4


def test_cutoffs_drop_values_equal_to_them(planted, built: ConceptLibrary) -> None:
    inputs, _, _ = planted
    at_top5 = fit_text_library(inputs, num_concepts=8, seed=0,
                               config=TextConfig(top5_cutoff=built.info["top5_similarity"][2]))
    assert {"word": "good2", "reason": "top5_similarity",
            "value": built.info["top5_similarity"][2]} in at_top5.dropped
    at_val = fit_text_library(inputs, num_concepts=8, seed=0,
                              config=TextConfig(val_cutoff=built.info["val_similarity"][1]))
    # Training does not depend on the val cutoff: the same W, the same values.
    assert {"word": "good1", "reason": "val_similarity", "value": built.info["val_similarity"][1]} in at_val.dropped
    cutoff = built.info["val_similarity"][1]
    assert at_val.words == [w for w, v in zip(GOOD, built.info["val_similarity"], strict=True) if v > cutoff]


def test_num_concepts_keeps_the_best_on_val(planted, built: ConceptLibrary) -> None:
    inputs, _, _ = planted
    capped = build_library("text", inputs, num_concepts=2, seed=0)
    val_sim = np.asarray(built.info["val_similarity"])
    best = sorted(np.argsort(-val_sim)[:2])
    assert capped.words == [GOOD[i] for i in best]
    np.testing.assert_array_equal(capped.vectors, built.vectors[best])
    over = [d for d in capped.dropped if d["reason"] == "num_concepts"]
    assert sorted(d["word"] for d in over) == sorted(set(GOOD) - set(capped.words))
    assert max(d["value"] for d in over) <= min(capped.info["val_similarity"])
    assert capped.info["num_concepts_requested"] == 2


def test_activations_are_standardised_with_train_statistics(planted, built: ConceptLibrary) -> None:
    inputs, _, _ = planted
    train_x, val_x = inputs.train_features, inputs.val_features
    raw_train = train_x.double().numpy() @ built.vectors.astype(np.float64).T
    np.testing.assert_allclose(built.mean, raw_train.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(built.std, raw_train.std(axis=0), rtol=1e-5)
    train_a = built.activations(train_x)
    assert train_a.dtype == torch.float32 and train_a.shape == (600, 4)
    np.testing.assert_allclose(train_a.mean(dim=0).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(train_a.std(dim=0, unbiased=False).numpy(), 1.0, atol=1e-4)
    # Per concept, not per image: an image's activations are not standardised across concepts.
    assert train_a.mean(dim=1).abs().max() > 0.1
    val_a = built.activations(val_x)
    expected = (val_x.double().numpy() @ built.vectors.astype(np.float64).T - built.mean) / built.std
    np.testing.assert_allclose(val_a.numpy(), expected, atol=1e-4)
    assert val_a.mean(dim=0).abs().max() > 1e-3  # val is not re-standardised with its own statistics


def test_seeded_and_pure(planted, built: ConceptLibrary) -> None:
    inputs, _, _ = planted
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002 - the legacy global state is the point
    again = build_library("text", inputs, num_concepts=8, seed=0)
    other = build_library("text", inputs, num_concepts=8, seed=1)
    np.testing.assert_array_equal(again.vectors, built.vectors)
    np.testing.assert_array_equal(again.mean, built.mean)
    np.testing.assert_array_equal(again.std, built.std)
    assert again.dropped == built.dropped and again.words == built.words
    assert not np.allclose(other.vectors, built.vectors)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # noqa: NPY002


def _head_fit(num_concepts: int) -> HeadFit:
    return HeadFit(ratios=[0.0, 0.5], weight=torch.randn(2, num_concepts, 3), bias=torch.zeros(2, 3),
                   input_scale=None, val_top1=np.zeros(2), test_top1=np.zeros(2), test_top5=np.zeros(2),
                   test_correct=np.zeros((2, 1), bool), test_pred=np.zeros((2, 1), np.int64),
                   active_concepts=np.zeros(2, np.int64), best_epoch=np.zeros(2, np.int64), fit_seconds=0.0)


def test_artifacts_round_trip(planted, built: ConceptLibrary, tmp_path) -> None:
    inputs, _, _ = planted
    path = save_library(built, _head_fit(4), library_dir=str(tmp_path), model="m", seed=0, store="s")
    lib, heads = load_library(path)
    assert lib.kind == "projection" and lib.words == built.words and lib.dropped == built.dropped
    np.testing.assert_array_equal(lib.mean, built.mean)
    np.testing.assert_array_equal(lib.std, built.std)
    np.testing.assert_array_equal(lib.vectors, built.vectors)
    assert [m.size for m in lib.members] == [0] * 4
    assert torch.equal(lib.activations(inputs.val_features), built.activations(inputs.val_features))
    assert lib.info["val_similarity"] == built.info["val_similarity"]
    # A cosine library still reads back as one.
    cosine = ConceptLibrary(name="prototype", vectors=np.eye(4, DIM, dtype=np.float32),
                            members=[np.array([i]) for i in range(4)])
    back, _ = load_library(save_library(cosine, _head_fit(4), library_dir=str(tmp_path), model="m", seed=0,
                                        store="s"))
    assert back.kind == "cosine" and back.mean is None and back.std is None and back.dropped == []
    assert torch.equal(back.activations(inputs.val_features), cosine.activations(inputs.val_features))


def test_projection_library_needs_its_statistics() -> None:
    with pytest.raises(ValueError, match="mean"):
        ConceptLibrary(name="text", vectors=np.ones((2, 3), np.float32), members=[], kind="projection")
    with pytest.raises(ValueError, match="kind"):
        ConceptLibrary(name="x", vectors=np.ones((2, 3), np.float32), members=[], kind="other")


# ---- errors -----------------------------------------------------------------------------------


def test_registered_supervised_not_per_ratio() -> None:
    spec = get_library("text")
    assert spec.supervised and not spec.per_ratio
    assert "text" in libraries.list_libraries()


def test_missing_text_is_a_clear_error(planted) -> None:
    inputs, _, _ = planted
    no_text = LibraryInputs(elements=inputs.elements, num_classes=2, train_features=inputs.train_features,
                            val_features=inputs.val_features)
    with pytest.raises(ValueError, match=r"the text library needs CLIP features: add a `text:` section"):
        build_library("text", no_text, num_concepts=4, seed=0)
    no_val = LibraryInputs(elements=inputs.elements, num_classes=2, train_features=inputs.train_features,
                           text=inputs.text)
    with pytest.raises(ValueError, match="val_features"):
        build_library("text", no_val, num_concepts=4, seed=0)
    short = TextInputs(words=list(WORDS), text_features=inputs.text.text_features,
                       clip_train=inputs.text.clip_train[:-1], clip_val=inputs.text.clip_val)
    misaligned = LibraryInputs(elements=inputs.elements, num_classes=2, train_features=inputs.train_features,
                               val_features=inputs.val_features, text=short)
    with pytest.raises(ValueError, match="clip_train"):
        build_library("text", misaligned, num_concepts=4, seed=0)


def test_an_emptied_library_names_its_filter(planted, caplog: pytest.LogCaptureFixture) -> None:
    inputs, _, _ = planted
    with pytest.raises(ValueError, match=r"top5_similarity filter: the largest value is 0\.[23]\d*, not above the cutoff 0\.9"):
        fit_text_library(inputs, num_concepts=8, seed=0, config=TextConfig(top5_cutoff=0.9))
    with caplog.at_level(logging.INFO, logger="iis.analyze.libraries.text"):
        with pytest.raises(ValueError, match=r"val_similarity filter: the largest value is 0\.9\d*, not above the cutoff 0\.9999"):
            fit_text_library(inputs, num_concepts=8, seed=0, config=TextConfig(val_cutoff=0.9999))
    # Every drop was logged with its reason before the error.
    logged = caplog.text
    assert all(f"'{word}'" in logged for word in WORDS)
    assert "top5_similarity" in logged and "val_similarity" in logged
