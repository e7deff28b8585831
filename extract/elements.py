"""Visual elements (METHOD.md, "Visual elements"): grid patches and SLIC superpixels of train images.

Planning and rendering are apart. ``plan_elements`` decides, once and deterministically, which
crops exist and records their provenance (source image, box, segment), so an element can be shown
to a person later. ``render_element`` turns one plan into pixels when the backbone needs them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.segmentation import slic

from .datasets import ImageDataset, ImageLoadError

logger = logging.getLogger(__name__)

# A SLIC segment whose mask overlaps an already kept mask of the same image by more than this
# (intersection over union) adds nothing new and is dropped.
_MAX_JACCARD = 0.5


@dataclass(frozen=True)
class ElementPlan:
    """One visual element and where it comes from."""

    source_index: int  # index into dataset.splits["train"]
    source_id: str  # that sample's id
    label: int  # its class index
    kind: str  # "grid" | "slic"
    box: tuple[int, int, int, int]  # (y0, x0, y1, x1) in source-image pixels, end-exclusive
    segment: int  # SLIC label within the source image; -1 for grid
    slic_segments: int = 0  # the n_segments SLIC ran with, so the segment can be recomputed; 0 for grid


def slic_segments_of(image: Image.Image, *, n_segments: int) -> np.ndarray:
    """SLIC superpixels of ``image``: (H, W) int64 labels starting at 0. Deterministic.

    Grayscale images are segmented as RGB so that SLIC always works in Lab space, where its
    default compactness is calibrated; on raw [0, 1] intensities the same compactness would give
    an almost regular grid.
    """
    pixels = np.asarray(image.convert("RGB"))
    labels = slic(pixels, n_segments=n_segments, start_label=0, channel_axis=-1)
    return labels.astype(np.int64)


def _grid_boxes(height: int, width: int, grid: int) -> list[tuple[int, int, int, int]]:
    ys = np.rint(np.linspace(0, height, grid + 1)).astype(int)
    xs = np.rint(np.linspace(0, width, grid + 1)).astype(int)
    boxes = [
        (int(ys[i]), int(xs[j]), int(ys[i + 1]), int(xs[j + 1])) for i in range(grid) for j in range(grid)
    ]
    # An image smaller than the grid has empty cells; they cannot be rendered.
    return [b for b in boxes if b[2] > b[0] and b[3] > b[1]]


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _image_elements(
    image: Image.Image, *, index: int, sample_id: str, label: int, grid: int, slic_n: int | None
) -> list[ElementPlan]:
    width, height = image.size
    base = {"source_index": index, "source_id": sample_id, "label": label}
    plans = [ElementPlan(**base, kind="grid", box=b, segment=-1) for b in _grid_boxes(height, width, grid)]
    if slic_n is None:
        return plans
    # Kept masks as flat float rows, so intersections with a candidate are one matrix product.
    kept = np.zeros((len(plans), height * width), dtype=np.float32)
    for row, (y0, x0, y1, x1) in enumerate(p.box for p in plans):
        kept[row].reshape(height, width)[y0:y1, x0:x1] = 1.0
    segments = slic_segments_of(image, n_segments=slic_n)
    for seg in np.unique(segments):
        mask = segments == seg
        flat = mask.reshape(-1).astype(np.float32)
        inter = kept @ flat
        union = kept.sum(axis=1) + flat.sum() - inter
        if len(inter) and (inter / union).max() > _MAX_JACCARD:
            continue
        plans.append(
            ElementPlan(**base, kind="slic", box=_box_of(mask), segment=int(seg), slic_segments=slic_n)
        )
        kept = np.vstack([kept, flat[None]])
    return plans


def plan_elements(
    dataset: ImageDataset, *, images_per_class: int, grid: int, slic: bool, seed: int, slic_segments: int = 8
) -> list[ElementPlan]:
    """Plan the visual elements of ``images_per_class`` random train images per class.

    Images are drawn with ``np.random.default_rng(seed)``; an unreadable one is skipped with a
    warning and replaced by another of its class. Per image: the ``grid`` x ``grid`` cells that
    tile it, then (if ``slic``) the SLIC segments whose mask has Jaccard <= 0.5 with every mask
    kept before it. Ordered by class, then train index, then element. Deterministic given seed.
    """
    if images_per_class < 1 or grid < 1:
        raise ValueError(f"need images_per_class >= 1 and grid >= 1; got {images_per_class}, {grid}")
    train = dataset.splits["train"]
    rng = np.random.default_rng(seed)
    plans: list[ElementPlan] = []
    for label in range(len(dataset.classes)):
        candidates = rng.permutation(np.flatnonzero(train.labels == label))
        chosen: list[tuple[int, Image.Image]] = []
        for index in candidates:
            if len(chosen) == images_per_class:
                break
            try:
                chosen.append((int(index), dataset.load("train", int(index))))
            except ImageLoadError as exc:
                logger.warning("visual elements: skipping unreadable train image: %s", exc)
        if len(chosen) < images_per_class:
            logger.warning(
                "visual elements: class %r has %d readable train images, fewer than %d",
                dataset.classes[label],
                len(chosen),
                images_per_class,
            )
        for index, image in sorted(chosen, key=lambda pair: pair[0]):
            plans += _image_elements(
                image,
                index=index,
                sample_id=str(train.ids[index]),
                label=label,
                grid=grid,
                slic_n=slic_segments if slic else None,
            )
    logger.info("visual elements: %d planned (%s)", len(plans), dataset.name)
    return plans


def render_element(
    image: Image.Image,
    plan: ElementPlan,
    *,
    fill: tuple[float, float, float],
    segments: np.ndarray | None = None,
) -> Image.Image:
    """The pixels of one element: an RGB crop of ``plan.box`` from its source ``image``.

    For a SLIC element, pixels outside the segment are set to ``fill`` first (callers pass the
    data config mean x 255, so they become 0 after normalisation). ``segments``, the (H, W)
    output of ``slic_segments_of`` for this image, saves recomputing SLIC for each element.
    """
    rgb = image.convert("RGB")
    y0, x0, y1, x1 = plan.box
    if plan.kind == "slic":
        if segments is None:
            if plan.slic_segments < 1:
                raise ValueError(f"SLIC element {plan} does not record its n_segments; pass segments=")
            segments = slic_segments_of(image, n_segments=plan.slic_segments)
        pixels = np.array(rgb)
        # The mean x 255 is fractional; round rather than truncate.
        pixels[segments != plan.segment] = np.clip(np.rint(fill), 0, 255).astype(np.uint8)
        rgb = Image.fromarray(pixels)
    elif plan.kind != "grid":
        raise ValueError(f"unknown element kind {plan.kind!r}; known: grid, slic")
    return rgb.crop((x0, y0, x1, y1))
