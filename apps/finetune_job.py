"""Application 1 end to end: fine-tune with λ and with λ = 0 at several seeds, measure every arm,
write ``finetune.parquet`` and ``finetune_delta.parquet``.

:mod:`iis.apps.finetune` trains the arms; this module splits the visual elements between the
loss's library and the scoring libraries, extracts each arm's checkpoint as a model of its own
(``<model>+ft<λ>-s<seed>``) with the scoring elements only, analyses it with the pipeline's
libraries and analysis seeds into a results folder of its own (``<results>/finetune``), and
tabulates (:mod:`iis.apps.finetune_tables`). It takes explicit arguments, never a pipeline
config (``iis.jobs`` unpacks one).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from iis.analyze import tables
from iis.analyze.pipeline import ClusterOptions, analyze_stores, model_keys
from iis.analyze.store import FeatureStore, StoreError, open_feature_store
from iis.apps.finetune import FinetuneArm, element_images, finetune_arms, loss_library_members, split_elements
from iis.apps.finetune_tables import Comparison, arm_rows, delta_rows
from iis.extract.backbones import create_backbone, file_sha256
from iis.extract.datasets import ImageDataset
from iis.extract.elements import ElementPlan
from iis.extract.runner import ExtractOptions, extract_store
from iis.extract.train import TrainOptions

log = logging.getLogger(__name__)

ARM_RESULTS = "finetune"  # the arms' own results folder, under the pipeline's


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
    """One comparison: ``lam`` against 0, same budget, at each training seed.

    Attributes:
        lam: weight of the interpretable-head loss.
        epochs: fine-tuning epochs.
        ratio: sparsity of ``g_s`` inside the loss.
        library: the library re-embedded by the live backbone (prototype).
        refresh_every: steps between re-embeddings.
        lr: AdamW peak learning rate.
        seeds: training seeds; each trains both arms and draws the loss's library.
        holdout: share of each class's element source images reserved for the loss's library.
        split_seed: seeds which source images are reserved (one split for every seed and arm, so
            every arm is scored from the same elements).
        steps: optimizer steps per arm below whole epochs; None: every step of ``epochs``.
        batch_size: images per step; None keeps :class:`TrainOptions`'s default.
        device: cpu, cuda, cuda:N or auto.
    """

    lam: float
    epochs: int
    ratio: float
    library: str
    refresh_every: int
    lr: float
    seeds: tuple[int, ...]
    holdout: float
    split_seed: int
    steps: int | None
    batch_size: int | None
    device: str


def arm_name(start: str, lam: float, seed: int) -> str:
    """The model name of a fine-tuned arm: ``<start>+ft<λ>-s<seed>`` (its group is ``start``'s)."""
    return f"{start}+ft{lam:g}-s{seed}"


def _complete_store(path: Path) -> FeatureStore | None:
    """The complete feature store at ``path``, or None."""
    try:
        return open_feature_store(path)
    except StoreError:
        return None


@dataclass(frozen=True)
class PreparedArms:
    """The trained and extracted arms of one comparison, before they are analysed.

    Attributes:
        arms: every arm at every seed (:class:`~iis.apps.finetune.FinetuneArm`).
        names: ``{(λ, seed): model name}``.
        stores: each arm's store, in ``arms`` order.
        fresh: the stores extracted by this call (absent, unfinished or of other weights before):
            their rows, if the tables hold any under the same key, come from an earlier store, so
            they are analysed again rather than skipped.
    """

    arms: list[FinetuneArm]
    names: dict[tuple[float, int], str]
    stores: list[Path]
    fresh: list[Path]


@dataclass(frozen=True)
class ArmsJob:
    """What training and extracting the arms of one comparison needs.

    Attributes:
        dataset, plans, elements_config: the pipeline's data and visual elements.
        start: the model to start from; its store must exist (``store_path(start.name)``) and hold
            the elements of ``plans``.
        settings: the comparison.
        store_path: model name -> its store.
        checkpoint_dir: a folder name -> where checkpoints go (both arms of a seed under one folder).
        pipeline: the pipeline's name (a key column of the rows; recorded in the stores).
        extract_options: how each arm's checkpoint is extracted.
        num_concepts: ``K``, also the size of the loss's library.
        project_version: recorded in the new stores.
    """

    dataset: ImageDataset
    plans: Sequence[ElementPlan]
    elements_config: dict
    start: StartingModel
    settings: FinetuneSettings
    store_path: Callable[[str], Path]
    checkpoint_dir: Callable[[str], Path]
    pipeline: str
    extract_options: ExtractOptions
    num_concepts: int
    project_version: str = "0"


def prepare_arms(job: ArmsJob) -> PreparedArms:
    """Train both arms at every seed and extract each into a store of its own; what exists with the
    same settings (checkpoints, complete stores) is reused.

    The loss's library (``num_concepts`` elements per seed) comes from the held-out source images
    (:func:`~iis.apps.finetune.split_elements`); the arms' stores hold the other elements only.
    """
    dataset, plans, start, settings, store_path = job.dataset, job.plans, job.start, job.settings, job.store_path
    base_store = open_feature_store(store_path(start.name))
    elements = base_store.read_elements()
    if len(plans) != len(elements) or not np.array_equal(elements.source_ids, [p.source_id for p in plans]):
        raise ValueError(f"{base_store.path}: its visual elements are not the pipeline's ({len(elements)} stored, "
                         f"{len(plans)} planned); extract it again")
    split = split_elements(elements.labels, elements.source_ids, holdout=settings.holdout, seed=settings.split_seed)
    log.info("fine-tune %s: %d of %d visual elements reserved for the loss's library, %d score the arms",
             start.name, split.loss.size, len(elements), split.scoring.size)
    backbone = create_backbone(backbone=start.backbone, weights=start.weights, img_size=start.img_size,
                               seed=start.seed)
    budget = f"e{settings.epochs}" + (f"-n{settings.steps}" if settings.steps is not None else "")
    arms = []
    for seed in settings.seeds:
        members = loss_library_members(elements, split.loss, num_concepts=job.num_concepts,
                                       num_classes=base_store.num_classes, seed=seed)
        train = TrainOptions(epochs=settings.epochs, checkpoints=(settings.epochs,), lr=settings.lr, seed=seed,
                             device=settings.device, max_steps=settings.steps,
                             **({"batch_size": settings.batch_size} if settings.batch_size is not None else {}))
        arms += finetune_arms(
            dataset=dataset, backbone=start.backbone, weights=start.weights, img_size=start.img_size,
            init_seed=start.seed, images=element_images(dataset, plans, members, backbone.data_config),
            lam=settings.lam, ratio=settings.ratio, options=train, refresh_every=settings.refresh_every,
            out_root=job.checkpoint_dir(f"{start.name}+finetune-seed{seed}-{budget}"), library_elements=members)
    names = {(arm.lam, arm.seed): arm_name(start.name, arm.lam, arm.seed) for arm in arms}
    # The arms' stores hold the scoring elements only: every library built from them (prototype
    # at any seed, cluster, end2end) is built after fine-tuning and never holds a loss element.
    scoring_plans = [plans[i] for i in split.scoring]
    scoring_config = {**job.elements_config, "finetune_holdout": {
        "share": settings.holdout, "seed": settings.split_seed, "reserved_elements": int(split.loss.size),
        "reserved_sources": sorted({str(elements.source_ids[i]) for i in split.loss})}}
    stores, fresh = [], []
    for arm in arms:
        name = names[(arm.lam, arm.seed)]
        path = store_path(name)
        stores.append(path)
        store = _complete_store(path)
        if store is not None and store.attrs.get("weights_sha256") == file_sha256(arm.checkpoint):
            continue
        if store is not None:
            # The arm was trained again (e.g. with another finetune.lr: its name does not hold every
            # setting), so this complete store holds the old weights: extracted anew, rows refitted.
            log.warning("%s: extracted from an earlier training of this arm (other weights); extracting it anew",
                        path)
            shutil.rmtree(path)
        fresh.append(path)
        tuned = create_backbone(backbone=start.backbone, weights=str(arm.checkpoint), img_size=start.img_size,
                                seed=start.seed)
        extract_store(path, dataset=dataset, backbone=tuned, model_name=name, element_plans=scoring_plans,
                      elements_config=scoring_config, options=job.extract_options, pipeline=job.pipeline,
                      project_version=job.project_version)
    return PreparedArms(arms=arms, names=names, stores=stores, fresh=fresh)


def compare_finetuning(
    job: ArmsJob,
    *,
    results: Path,
    dataset_label: str,
    libraries: Sequence[str],
    ratios: Sequence[float],
    analysis_seeds: Sequence[int],
    bootstrap: int,
    options: Mapping[str, dict] | None = None,
    cluster: ClusterOptions | None = None,
    clip_store: Path | None = None,
) -> dict[str, pd.DataFrame]:
    """Fine-tune ``job.start`` with ``job.settings.lam`` and with 0 at every seed, measure every arm,
    and upsert ``finetune.parquet`` and ``finetune_delta.parquet``.

    Args:
        job: the arms to train and extract (:func:`prepare_arms`).
        results: the results folder: the fine-tuning tables are upserted there, the arms' analysis
            tables under ``results / "finetune"`` (same formats), apart from the pipeline's models.
        dataset_label: a key column of the rows.
        libraries, ratios, analysis_seeds, bootstrap, options: the analysis every arm gets (the
            pipeline's, at ``job.num_concepts``; ``libraries`` may be a subset of the pipeline's,
            ``finetune.scoring_libraries``): every library scores every arm at every analysis seed.
        cluster: where the analysis runs (None: ``ClusterOptions()``).
        clip_store: the CLIP store, for a text library.

    Returns:
        ``{"finetune": …, "finetune_delta": …}`` as written.
    """
    prepared = prepare_arms(job)
    pipeline, num_concepts, start, settings, store_path = (job.pipeline, job.num_concepts, job.start, job.settings,
                                                           job.store_path)
    analysis = dict(pipeline=pipeline, libraries=list(libraries), num_concepts=num_concepts, ratios=ratios,
                    seeds=list(analysis_seeds), bootstrap=bootstrap, cluster=cluster or ClusterOptions(),
                    clip_store=clip_store, options=dict(options or {}), skip_complete=True)
    # "Before" is the start model as the pipeline's own analysis scores it (done already, as a rule).
    analyze_stores([store_path(start.name)], results=results, **analysis)
    # The arms get a results folder of their own: six near-copies of one model in the pipeline's
    # tables would weigh in its correlation across models and its ranking as six models.
    arm_results = Path(results) / ARM_RESULTS
    analyze_stores(prepared.stores, results=arm_results, redo=prepared.fresh, **analysis)
    names = prepared.names
    comparison = Comparison(
        pipeline=pipeline, dataset=dataset_label, start=start.name, lam=settings.lam, arms=names,
        libraries=list(libraries), num_concepts=num_concepts, grid=tables.grid_key(ratios),
        library_seeds=list(analysis_seeds),
        settings={"epochs": settings.epochs, "steps": settings.steps, "ratio": settings.ratio,
                  "loss_library": settings.library, "holdout": settings.holdout},
        weights={name: model_keys(store_path(name), pipeline=pipeline)["weights"]
                 for name in [start.name, *names.values()]})
    with tables.results_lock(results):
        iis = pd.concat([tables.read_table(results, "iis"), tables.read_table(arm_results, "iis")],
                        ignore_index=True)
        out = {"finetune": tables.merge(results, "finetune", pd.DataFrame(arm_rows(
                   iis, comparison, {(a.lam, a.seed): a.result.seconds for a in prepared.arms}))),
               "finetune_delta": tables.merge(results, "finetune_delta", pd.DataFrame(delta_rows(
                   iis, comparison, results=arm_results, n_resamples=bootstrap)))}
        tables.commit(results, out, run={"command": "finetune", "pipeline": pipeline, "model": start.name,
                                         "lambda": settings.lam, "seeds": list(settings.seeds)})
    return out
