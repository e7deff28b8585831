"""One unit of stage-2 work: a (store, library, seed) task, run on a Dask worker or in-process.

Tasks receive paths and small parameters, never arrays: each opens its store itself, so the
graph stays tiny and a rescheduled task (after a worker dies) recomputes the same result.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from iis.analyze.allocator import reuse_freed_memory
from iis.analyze.artifacts import save_library
from iis.analyze.heads import DenseHeads, HeadFit, fit_dense_heads, fit_heads
from iis.analyze.heads_model import concat_fits
from iis.analyze.libraries import ConceptLibrary, LibraryInputs, build_library, get_library
from iis.analyze.libraries.base import TextInputs
from iis.analyze.metrics import accuracy_ci
from iis.analyze.store import FeatureStore, SplitData, StoreError, as_str, held_dtype, open_feature_store
from iis.analyze.versioning import analysis_version
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

STANDARD = "standard"  # the `library` value of the standard head's rows
# Default share of physical RAM one task's standard head may hold as train features. Two tasks
# per 2-core node each holding a quarter leaves room for the interpreter, Dask and val/test.
MEMORY_FRACTION = 0.25
REFERENCE_CAVEAT = "selected on test"  # the caveat of every row the reference protocol fitted


def memory_budget(spec_budget: int | None) -> int:
    """Bytes of train features a standard head may hold: ``spec_budget``, or the RAM share."""
    if spec_budget is not None:
        return spec_budget
    import psutil  # a dependency of distributed

    return int(MEMORY_FRACTION * psutil.virtual_memory().total)


@dataclass(frozen=True)
class TaskSpec:
    """What one task computes. Small and picklable: it travels to a worker.

    Attributes:
        store: path of the feature store.
        library: a registered library name, or ``"standard"`` for the head on raw features.
        seed: seeds library sampling and head fitting.
        num_concepts: ``K`` (ignored for the standard head).
        ratios: the sparsity grid, ascending.
        protocol: ``default`` (val-selected) or ``reference`` (the authors' protocol).
        bootstrap: resamples for the accuracy confidence intervals; 0 disables them.
        threads: torch/BLAS threads for this task, so workers do not oversubscribe cores.
        library_dir: where built libraries are saved (``.npz``), or None.
        clip_store: path of the CLIP store, for libraries that need text features.
        options: the library's own settings (its builder's keyword arguments), or None.
        memory_budget: bytes of float32 train features the standard head may hold in memory;
            beyond it, it streams them from the store chunk by chunk. None: a fraction
            (``MEMORY_FRACTION``) of this machine's RAM.
        elements_store: the store whose visual elements build the library (``analysis.library_from``;
            same backbone, weights and layer, checked), or None for this store's own.
        part: the ratios (a part of ``ratios``) whose heads this task fits when the grid is split
            over several tasks (:mod:`iis.analyze.parts`); None: every ratio.
        part_label: the part's place among the grid's parts (``"1of2"``), for a readable Dask key.
    """

    store: str
    library: str
    seed: int
    num_concepts: int
    ratios: tuple[float, ...]
    protocol: str = "default"
    bootstrap: int = 1000
    threads: int = 1
    library_dir: str | None = None
    clip_store: str | None = None
    options: dict | None = None
    memory_budget: int | None = None
    elements_store: str | None = None
    part: tuple[float, ...] | None = None
    part_label: str | None = None  # "2of3": the part's place among its grid's parts, for its Dask key

    @property
    def fitted_ratios(self) -> tuple[float, ...]:
        """The ratios whose heads this task fits: its part's, or the whole grid."""
        return self.part if self.part is not None else self.ratios

    @property
    def key(self) -> str:
        """A readable, unique Dask key."""
        key = f"iis-{Path(self.store).stem}-{self.library}-K{self.num_concepts}-seed{self.seed}-{self.protocol}"
        return key if self.part is None else f"{key}-part{self.part_label or '-'.join(map(repr, self.part))}"


@dataclass
class TaskResult:
    """What a task sends back: table rows and the per-image correctness for bootstraps.

    Attributes:
        spec: the task.
        accuracy_rows: rows of ``accuracy.parquet`` without the model keys.
        concept_rows: rows of ``concepts.parquet`` without the model keys.
        test_correct: ``(R, N_test)`` bool; ``R = 1`` for the standard head.
        test_ids: ``(N_test,)`` str, to check that paired bootstraps pair the same images.
        info: ``seconds``, the task's wall time (for a result merged from parts: the sum of the
            parts' times, without the shared library build) and, for a merged result, ``parts``;
            ``library_digest`` for a part (:func:`library_digest`).
        fit: the heads of a part of a split grid (:func:`run_part`), for :func:`merge_parts`; else None.
    """

    spec: TaskSpec
    accuracy_rows: list[dict]
    concept_rows: list[dict]
    test_correct: np.ndarray
    test_ids: np.ndarray
    info: dict = field(default_factory=dict)
    fit: HeadFit | None = None


def _ci(correct: np.ndarray, spec: TaskSpec) -> tuple[float, float]:
    if spec.bootstrap <= 0:
        return float("nan"), float("nan")
    return accuracy_ci(correct, n_resamples=spec.bootstrap, seed=spec.seed)


def _accuracy_rows(fit: HeadFit, spec: TaskSpec, *, library: str, num_concepts: int | None,
                   ratios: list[float | None], sizes: dict[str, int], caveat: str | None = None) -> list[dict]:
    rows = []
    for r, ratio in enumerate(ratios):
        low, high = _ci(fit.test_correct[r], spec)
        rows.append({
            "library": library, "num_concepts": num_concepts, "sparsity": ratio, "seed": spec.seed,
            "val_top1": float(fit.val_top1[r]), "test_top1": float(fit.test_top1[r]),
            "test_top5": float(fit.test_top5[r]), "test_top1_ci_low": low, "test_top1_ci_high": high,
            "active_concepts": int(fit.active_concepts[r]), "n_train": sizes["train"],
            "n_val": sizes["val"], "n_test": sizes["test"],
            # A per-ratio library's fit time is its own; a grid fitted in one pass shares it.
            "fit_seconds": float(fit.fit_seconds) / (1 if len(ratios) == 1 else len(ratios)),
            "protocol": spec.protocol, "caveat": with_protocol_caveat(caveat, spec.protocol),
            "library_source": spec.elements_store,
            "inverse_l2": _chosen(fit.inverse_l2, r), "learning_rate": _chosen(fit.learning_rate, r),
            "analysis_version": analysis_version(),  # of this process: the code that fitted the head
        })
    return rows


def _chosen(values: np.ndarray | None, r: int) -> float | None:
    return None if values is None else float(values[r])


def with_protocol_caveat(caveat: str | None, protocol: str) -> str | None:
    """``caveat`` joined with ``selected on test`` for a row fitted with the reference protocol,
    which keeps the epoch with the best test top-1 (its test figures are optimistic)."""
    extra = REFERENCE_CAVEAT if protocol == "reference" else None
    return "; ".join(c for c in (caveat, extra) if c) or None


def _concept_rows(lib: ConceptLibrary, store: FeatureStore, spec: TaskSpec, library_file: str | None,
                  caveat: str | None) -> list[dict]:
    """One row per kept concept (its source elements or word), and one per dropped concept."""
    g = store.group["elements"]  # the store the elements came from: provenance indexes its rows
    source_ids = as_str(g["source_id"][:]) if "source_id" in g else None
    boxes = np.asarray(g["box"][:]) if "box" in g else None
    base = {"library": lib.name, "num_concepts": spec.num_concepts, "sparsity": lib.ratio, "seed": spec.seed,
            "library_file": library_file, "caveat": caveat, "library_source": spec.elements_store}
    rows = []
    for k, members in enumerate(lib.members):
        members = np.asarray(members, dtype=np.int64)
        rows.append({
            **base, "concept": k, "word": lib.words[k] if lib.words else None,
            "element_index": members.tolist(),
            "source_id": source_ids[members].tolist() if source_ids is not None else [],
            "box": boxes[members].tolist() if boxes is not None else [],
            "kept": True, "drop_reason": None, "drop_value": None,
        })
    # Dropped concepts (text filters) keep their word, the filter and the value that failed it;
    # they are numbered after the kept ones so the key stays unique.
    for j, drop in enumerate(getattr(lib, "dropped", None) or []):
        rows.append({
            **base, "concept": lib.num_concepts + j, "word": drop.get("word"), "element_index": [],
            "source_id": [], "box": [], "kept": False, "drop_reason": drop.get("reason"),
            "drop_value": float(drop["value"]) if drop.get("value") is not None else None,
        })
    return rows


def _library_dir(spec: TaskSpec) -> str | None:
    """Where the task saves its libraries: one from another store's elements goes to a folder of its
    source, so it never replaces the library of the store's own elements (which explain loads)."""
    if spec.library_dir is None or spec.elements_store is None:
        return spec.library_dir
    digest = hashlib.sha256(str(Path(spec.elements_store).resolve()).encode()).hexdigest()[:12]
    return str(Path(spec.library_dir) / f"from-{digest}")


def warm_starts(spec: TaskSpec) -> bool:
    """Whether a task's concept heads start from its dense heads (``heads_default.fit_default``):
    a library whose concepts are the same at every ratio. A per-ratio library (end2end) has other
    concepts at each ratio, so its heads start from zeros. The reference protocol ignores it."""
    return spec.library != STANDARD and not get_library(spec.library).per_ratio


def trains_dense_heads(spec: TaskSpec) -> bool:
    """Whether a task's trainer fits dense heads first and starts its other heads from them: a
    warm-started library (:func:`warm_starts`) in the default protocols, not the reference."""
    return spec.protocol != "reference" and warm_starts(spec)


def _fit(train: SplitData, val: SplitData, test: SplitData, *, num_classes: int,
         ratios: list[float] | None, spec: TaskSpec, dense: DenseHeads | None = None) -> HeadFit:
    return fit_heads(train=(train.x, train.labels), val=(val.x, val.labels), test=(test.x, test.labels),
                     num_classes=num_classes, ratios=ratios, seed=spec.seed, protocol=spec.protocol,
                     warm_start=warm_starts(spec), dense_heads=dense)


def _text_inputs(spec: TaskSpec, train: SplitData, val: SplitData) -> TextInputs:
    """CLIP image features of train/val (row-aligned with the backbone's) and the concept words."""
    if spec.clip_store is None:
        raise ValueError(f"library {spec.library!r} needs a CLIP store")
    clip = open_feature_store(Path(spec.clip_store))
    text = clip.text_group()  # refuses an absent or unfinished group, by name
    splits = {}
    for name, own in (("train", train), ("val", val)):
        data = clip.read_split(name)
        if not np.array_equal(data.ids, own.ids):
            raise StoreError(f"{spec.clip_store}: {name} rows differ from {spec.store}'s (ids or validity)")
        splits[name] = data.x
    return TextInputs(words=as_str(text["words"][:]).tolist(),
                      text_features=np.asarray(text["features"][:], dtype=np.float32),
                      clip_train=splits["train"], clip_val=splits["val"])


def clip_caveat(clip_store: str | None) -> str | None:
    """The mark every table row made with random CLIP weights carries."""
    if clip_store is None:
        return None
    attrs = dict(open_feature_store(Path(clip_store)).group["text"].attrs)
    return "random CLIP weights (random-for-tests): text concepts are meaningless" if attrs.get("random_weights") else None


@contextlib.contextmanager
def _task_context(spec: TaskSpec) -> Iterator[None]:
    """What every task runs under: reused freed memory, its seed, ``spec.threads`` torch/BLAS threads."""
    # A Dask worker's malloc settings would double the heads' CPU time (allocator.py); fit_heads sets
    # this too, for callers outside tasks, and here it also covers the task's library build.
    reuse_freed_memory()
    torch.manual_seed(spec.seed)
    with threadpool_limits(limits=spec.threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(spec.threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def run_task(spec: TaskSpec) -> TaskResult:
    """Compute one (store, library, seed): build the library, project, fit every ratio's head.

    The activations are computed once per (model, library, seed) and all ratios' heads are
    fitted together; a per-ratio library (end2end) is built and fitted once per ratio (those of
    ``spec.part`` only, when its grid is split over tasks: :func:`merge_parts` joins them).
    """
    if spec.part is not None and (spec.library == STANDARD or not get_library(spec.library).per_ratio):
        raise RuntimeError(f"{spec.key}: a part of a shared library's grid runs in run_part, on the shared build")
    with _task_context(spec):
        return _run(spec)


def _run(spec: TaskSpec) -> TaskResult:
    start = time.perf_counter()
    store = open_feature_store(Path(spec.store))
    if spec.library == STANDARD:
        return _run_standard(spec, store, start)
    source, inputs = _library_inputs(spec, store)
    caveat = clip_caveat(spec.clip_store)
    builds = [None] if not get_library(spec.library).per_ratio else list(spec.fitted_ratios)
    accuracy_rows: list[dict] = []
    concept_rows: list[dict] = []
    correct = []
    test_ids = None
    for ratio in builds:
        lib = build_library(spec.library, inputs, num_concepts=spec.num_concepts, seed=spec.seed, ratio=ratio,
                            options=spec.options)
        ratios = list(spec.ratios) if ratio is None else [ratio]
        fit, rows, test_ids = _fit_library(spec, store, lib, ratios, caveat)
        accuracy_rows += rows
        concept_rows += _save_library(spec, store, source, lib, fit, caveat)
        correct.append(fit.test_correct)
    log.info("%s %s seed %d: %d ratios in %.1f s", store.model, spec.library, spec.seed,
             len(spec.fitted_ratios), time.perf_counter() - start)
    return TaskResult(spec, accuracy_rows, concept_rows, np.concatenate(correct), test_ids,
                      info={"seconds": time.perf_counter() - start})


def _run_standard(spec: TaskSpec, store: FeatureStore, start: float) -> TaskResult:
    # Train is held when its features fit the budget: every epoch then draws batches from memory
    # instead of decoding the store again (a 100k x 512 standard head spent most of its time
    # there). A float16 store's are held as float16 (half the memory of float32; batches become
    # float32 as they are drawn, the same values), any other as float32. Beyond the budget it streams
    # chunk by chunk; val and test are read whole. Decided from the stored array's shape (every
    # row, an upper bound on the usable ones), so that the split is decoded once, not scanned
    # first to count its usable rows.
    stored = store.group["train"]["features"]
    stored_rows, dim = stored.shape
    held = held_dtype(stored.dtype).itemsize * stored_rows * dim <= memory_budget(spec.memory_budget)
    if held:
        train = store.read_split("train", stored_dtype=True)
        train_x, labels = train.x, train.labels
    else:
        train_x = store.chunked_split("train")
        labels = train_x.labels
    log.debug("%s standard head: train features %s", store.model, "held in memory" if held else "streamed")
    val, test = store.read_split("val"), store.read_split("test")
    sizes = {"train": len(labels), "val": len(val.labels), "test": len(test.labels)}
    fit = fit_heads(train=(train_x, labels), val=(val.x, val.labels), test=(test.x, test.labels),
                    num_classes=store.num_classes, ratios=None, seed=spec.seed, protocol=spec.protocol)
    rows = _accuracy_rows(fit, spec, library=STANDARD, num_concepts=None, ratios=[None], sizes=sizes)
    log.info("%s standard head: test top-1 %.4f", store.model, fit.test_top1[0])
    return TaskResult(spec, rows, [], fit.test_correct, test.ids, info={"seconds": time.perf_counter() - start})


def _library_inputs(spec: TaskSpec, store: FeatureStore) -> tuple[FeatureStore, LibraryInputs]:
    """The store whose elements build the library (this one, or ``spec.elements_store``) and the
    library builder's inputs."""
    source = store
    if spec.elements_store is not None:
        from iis.analyze.sources import check_source

        source = open_feature_store(Path(spec.elements_store))
        check_source(store, source)  # again here: a task may be submitted without analyze_stores
    elements = source.read_elements()
    inputs = LibraryInputs(elements=elements, num_classes=store.num_classes)
    lib_spec = get_library(spec.library)
    if lib_spec.supervised:
        train_raw, val_raw = store.read_split("train"), store.read_split("val")
        text = _text_inputs(spec, train_raw, val_raw) if lib_spec.needs_text else None
        inputs = LibraryInputs(elements=elements, num_classes=store.num_classes,
                               train_features=train_raw.x, train_labels=train_raw.labels,
                               val_features=val_raw.x, val_labels=val_raw.labels, text=text)
    return source, inputs


def _fit_library(spec: TaskSpec, store: FeatureStore, lib: ConceptLibrary, ratios: list[float],
                 caveat: str | None, dense: DenseHeads | None = None) -> tuple[HeadFit, list[dict], np.ndarray]:
    """Project every split on ``lib`` and fit the heads of ``ratios`` (from ``dense``, the dense heads
    trained by :func:`dense_task`, when given): the fit, its accuracy rows and the test ids."""
    # Projection happens chunk by chunk inside the reader: N x K is held, never N x D.
    splits = {s: store.read_split(s, transform=lib.activations) for s in ("train", "val", "test")}
    sizes = {s: len(d.labels) for s, d in splits.items()}
    fit = _fit(splits["train"], splits["val"], splits["test"], num_classes=store.num_classes, ratios=ratios, spec=spec,
               dense=dense)
    # Rows carry the requested K: a text library may keep fewer concepts (K' <= K, filters),
    # and the tables line libraries up by the K the user asked for.
    rows = _accuracy_rows(fit, spec, library=spec.library, num_concepts=spec.num_concepts, ratios=ratios,
                          sizes=sizes, caveat=caveat)
    return fit, rows, splits["test"].ids


def _save_library(spec: TaskSpec, store: FeatureStore, source: FeatureStore, lib: ConceptLibrary, fit: HeadFit,
                  caveat: str | None) -> list[dict]:
    """Save ``lib`` with its heads; its ``concepts.parquet`` rows, which name the file."""
    saved = save_library(lib, fit, library_dir=_library_dir(spec), model=store.model, seed=spec.seed,
                         store=spec.store, num_concepts=spec.num_concepts)
    return _concept_rows(lib, source, spec, saved, caveat)


# --------------------------------------------------------------------------------------------------
# One library's ratio grid split over several tasks (iis.analyze.parts plans the split)


def library_digest(lib: ConceptLibrary) -> str:
    """A digest of what a library's activations depend on (its vectors and projection moments)."""
    digest = hashlib.sha256()
    for array in (lib.vectors, lib.mean, lib.std):
        if array is not None:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def build_task(spec: TaskSpec) -> ConceptLibrary:
    """Build the library of a task whose ratio grid is split (one build shared by every part)."""
    if spec.library == STANDARD or get_library(spec.library).per_ratio:
        raise RuntimeError(f"{spec.library!r}: only a library built once for every ratio is shared by parts")
    with _task_context(spec):
        store = open_feature_store(Path(spec.store))
        _, inputs = _library_inputs(spec, store)
        return build_library(spec.library, inputs, num_concepts=spec.num_concepts, seed=spec.seed, ratio=None,
                             options=spec.options)


def dense_task(spec: TaskSpec, lib: ConceptLibrary) -> DenseHeads:
    """Train the dense heads of a split, warm-started grid once, on the shared library ``lib``: every
    part (:func:`run_part`) starts its heads from them instead of training them again."""
    if not trains_dense_heads(spec):
        raise RuntimeError(f"{spec.key}: only a warm-started grid of the default protocols has dense heads to share")
    with _task_context(spec):
        start = time.perf_counter()
        store = open_feature_store(Path(spec.store))
        train = store.read_split("train", transform=lib.activations)
        dense = fit_dense_heads(train=(train.x, train.labels), num_classes=store.num_classes, seed=spec.seed,
                                protocol=spec.protocol)
        log.info("%s %s seed %d: dense heads in %.1f s", store.model, spec.library, spec.seed,
                 time.perf_counter() - start)
        return dense


def run_part(spec: TaskSpec, lib: ConceptLibrary, dense: DenseHeads | None = None) -> TaskResult:
    """Fit the heads of ``spec.part``, a part of the ratio grid, on the shared library ``lib``.

    The heads of a ratio do not depend on the other ratios' (in the default protocol every head
    sees the same batches, drawn from the task's seed; the reference seeds each ratio's head from
    (seed, ratio)), so a split grid gives the heads of the whole one. ``dense``, the grid's dense
    heads from :func:`dense_task`, spares the part training them itself (checked to be trained on
    this part's train activations). The result carries its fit and the digest of the library it
    fitted on, for :func:`merge_parts`; nothing is saved here.
    """
    if spec.part is None:
        raise RuntimeError("run_part needs a spec with a part of the ratio grid")
    with _task_context(spec):
        start = time.perf_counter()
        store = open_feature_store(Path(spec.store))
        fit, rows, test_ids = _fit_library(spec, store, lib, list(spec.part), clip_caveat(spec.clip_store), dense)
        log.info("%s %s seed %d: ratios %s in %.1f s", store.model, spec.library, spec.seed,
                 ", ".join(f"{r:g}" for r in spec.part), time.perf_counter() - start)
        return TaskResult(spec, rows, [], fit.test_correct, test_ids, fit=fit,
                          info={"seconds": time.perf_counter() - start, "library_digest": library_digest(lib)})


def merge_parts(spec: TaskSpec, lib: ConceptLibrary | None, parts: list[TaskResult]) -> TaskResult:
    """One task's result from its parts': rows and per-image results in ratio order. Runs where the
    tables are written.

    Args:
        spec: the whole task.
        lib: the shared library the parts fitted on (:func:`run_part`): it is saved here with every
            part's heads, and its concept rows made once. None for a per-ratio library, whose parts
            (:func:`run_task`) saved their own builds and made their own concept rows.
        parts: the parts' results, in any order.
    """
    ratios = sorted(r for p in parts for r in p.spec.part)
    if ratios != sorted(spec.ratios):
        raise RuntimeError(f"{spec.key}: the parts fitted ratios {ratios}, not the grid {sorted(spec.ratios)}")
    test_ids = parts[0].test_ids
    if any(not np.array_equal(p.test_ids, test_ids) for p in parts):
        raise RuntimeError(f"{spec.store}: the parts of {spec.library} saw different test images")
    rows = sorted((row for p in parts for row in p.accuracy_rows), key=lambda row: row["sparsity"])
    info = {"seconds": sum(p.info.get("seconds", 0.0) for p in parts), "parts": len(parts)}
    if lib is None:
        by_ratio = sorted(((r, p.test_correct[j]) for p in parts for j, r in enumerate(p.spec.part)),
                          key=lambda pair: pair[0])
        concept_rows = sorted((row for p in parts for row in p.concept_rows), key=lambda row: row["sparsity"])
        return TaskResult(spec, rows, concept_rows, np.stack([c for _, c in by_ratio]), test_ids, info=info)
    # A library rebuilt after its worker died (or built twice) must be the one every part fitted on
    # and the one saved: a mismatch would pair heads with concepts they were not fitted on.
    digests = {p.info.get("library_digest") for p in parts} | {library_digest(lib)}
    if len(digests) != 1:
        raise RuntimeError(f"{spec.store} ({spec.library}, seed {spec.seed}): the parts of the ratio grid were "
                           "fitted on different builds of the library (rebuilt after a lost worker?); run it again")
    fit = concat_fits([p.fit for p in parts])
    store = open_feature_store(Path(spec.store))
    source = store if spec.elements_store is None else open_feature_store(Path(spec.elements_store))
    concept_rows = _save_library(spec, store, source, lib, fit, clip_caveat(spec.clip_store))
    return TaskResult(spec, rows, concept_rows, fit.test_correct, test_ids, info=info)
