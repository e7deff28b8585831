"""Visual elements: grid tiling, SLIC segments and their de-duplication, rendering, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from iis.extract.datasets import load_dataset
from iis.extract.elements import ElementPlan, plan_elements, render_element, slic_segments_of
from PIL import Image

# Four flat quadrants of very different colours: SLIC with 4 segments finds exactly the quadrants.
_QUADRANT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))


def _quadrants(size: int = 32) -> np.ndarray:
    half = size // 2
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    for k, (ys, xs) in enumerate(
        (
            (slice(0, half), slice(0, half)),
            (slice(0, half), slice(half, None)),
            (slice(half, None), slice(0, half)),
            (slice(half, None), slice(half, None)),
        )
    ):
        pixels[ys, xs] = _QUADRANT_COLOURS[k]
    return pixels


@pytest.fixture(scope="module")
def digits():
    return load_dataset(source="builtin", name="digits", seed=0)


@pytest.fixture
def quadrant_folder(tmp_path):
    """Two classes of 20 quadrant images each (only the 'a' class is ever inspected closely)."""
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(20):
            Image.fromarray(_quadrants()).save(tmp_path / c / f"{i}.png")
    return load_dataset(source="imagefolder", root=tmp_path)


def test_grid_count_and_provenance(digits):
    plans = plan_elements(digits, images_per_class=3, grid=3, slic=False, seed=0)
    assert len(plans) == 10 * 3 * 9
    assert all(p.kind == "grid" and p.segment == -1 for p in plans)
    train = digits.splits["train"]
    for p in plans:
        assert train.ids[p.source_index] == p.source_id and train.labels[p.source_index] == p.label
    # three distinct images per class, ordered by class then train index
    sources = [(p.label, p.source_index) for p in plans[::9]]
    assert sources == sorted(sources) and len(set(sources)) == 30
    assert [label for label, _ in sources] == [c for c in range(10) for _ in range(3)]


def test_grid_boxes_tile_the_image_exactly(digits):
    plans = plan_elements(digits, images_per_class=1, grid=3, slic=False, seed=0)
    by_image: dict[int, list[ElementPlan]] = {}
    for p in plans:
        by_image.setdefault(p.source_index, []).append(p)
    for index, group in by_image.items():
        width, height = digits.load("train", index).size
        cover = np.zeros((height, width), dtype=int)
        for y0, x0, y1, x1 in (p.box for p in group):
            assert y1 > y0 and x1 > x0
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()  # every pixel in exactly one cell (8 px into 3 cells: 3, 2, 3)


def test_plans_are_deterministic_per_seed(digits):
    a = plan_elements(digits, images_per_class=2, grid=2, slic=True, seed=4, slic_segments=4)
    b = plan_elements(digits, images_per_class=2, grid=2, slic=True, seed=4, slic_segments=4)
    c = plan_elements(digits, images_per_class=2, grid=2, slic=True, seed=5, slic_segments=4)
    assert a == b
    assert {p.source_index for p in a} != {p.source_index for p in c}


def test_slic_elements_exist_with_boxes_around_their_segment(quadrant_folder):
    # A 1x1 grid is the whole image; each quadrant overlaps it by only 1/4, so all four are kept.
    plans = plan_elements(quadrant_folder, images_per_class=1, grid=1, slic=True, seed=0, slic_segments=4)
    for label in (0, 1):
        mine = [p for p in plans if p.label == label]
        assert [p.kind for p in mine] == ["grid"] + ["slic"] * 4
        assert sorted(p.box for p in mine[1:]) == [
            (0, 0, 16, 16),
            (0, 16, 16, 32),
            (16, 0, 32, 16),
            (16, 16, 32, 32),
        ]
        assert all(p.slic_segments == 4 and p.segment >= 0 for p in mine[1:])


def test_slic_segment_equal_to_a_grid_cell_is_dropped(quadrant_folder):
    plans = plan_elements(quadrant_folder, images_per_class=2, grid=2, slic=True, seed=0, slic_segments=4)
    assert len(plans) == 2 * 2 * 4
    assert all(p.kind == "grid" for p in plans)


def test_render_grid_element_is_the_crop():
    image = Image.fromarray(_quadrants())
    plan = ElementPlan(source_index=0, source_id="x", label=0, kind="grid", box=(0, 16, 16, 32), segment=-1)
    out = render_element(image, plan, fill=(0, 0, 0))
    assert out.mode == "RGB" and out.size == (16, 16)
    assert (np.asarray(out) == _QUADRANT_COLOURS[1]).all()


def test_render_slic_element_fills_outside_its_segment():
    # A bright disc on a dark background: the disc's segment has a square box that includes
    # background corners, which must come out as the fill colour.
    yy, xx = np.mgrid[:40, :40]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 < 10**2
    pixels = np.where(disc[..., None], 230, 20).astype(np.uint8).repeat(3, axis=2)
    image = Image.fromarray(pixels[..., 0])  # grayscale source: the output is still RGB
    segments = slic_segments_of(image, n_segments=4)
    seg = int(np.bincount(segments[disc]).argmax())
    mask = segments == seg
    np.testing.assert_array_equal(mask, disc)  # SLIC finds the disc, so the box has background corners
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    plan = ElementPlan(
        source_index=0, source_id="x", label=0, kind="slic", box=box, segment=seg, slic_segments=4
    )
    fill = (123.7, 116.3, 103.5)  # an ImageNet mean x 255: fractional, rounded
    out = np.asarray(render_element(image, plan, fill=fill))
    crop_mask = mask[box[0] : box[2], box[1] : box[3]]
    assert out.shape == (*crop_mask.shape, 3)
    assert (~crop_mask).any() and crop_mask.any()
    assert (out[~crop_mask] == (124, 116, 104)).all()
    assert (out[crop_mask] == pixels[box[0] : box[2], box[1] : box[3]][crop_mask]).all()
    # Passing the precomputed segmentation gives the same pixels.
    np.testing.assert_array_equal(np.asarray(render_element(image, plan, fill=fill, segments=segments)), out)


def test_slic_is_deterministic_and_zero_based():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    a = slic_segments_of(image, n_segments=6)
    b = slic_segments_of(image, n_segments=6)
    assert a.shape == (24, 24)
    np.testing.assert_array_equal(a, b)
    assert a.min() == 0 and set(np.unique(a)) == set(range(a.max() + 1))


def test_unreadable_image_is_replaced(tmp_path, caplog):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(np.full((8, 8), 9 * i, dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(source="imagefolder", root=tmp_path, seed=0)
    train = ds.splits["train"]
    picked = plan_elements(ds, images_per_class=2, grid=1, slic=False, seed=0)
    victim = picked[0].source_id
    (tmp_path / victim).write_bytes(b"not a png at all")
    with caplog.at_level("WARNING", logger="iis.extract.elements"):
        plans = plan_elements(ds, images_per_class=2, grid=1, slic=False, seed=0)
    assert victim in caplog.text
    assert victim not in {p.source_id for p in plans}
    assert len(plans) == 4 and sum(p.label == picked[0].label for p in plans) == 2
    assert all(train.labels[p.source_index] == p.label for p in plans)


def test_element_rows_segment_each_source_image_once_and_render_the_same_bytes(digits, monkeypatch):
    """The extract runner keeps the last source image's SLIC labels for the next element: the
    rows equal elements rendered one by one, with one SLIC run per source image, not per element."""
    import iis.extract.runner as runner
    from iis.extract.backbones import element_transform

    plans = plan_elements(digits, images_per_class=2, grid=2, slic=True, seed=0, slic_segments=6)
    slic_plans = [p for p in plans if p.kind == "slic"]
    sources = {p.source_index for p in slic_plans}
    assert len(slic_plans) > len(sources)  # several SLIC elements per image: something to reuse
    config = {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
              "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    transform = element_transform(config, uint8=True)
    calls = []

    def counted(image, *, n_segments):
        calls.append(n_segments)
        return slic_segments_of(image, n_segments=n_segments)

    monkeypatch.setattr(runner, "slic_segments_of", counted)
    rows = runner._ElementRows(digits, plans, transform, (128, 128, 128))
    for i, plan in enumerate(plans):
        tensor, valid = rows[i]
        expected = transform(render_element(digits.load("train", plan.source_index), plan, fill=(128, 128, 128)))
        assert valid and torch.equal(tensor, expected), plan
    assert len(calls) == len(sources)
