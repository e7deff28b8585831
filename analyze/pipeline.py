"""Stage 2's entry point: schedule one task per (model, library, seed) on Dask, then write
the tables. ``analyze_stores`` takes explicit arguments; the CLI unpacks configs into them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from iis.analyze import tables
from iis.analyze.libraries import get_library
from iis.analyze.parts import plan_parts, task_cost
from iis.analyze.ranking import ranking_current, ranking_rows, save_correctness
from iis.analyze.sources import check_sources, store_layer
from iis.analyze.store import FeatureStore, StoreError, open_feature_store
from iis.analyze.summary import correlated, correlation_rows, iis_rows
from iis.analyze.tasks import (
    STANDARD,
    TaskResult,
    TaskSpec,
    build_task,
    dense_task,
    merge_parts,
    run_part,
    run_task,
    trains_dense_heads,
)
from iis.analyze.versioning import analysis_version, models_by_version, version_caveat, version_label

from iis.progress import progress

log = logging.getLogger(__name__)

# Loaded in every LocalCluster worker (quiets a shutdown race's log noise; see the module).
WORKER_PRELOAD = "iis.analyze.dask_worker"
ANALYSIS_TABLES = ("accuracy", "concepts", "iis", "correlation", "ranking")  # what one analysis commits together


@dataclass(frozen=True)
class ClusterOptions:
    """Where tasks run.

    Attributes:
        scheduler: address of an existing scheduler (``tcp://host:8786``), or None for a
            LocalCluster started here.
        workers: LocalCluster worker processes.
        threads: torch/BLAS threads per task (and Dask threads per worker: one task each).
        synchronous: run every task in this process, in order, without Dask.
        memory_budget: bytes of train features (float16 stays float16) one task's standard head may hold in
            memory (beyond it, they stream from the store); None: a share of each worker's RAM
            (:data:`iis.analyze.tasks.MEMORY_FRACTION`).
        shared: a LocalCluster that this and later analyses use, started on first use
            (:func:`shared_cluster`); None: each analysis starts its own.
        head_parts: tasks each library's ratio grid is split over (:mod:`iis.analyze.parts`);
            None: the task slots divided among the library tasks, rounded down (so a grid splits
            where there are at least twice as many slots as library tasks); 1: never split.
            Ignored when ``synchronous``.
    """

    scheduler: str | None = None
    workers: int = 2
    threads: int = 1
    synchronous: bool = False
    memory_budget: int | None = None
    shared: SharedCluster | None = None  # a LocalCluster kept between analyses (shared_cluster)
    head_parts: int | None = None

    def __post_init__(self) -> None:
        # A LocalCluster of 0 workers waits for a worker forever; 0 threads is no torch setting.
        for name in ("workers", "threads", "head_parts"):
            value = getattr(self, name)
            if name == "head_parts" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _thread_env(threads: int) -> dict[str, str]:
    # Set before the worker imports numpy/torch, so BLAS pools start at the right size.
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def start_local_cluster(options: ClusterOptions) -> object:
    """A new ``LocalCluster`` of ``options.workers`` single-threaded worker processes (close it)."""
    import dask
    from dask.distributed import LocalCluster

    # forkserver, not spawn: a spawned worker exits through a full interpreter teardown (torch,
    # zarr), which outlasts the nanny's 4 s close and gets it killed (a warning, a traceback).
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        return LocalCluster(n_workers=options.workers, threads_per_worker=1, processes=True,
                            dashboard_address="127.0.0.1:0", env=_thread_env(options.threads),
                            preload=[WORKER_PRELOAD])


class SharedCluster:
    """A LocalCluster that several analyses of one job share, started on first use.

    Starting a cluster and warming its workers (imports) takes seconds; ``iis run`` analyses the
    models and then the fine-tuning arms, and a resumed run may need no cluster at all.
    """

    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        self._cluster: object | None = None

    @property
    def address(self) -> str | None:
        """The running scheduler's address; None before first use and after :meth:`close`."""
        return None if self._cluster is None else self._cluster.scheduler_address

    def resolve(self) -> ClusterOptions:
        """Options naming a running scheduler (this one's, started now if need be)."""
        if self._cluster is None:
            self._cluster = start_local_cluster(self.options)
        return replace(self.options, scheduler=self.address, shared=None)

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


@contextlib.contextmanager
def shared_cluster(options: ClusterOptions) -> Iterator[ClusterOptions]:
    """``options`` whose local cluster, if any, is shared by every analysis in the ``with`` block."""
    if options.scheduler or options.synchronous:
        yield options
        return
    shared = SharedCluster(options)
    try:
        yield replace(options, shared=shared)
    finally:
        shared.close()


@contextlib.contextmanager
def dask_client(options: ClusterOptions) -> Iterator[object]:
    """A ``dask.distributed`` client: to ``options.scheduler``, or to a new LocalCluster."""
    from dask.distributed import Client

    if options.shared is not None:
        options = options.shared.resolve()
    cluster = None if options.scheduler else start_local_cluster(options)
    client = Client(options.scheduler, timeout="30s") if options.scheduler else Client(cluster)
    log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _naming_store(err: Exception, spec: TaskSpec) -> Exception:
    """An expected task failure whose message names the store and task it came from."""
    if not isinstance(err, (StoreError, ValueError)) or spec.store in str(err):
        return err
    try:
        return type(err)(f"{spec.store} ({spec.library}, seed {spec.seed}): {err}")
    except Exception:  # an exception type with another constructor keeps its own message
        return err


def run_tasks(specs: Sequence[TaskSpec], options: ClusterOptions) -> list[TaskResult]:
    """Run every task; results come back in the order of ``specs``.

    On a cluster with at least twice as many task slots as library tasks (or with
    ``options.head_parts``), a library's ratio grid is split over several tasks
    (:mod:`iis.analyze.parts`) and merged back here: the results are those of the whole task. A task's expected failure (:class:`StoreError`, :class:`ValueError`) is raised
    again with the store and task named in its message.
    """
    if options.synchronous:
        if options.head_parts not in (None, 1):
            log.warning("analyze: head_parts %d ignored: synchronous tasks run one after another", options.head_parts)
        results = []
        with progress(total=len(specs), desc="analyze", unit="task", logger=log) as bar:
            for spec in specs:
                with _named_failures(spec):
                    results.append(run_task(spec))
                bar.update()
        return results
    from dask.distributed import as_completed

    with dask_client(options) as client:
        slots = sum(client.nthreads().values())
        plan = plan_parts(specs, slots=slots, head_parts=options.head_parts)
        if plan:
            log.info("analyze: %d library task(s) split in %s parts (%d task slots)", len(plan),
                     "/".join(str(len(p)) for p in plan.values()), slots)
        # Longest first (Dask runs higher priorities first): a short standard head then fills the
        # gap a shorter part leaves, instead of delaying the longest part.
        futures, owner, libraries = [], {}, {}
        for i, spec in enumerate(specs):
            if i not in plan:
                futures.append(client.submit(run_task, spec, key=spec.key, pure=False, priority=task_cost(spec)))
                owner[futures[-1].key] = (i, spec)
                continue
            # A library built once for every ratio is built in one task and shared by the parts:
            # k-means runs once, and every part projects on the same concepts. A per-ratio library's
            # parts build their own ratios' libraries (run_task).
            shared = not get_library(spec.library).per_ratio
            dense = None
            if shared:
                libraries[i] = client.submit(build_task, spec, key=f"{spec.key}-library", pure=False,
                                             priority=task_cost(spec))
                # A warm-started grid's dense heads, which every part's other heads start from, are
                # trained once, right after the library, instead of once in every part.
                if trains_dense_heads(spec):
                    dense = client.submit(dense_task, spec, libraries[i], key=f"{spec.key}-dense", pure=False,
                                          priority=task_cost(spec))
            for j, part in enumerate(plan[i]):
                part_spec = replace(spec, part=part, part_label=f"{j + 1}of{len(plan[i])}")
                task = (run_part, part_spec, libraries[i], dense) if shared else (run_task, part_spec)
                futures.append(client.submit(*task, key=part_spec.key, pure=False, priority=task_cost(part_spec)))
                owner[futures[-1].key] = (i, part_spec)
        done: dict[int, list[TaskResult]] = {}
        with progress(total=len(futures), desc="analyze", unit="task", logger=log) as bar:
            for future in as_completed(futures):
                i, spec = owner[future.key]
                with _named_failures(spec):
                    done.setdefault(i, []).append(future.result())
                bar.update()
        results = []
        for i, spec in enumerate(specs):
            if i not in plan:
                results.append(done[i][0])
                continue
            with _named_failures(spec):
                lib = libraries[i].result() if i in libraries else None
                results.append(merge_parts(spec, lib, done[i]))
    return results


@contextlib.contextmanager
def _named_failures(spec: TaskSpec) -> Iterator[None]:
    """Raise a task's expected failure again with its store and task named (:func:`_naming_store`)."""
    try:
        yield
    except Exception as err:
        named = _naming_store(err, spec)
        if named is err:
            raise
        raise named from err


def model_keys(store_path: Path, *, pipeline: str | None, model: str | None = None,
               store: FeatureStore | None = None) -> dict:
    """The key columns every table row of one store carries."""
    store = store if store is not None else open_feature_store(store_path)
    attrs = store.attrs
    return {
        "pipeline": pipeline if pipeline is not None else (attrs.get("pipeline") or ""),
        "dataset": store.dataset,
        "model": model or store.model,
        "backbone": str(attrs.get("backbone", "")),
        "weights": str(attrs.get("weights", "")),
        **store_layer(attrs),
    }


def _present(df: pd.DataFrame, columns: list[str]) -> set[tuple]:
    if df.empty:
        return set()
    return {tuple(tables.key_value(v) for v in row) for row in df[columns].itertuples(index=False, name=None)}


def _this_version(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of table ``name`` (as :func:`tables.read_table` gives it: with the column, null in
    tables written before it) that this code computed; logs how many another version did."""
    if df.empty:
        return df
    version = analysis_version()
    ours = df["analysis_version"] == version
    if not ours.all():
        other = sorted({version_label(v) for v in df.loc[~ours, "analysis_version"]})
        log.info("analyze: %d %s rows come from analysis version %s, not this one (%s): they are refitted "
                 "where this run analyses their store", int((~ours).sum()), name, ", ".join(other), version)
    return df[ours]


def _incomplete(specs: list[TaskSpec], keys: dict[str, dict], current: dict[str, pd.DataFrame], *,
                num_concepts: int, grid: str, bootstrap: int) -> list[TaskSpec]:
    """The specs of every (store, seed) that some table lacks a row of, for this grid and bootstrap.

    Judged from ``accuracy`` (every ratio of every library, and the standard head), ``iis`` (every
    library) and ``concepts`` (every library build). A row of ``accuracy`` or ``iis`` that another
    analysis version computed (:func:`iis.analyze.versioning.analysis_version`; null in tables
    from before the column) counts as missing. A (store, seed) is redone whole: its IIS rows need
    the standard head's per-image results.
    """
    acc_cols = [*tables.KEYS["accuracy"], "bootstrap"]
    iis_cols = [*tables.KEYS["iis"], "bootstrap"]
    concept_cols = ["pipeline", "dataset", "model", "library", "num_concepts", "sparsity", "seed", "library_source"]
    have = {"accuracy": _present(_this_version(current["accuracy"], "accuracy"), acc_cols),
            "iis": _present(_this_version(current["iis"], "iis"), iis_cols),
            "concepts": _present(current["concepts"], concept_cols)}
    boot = float(bootstrap)
    todo = set()
    for s in specs:
        mk = keys[s.store]
        base = tuple(tables.key_value(mk[k]) for k in tables.MODEL_KEYS)
        seed, k, src = float(s.seed), float(num_concepts), tables.key_value(s.elements_store)
        if s.library == STANDARD:
            need = [("accuracy", (*base, STANDARD, None, None, seed, s.protocol, grid, None, boot))]
        else:
            builds = [float(r) for r in s.ratios] if get_library(s.library).per_ratio else [None]
            need = [("accuracy", (*base, s.library, k, float(r), seed, s.protocol, grid, src, boot))
                    for r in s.ratios]
            need.append(("iis", (*base, s.library, k, seed, s.protocol, grid, src, boot)))
            need += [("concepts", (base[0], base[1], base[2], s.library, k, b, seed, src)) for b in builds]
        if any(row not in have[table] for table, row in need):
            todo.add((s.store, s.seed))
    return [s for s in specs if (s.store, s.seed) in todo]


def _correlation_current(iis: pd.DataFrame, correlation: pd.DataFrame) -> bool:
    """Whether ``correlation`` has one row per group of ``iis``, over the models ``iis`` has."""
    keys = [k for k in tables.KEYS["correlation"] if k not in ("scope", "group")]
    iis = correlated(iis)
    if iis.empty:
        return True
    correlation = correlation[correlation["scope"] == "all"]
    want = {tuple(tables.key_value(v) for v in key): sorted(set(g["model"])) for key, g in iis.groupby(keys, dropna=False)}
    have = {tuple(tables.key_value(v) for v in row[:-1]): sorted(row[-1])
            for row in correlation[[*keys, "models"]].itertuples(index=False, name=None)}
    return all(have.get(key) == models for key, models in want.items())


def _check_versions(done: Sequence[TaskResult]) -> None:
    """Warn when workers ran other code than this process (a cluster's workers on another
    install): their rows carry their version, so the next ``skip_complete`` run refits them."""
    version = analysis_version()
    other = sorted({version_label(row.get("analysis_version")) for r in done for row in r.accuracy_rows
                    if row.get("analysis_version") != version})
    if other:
        log.warning("analyze: some tasks ran analysis version %s, this process is %s: the workers run "
                    "other code than the client (install the same iis on both)", ", ".join(other), version)


def _check_elements(stores: dict[str, FeatureStore], libraries: Sequence[str], num_concepts: int) -> None:
    """Refuse ``K`` above a store's element count now, not after the first libraries are fitted."""
    if not any(not get_library(name).needs_text for name in libraries):
        return
    for path, store in stores.items():
        count = store.num_elements
        if num_concepts > count:
            raise ValueError(f"{path}: K = {num_concepts} concepts but the store has only {count} visual "
                             f"elements; lower analysis.num_concepts (--num-concepts) to at most {count}, "
                             "or extract more elements (elements.images_per_class)")


def analyze_stores(
    stores: Sequence[Path],
    *,
    results: Path,
    libraries: Sequence[str],
    num_concepts: int,
    ratios: Sequence[float],
    seeds: Sequence[int],
    protocol: str = "default",
    bootstrap: int = 1000,
    pipeline: str | None = None,
    cluster: ClusterOptions = ClusterOptions(),
    skip_complete: bool = False,
    clip_store: Path | None = None,
    options: dict[str, dict] | None = None,
    groups: Mapping[str, str] | None = None,
    elements_stores: Mapping[str, Path] | None = None,
    redo: Sequence[Path] = (),
) -> dict[str, pd.DataFrame]:
    """Analyse every store and write ``accuracy``, ``iis``, ``correlation``, ``ranking`` and ``concepts``.

    Everything that can be checked before fitting is: each store (complete, ours, a safe model
    name), ``K`` against its elements, the CLIP store's text group, and that ``results`` is
    writable. The tables are then merged and committed together under the results
    folder's lock (:mod:`iis.analyze.tables`), so concurrent runs on one folder lose no rows.

    Args:
        stores: one complete feature store per model.
        results: the results directory; tables are upserted there.
        libraries: registered library names.
        num_concepts: ``K``.
        ratios: the sparsity grid (at least two ratios); its rows are keyed by ``grid``.
        seeds: one task per (model, library, seed).
        protocol: ``default`` or ``reference``.
        bootstrap: resamples for confidence intervals (0: none).
        pipeline: the pipeline's name for the tables (default: the store's attribute).
        cluster: where the tasks run.
        redo: stores analysed even when ``skip_complete`` would leave them out: stores just
            (re)made under a name whose rows the tables may hold from an earlier store.
        skip_complete: leave out (model, seed) pairs whose rows (this grid, this bootstrap) are
            in every table already; with nothing left to do, nothing is written.
        clip_store: the CLIP store (image and concept-word features), needed by the text library.
        options: per-library builder settings, ``{library: {name: value}}``.
        groups: model -> group (the run a checkpoint belongs to, the model a fine-tuned copy comes
            from), for the correlation within and across groups; models not named get their name
            before the first ``@`` or ``+`` (:func:`iis.analyze.summary.default_group`).
        elements_stores: ``{store path: store}`` whose visual elements build that store's libraries
            (``analysis.library_from``); checked first for the same backbone, weights and layer.

    Returns:
        The five tables as written.
    """
    results = Path(results)
    ratios = sorted(float(r) for r in ratios)
    if len(ratios) < 2:
        raise ValueError("IIS needs at least two sparsity ratios")
    if len(set(ratios)) != len(ratios):
        # Rows are keyed by ratio: a repeated one would be fitted twice and one of its rows dropped.
        raise ValueError(f"sparsity ratios must not repeat, got {ratios}")
    grid = tables.grid_key(ratios)
    if protocol == "reference":
        log.warning("analyze: protocol 'reference' selects each head's epoch on the test set (the authors' "
                    "protocol); its test figures are optimistic and its rows carry the caveat 'selected on test'")
    for name in libraries:
        if get_library(name).needs_text and clip_store is None:
            raise ValueError(f"library {name!r} needs a CLIP store (a `text:` section, or --clip-store)")
    if clip_store is not None and any(get_library(n).needs_text for n in libraries):
        open_feature_store(Path(clip_store)).text_group()  # a partial CLIP store fails now, by name
    # Open every store once here: a partial or foreign store fails now, by name.
    opened = {str(Path(p)): open_feature_store(Path(p)) for p in stores}
    keys = {path: model_keys(Path(path), pipeline=pipeline, store=store) for path, store in opened.items()}
    models = [k["model"] for k in keys.values()]
    if len(set(models)) != len(models):
        raise ValueError(f"two stores carry the same model id: {models}")
    sources = check_sources(opened, elements_stores)  # a foreign space is refused before any fitting
    _check_elements({p: sources.get(p, s) for p, s in opened.items()}, libraries, num_concepts)
    tables.check_writable(results)
    library_dir = str(results / "libraries")
    text_libraries = {name for name in libraries if get_library(name).needs_text}
    specs = [
        TaskSpec(store=path, library=lib, seed=seed, num_concepts=num_concepts, ratios=tuple(ratios),
                 protocol=protocol, bootstrap=bootstrap, threads=cluster.threads, library_dir=library_dir,
                 clip_store=str(clip_store) if clip_store is not None and lib in text_libraries else None,
                 options=(options or {}).get(lib), memory_budget=cluster.memory_budget,
                 elements_store=str(sources[path].path) if path in sources and lib != STANDARD else None)
        for path in keys for seed in seeds for lib in (STANDARD, *libraries)
    ]
    if skip_complete:
        with tables.results_lock(results):
            current = {name: tables.read_table(results, name) for name in ANALYSIS_TABLES}
        again = {str(Path(r)) for r in redo}
        todo = _incomplete(specs, keys, current, num_concepts=num_concepts, grid=grid, bootstrap=bootstrap)
        specs = [s for s in specs if s in todo or s.store in again]
        if (not specs and _correlation_current(current["iis"], current["correlation"])
                and ranking_current(current["iis"], current["ranking"])):
            log.info("analyze: every table row is already there (grid %s); nothing to do", grid)
            return current
    log.info("analyze: %d stores x %d libraries (+standard) x %d seeds -> %d tasks",
             len(keys), len(libraries), len(seeds), len(specs))
    done = run_tasks(specs, cluster) if specs else []
    _check_versions(done)

    extra = {"grid": grid, "bootstrap": bootstrap}
    accuracy = pd.DataFrame([{**keys[r.spec.store], **row, **extra} for r in done for row in r.accuracy_rows])
    concepts = pd.DataFrame([{**keys[r.spec.store], **row} for r in done for row in r.concept_rows])
    new_iis = pd.DataFrame(iis_rows(done, model_keys=keys, bootstrap=bootstrap))
    run = {"command": "analyze", "pipeline": pipeline, "models": sorted(models), "grid": grid,
           "libraries": list(libraries), "num_concepts": num_concepts, "seeds": list(seeds),
           "protocol": protocol, "bootstrap": bootstrap, "tasks": len(specs)}
    with tables.results_lock(results):
        # Per-image results, for ranking this run's models with earlier runs' (files, written atomically;
        # under the lock, so that another run's cannot land between these and this run's tables). A run
        # that dies before its commit leaves files that its tables do not hold: the ranking checks each
        # file against its iis.parquet row.
        save_correctness(results, done, models={path: k["model"] for path, k in keys.items()}, grid=grid)
        out = {
            "accuracy": tables.merge(results, "accuracy", accuracy),
            "concepts": tables.merge(results, "concepts", concepts),
            "iis": tables.merge(results, "iis", new_iis),
        }
        if version_caveat(out["iis"]["analysis_version"]):  # models of earlier runs not analysed again here
            others = {v: m for v, m in models_by_version(out["iis"]).items() if v != analysis_version()}
            log.warning("analyze: iis.parquet holds models of other analysis versions than this one (%s): %s; "
                        "correlation and ranking rows over them say so. Analyse them again (their stores), or "
                        "remove their rows", analysis_version(),
                        "; ".join(f"{v}: {', '.join(m)}" for v, m in others.items()))
        # Derived whole from iis.parquet: recomputed over every model there, replacing old rows.
        out["correlation"] = tables.replace("correlation", pd.DataFrame(
            correlation_rows(out["iis"], groups=groups, bootstrap=bootstrap)))
        out["ranking"] = tables.replace("ranking", pd.DataFrame(
            ranking_rows(out["iis"], results=results, n_resamples=bootstrap)))
        tables.commit(results, out, run=run)
    log.info("tables written to %s", results)
    return out
