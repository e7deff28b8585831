"""Stage 2's entry point: schedule one task per (model, library, seed) on Dask, then write
the tables. ``analyze_stores`` takes explicit arguments; the CLI unpacks configs into them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from iis.analyze import tables
from iis.analyze.libraries import get_library
from iis.analyze.store import open_feature_store
from iis.analyze.summary import correlation_rows, iis_rows
from iis.analyze.tasks import STANDARD, TaskResult, TaskSpec, run_task

from iis.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterOptions:
    """Where tasks run.

    Attributes:
        scheduler: address of an existing scheduler (``tcp://host:8786``), or None for a
            LocalCluster started here.
        workers: LocalCluster worker processes.
        threads: torch/BLAS threads per task (and Dask threads per worker: one task each).
        synchronous: run every task in this process, in order, without Dask.
    """

    scheduler: str | None = None
    workers: int = 2
    threads: int = 1
    synchronous: bool = False


def _thread_env(threads: int) -> dict[str, str]:
    # Set before the worker imports numpy/torch, so BLAS pools start at the right size.
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@contextlib.contextmanager
def dask_client(options: ClusterOptions) -> Iterator[object]:
    """A ``dask.distributed`` client: to ``options.scheduler``, or to a new LocalCluster."""
    import dask
    from dask.distributed import Client, LocalCluster

    if options.scheduler:
        client = Client(options.scheduler, timeout="30s")
        cluster = None
    else:
        # forkserver, not spawn: a spawned worker exits through a full interpreter teardown (torch,
        # zarr), which outlasts the nanny's 4 s close and gets it killed (a warning, a traceback).
        with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
            cluster = LocalCluster(n_workers=options.workers, threads_per_worker=1, processes=True,
                                   dashboard_address="127.0.0.1:0", env=_thread_env(options.threads))
        client = Client(cluster)
    log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_tasks(specs: Sequence[TaskSpec], options: ClusterOptions) -> list[TaskResult]:
    """Run every task; results come back in the order of ``specs``."""
    bar = progress(total=len(specs), desc="analyze", unit="task", logger=log)
    if options.synchronous:
        results = []
        for spec in specs:
            results.append(run_task(spec))
            bar.update()
        bar.close()
        return results
    from dask.distributed import as_completed

    with dask_client(options) as client, bar:
        futures = [client.submit(run_task, spec, key=spec.key, pure=False) for spec in specs]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[TaskResult | None] = [None] * len(specs)
        for future in as_completed(futures):
            results[index[future.key]] = future.result()
            bar.update()
    return results  # type: ignore[return-value]


def model_keys(store_path: Path, *, pipeline: str | None, model: str | None = None) -> dict:
    """The key columns every table row of one store carries."""
    store = open_feature_store(store_path)
    attrs = store.attrs
    return {
        "pipeline": pipeline if pipeline is not None else (attrs.get("pipeline") or ""),
        "dataset": store.dataset,
        "model": model or store.model,
        "backbone": str(attrs.get("backbone", "")),
        "weights": str(attrs.get("weights", "")),
    }


def _incomplete(specs: list[TaskSpec], keys: dict[str, dict], results: Path, *,
                libraries: Sequence[str], num_concepts: int) -> list[TaskSpec]:
    """The specs of every (store, seed) with a library row missing from ``iis.parquet``.

    A (store, seed) is redone whole: its IIS rows need the standard head's per-image results.
    """
    have = tables.read_table(results, "iis")
    present = set(zip(have["model"], have["library"], have["num_concepts"], have["seed"], have["protocol"]))
    todo = {
        (s.store, s.seed) for s in specs if s.library != STANDARD
        and (keys[s.store]["model"], s.library, num_concepts, s.seed, s.protocol) not in present
    }
    return [s for s in specs if (s.store, s.seed) in todo]


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
) -> dict[str, pd.DataFrame]:
    """Analyse every store and write ``accuracy``, ``iis``, ``correlation`` and ``concepts``.

    Args:
        stores: one complete feature store per model.
        results: the results directory; tables are upserted there.
        libraries: registered library names.
        num_concepts: ``K``.
        ratios: the sparsity grid (at least two ratios).
        seeds: one task per (model, library, seed).
        protocol: ``default`` or ``reference``.
        bootstrap: resamples for confidence intervals (0: none).
        pipeline: the pipeline's name for the tables (default: the store's attribute).
        cluster: where the tasks run.
        skip_complete: leave out (model, seed) pairs whose rows are all in the tables already.
        clip_store: the CLIP store (image and concept-word features), needed by the text library.
        options: per-library builder settings, ``{library: {name: value}}``.

    Returns:
        The four tables as written.
    """
    ratios = sorted(float(r) for r in ratios)
    if len(ratios) < 2:
        raise ValueError("IIS needs at least two sparsity ratios")
    for name in libraries:
        if get_library(name).needs_text and clip_store is None:
            raise ValueError(f"library {name!r} needs a CLIP store (a `text:` section, or --clip-store)")
    if clip_store is not None and any(get_library(n).needs_text for n in libraries):
        open_feature_store(Path(clip_store))  # a partial CLIP store fails now, by name
    # Open every store once here: a partial or foreign store fails now, by name.
    keys = {str(Path(p)): model_keys(Path(p), pipeline=pipeline) for p in stores}
    models = [k["model"] for k in keys.values()]
    if len(set(models)) != len(models):
        raise ValueError(f"two stores carry the same model id: {models}")
    library_dir = str(Path(results) / "libraries")
    text_libraries = {name for name in libraries if get_library(name).needs_text}
    specs = [
        TaskSpec(store=path, library=lib, seed=seed, num_concepts=num_concepts, ratios=tuple(ratios),
                 protocol=protocol, bootstrap=bootstrap, threads=cluster.threads, library_dir=library_dir,
                 clip_store=str(clip_store) if clip_store is not None and lib in text_libraries else None,
                 options=(options or {}).get(lib))
        for path in keys for seed in seeds for lib in (STANDARD, *libraries)
    ]
    if skip_complete:
        specs = _incomplete(specs, keys, results, libraries=libraries, num_concepts=num_concepts)
        if not specs:
            log.info("analyze: every table row is already there; nothing to do")
            return {name: tables.read_table(results, name) for name in tables.SCHEMAS}
    log.info("analyze: %d stores x %d libraries (+standard) x %d seeds -> %d tasks",
             len(keys), len(libraries), len(seeds), len(specs))
    done = run_tasks(specs, cluster)

    accuracy = pd.DataFrame([{**keys[r.spec.store], **row} for r in done for row in r.accuracy_rows])
    concepts = pd.DataFrame([{**keys[r.spec.store], **row} for r in done for row in r.concept_rows])
    out = {
        "accuracy": tables.upsert(results, "accuracy", accuracy),
        "concepts": tables.upsert(results, "concepts", concepts),
    }
    out["iis"] = tables.upsert(results, "iis", pd.DataFrame(iis_rows(done, model_keys=keys, bootstrap=bootstrap)))
    out["correlation"] = tables.upsert(results, "correlation", pd.DataFrame(correlation_rows(out["iis"])))
    log.info("tables written to %s", results)
    return out
