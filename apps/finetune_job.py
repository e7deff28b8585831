"""Application 1 end to end: fine-tune with λ and with λ = 0, measure both, write ``finetune.parquet``.

:mod:`iis.apps.finetune` trains the two arms; this module builds the starting library from the
base model's store, extracts and analyses each arm's checkpoint like any other model
(``<model>+ft<λ>``), and tabulates before and after. It takes explicit arguments, never a
pipeline config (``iis.jobs`` unpacks one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from iis.analyze import tables
from iis.analyze.libraries import LibraryInputs, build_library
from iis.analyze.pipeline import ClusterOptions, analyze_stores
from iis.analyze.store import open_feature_store
from iis.apps.finetune import element_images, finetune_arms
from iis.extract.backbones import create_backbone
from iis.extract.datasets import ImageDataset
from iis.extract.elements import ElementPlan
from iis.extract.runner import ExtractOptions, extract_store
from iis.extract.train import TrainOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartingModel:
    """The measured model fine-tuning starts from (as in its store's attributes)."""

    name: str
    backbone: str
    weights: str
    img_size: int | None
    seed: int


@dataclass(frozen=True)
class FinetuneSettings:
    """One comparison: ``lam`` against 0, same budget and seed.

    Attributes:
        lam: weight of the interpretable-head loss.
        epochs: fine-tuning epochs.
        ratio: sparsity of ``g_s`` inside the loss.
        library: the library re-embedded by the live backbone (prototype).
        refresh_every: steps between re-embeddings.
        lr: AdamW peak learning rate.
        seed: seeds the library, the training and the analysis of both arms.
        batch_size: images per step; None keeps :class:`TrainOptions`'s default.
        device: cpu, cuda, cuda:N or auto.
    """

    lam: float
    epochs: int
    ratio: float
    library: str
    refresh_every: int
    lr: float
    seed: int
    batch_size: int | None
    device: str


def compare_finetuning(
    *,
    dataset: ImageDataset,
    plans: Sequence[ElementPlan],
    elements_config: dict,
    start: StartingModel,
    settings: FinetuneSettings,
    store_path: Callable[[str], Path],
    checkpoint_dir: Callable[[str], Path],
    results: Path,
    pipeline: str,
    dataset_label: str,
    extract_options: ExtractOptions,
    libraries: Sequence[str],
    num_concepts: int,
    ratios: Sequence[float],
    bootstrap: int,
    options: Mapping[str, dict] | None = None,
    cluster: ClusterOptions | None = None,
    clip_store: Path | None = None,
    project_version: str = "0",
) -> pd.DataFrame:
    """Fine-tune ``start`` with ``settings.lam`` and with 0, measure both, upsert ``finetune.parquet``.

    Args:
        dataset, plans, elements_config: the pipeline's data and visual elements.
        start: the model to start from; its store must exist (``store_path(start.name)``).
        settings: the comparison.
        store_path: model name -> its store.
        checkpoint_dir: a folder name -> where checkpoints go (both arms under one folder).
        results: the results folder; every table is upserted there.
        pipeline, dataset_label: key columns of the rows.
        extract_options: how each arm's checkpoint is extracted.
        libraries, num_concepts, ratios, bootstrap, options: the analysis both arms get (the
            pipeline's, so each correlation row counts the same models); ``settings.library``
            is added when missing.
        cluster: where the analysis runs (None: ``ClusterOptions()``).
        clip_store: the CLIP store, for a text library.
        project_version: recorded in the new stores.

    Returns:
        ``finetune.parquet`` as written: one row per arm.
    """
    k = num_concepts
    base_store = open_feature_store(store_path(start.name))
    library = build_library(settings.library, LibraryInputs(elements=base_store.read_elements(),
                                                            num_classes=base_store.num_classes),
                            num_concepts=k, seed=settings.seed)
    backbone = create_backbone(backbone=start.backbone, weights=start.weights, img_size=start.img_size,
                               seed=start.seed)
    images = element_images(dataset, plans, [int(m[0]) for m in library.members], backbone.data_config)
    train = TrainOptions(epochs=settings.epochs, checkpoints=(settings.epochs,), lr=settings.lr, seed=settings.seed,
                         device=settings.device,
                         **({"batch_size": settings.batch_size} if settings.batch_size is not None else {}))
    arms = finetune_arms(dataset=dataset, backbone=start.backbone, weights=start.weights, img_size=start.img_size,
                         init_seed=start.seed, images=images, lam=settings.lam, ratio=settings.ratio, options=train,
                         refresh_every=settings.refresh_every,
                         out_root=checkpoint_dir(f"{start.name}+finetune-seed{settings.seed}-e{settings.epochs}"))
    names = {arm.lam: f"{start.name}+ft{arm.lam:g}" for arm in arms}
    for arm in arms:
        tuned = create_backbone(backbone=start.backbone, weights=str(arm.checkpoint), img_size=start.img_size,
                                seed=start.seed)
        extract_store(store_path(names[arm.lam]), dataset=dataset, backbone=tuned, model_name=names[arm.lam],
                      element_plans=plans, elements_config=elements_config, options=extract_options,
                      pipeline=pipeline, project_version=project_version)
    stores = [store_path(start.name)] + [store_path(n) for n in names.values()]
    analyze_stores(stores, results=results, pipeline=pipeline, libraries=list(dict.fromkeys([*libraries, settings.library])),
                   num_concepts=k, ratios=ratios, seeds=[settings.seed], bootstrap=bootstrap, skip_complete=True,
                   cluster=cluster or ClusterOptions(), clip_store=clip_store, options=dict(options or {}))
    iis = tables.read_table(results, "iis")
    iis = iis[(iis.library == settings.library) & (iis.num_concepts == k) & (iis.seed == settings.seed)
              & (iis.protocol == "default") & (iis.pipeline == pipeline)
              & (iis.grid == tables.grid_key(ratios))].set_index("model")
    rows = [{
        "pipeline": pipeline, "dataset": dataset_label, "model": start.name, "lambda": arm.lam,
        "seed": settings.seed, "epochs": settings.epochs, "ratio": settings.ratio, "library": settings.library,
        "num_concepts": k,
        "standard_top1_before": float(iis.loc[start.name, "standard_top1"]),
        "standard_top1_after": float(iis.loc[names[arm.lam], "standard_top1"]),
        "iis_before": float(iis.loc[start.name, "iis"]), "iis_after": float(iis.loc[names[arm.lam], "iis"]),
        "finetuned_model": names[arm.lam], "seconds": arm.result.seconds,
    } for arm in arms]
    table = tables.upsert(results, "finetune", pd.DataFrame(rows))
    for row in rows:
        log.info("fine-tune %s lambda=%g: standard top-1 %.4f -> %.4f, IIS %.4f -> %.4f", row["model"],
                 row["lambda"], row["standard_top1_before"], row["standard_top1_after"], row["iis_before"],
                 row["iis_after"])
    return table
