"""The row cache of stage 1: later models read the first model's transformed rows, and the stores
are the same bytes as without it."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
import torch
from iis.extract import rowcache
from iis.extract.datasets import ImageDataset, ImageLoadError, load_dataset

from iis.config import load_pipeline
from iis.jobs import extract_pipeline

PIPELINE = """\
pipelines:
  t:
    dataset: {source: builtin, name: digits, seed: 3}
    models:
      - {name: ra, backbone: resnet10t, img_size: 32, seed: 0}
      - {name: rb, backbone: resnet10t, img_size: 32, seed: 1}
    elements: {images_per_class: 2, grid: 2, slic: true, slic_segments: 4}
    extract: EXTRACT
    store: cache
    results: results
"""


def _pipeline(folder: Path, extract: str):
    folder.mkdir()
    path = folder / "pipelines.yaml"
    path.write_text(PIPELINE.replace("EXTRACT", extract))
    return load_pipeline(path, "t")


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_second_model_reads_cached_rows_and_writes_the_same_bytes(tmp_path, monkeypatch):
    loads = []
    original = ImageDataset.load

    def counted(self, split, index):
        loads.append((split, index))
        return original(self, split, index)

    monkeypatch.setattr(ImageDataset, "load", counted)
    cached = _pipeline(tmp_path / "cached", "{batch_size: 64, block_rows: 256}")
    assert extract_pipeline(cached) == {"ra": True, "rb": True}
    with_cache = len(loads)
    loads.clear()
    plain = _pipeline(tmp_path / "plain", "{batch_size: 64, block_rows: 256, row_cache_mb: 0}")
    assert extract_pipeline(plain) == {"ra": True, "rb": True}
    without = len(loads)
    # Digits: 1,797 images; the elements' S source images are loaded once to plan them (SLIC) and
    # once per model that renders them. With the cache the second model loads nothing:
    # 1,797 + 2 S loads, against 2 x 1,797 + 3 S without.
    sources = (with_cache - 1797) / 2
    assert sources == int(sources) and 0 < sources < 50
    assert without == 2 * 1797 + 3 * sources
    for name in ("ra", "rb"):
        a, b = _tree(cached.store_path(name)), _tree(plain.store_path(name))
        assert a.keys() == b.keys()
        # Creation times may differ; every array chunk must not.
        assert {k: v for k, v in a.items() if "/c/" in k} == {k: v for k, v in b.items() if "/c/" in k}
    assert _tree(cached.store_path("ra")) != _tree(cached.store_path("rb"))  # two models, not one copied


def test_cache_keeps_rows_up_to_its_budget_and_never_an_unreadable_one(caplog):
    from iis.extract.backbones import image_transform
    from iis.extract.runner import _ImageRows

    dataset = load_dataset(source="builtin", name="digits", seed=0)
    bad = 5
    original = dataset.load

    def load(split, index):
        if index == bad:
            raise ImageLoadError("unreadable on purpose")
        return original(split, index)

    dataset.load = load
    config = {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
              "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    transform = image_transform(config, uint8=True)
    row_bytes = 3 * 16 * 16 + rowcache._ROW_OVERHEAD
    cache = rowcache.cache_for(dataset, 4 * row_bytes)  # room for four rows
    rows = _ImageRows(dataset, "train", transform, (3, 16, 16), cache)
    with caplog.at_level(logging.WARNING):
        first = [rows[i] for i in range(8)]
        second = [rows[i] for i in range(8)]
    assert len(cache) == 4 and cache.used <= cache.budget
    assert cache.hits == 4  # rows 0-3 came from the cache the second time, 4-7 were transformed again
    for (x, ok), (y, ok2), i in zip(first, second, range(8), strict=True):
        assert ok == ok2 == (i != bad)
        if ok:
            assert torch.equal(x, y) and torch.equal(x, transform(original("train", i)))
        else:
            assert not x.any()
    # The unreadable image is reported on every pass, not remembered as a row.
    assert sum("unreadable on purpose" in r.getMessage() for r in caplog.records) == 2


def test_cache_goes_with_its_dataset_and_needs_a_stable_transform_name():
    dataset = load_dataset(source="builtin", name="digits", seed=0)
    key = id(dataset)
    cache = rowcache.cache_for(dataset, 2**20)
    assert rowcache.cache_for(dataset, 2**20) is cache
    assert rowcache.cache_for(dataset, 0) is None
    del dataset, cache
    gc.collect()
    assert key not in rowcache._caches

    class Opaque:
        def __call__(self, image):
            return image

    assert rowcache.transform_key(Opaque()) is None  # a repr with an address names nothing stable
    from torchvision import transforms

    assert rowcache.transform_key(transforms.Resize(8)) == repr(transforms.Resize(8))


def test_row_cache_setting_is_checked():
    from iis.extract.runner import ExtractOptions

    with pytest.raises(ValueError, match="row_cache_mb"):
        ExtractOptions(row_cache_mb=-1)
    with pytest.raises(ValueError, match="row_cache_mb"):
        ExtractOptions(row_cache_mb=1.5)
    assert ExtractOptions(row_cache_mb=0).row_cache_mb == 0
