"""Wiring from a parsed pipeline to the stage and application functions, with explicit arguments.

Stage functions never see a config object: this module unpacks it. It holds no logic of its
own beyond choosing what each command needs; the work lives in :mod:`iis.extract`,
:mod:`iis.analyze` and :mod:`iis.apps`. Defaults are not restated here: a value the command
line leaves out (None) is left to the function that owns its default.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from iis import __version__
from iis.config import AnalysisConfig, ConfigError, FinetuneConfig, MeasuredModel, PipelineConfig
from iis.store_format import StoreError

if TYPE_CHECKING:  # the analysis stack (torch, dask) is imported by the commands that use it
    from iis.analyze.pipeline import ClusterOptions

log = logging.getLogger(__name__)


def _given(**values) -> dict:
    """The keyword arguments the caller set (not None), so the callee's own defaults apply."""
    return {k: v for k, v in values.items() if v is not None}


# --------------------------------------------------------------------------------------------------
# Stage 1


def extract_pipeline(
    cfg: PipelineConfig,
    *,
    models: list[str] | None = None,
    shard: tuple[int, int] | None = None,
    device: str | None = None,
    num_workers: int | None = None,
) -> dict[str, bool]:
    """Run stage 1 for every (selected) model of a pipeline (``shard``: ``(i, n)``; None: unsharded).

    Returns:
        ``{model name: store complete}``.
    """
    from iis.extract.backbones import create_backbone
    from iis.extract.runner import extract_layers, extract_store

    selected = select_models(cfg, models)  # a wrong --model is said before the dataset loads
    dataset = _load_dataset(cfg)
    plans = _plan_elements(cfg, dataset)
    options = _extract_options(cfg, device=device, num_workers=num_workers, shard=shard)
    for parent in sorted({m.parent for m in selected if m.epoch is not None}):
        train_pipeline_model(cfg, parent, dataset=dataset, device=options.device, shard=options.shard,
                             wait_seconds=options.wait_seconds)
    status = {}
    if cfg.text is not None and (not models or "clip" in models):
        status["clip"] = extract_clip(cfg, dataset=dataset, options=options)
    # One extraction per base model: its layers (`layers:`) all come from the same forward pass.
    bases: dict[str, MeasuredModel] = {}
    for m in selected:
        bases.setdefault(m.base or m.name, m)
    for name, model in bases.items():
        backbone = create_backbone(backbone=model.backbone, weights=model.weights,
                                   img_size=model.img_size, seed=model.seed)
        log.info("extract %s/%s: %s (%s), D=%d%s", cfg.name, name, model.backbone, backbone.weights_source,
                 backbone.feature_dim, f", layers {', '.join(model.layers)}" if model.layers else "")
        common = dict(dataset=dataset, backbone=backbone, model_name=name, element_plans=plans,
                      elements_config=cfg.elements.model_dump(), options=options, pipeline=cfg.name,
                      project_version=__version__)
        if model.layers:
            status.update(extract_layers(cfg.store_path(name), layers=list(model.layers), **common))
        else:
            status[name] = extract_store(cfg.store_path(name), **common)
    return status


def extract_clip(cfg: PipelineConfig, *, dataset, options) -> bool:
    """Fill the CLIP store (image features of every split) and add the concept list's text features."""
    from iis.extract.clip import (
        clip_backbone,
        create_clip,
        encode_text,
        read_concepts,
        text_attrs,
        write_text_features,
    )
    from iis.extract.runner import extract_store

    clip_cfg = cfg.text.clip
    clip = create_clip(model=clip_cfg.model, weights=clip_cfg.weights, seed=clip_cfg.seed)
    concepts = read_concepts(cfg.text.concepts)
    log.info("extract %s/clip: %s (%s), %d concepts", cfg.name, clip.name, clip.weights, len(concepts))
    complete = extract_store(cfg.clip_store, dataset=dataset, backbone=clip_backbone(clip), model_name="clip",
                             element_plans=[], elements_config=None, options=options, pipeline=cfg.name,
                             project_version=__version__)
    if options.shard[0] == 0:  # text features are metadata: the coordinator writes them
        write_text_features(cfg.clip_store, concepts=concepts, features=encode_text(clip, concepts),
                            attrs=text_attrs(clip, cfg.text.concepts))
    return complete


def select_models(cfg: PipelineConfig, names: list[str] | None) -> list[MeasuredModel]:
    """The measured models named (by their own name or their `models:` entry); all when None."""
    measured = cfg.measured_models()
    if not names:
        return measured
    known = {m.name for m in measured} | {m.parent for m in measured}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"pipeline {cfg.name!r} has no model {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [m for m in measured if m.name in names or m.parent in names]


def train_pipeline_model(cfg: PipelineConfig, name: str, *, dataset, device: str = "auto",
                         shard: tuple[int, int] = (0, 1), wait_seconds: float | None = None):
    """Train one `models:` entry that has a `train:` section; skipped when its checkpoints exist.

    Only the coordinator (shard 0 of ``shard = (i, n)``, as in an unsharded run) trains: training
    is not bit-reproducible on a GPU, so shards that each trained into the same folder could
    extract other checkpoints than those the stores were created from. The other shards wait
    (up to ``wait_seconds``; None: the waiter's default) for the coordinator's training to finish.
    """
    from iis.extract.train import TrainOptions, train_backbone, wait_for_training

    model = cfg.model(name)
    t = model.train
    options = TrainOptions(epochs=t.epochs, checkpoints=t.checkpoints, lr=t.lr, weight_decay=t.weight_decay,
                           batch_size=t.batch_size, seed=t.seed, device=device)
    args = dict(dataset=dataset, backbone=model.backbone, weights=model.weights, img_size=model.img_size,
                init_seed=model.seed, options=options, out_dir=cfg.checkpoint_dir(name))
    if shard[0] != 0:
        return wait_for_training(**args, name=f"{cfg.name}/{name}", **_given(timeout=wait_seconds))
    return train_backbone(**args)


# --------------------------------------------------------------------------------------------------
# Stage 2


def store_paths(cfg: PipelineConfig) -> list[Path]:
    """The store of every measured model of a pipeline, in config order."""
    return [cfg.store_path(m.name) for m in cfg.measured_models()]


def require_stores(cfg: PipelineConfig, paths: list[Path] | None = None) -> None:
    """Raise :class:`StoreError` naming every store of ``paths`` (default: the pipeline's, and its
    CLIP store when a library needs one) that is not there. Stage 2 checks nothing else."""
    if paths is None:
        paths = store_paths(cfg) + ([cfg.clip_store] if cfg.analysis.needs_text and cfg.clip_store else [])
    missing = [str(p) for p in paths if not (Path(p) / "zarr.json").is_file()]
    if missing:
        raise StoreError(f"pipeline {cfg.name!r}: no store at {', '.join(missing)}; "
                         f"run `iis extract {cfg.name}` first (where the dataset and weights are)")


def _analysis_args(base: AnalysisConfig | None, **overrides) -> dict:
    """The analysis settings of a pipeline (or the defaults), with command-line overrides (None:
    not given), checked like yaml; as ``analyze_stores`` keyword arguments."""
    merged = (base or AnalysisConfig()).model_dump()
    merged.update(_given(**overrides))
    # A --libraries override may leave out a library that has options; its options go too.
    merged["options"] = {k: v for k, v in merged["options"].items() if v is not None and k in merged["libraries"]}
    checked = AnalysisConfig.model_validate(merged)
    return {"libraries": checked.libraries, "num_concepts": checked.num_concepts, "ratios": checked.ratios,
            "seeds": checked.seeds, "protocol": checked.protocol, "bootstrap": checked.bootstrap,
            "options": checked.options_by_library()}


def _cluster(*, scheduler: str | None = None, workers: int | None = None, threads: int | None = None,
             synchronous: bool = False, memory_budget_mb: int | None = None, head_parts: int | None = None):
    """Where tasks run; what is not given keeps :class:`~iis.analyze.pipeline.ClusterOptions`'s default."""
    from iis.analyze.pipeline import ClusterOptions

    budget = None if memory_budget_mb is None else memory_budget_mb * 2**20
    return ClusterOptions(synchronous=synchronous, memory_budget=budget, head_parts=head_parts,
                          **_given(scheduler=scheduler, workers=workers, threads=threads))


def analyze_pipeline(cfg: PipelineConfig, *, scheduler: str | None = None, workers: int | None = None,
                     threads: int | None = None, synchronous: bool = False, skip_complete: bool = False,
                     memory_budget_mb: int | None = None, head_parts: int | None = None,
                     cluster: ClusterOptions | None = None, **overrides) -> dict:
    """Run stage 2 over every model store of a pipeline (``overrides``: analysis settings, None: the pipeline's).

    ``cluster`` (a :class:`~iis.analyze.pipeline.ClusterOptions`) replaces the scheduler and
    worker arguments: ``iis run`` passes one whose LocalCluster every analysis of the run shares.
    """
    from iis.analyze.pipeline import analyze_stores

    require_stores(cfg)
    args = _analysis_args(cfg.analysis, **overrides)
    cluster = cluster or _cluster(scheduler=scheduler, workers=workers, threads=threads, synchronous=synchronous,
                                  memory_budget_mb=memory_budget_mb, head_parts=head_parts)
    return analyze_stores(store_paths(cfg), results=cfg.results, pipeline=cfg.name, clip_store=cfg.clip_store,
                          skip_complete=skip_complete, elements_stores=cfg.elements_stores() or None,
                          groups=cfg.groups() or None, cluster=cluster, **args)


def analyze_explicit(*, stores: list[Path], results: Path, clip_store: Path | None = None,
                     library_from: Path | None = None, scheduler: str | None = None, workers: int | None = None,
                     threads: int | None = None, synchronous: bool = False, memory_budget_mb: int | None = None,
                     head_parts: int | None = None, **overrides) -> dict:
    """Run stage 2 over explicitly named stores (features made elsewhere, e.g. by import-h5).

    ``library_from``: a store whose visual elements build every store's libraries (checked to
    share their feature space before any fitting), as ``analysis.library_from: {store: ...}``.
    """
    from iis.analyze.pipeline import analyze_stores

    args = _analysis_args(None, **overrides)
    if library_from is not None:
        args["elements_stores"] = {str(store): library_from for store in stores}
    return analyze_stores(stores, results=results, pipeline=None, clip_store=clip_store,
                          cluster=_cluster(scheduler=scheduler, workers=workers, threads=threads,
                                           synchronous=synchronous, memory_budget_mb=memory_budget_mb,
                                           head_parts=head_parts), **args)


# --------------------------------------------------------------------------------------------------
# Report and applications


def require_results(cfg: PipelineConfig) -> None:
    """Raise FileNotFoundError naming the results folder when stage 2 has not written it."""
    if not (cfg.results / "iis.parquet").is_file():
        raise FileNotFoundError(f"{cfg.results}: no tables (iis.parquet) here; run `iis analyze {cfg.name}` first")


def report_pipeline(cfg: PipelineConfig) -> Path:
    """Write ``<results>/report.html`` from the pipeline's tables; pictures when the dataset is here."""
    from iis.apps.report import write_report

    require_results(cfg)
    path = write_report(results=cfg.results, dataset=_dataset_if_here(cfg),
                        title=f"iis: {cfg.name} ({cfg.dataset.label})")
    log.info("report: %s", path)
    return path


def explain_pipeline(cfg: PipelineConfig, *, model: str | None = None, library: str | None = None,
                     ratio: float | None = None, split: str | None = None, images: list[str] | None = None,
                     seed: int | None = None, limit: int | None = None, top: int | None = None) -> dict:
    """Application 2: explain predictions of ``g ∘ g_s ∘ a``; upserts ``explanations.parquet``.

    ``model``, ``library`` and ``ratio`` default to the pipeline's ``explain:`` section, and beyond
    it to the final-layer model best by the standard head's val top-1, the first library and
    :meth:`PipelineConfig.explain_ratio`.

    Returns:
        ``{"model", "library", "ratio", "split", "interpretable_top1", "standard_top1",
        "accuracy_lost", "n_images", "rows"}``.
    """
    from iis.apps.explain_job import best_model, explain_model

    known = [m.name for m in cfg.measured_models()]
    model = model or cfg.explain.model
    if model is None:  # chosen from the tables
        require_results(cfg)
        model = best_model(cfg.results, pipeline=cfg.name, models=cfg.final_models())
    if model not in known:
        raise ConfigError(f"pipeline {cfg.name!r} has no model {model!r}; it has {', '.join(known)}")
    library = library or cfg.explain.library or cfg.analysis.libraries[0]
    ratio = cfg.explain_ratio() if ratio is None else ratio
    require_stores(cfg, [cfg.store_path(model)])
    require_results(cfg)
    summary = explain_model(store=cfg.store_path(model), results=cfg.results, model=model, library=library,
                            num_concepts=cfg.analysis.num_concepts,
                            seed=cfg.analysis.seeds[0] if seed is None else seed, ratio=ratio, images=images,
                            pipeline=cfg.name, **_given(split=split, limit=limit, top=top))
    return {"model": model, "library": library, "ratio": ratio, **summary}


def describe_explanation(summary: dict) -> str:
    """One line of :func:`explain_pipeline`'s summary: the figure a user asked for."""
    return (f"{summary['model']} {summary['library']} s={summary['ratio']:g} ({summary['split']}, "
            f"{summary['n_images']} images): interpretable top-1 {summary['interpretable_top1']:.4f}, standard top-1 "
            f"{summary['standard_top1']:.4f}, accuracy lost {100 * summary['accuracy_lost']:.2f} points")


def finetune_pipeline(cfg: PipelineConfig, *, model: str | None = None, lam: float | None = None,
                      epochs: int | None = None, seeds: list[int] | None = None, device: str | None = None,
                      workers: int | None = None, scheduler: str | None = None,
                      cluster: ClusterOptions | None = None) -> dict:
    """Application 1: fine-tune a model with λ and with λ = 0 at every seed, measure every arm with
    the pipeline's libraries (or ``finetune.scoring_libraries``) and analysis seeds, write
    ``finetune`` and ``finetune_delta.parquet``.

    Command-line values override the pipeline's ``finetune:`` section; ``cluster`` replaces
    ``workers`` and ``scheduler`` (:func:`analyze_pipeline`).
    """
    from iis.apps.finetune_job import compare_finetuning

    job = _arms_job(cfg, model=model, lam=lam, epochs=epochs, seeds=seeds, device=device)
    a = cfg.analysis
    scoring = (cfg.finetune and cfg.finetune.scoring_libraries) or a.libraries
    options = {name: value for name, value in a.options_by_library().items() if name in scoring}
    return compare_finetuning(
        job, results=cfg.results, dataset_label=cfg.dataset.label, libraries=scoring, ratios=a.ratios,
        analysis_seeds=a.seeds, bootstrap=a.bootstrap, options=options,
        cluster=cluster or _cluster(scheduler=scheduler, workers=workers), clip_store=cfg.clip_store)


def _arms_job(cfg: PipelineConfig, *, model: str | None = None, lam: float | None = None,
              epochs: int | None = None, seeds: list[int] | None = None, device: str | None = None):
    """The fine-tuning arms to train and extract (an :class:`~iis.apps.finetune_job.ArmsJob`), from
    the ``finetune:`` section and command-line overrides."""
    from iis.apps.finetune_job import ArmsJob, FinetuneSettings, StartingModel

    base_cfg = cfg.finetune.model_dump(by_alias=True) if cfg.finetune else {}
    ft = FinetuneConfig.model_validate({**base_cfg, **_given(model=model, epochs=epochs, seeds=seeds),
                                        **_given(**{"lambda": lam})})
    base = next((m for m in cfg.measured_models() if m.name == ft.model), None)
    if base is None:
        raise ConfigError(f"pipeline {cfg.name!r} has no model {ft.model!r}; it has {', '.join(cfg.final_models())}")
    require_stores(cfg, [cfg.store_path(base.name)])
    dataset = _load_dataset(cfg)
    # The trainer's batch size, when the pipeline trains a model; else TrainOptions's default.
    batch_size = next((m.train.batch_size for m in cfg.models if m.train), None)
    settings = FinetuneSettings(lam=ft.lambda_, epochs=ft.epochs, ratio=ft.ratio, library=ft.library,
                                refresh_every=ft.refresh_every, lr=ft.lr, seeds=ft.seeds, holdout=ft.holdout,
                                split_seed=cfg.dataset.seed, steps=ft.steps, batch_size=batch_size,
                                device=device or cfg.extract.device)
    start = StartingModel(name=base.name, backbone=base.backbone, weights=base.weights, img_size=base.img_size,
                          seed=base.seed)
    return ArmsJob(dataset=dataset, plans=_plan_elements(cfg, dataset),
                   elements_config=cfg.elements.model_dump(), start=start, settings=settings,
                   store_path=cfg.store_path, checkpoint_dir=cfg.checkpoint_dir, pipeline=cfg.name,
                   extract_options=_extract_options(cfg, device=device), num_concepts=cfg.analysis.num_concepts,
                   project_version=__version__)


def run_pipeline(cfg: PipelineConfig, *, workers: int | None = None, scheduler: str | None = None,
                 device: str | None = None) -> Path:
    """The main job: extract, analyze, explain, fine-tune (if configured), report.

    Work whose outputs are complete is skipped: finished stores are not recomputed, and
    (model, seed) pairs already in the tables are not refitted.
    """
    from iis.analyze.pipeline import shared_cluster

    start = time.perf_counter()
    extract_pipeline(cfg, device=device)
    log.info("run %s: extract done at %.0f s", cfg.name, time.perf_counter() - start)
    with shared_cluster(_cluster(scheduler=scheduler, workers=workers)) as cluster:
        analyze_pipeline(cfg, skip_complete=True, cluster=cluster)
        log.info("run %s: analyze done at %.0f s", cfg.name, time.perf_counter() - start)
        log.info("run %s: explained %s", cfg.name, describe_explanation(explain_pipeline(cfg, limit=cfg.explain.images)))
        if cfg.finetune is not None:
            finetune_pipeline(cfg, device=device, cluster=cluster)
            log.info("run %s: fine-tuning done at %.0f s", cfg.name, time.perf_counter() - start)
    path = report_pipeline(cfg)
    log.info("run %s: finished in %.0f s; open %s", cfg.name, time.perf_counter() - start, path)
    return path


# --------------------------------------------------------------------------------------------------
# Unpacking helpers


def _plan_elements(cfg: PipelineConfig, dataset):
    """The pipeline's visual elements; the same plan for every model of the pipeline."""
    from iis.extract.elements import plan_elements

    el = cfg.elements
    return plan_elements(dataset, images_per_class=el.images_per_class, grid=el.grid, slic=el.slic,
                         seed=cfg.dataset.seed, slic_segments=el.slic_segments)


def _extract_options(cfg: PipelineConfig, *, device: str | None = None, num_workers: int | None = None,
                     shard: tuple[int, int] | None = None):
    """The pipeline's `extract:` section, with command-line overrides."""
    from iis.extract.runner import ExtractOptions

    ex = cfg.extract
    return ExtractOptions(batch_size=ex.batch_size, block_rows=ex.block_rows, dtype=ex.dtype,
                          num_workers=ex.num_workers if num_workers is None else num_workers,
                          device=device or ex.device, amp=ex.amp, row_cache_mb=ex.row_cache_mb,
                          wait_seconds=ex.wait_seconds, **_given(shard=shard))


def _load_dataset(cfg: PipelineConfig):
    from iis.extract.datasets import load_dataset

    ds = cfg.dataset
    return load_dataset(source=ds.source, name=ds.label, root=ds.root, file=ds.file,
                        val_fraction=ds.splits.val, test_fraction=ds.splits.test, seed=ds.seed)


def _dataset_if_here(cfg: PipelineConfig):
    """The dataset when this machine has it (the report shows its images), else None."""
    ds = cfg.dataset
    where = ds.root if ds.source == "imagefolder" else ds.file if ds.source == "filelist" else None
    if where is not None and not where.exists():
        log.info("dataset %s is not on this machine (%s): the report's cards come without pictures", ds.label, where)
        return None
    return _load_dataset(cfg)
