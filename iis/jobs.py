"""Wiring from a parsed pipeline to the stage functions, with explicit arguments.

Stage functions never see a config object: this module unpacks it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from iis import __version__
from iis.config import ConfigError, MeasuredModel, PipelineConfig

log = logging.getLogger(__name__)


def extract_pipeline(
    cfg: PipelineConfig,
    *,
    models: list[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    device: str | None = None,
    num_workers: int | None = None,
) -> dict[str, bool]:
    """Run stage 1 for every (selected) model of a pipeline.

    Returns:
        ``{model name: store complete}``.
    """
    from iis.extract.backbones import create_backbone
    from iis.extract.runner import extract_store

    dataset = _load_dataset(cfg)
    el = cfg.elements
    plans = _plan_elements(cfg, dataset)
    options = _extract_options(cfg, device=device, num_workers=num_workers, shard=shard)
    selected = select_models(cfg, models)
    for parent in sorted({m.parent for m in selected if m.epoch is not None}):
        train_pipeline_model(cfg, parent, dataset=dataset, device=options.device)
    status = {}
    if cfg.text is not None and (not models or "clip" in models):
        status["clip"] = extract_clip(cfg, dataset=dataset, options=options)
    for model in selected:
        backbone = create_backbone(backbone=model.backbone, weights=model.weights,
                                   img_size=model.img_size, seed=model.seed)
        log.info("extract %s/%s: %s (%s), D=%d", cfg.name, model.name, model.backbone,
                 backbone.weights_source, backbone.feature_dim)
        status[model.name] = extract_store(
            cfg.store_path(model.name), dataset=dataset, backbone=backbone, model_name=model.name,
            element_plans=plans, elements_config=el.model_dump(), options=options,
            pipeline=cfg.name, project_version=__version__,
        )
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


def train_pipeline_model(cfg: PipelineConfig, name: str, *, dataset, device: str = "auto"):
    """Train one `models:` entry that has a `train:` section; skipped when its checkpoints exist."""
    from iis.extract.train import TrainOptions, train_backbone

    model = cfg.model(name)
    t = model.train
    options = TrainOptions(epochs=t.epochs, checkpoints=tuple(sorted(t.checkpoints)), lr=t.lr,
                           weight_decay=t.weight_decay, batch_size=t.batch_size, seed=t.seed,
                           device=device)
    return train_backbone(dataset=dataset, backbone=model.backbone, weights=model.weights,
                          img_size=model.img_size, init_seed=model.seed, options=options,
                          out_dir=cfg.checkpoint_dir(name))


def store_paths(cfg: PipelineConfig) -> list[Path]:
    """The store of every measured model of a pipeline, in config order."""
    return [cfg.store_path(m.name) for m in cfg.measured_models()]


def _analysis_args(cfg_analysis, *, libraries, num_concepts, ratios, seeds, protocol, bootstrap) -> dict:
    """Command-line overrides on top of a pipeline's analysis section (or the defaults)."""
    from iis.config import AnalysisConfig

    base = cfg_analysis or AnalysisConfig()
    merged = base.model_dump()
    overrides = dict(libraries=libraries, num_concepts=num_concepts, ratios=ratios, seeds=seeds,
                     protocol=protocol, bootstrap=bootstrap)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    # A --libraries override may leave out a library that has options; its options go too.
    merged["options"] = {k: v for k, v in merged["options"].items() if k in merged["libraries"]}
    checked = AnalysisConfig.model_validate(merged)  # overrides get the same checks as yaml
    return checked.model_dump()


def _cluster(scheduler, workers, threads, synchronous):
    from iis.analyze.pipeline import ClusterOptions

    return ClusterOptions(scheduler=scheduler, workers=workers, threads=threads, synchronous=synchronous)


def analyze_pipeline(cfg: PipelineConfig, *, scheduler=None, workers=2, threads=1, synchronous=False,
                     **overrides) -> dict:
    """Run stage 2 over every model store of a pipeline."""
    from iis.analyze.pipeline import analyze_stores

    args = _analysis_args(cfg.analysis, **overrides)
    return analyze_stores(store_paths(cfg), results=cfg.results, pipeline=cfg.name, clip_store=cfg.clip_store,
                          cluster=_cluster(scheduler, workers, threads, synchronous), **args)


def analyze_explicit(*, stores: list[Path], results: Path, clip_store: Path | None = None, scheduler=None,
                     workers=2, threads=1, synchronous=False, **overrides) -> dict:
    """Run stage 2 over explicitly named stores (features made elsewhere, e.g. by import-h5)."""
    from iis.analyze.pipeline import analyze_stores

    args = _analysis_args(None, **overrides)
    return analyze_stores(stores, results=results, pipeline=None, clip_store=clip_store,
                          cluster=_cluster(scheduler, workers, threads, synchronous), **args)


def report_pipeline(cfg: PipelineConfig) -> Path:
    """Write ``<results>/report.html`` from the pipeline's tables."""
    from iis.apps.report import write_report

    path = write_report(results=cfg.results, dataset=_load_dataset(cfg),
                        title=f"iis: {cfg.name} ({cfg.dataset.label})")
    log.info("report: %s", path)
    return path


def explain_pipeline(cfg: PipelineConfig, *, model: str, library: str, ratio: float, split: str = "test",
                     images: list[str] | None = None, seed: int | None = None, limit: int = 16,
                     top: int = 5) -> dict:
    """Application 2: explain predictions of ``g ∘ g_s ∘ a``; upserts ``explanations.parquet``.

    Returns:
        ``{"interpretable_top1", "standard_top1", "accuracy_lost", "n_images", "rows"}``.
    """
    from iis.analyze import tables
    from iis.analyze.artifacts import library_path
    from iis.analyze.libraries import get_library
    from iis.apps.explain import explain_split

    seed = cfg.analysis.seeds[0] if seed is None else seed
    if model not in {m.name for m in cfg.measured_models()}:
        raise ConfigError(f"pipeline {cfg.name!r} has no model {model!r}")
    lib_file = library_path(cfg.results / "libraries", model=model, library=library,
                            num_concepts=cfg.analysis.num_concepts, seed=seed, protocol="default",
                            ratio=ratio if get_library(library).per_ratio else None)
    if not lib_file.is_file():
        raise FileNotFoundError(f"{lib_file}: no saved library; run `iis analyze {cfg.name}` first "
                                f"(with {library} in analysis.libraries and seed {seed})")
    result = explain_split(store=cfg.store_path(model), library_file=lib_file, ratio=ratio, split=split,
                           image_ids=images, limit=limit, top=top)
    acc = tables.read_table(cfg.results, "accuracy")
    std = acc[(acc.model == model) & (acc.library == "standard") & (acc.seed == seed) & (acc.protocol == "default")]
    standard_top1 = float(std.test_top1.iloc[0]) if len(std) and split == "test" else float("nan")
    rows = result.rows.assign(pipeline=cfg.name, seed=seed)
    tables.upsert(cfg.results, "explanations", rows)
    summary = {"interpretable_top1": result.interpretable_top1, "standard_top1": standard_top1,
               "accuracy_lost": standard_top1 - result.interpretable_top1, "n_images": result.n_images,
               "rows": len(rows)}
    log.info("%s %s s=%g on %s: interpretable top-1 %.4f vs standard %.4f (%.2f points lost, %d images)",
             model, library, ratio, split, result.interpretable_top1, standard_top1,
             100 * summary["accuracy_lost"], result.n_images)
    return summary


def _explain_defaults(cfg: PipelineConfig) -> tuple[str, str]:
    """The model and library `iis run` explains: configured, or the best model and first library."""
    from iis.analyze import tables

    library = cfg.explain.library or cfg.analysis.libraries[0]
    if cfg.explain.model:
        return cfg.explain.model, library
    acc = tables.read_table(cfg.results, "accuracy")
    std = acc[(acc.library == "standard") & (acc.pipeline == cfg.name)]
    measured = [m.name for m in cfg.measured_models()]
    std = std[std.model.isin(measured)]
    best = std.groupby("model").test_top1.mean().idxmax() if len(std) else measured[0]
    return str(best), library


def run_pipeline(cfg: PipelineConfig, *, workers: int = 2, scheduler: str | None = None,
                 device: str | None = None) -> Path:
    """The main job: extract, analyze, explain, fine-tune (if configured), report.

    Work whose outputs are complete is skipped: finished stores are not recomputed, and
    (model, seed) pairs already in the tables are not refitted.
    """
    import time

    start = time.perf_counter()
    extract_pipeline(cfg, device=device)
    log.info("run %s: extract done at %.0f s", cfg.name, time.perf_counter() - start)
    from iis.analyze.pipeline import analyze_stores

    args = _analysis_args(cfg.analysis, libraries=None, num_concepts=None, ratios=None, seeds=None,
                          protocol=None, bootstrap=None)
    analyze_stores(store_paths(cfg), results=cfg.results, pipeline=cfg.name, skip_complete=True,
                   clip_store=cfg.clip_store,
                   cluster=_cluster(scheduler, workers, 1, False), **args)
    log.info("run %s: analyze done at %.0f s", cfg.name, time.perf_counter() - start)
    model, library = _explain_defaults(cfg)
    explain_pipeline(cfg, model=model, library=library, ratio=cfg.explain.ratio, limit=cfg.explain.images)
    if cfg.finetune is not None:
        finetune_pipeline(cfg, device=device, workers=workers, scheduler=scheduler)
        log.info("run %s: fine-tuning done at %.0f s", cfg.name, time.perf_counter() - start)
    path = report_pipeline(cfg)
    log.info("run %s: finished in %.0f s; open %s", cfg.name, time.perf_counter() - start, path)
    return path


def finetune_pipeline(cfg: PipelineConfig, *, model: str | None = None, lam: float | None = None,
                      epochs: int | None = None, seed: int | None = None, device: str | None = None,
                      workers: int = 2, scheduler: str | None = None):
    """Application 1: fine-tune a model with λ and with λ = 0, measure both, write ``finetune.parquet``.

    Command-line values override the pipeline's ``finetune:`` section. Each arm's checkpoint
    becomes a model of the pipeline's tables (``<model>+ft<λ>``), measured with the
    fine-tuning library.
    """
    import pandas as pd

    from iis.analyze import tables
    from iis.analyze.libraries import LibraryInputs, build_library
    from iis.analyze.pipeline import analyze_stores
    from iis.analyze.store import open_feature_store
    from iis.apps.finetune import element_images, finetune_arms
    from iis.config import FinetuneConfig
    from iis.extract.backbones import create_backbone
    from iis.extract.train import TrainOptions

    given = {"model": model, "lambda": lam, "epochs": epochs, "seed": seed}
    base_cfg = cfg.finetune.model_dump(by_alias=True) if cfg.finetune else {}
    ft = FinetuneConfig.model_validate({**base_cfg, **{k: v for k, v in given.items() if v is not None}})
    base = next((m for m in cfg.measured_models() if m.name == ft.model), None)
    if base is None:
        raise ConfigError(f"pipeline {cfg.name!r} has no model {ft.model!r}")
    dataset = _load_dataset(cfg)
    el = cfg.elements
    plans = _plan_elements(cfg, dataset)
    k = cfg.analysis.num_concepts
    base_store = open_feature_store(cfg.store_path(base.name))
    library = build_library(ft.library, LibraryInputs(elements=base_store.read_elements(),
                                                      num_classes=base_store.num_classes),
                            num_concepts=k, seed=ft.seed)
    backbone = create_backbone(backbone=base.backbone, weights=base.weights, img_size=base.img_size, seed=base.seed)
    images = element_images(dataset, plans, [int(m[0]) for m in library.members], backbone.data_config)
    options = TrainOptions(epochs=ft.epochs, checkpoints=(ft.epochs,), lr=ft.lr, seed=ft.seed,
                           batch_size=next((m.train.batch_size for m in cfg.models if m.train), 128),
                           device=device or cfg.extract.device)
    arms = finetune_arms(dataset=dataset, backbone=base.backbone, weights=base.weights, img_size=base.img_size,
                         init_seed=base.seed, images=images, lam=ft.lambda_, ratio=ft.ratio, options=options,
                         refresh_every=ft.refresh_every,
                         out_root=cfg.checkpoint_dir(f"{base.name}+finetune-seed{ft.seed}-e{ft.epochs}"))
    names = {arm.lam: f"{base.name}+ft{arm.lam:g}" for arm in arms}
    from iis.extract.runner import extract_store

    ex_options = _extract_options(cfg, device=device)
    for arm in arms:
        tuned = create_backbone(backbone=base.backbone, weights=str(arm.checkpoint), img_size=base.img_size,
                                seed=base.seed)
        extract_store(cfg.store_path(names[arm.lam]), dataset=dataset, backbone=tuned, model_name=names[arm.lam],
                      element_plans=plans, elements_config=el.model_dump(), options=ex_options,
                      pipeline=cfg.name, project_version=__version__)
    stores = [cfg.store_path(base.name)] + [cfg.store_path(n) for n in names.values()]
    # Measured with every library of the pipeline, so each correlation row counts the same models.
    libraries = list(dict.fromkeys([*cfg.analysis.libraries, ft.library]))
    analyze_stores(stores, results=cfg.results, pipeline=cfg.name, libraries=libraries, num_concepts=k,
                   ratios=cfg.analysis.ratios, seeds=[ft.seed], bootstrap=cfg.analysis.bootstrap,
                   skip_complete=True, cluster=_cluster(scheduler, workers, 1, False), clip_store=cfg.clip_store,
                   options=cfg.analysis.options)
    iis = tables.read_table(cfg.results, "iis")
    iis = iis[(iis.library == ft.library) & (iis.num_concepts == k) & (iis.seed == ft.seed)
              & (iis.protocol == "default") & (iis.pipeline == cfg.name)
              & (iis.grid == tables.grid_key(cfg.analysis.ratios))].set_index("model")
    rows = [{
        "pipeline": cfg.name, "dataset": cfg.dataset.label, "model": base.name, "lambda": arm.lam,
        "seed": ft.seed, "epochs": ft.epochs, "ratio": ft.ratio, "library": ft.library, "num_concepts": k,
        "standard_top1_before": float(iis.loc[base.name, "standard_top1"]),
        "standard_top1_after": float(iis.loc[names[arm.lam], "standard_top1"]),
        "iis_before": float(iis.loc[base.name, "iis"]), "iis_after": float(iis.loc[names[arm.lam], "iis"]),
        "finetuned_model": names[arm.lam], "seconds": arm.result.seconds,
    } for arm in arms]
    table = tables.upsert(cfg.results, "finetune", pd.DataFrame(rows))
    for row in rows:
        log.info("fine-tune %s lambda=%g: standard top-1 %.4f -> %.4f, IIS %.4f -> %.4f", row["model"],
                 row["lambda"], row["standard_top1_before"], row["standard_top1_after"], row["iis_before"],
                 row["iis_after"])
    return table


def _plan_elements(cfg: PipelineConfig, dataset):
    """The pipeline's visual elements; the same plan for every model of the pipeline."""
    from iis.extract.elements import plan_elements

    el = cfg.elements
    return plan_elements(dataset, images_per_class=el.images_per_class, grid=el.grid, slic=el.slic,
                         seed=cfg.dataset.seed, slic_segments=el.slic_segments)


def _extract_options(cfg: PipelineConfig, *, device: str | None = None, num_workers: int | None = None,
                     shard: tuple[int, int] = (0, 1)):
    """The pipeline's `extract:` section, with command-line overrides."""
    from iis.extract.runner import ExtractOptions

    ex = cfg.extract
    return ExtractOptions(batch_size=ex.batch_size, block_rows=ex.block_rows, dtype=ex.dtype,
                          num_workers=ex.num_workers if num_workers is None else num_workers,
                          device=device or ex.device, amp=ex.amp, shard=shard)


def _load_dataset(cfg: PipelineConfig):
    from iis.extract.datasets import load_dataset

    ds = cfg.dataset
    return load_dataset(source=ds.source, name=ds.label, root=ds.root, file=ds.file,
                        val_fraction=ds.splits.val, test_fraction=ds.splits.test, seed=ds.seed)
