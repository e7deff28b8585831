"""Concept-library builders: the contract every registered library keeps, and planted data.

The generic tests run over the registry, so a new library is covered without new test code. The
planted tests use elements drawn around known orthonormal directions, where the right answer is
known.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from iis.analyze.libraries import (
    ElementSet,
    LibraryInputs,
    build_library,
    cluster,
    get_library,
    list_libraries,
)
from iis.analyze.libraries.end2end import End2EndConfig, fit_end2end
from iis.analyze.libraries.prototype import stratified_quotas
from scipy.optimize import linear_sum_assignment

CONTRACT_K = 12
CONTRACT_RATIO = 0.5


def _element_set(features: np.ndarray, labels: np.ndarray) -> ElementSet:
    num = features.shape[0]
    return ElementSet(
        features=np.asarray(features, dtype=np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        source_ids=np.array([f"img{i // 4}" for i in range(num)]),
        boxes=np.zeros((num, 4), dtype=np.int32),
        kinds=np.array(["grid"] * num),
        segments=np.full(num, -1, dtype=np.int32),
    )


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


def _build(name: str, inputs: LibraryInputs, *, num_concepts: int, seed: int):
    ratio = CONTRACT_RATIO if get_library(name).per_ratio else None
    return build_library(name, inputs, num_concepts=num_concepts, seed=seed, ratio=ratio)


@pytest.fixture(scope="module")
def random_inputs() -> LibraryInputs:
    """Unstructured data: 120 Gaussian elements over 6 classes, D = 16, random train/val labels."""
    rng = np.random.default_rng(0)
    return LibraryInputs(
        elements=_element_set(rng.normal(size=(120, 16)), np.repeat(np.arange(6), 20)),
        num_classes=6,
        train_features=_tensor(rng.normal(size=(300, 16))),
        train_labels=torch.as_tensor(rng.integers(0, 6, 300)),
        val_features=_tensor(rng.normal(size=(100, 16))),
        val_labels=torch.as_tensor(rng.integers(0, 6, 100)),
    )


def _planted(
    seed: int, *, num_dirs: int = 8, dim: int = 32, per_dir: int = 20
) -> tuple[np.ndarray, LibraryInputs]:
    """Elements around ``num_dirs`` orthonormal directions (label = direction), and images whose
    class is the direction their feature lies along. Returns the directions ``(M, D)`` too."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(dim, num_dirs)))[0].T
    element_dirs = np.repeat(np.arange(num_dirs), per_dir)
    # Element noise of norm ~0.1 against unit directions: well separated, not identical.
    elements = directions[element_dirs] + 0.1 * rng.normal(size=(element_dirs.size, dim)) / np.sqrt(dim)

    def images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.integers(0, num_dirs, count)
        features = 3.0 * directions[labels] + 0.5 * rng.normal(size=(count, dim)) / np.sqrt(dim)
        return _tensor(features), torch.as_tensor(labels)

    train_x, train_y = images(400)
    val_x, val_y = images(200)
    inputs = LibraryInputs(
        elements=_element_set(elements, element_dirs),
        num_classes=num_dirs,
        train_features=train_x,
        train_labels=train_y,
        val_features=val_x,
        val_labels=val_y,
    )
    return directions, inputs


def _matched_cosines(vectors: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of concepts to directions by cosine: (direction of each concept, cosines)."""
    cos = vectors @ directions.T
    rows, cols = linear_sum_assignment(-cos)
    matched = np.empty(vectors.shape[0], dtype=np.int64)
    matched[rows] = cols
    return matched, cos[rows, cols]


def _purity(assignment: np.ndarray, truth: np.ndarray) -> float:
    """Share of elements that sit in their concept's majority direction."""
    return sum(np.bincount(truth[assignment == k]).max() for k in np.unique(assignment)) / assignment.size


# ---- the contract, over the registry ---------------------------------------------------------

# Libraries built from visual elements: unit-norm concept vectors with element provenance.
# Text libraries (CLIP inputs, projection vectors, words) have their own contract in
# tests/test_text_library.py.
ELEMENT_LIBRARIES = [n for n in list_libraries() if not get_library(n).needs_text]
TEXT_LIBRARIES = [n for n in list_libraries() if get_library(n).needs_text]


@pytest.mark.parametrize("name", ELEMENT_LIBRARIES)
def test_contract(name: str, random_inputs: LibraryInputs) -> None:
    library = _build(name, random_inputs, num_concepts=CONTRACT_K, seed=0)
    assert library.name == name
    assert library.vectors.dtype == np.float32
    assert library.vectors.shape == (CONTRACT_K, 16)
    np.testing.assert_allclose(np.linalg.norm(library.vectors, axis=1), 1.0, atol=1e-5)
    assert len(library.members) == CONTRACT_K
    for members in library.members:
        assert members.dtype == np.int64 and 1 <= members.size <= 8
        assert members.min() >= 0 and members.max() < len(random_inputs.elements)
    expected_ratio = CONTRACT_RATIO if get_library(name).per_ratio else None
    assert library.ratio == expected_ratio


@pytest.mark.parametrize("name", ELEMENT_LIBRARIES)
def test_seeded_and_pure(name: str, random_inputs: LibraryInputs) -> None:
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002 - the legacy global state is the point
    first = _build(name, random_inputs, num_concepts=CONTRACT_K, seed=3)
    again = _build(name, random_inputs, num_concepts=CONTRACT_K, seed=3)
    other = _build(name, random_inputs, num_concepts=CONTRACT_K, seed=4)
    np.testing.assert_array_equal(first.vectors, again.vectors)
    assert all(np.array_equal(a, b) for a, b in zip(first.members, again.members, strict=True))
    assert not np.allclose(first.vectors, other.vectors)
    # A builder draws from its own generators, never the global ones.
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # noqa: NPY002


@pytest.mark.parametrize("name", TEXT_LIBRARIES)
def test_text_library_without_clip_inputs_says_what_is_missing(name: str, random_inputs: LibraryInputs) -> None:
    with pytest.raises(ValueError, match="CLIP features"):
        _build(name, random_inputs, num_concepts=CONTRACT_K, seed=0)


@pytest.mark.parametrize("name", ELEMENT_LIBRARIES)
def test_more_concepts_than_elements_is_an_error(name: str, random_inputs: LibraryInputs) -> None:
    with pytest.raises(ValueError, match=r"121.*120"):
        _build(name, random_inputs, num_concepts=121, seed=0)


def test_unknown_library_lists_the_known_ones(random_inputs: LibraryInputs) -> None:
    with pytest.raises(ValueError, match="unknown concept library 'nope'") as raised:
        build_library("nope", random_inputs, num_concepts=4, seed=0)
    assert all(name in str(raised.value) for name in list_libraries())
    assert {"prototype", "cluster", "end2end"} <= set(list_libraries())


def test_end2end_is_registered_per_ratio_and_supervised(random_inputs: LibraryInputs) -> None:
    spec = get_library("end2end")
    assert spec.per_ratio and spec.supervised
    with pytest.raises(ValueError, match="ratio"):
        build_library("end2end", random_inputs, num_concepts=4, seed=0)


# ---- prototype ------------------------------------------------------------------------------


def test_prototype_covers_each_planted_class_once() -> None:
    directions, inputs = _planted(seed=1)
    library = build_library("prototype", inputs, num_concepts=8, seed=0)
    chosen = np.concatenate(library.members)
    assert sorted(inputs.elements.labels[chosen]) == list(range(8))
    # Each concept is its own element, normalised.
    own = inputs.elements.features[chosen]
    np.testing.assert_allclose(library.vectors, own / np.linalg.norm(own, axis=1, keepdims=True), atol=1e-6)
    _, cosines = _matched_cosines(library.vectors, directions)
    assert cosines.min() > 0.95


@pytest.mark.parametrize("seed", range(5))
def test_prototype_draws_two_per_class(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), 9))
    inputs = LibraryInputs(elements=_element_set(rng.normal(size=(90, 8)), labels), num_classes=10)
    library = build_library("prototype", inputs, num_concepts=20, seed=seed)
    chosen = np.concatenate(library.members)
    assert np.unique(chosen).size == 20
    np.testing.assert_array_equal(np.bincount(labels[chosen], minlength=10), np.full(10, 2))


def test_stratified_quotas_share_out_what_small_classes_lack() -> None:
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(stratified_quotas(np.array([1, 5, 5]), 9, rng=rng), [1, 4, 4])
    np.testing.assert_array_equal(stratified_quotas(np.array([2, 9, 3]), 14, rng=rng), [2, 9, 3])
    uneven = stratified_quotas(np.array([4, 4, 4, 4]), 6, rng=rng)
    assert uneven.sum() == 6 and set(uneven.tolist()) == {1, 2}
    # The classes that get one more are drawn, not always the first ones.
    lucky = {tuple(stratified_quotas(np.array([4, 4, 4, 4]), 6, rng=rng)) for _ in range(20)}
    assert len(lucky) > 1
    with pytest.raises(ValueError):
        stratified_quotas(np.array([1, 1]), 3, rng=rng)


# ---- cluster --------------------------------------------------------------------------------


def test_cluster_recovers_planted_directions() -> None:
    directions, inputs = _planted(seed=2)
    library = build_library("cluster", inputs, num_concepts=8, seed=0)
    matched, cosines = _matched_cosines(library.vectors, directions)
    assert cosines.min() > 0.95
    unit = inputs.elements.features / np.linalg.norm(inputs.elements.features, axis=1, keepdims=True)
    for k, members in enumerate(library.members):
        assert members.size == 8
        # Nearest first, and the nearest over the whole element set.
        sims = unit[members] @ library.vectors[k]
        assert np.all(np.diff(sims) <= 1e-6)
        assert sims[-1] >= np.sort(unit @ library.vectors[k])[-8] - 1e-6
        np.testing.assert_array_equal(inputs.elements.labels[members], matched[k])
    assert library.info["n_elements_used"] == 160
    assert library.info["inertia"] > 0 and library.info["n_iter"] >= 1


def test_cluster_subsamples_above_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    directions, inputs = _planted(seed=3)
    monkeypatch.setattr(cluster, "MAX_KMEANS_ELEMENTS", 100)
    library = build_library("cluster", inputs, num_concepts=8, seed=0)
    assert library.info["n_elements_used"] == 100
    # Members still come from the full set of 160 elements.
    assert max(int(m.max()) for m in library.members) >= 100
    _, cosines = _matched_cosines(library.vectors, directions)
    assert cosines.min() > 0.95


# ---- end2end --------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.875])
def test_end2end_learns_the_planted_partition(ratio: float) -> None:
    directions, inputs = _planted(seed=4)
    library = build_library("end2end", inputs, num_concepts=8, seed=0, ratio=ratio)
    info = library.info
    assert info["train_loss"][-1] < info["train_loss"][0]
    assert info["val_top1"] > 0.9 and info["val_top1"] == info["val_top1_per_epoch"][info["best_epoch"]]
    assignment = np.asarray(info["assignment"])
    assert _purity(assignment, inputs.elements.labels) > 0.9
    _, cosines = _matched_cosines(library.vectors, directions)
    assert cosines.min() > 0.95
    # The vectors are the noise-free partition's normalised sums: recompute them from it.
    unit = inputs.elements.features / np.linalg.norm(inputs.elements.features, axis=1, keepdims=True)
    sums = np.stack([unit[assignment == k].sum(axis=0) for k in range(8)])
    np.testing.assert_allclose(library.vectors, sums / np.linalg.norm(sums, axis=1, keepdims=True), atol=1e-5)
    for k, members in enumerate(library.members):
        assert set(members.tolist()) <= set(np.flatnonzero(assignment == k).tolist())
    again = build_library("end2end", inputs, num_concepts=8, seed=0, ratio=ratio)
    np.testing.assert_array_equal(library.vectors, again.vectors)


def test_end2end_logits_learn_from_the_loss() -> None:
    """From random logits, training must raise purity far above what frozen logits keep."""
    _, inputs = _planted(seed=5)
    purity = {}
    for lr in (0.0, 0.3):
        config = End2EndConfig(init="random", lr_logits=lr)
        library = fit_end2end(inputs, num_concepts=8, seed=0, ratio=0.5, config=config)
        purity[lr] = _purity(np.asarray(library.info["assignment"]), inputs.elements.labels)
    assert purity[0.0] < 0.35
    assert purity[0.3] > purity[0.0] + 0.15


def test_end2end_empty_concepts_fall_back_to_an_element() -> None:
    # Two distinct elements, each three times, for four concepts: two concepts must stay empty.
    features = np.repeat(np.eye(4)[:2], 3, axis=0)
    train_labels = torch.as_tensor([0, 1] * 20)
    inputs = LibraryInputs(
        elements=_element_set(features, np.array([0, 0, 0, 1, 1, 1])),
        num_classes=2,
        train_features=_tensor(np.eye(4)[train_labels.numpy()]),
        train_labels=train_labels,
        val_features=_tensor(np.eye(4)[[0, 1] * 5]),
        val_labels=torch.as_tensor([0, 1] * 5),
    )
    library = build_library("end2end", inputs, num_concepts=4, seed=0, ratio=0.0)
    assert np.isfinite(library.vectors).all()
    np.testing.assert_allclose(np.linalg.norm(library.vectors, axis=1), 1.0, atol=1e-6)
    assert library.info["empty_concepts"] == 2
    used = set(library.info["assignment"])
    for k in set(range(4)) - used:
        assert library.members[k].size == 1
        np.testing.assert_allclose(library.vectors[k], features[library.members[k][0]], atol=1e-6)


def test_end2end_needs_val(random_inputs: LibraryInputs) -> None:
    no_val = LibraryInputs(
        elements=random_inputs.elements,
        num_classes=6,
        train_features=random_inputs.train_features,
        train_labels=random_inputs.train_labels,
    )
    with pytest.raises(ValueError, match="val"):
        build_library("end2end", no_val, num_concepts=4, seed=0, ratio=0.5)
