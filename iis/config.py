"""The pipelines.yaml schema: parsed once, at the edge, into frozen typed objects.

Errors name the key path and the reason, e.g.
``pipelines.demo.models[1].weights: file not found: /models/r50.pth``.

Where pipelines come from (:func:`find_pipeline`): the user's file (``--config``, or
``./pipelines.yaml`` when it exists), then the pipelines shipped as package data
(``iis/data/pipelines.yaml``: smoke, smoke-text, demo). A user's pipeline of the same name wins.
Relative paths in a user's file resolve against its folder. In the shipped file, input paths
(concept lists) resolve inside the package, next to the file, and ``store:``/``results:``
under the current directory, so ``iis run demo`` works from any folder.

What is checked depends on the command (``check_inputs``): extraction needs the dataset, the
weights files, the timm backbone names, the concept list and the CLIP weights; stage 2 needs
only the stores, which it checks itself when it opens them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    create_model,
    field_validator,
    model_validator,
)

from iis.store_format import BLOCK_ROWS
from iis.strict import Bool, Float, Int

BUILTIN_DATASETS = ("mnist5k", "digits")
CLIP_STORE = "clip"  # the CLIP store's model name (its store is <store>/clip.zarr)
DEFAULT_RATIOS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")





def _distinct(value: tuple, what: str) -> tuple:
    """A list of ``what`` (seeds, libraries): non-empty, no repeats."""
    if not value or len(set(value)) != len(value):
        raise ValueError(f"{what} must be a non-empty list without repeats")
    return value

class ConfigError(ValueError):
    """A pipelines.yaml that cannot be used; the message lists every problem by key path."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: str | Path, info: ValidationInfo, *, output: bool = False) -> Path:
    """An absolute path: relative ones against the context's ``base`` (inputs) or ``out_base``
    (``store``/``results``; they differ for the shipped pipelines)."""
    context = info.context or {}
    base = context.get("out_base" if output else "base") or context.get("base") or Path.cwd()
    path = Path(value).expanduser()
    return path if path.is_absolute() else (Path(base) / path)


def _checking_inputs(info: ValidationInfo) -> bool:
    """Whether this parse checks what extraction reads (dataset, weights, backbones, concepts)."""
    return (info.context or {}).get("check_inputs", True)


class SplitFractions(_Frozen):
    val: Float = Field(0.1, ge=0.0, lt=1.0)  # fraction carved for val where the data has none
    test: Float = Field(0.2, ge=0.0, lt=1.0)  # fraction carved for test where the data has none

    @model_validator(mode="after")
    def _fits(self) -> SplitFractions:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test must leave room for train, got {self.val} + {self.test}")
        return self


class DatasetConfig(_Frozen):
    source: Literal["builtin", "imagefolder", "filelist"]
    name: str | None = None  # builtin: mnist5k | digits; otherwise a label for the tables
    root: Path | None = None  # imagefolder: class subfolders, optionally under train/ val/ test/
    file: Path | None = None  # filelist: CSV with columns path,label[,split]
    splits: SplitFractions = SplitFractions()
    seed: Int = 0  # seeds the split carving and the element sampling

    @model_validator(mode="before")
    @classmethod
    def _no_keys_of_another_source(cls, data: Any) -> Any:
        # A key that only another source reads would be silently ignored (a `root:` left behind
        # when switching to `source: builtin` says the user meant another dataset).
        if isinstance(data, dict) and data.get("source") in ("builtin", "imagefolder", "filelist"):
            for key, owner in (("root", "imagefolder"), ("file", "filelist")):
                if data.get(key) is not None and data["source"] != owner:
                    raise ValueError(f"`{key}` is read only by source {owner}; source {data['source']} "
                                     f"would ignore it: remove it or set `source: {owner}`")
        return data

    @field_validator("root")
    @classmethod
    def _root_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _resolve(value, info)
        if _checking_inputs(info) and not path.is_dir():
            raise ValueError(f"directory not found: {path}")
        return path

    @field_validator("file")
    @classmethod
    def _file_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _resolve(value, info)
        if _checking_inputs(info) and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path

    @model_validator(mode="after")
    def _source_fields(self) -> DatasetConfig:
        if self.source == "builtin" and self.name not in BUILTIN_DATASETS:
            raise ValueError(f"builtin dataset name must be one of {', '.join(BUILTIN_DATASETS)}, got {self.name!r}")
        if self.source == "imagefolder" and self.root is None:
            raise ValueError("source imagefolder needs `root`")
        if self.source == "filelist" and self.file is None:
            raise ValueError("source filelist needs `file`")
        return self

    @property
    def label(self) -> str:
        """The dataset's name in stores and tables."""
        if self.name:
            return self.name
        return (self.root or self.file).stem  # type: ignore[union-attr]


class TrainConfig(_Frozen):
    """A small seeded trainer for backbones trained by the pipeline (AdamW, cosine schedule)."""

    epochs: Int = Field(ge=1)
    checkpoints: tuple[Annotated[Int, Field(ge=0)], ...]  # epochs after which a checkpoint becomes a model
    lr: Float = Field(2e-3, gt=0)
    weight_decay: Float = Field(0.05, ge=0)
    batch_size: Int = Field(128, ge=1)
    seed: Int = 0

    @model_validator(mode="after")
    def _checkpoints_within(self) -> TrainConfig:
        bad = [c for c in self.checkpoints if c > self.epochs]
        if bad:
            raise ValueError(f"checkpoints {bad} lie beyond epochs={self.epochs}")
        if len(set(self.checkpoints)) != len(self.checkpoints) or not self.checkpoints:
            raise ValueError("checkpoints must be a non-empty list of distinct epochs")
        return self.model_copy(update={"checkpoints": tuple(sorted(self.checkpoints))})


class ModelConfig(_Frozen):
    name: str  # unique id; the row key in every table
    backbone: str  # any timm model name
    weights: str = "random"  # random (seeded) | pretrained (local HF cache) | a file path
    img_size: Int | None = Field(None, ge=8)  # optional input-size override
    # Layers measured besides the pooled pre-logit features, from one forward pass: `all`, or a
    # list of `final` and `stages.<i>` (timm's feature_info entries; see iis.extract.layers).
    # None: `final` only. Each layer but `final` is a model of its own, `<name>@<layer>`.
    layers: tuple[str, ...] | None = None
    seed: Int = 0  # seeds random weights
    # The run this model belongs to, for the correlation within and across groups (models of one
    # group are not independent). Default: the name before the first `@` or `+`, so a trained
    # model's checkpoints share one; name it to tie separate entries together (the same backbone
    # under several weights files, say). A trained entry's checkpoints all take it.
    group: str | None = None
    train: TrainConfig | None = None
    # With `train:`, the checkpoints (epochs) whose layers are extracted; default: every one.
    layers_at: tuple[Annotated[Int, Field(ge=0)], ...] | None = None

    @field_validator("name", "group")
    @classmethod
    def _name_ok(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"model {info.field_name}s use letters, digits, '.', '_' and '-', got {value!r}")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str, info: ValidationInfo) -> str:
        if not _checking_inputs(info):
            return value  # stage 2 never builds the backbone: it reads the store
        import timm  # deferred: importing timm takes seconds, and only extraction needs it

        if not timm.is_model(value.split(".")[0]):
            raise ValueError(f"unknown timm model {value!r} (see timm.list_models())")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_ok(cls, value: str, info: ValidationInfo) -> str:
        if value in ("random", "pretrained"):
            return value
        path = _resolve(value, info)
        if _checking_inputs(info) and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return str(path)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_listed(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("layers")
    @classmethod
    def _known_layers(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if value is None:
            return None
        backbone = info.data.get("backbone")
        if backbone is None:
            return value  # the backbone itself is reported
        # Resolved on the meta device (no weights, under a second once timm is imported), also for
        # stage 2: `all` and a spelled-out default pooling (`stages.1.avg`) name stores by canonical name.
        from iis.extract.layers import layer_names

        try:
            return tuple(layer_names(backbone, value, img_size=info.data.get("img_size")))
        except ValueError as exc:  # LayerError: the message lists the model's layers
            raise ValueError(str(exc)) from None
        except Exception:
            if _checking_inputs(info):
                raise
            return value  # a backbone this timm cannot build: stage 2 reads the stores as named

    @model_validator(mode="after")
    def _layers_at_checkpoints(self) -> ModelConfig:
        if self.layers_at is None:
            return self
        if self.train is None or self.layers is None:
            raise ValueError("layers_at needs both `train:` and `layers:`")
        stray = sorted(set(self.layers_at) - set(self.train.checkpoints))
        if stray:
            raise ValueError(f"layers_at {stray} are not among train.checkpoints {list(self.train.checkpoints)}")
        return self


class ElementsConfig(_Frozen):
    images_per_class: Int = Field(10, ge=1)  # train images per class cut into elements
    grid: Int = Field(2, ge=1)  # g: each image gives a g x g grid of patches
    slic: Bool = False  # also SLIC superpixel segments
    slic_segments: Int = Field(8, ge=2)  # SLIC's n_segments per image


class ExtractConfig(_Frozen):
    batch_size: Int = Field(64, ge=1)
    block_rows: Int = Field(BLOCK_ROWS, ge=1)  # rows per block and per Zarr chunk
    dtype: Literal["float16", "float32"] = "float16"
    num_workers: Int = Field(0, ge=0)  # DataLoader workers
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["bfloat16", "float16"] = "bfloat16"  # autocast dtype on CUDA
    # MiB of transformed images kept for the next model over the same data (num_workers 0 only);
    # omitted: 1/16 of RAM; 0: none (iis/extract/rowcache.py).
    row_cache_mb: Int | None = Field(None, ge=0)
    # Seconds a shard other than shard 0 waits for shard 0 to create each store and, for models
    # with `train:`, to finish their training (only shard 0 trains): set it above the training
    # time when all shards start together.
    wait_seconds: Float = Field(600.0, ge=0)


@lru_cache(maxsize=1)
def _options_model() -> type[BaseModel]:
    """One optional field per registered library, typed by that library's options class.

    Built from the registry on first use, so a new library's options are checked with no edit
    here, and a bad option is reported with its key path
    (``analysis.options.text.top5_cutoff: Input should be a valid number``).
    """
    from iis.analyze.libraries import get_library, list_libraries  # the registry is the source of truth

    fields: dict[str, Any] = {name: (get_library(name).options | None, None) for name in list_libraries()}
    return create_model("LibraryOptionsByName", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


class LibraryFromConfig(_Frozen):
    """Concept libraries built from the visual elements of other stores (same backbone, weights and
    layer: stage 2 refuses any other, naming the mismatch). Exactly one of the two keys."""

    store: Path | None = None  # one store whose elements build the libraries of every model
    pipeline: str | None = None  # another pipeline of the same file: each model takes its namesake's store
    # Set from `pipeline` when the file is read: that pipeline's `store:` folder.
    pipeline_store: Path | None = None

    @field_validator("store")
    @classmethod
    def _store_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info, output=True)

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> LibraryFromConfig:
        if (self.store is None) == (self.pipeline is None):
            raise ValueError("library_from takes exactly one of `store` or `pipeline`")
        if self.pipeline is None or self.pipeline_store is not None:
            return self
        stores = (info.context or {}).get("pipeline_stores") or {}
        if self.pipeline not in stores:
            raise ValueError(f"library_from.pipeline {self.pipeline!r} is not a pipeline of this file; "
                             f"known: {', '.join(sorted(stores))}")
        if not isinstance(stores[self.pipeline], str | Path):
            raise ValueError(f"library_from.pipeline {self.pipeline!r} has no `store:` folder")
        return self.model_copy(update={"pipeline_store": _resolve(stores[self.pipeline], info, output=True)})

    def elements_store(self, model: str) -> Path:
        """The store whose visual elements build the libraries of ``model``."""
        if self.store is not None:
            return self.store
        return self.pipeline_store / f"{model}.zarr"  # type: ignore[operator]


class AnalysisConfig(_Frozen):
    libraries: tuple[str, ...] = ("prototype", "cluster", "end2end")
    num_concepts: Int = Field(64, ge=2)
    ratios: tuple[Annotated[Float, Field(ge=0.0, lt=1.0)], ...] = DEFAULT_RATIOS
    seeds: tuple[Int, ...] = (0,)
    # default: METHOD.md's heads; fixed-scale: without the learnt per-concept scale (comparison);
    # reference: the authors' protocol, which selects on test (comparison only)
    protocol: Literal["default", "fixed-scale", "reference"] = "default"
    bootstrap: Int = Field(1000, ge=0)  # bootstrap resamples for confidence intervals (0: none)
    # Build the libraries from another store's or pipeline's visual elements, e.g.
    # {store: cache/other/r10.zarr} or {pipeline: other}; None: each store's own elements.
    library_from: LibraryFromConfig | None = None
    # Per-library settings, e.g. {text: {top5_cutoff: 0.05}, end2end: {epochs: 20}}: each library's
    # options class (declared in its module, carried by the registry) checks them here.
    options: Any = Field(default=None, validate_default=True)

    @field_validator("options", mode="wrap")
    @classmethod
    def _typed_options(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> BaseModel:
        model = _options_model()
        if isinstance(value, model):
            return value
        # A ValidationError raised here keeps its locations, under analysis.options.
        return model.model_validate({} if value is None else value)

    @field_validator("libraries")
    @classmethod
    def _known_libraries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from iis.analyze.libraries import list_libraries  # the registry is the source of truth

        known = list_libraries()
        for name in value:
            if name not in known:
                raise ValueError(f"unknown library {name!r}; known: {', '.join(known)}")
        return _distinct(value, "libraries")

    @model_validator(mode="after")
    def _options_for_listed_libraries(self) -> AnalysisConfig:
        stray = sorted(set(self.given_options()) - set(self.libraries))
        if stray:
            raise ValueError(f"options given for libraries not in `libraries`: {', '.join(stray)}")
        return self

    def given_options(self) -> dict[str, BaseModel]:
        """The options written in the file, by library (libraries left at their defaults are absent)."""
        return {name: value for name, value in self.options if value is not None}

    def library_options(self, name: str) -> BaseModel:
        """The options of library ``name``: as given, or its options class's defaults."""
        from iis.analyze.libraries import get_library

        given = self.given_options().get(name)
        return given if given is not None else get_library(name).options()

    def options_by_library(self) -> dict[str, dict]:
        """``{library: {option: value}}`` for every listed library: plain data that tasks carry."""
        return {name: self.library_options(name).model_dump() for name in self.libraries}

    @property
    def needs_text(self) -> tuple[str, ...]:
        """The listed libraries that read CLIP features (the registry says which)."""
        from iis.analyze.libraries import get_library

        return tuple(name for name in self.libraries if get_library(name).needs_text)

    @field_validator("ratios")
    @classmethod
    def _grid(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) < 2:
            raise ValueError("IIS needs at least two sparsity ratios")
        if len(set(value)) != len(value):
            raise ValueError("ratios must not repeat")
        return tuple(sorted(value))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return _distinct(value, "seeds")


class ClipConfig(_Frozen):
    """The CLIP model that embeds images and concept words for the text library."""

    model: str  # an open_clip model name, e.g. ViT-B-32 (iis-tiny-test: a tiny config for tests)
    weights: str  # a local weights file, or `random-for-tests` (marked in every table)
    seed: Int = 0  # seeds random-for-tests weights

    @field_validator("weights")
    @classmethod
    def _weights_ok(cls, value: str, info: ValidationInfo) -> str:
        if value == "random-for-tests":
            return value
        if value in ("random", "pretrained"):
            raise ValueError("CLIP weights come from a local file; random weights need the explicit value random-for-tests")
        path = _resolve(value, info)
        if _checking_inputs(info) and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return str(path)


class TextConfig(_Frozen):
    """Text concepts (the Label-free-CBM library): a concept list and a CLIP model."""

    concepts: Path  # a text file, one concept per line (see data/concepts/README.md)
    clip: ClipConfig

    @field_validator("concepts")
    @classmethod
    def _concepts_exist(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve(value, info)
        if _checking_inputs(info) and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path


DEFAULT_EXPLAIN_RATIO = 0.9


class ExplainConfig(_Frozen):
    """What `iis run` explains for the report's cards (application 2)."""

    model: str | None = None  # default: the model with the best standard top-1
    library: str | None = None  # default: the first library of the analysis
    # One of analysis.ratios; default: 0.9, or the analysis ratio nearest it (PipelineConfig.explain_ratio).
    ratio: Float | None = Field(None, ge=0.0, lt=1.0)
    images: Int = Field(8, ge=1)  # test images explained


class FinetuneConfig(_Frozen):
    """The fine-tuning comparison that `iis run` makes (application 1): lambda vs 0, per seed.

    The loss's prototype library is drawn from a held-out share of each class's element source
    images; both arms are scored with the pipeline's libraries and analysis seeds, built after
    fine-tuning from the other elements only, so no scoring library holds an element the loss saw.
    """

    model: str  # a measured model (e.g. "r10@e8"), not an inner layer: its weights are the starting point
    lambda_: Float = Field(1.0, gt=0.0, alias="lambda")  # weight of the interpretable-head loss
    epochs: Int = Field(2, ge=1)
    # Optimizer steps per arm when fewer than `epochs` whole epochs (the last epoch is cut short);
    # None: every step of every epoch.
    steps: Int | None = Field(None, ge=1)
    ratio: Float = Field(0.9, ge=0.0, lt=1.0)  # sparsity of g_s inside the loss
    library: Literal["prototype"] = "prototype"  # re-embedded by the current backbone
    refresh_every: Int = Field(20, ge=1)  # steps between re-embeddings of the library
    lr: Float = Field(5e-4, gt=0)
    # Training seeds: each trains both arms once, and seeds the loss library's draw.
    seeds: tuple[Int, ...] = (0, 1, 2)
    # Share of each class's element source images reserved for the loss's library (at least one
    # image per class, and at least one left for the scoring libraries).
    holdout: Float = Field(0.3, gt=0.0, lt=1.0)
    # The libraries that score the arms, a subset of analysis.libraries; None: all of them. Each
    # arm is analysed like a model, so every scoring library adds a task per arm and seed.
    scoring_libraries: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _seed_was_replaced(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data:
            raise ValueError(f"`seed` was replaced by `seeds`, a list of training seeds (default [0, 1, 2]); "
                             f"write `seeds: [{data['seed']}, ...]`")
        return data

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return _distinct(value, "seeds")

    @field_validator("scoring_libraries")
    @classmethod
    def _scoring_libraries(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # An empty list would silently mean "all": absent (None) says that.
        return None if value is None else _distinct(value, "scoring_libraries")


class PipelineConfig(_Frozen):
    name: str
    dataset: DatasetConfig
    models: tuple[ModelConfig, ...] = Field(min_length=1)
    elements: ElementsConfig = ElementsConfig()
    extract: ExtractConfig = ExtractConfig()
    store: Path  # Zarr stores go under here, one per model
    results: Path  # stage 2 writes its tables and report here
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)  # built on use: it imports the library registry
    explain: ExplainConfig = ExplainConfig()
    finetune: FinetuneConfig | None = None
    text: TextConfig | None = None

    @field_validator("store", "results")
    @classmethod
    def _paths(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info, output=True)

    @model_validator(mode="after")
    def _unique_models(self) -> PipelineConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, repeated: {', '.join(dupes)}")
        if self.analysis.needs_text and self.text is None:
            raise ValueError(f"analysis.libraries has {', '.join(self.analysis.needs_text)}, which needs a "
                             "`text:` section (concepts and clip)")
        if CLIP_STORE in names:
            raise ValueError(f"the model name {CLIP_STORE!r} is reserved for the CLIP store")
        measured = {m.name: m for m in self.measured_models()}
        for section, name in (("explain", self.explain.model), ("finetune", self.finetune and self.finetune.model)):
            if name and name not in measured:
                raise ValueError(f"{section}.model {name!r} is not a model of this pipeline; known: {', '.join(sorted(measured))}")
        inner = self.finetune and measured[self.finetune.model]
        if inner and inner.layer != "final":
            # Fine-tuning trains the whole backbone and scores its arms at the final layer.
            raise ValueError(f"finetune.model {inner.name!r} is an inner layer ({inner.layer}); name the model "
                             f"itself, {inner.base!r}")
        if self.explain.library and self.explain.library not in self.analysis.libraries:
            raise ValueError(f"explain.library {self.explain.library!r} is not in analysis.libraries")
        if self.explain.ratio is not None and not any(abs(self.explain.ratio - r) < 1e-9 for r in self.analysis.ratios):
            raise ValueError(f"explain.ratio {self.explain.ratio} is not in analysis.ratios {self.analysis.ratios}")
        stray = sorted(set(self.finetune.scoring_libraries or ()) - set(self.analysis.libraries)) if self.finetune else []
        if stray:
            raise ValueError(f"finetune.scoring_libraries {', '.join(stray)} not in analysis.libraries "
                             f"({', '.join(self.analysis.libraries)})")
        if self.finetune is not None and self.elements.images_per_class < 2:
            raise ValueError("finetune needs elements.images_per_class >= 2: the loss's library and the "
                             "scoring libraries are drawn from different source images")
        return self

    def model(self, name: str) -> ModelConfig:
        """The model entry called ``name``; an unknown one lists the known ones."""
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"pipeline {self.name!r} has no model {name!r}; it has {', '.join(m.name for m in self.models)}")

    def checkpoint_dir(self, model: str) -> Path:
        """Where the pipeline's trainer writes the checkpoints of a trained model."""
        return self.store / "checkpoints" / model

    def measured_models(self) -> list[MeasuredModel]:
        """Every model the tables will carry: each plain entry, and each checkpoint of a trained one."""
        out = []
        for m in self.models:
            if m.train is None:
                base = MeasuredModel(name=m.name, backbone=m.backbone, weights=m.weights,
                                     img_size=m.img_size, seed=m.seed, parent=m.name, base=m.name, group=m.group)
                out += _with_layers(base, m.layers)
                continue
            for epoch in sorted(m.train.checkpoints):
                ckpt = self.checkpoint_dir(m.name) / f"e{epoch}.safetensors"
                name = f"{m.name}@e{epoch}"
                base = MeasuredModel(name=name, backbone=m.backbone, weights=str(ckpt), img_size=m.img_size,
                                     seed=m.seed, parent=m.name, epoch=epoch, base=name, group=m.group)
                at = m.layers_at if m.layers_at is not None else m.train.checkpoints
                out += _with_layers(base, m.layers if epoch in at else None)
        return out

    def final_models(self) -> list[str]:
        """The measured models at their final layer (inner layers, `name@stages.i`, left out)."""
        return [m.name for m in self.measured_models() if m.layer == "final"]

    def explain_ratio(self) -> float:
        """``explain.ratio``, or by default 0.9 when the analysis has it, else the analysis ratio
        nearest 0.9 (an explanation is of a head the analysis fitted)."""
        if self.explain.ratio is not None:
            return self.explain.ratio
        return min(self.analysis.ratios, key=lambda r: (abs(r - DEFAULT_EXPLAIN_RATIO), -r))

    def groups(self) -> dict[str, str]:
        """``{model: group}`` for the measured models whose entry names a ``group:``."""
        return {m.name: m.group for m in self.measured_models() if m.group}

    @property
    def clip_store(self) -> Path | None:
        """The CLIP store beside the backbone stores, when the pipeline has text concepts."""
        return self.store / f"{CLIP_STORE}.zarr" if self.text else None

    def store_path(self, model: str) -> Path:
        """Where the store of one model lives."""
        return self.store / f"{model}.zarr"

    def elements_stores(self) -> dict[str, Path]:
        """``{store path: store whose elements build its libraries}`` under ``analysis.library_from``; else empty."""
        source = self.analysis.library_from
        if source is None:
            return {}
        return {str(self.store_path(m.name)): source.elements_store(m.name) for m in self.measured_models()}


class MeasuredModel(_Frozen):
    """One row key of the tables: a model as given, one checkpoint of a trained model, or one
    layer of either (``layers:``)."""

    name: str  # e.g. "r10", "r10@e2" for a checkpoint, "r10@e2@stages.1" for a layer of it
    backbone: str
    weights: str  # random | pretrained | a file (a checkpoint for trained models)
    img_size: int | None
    seed: int
    parent: str  # the models: entry it comes from
    epoch: int | None = None  # the checkpoint's epoch, for trained models
    base: str = ""  # the model whose extraction writes this store (its name without the layer)
    layer: str = "final"  # the layer this store holds
    layers: tuple[str, ...] | None = None  # on the base's entries: every layer its one pass extracts
    group: str | None = None  # the entry's `group:`; None: the default group (from the name)


def _with_layers(base: MeasuredModel, layers: tuple[str, ...] | None) -> list[MeasuredModel]:
    """The stores one extraction of ``base`` makes: itself, or one per layer (``final`` keeps its name)."""
    if not layers:
        return [base]
    return [base.model_copy(update={"name": base.name if layer == "final" else f"{base.name}@{layer}",
                                    "layer": layer, "layers": layers})
            for layer in layers]


class PipelinesFile(_Frozen):
    pipelines: dict[str, PipelineConfig]


def _loc(parts: tuple) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_causes(errors: list[dict]) -> list[dict]:
    """The errors without the consequences of others: a list whose every entry failed is also
    "too short" (e.g. ``models:`` after its one model's bad backbone), which says nothing new."""
    def inside(err: dict, outer: dict) -> bool:
        return len(err["loc"]) > len(outer["loc"]) and err["loc"][: len(outer["loc"])] == outer["loc"]

    return [e for e in errors if not (e["type"] == "too_short" and any(inside(other, e) for other in errors))]


def _reason(err: dict) -> str:
    msg = err["msg"]
    # pydantic prefixes messages raised in validators; the prefix says nothing to a user.
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "tuple_type":  # the schema holds tuples; in yaml they are lists
        msg = f"Input should be a list, got {type(err.get('input')).__name__}"
    return msg


def _locate(err: dict) -> str:
    # Tagged/union locations and 'function-after' markers are noise to a reader of yaml.
    parts = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    return _loc(parts)


def parse_pipelines(data: object, *, base: Path, source: str = "pipelines.yaml", out_base: Path | None = None,
                    check_inputs: bool = True, pipeline_stores: Mapping[str, Any] | None = None
                    ) -> dict[str, PipelineConfig]:
    """Validate already-loaded yaml data; raise :class:`ConfigError` listing every problem.

    Args:
        data: the loaded yaml.
        base: relative input paths (dataset, weights, concepts) resolve against it.
        source: names the file in error messages.
        out_base: relative ``store``/``results`` resolve against it (default: ``base``).
        check_inputs: check that what extraction reads exists (dataset root or file, weights
            files, timm backbone names, the concept list, CLIP weights). Stage-2 commands pass
            False: they read only the stores.
        pipeline_stores: the file's pipelines (raw), for ``library_from: {pipeline: …}``
            (default: those of ``data``).
    """
    if not isinstance(data, dict) or "pipelines" not in data:
        raise ConfigError(f"{source}: top level must be a mapping with a `pipelines` key")
    if isinstance(data.get("pipelines"), dict):
        # The mapping key names a pipeline; a `name:` inside it would be silently replaced.
        named = [k for k, v in data["pipelines"].items() if isinstance(v, dict) and "name" in v]
        if named:
            lines = [f"pipelines.{k}.name: unknown key; a pipeline is named by its key under `pipelines:` "
                     f"({k!r}), so remove `name:`" for k in named]
            raise ConfigError(f"{source}: {len(lines)} problem(s)\n  " + "\n  ".join(lines))
        # Each pipeline learns its own name, so stage functions need not be told it.
        data = {**data, "pipelines": {
            k: ({**v, "name": k} if isinstance(v, dict) else v) for k, v in data["pipelines"].items()
        }}
    context = {"base": base, "out_base": out_base or base, "check_inputs": check_inputs,
               # `library_from: {pipeline: NAME}` reads that pipeline's store folder
               "pipeline_stores": {k: v.get("store") for k, v in (pipeline_stores or data["pipelines"]).items()
                                   if isinstance(v, dict)} if isinstance(data.get("pipelines"), dict) else {}}
    try:
        parsed = PipelinesFile.model_validate(data, context=context)
    except ValidationError as exc:
        lines = [f"{_locate(e)}: {_reason(e)}" for e in _first_causes(exc.errors())]
        raise ConfigError(f"{source}: {len(lines)} problem(s)\n  " + "\n  ".join(lines)) from None
    return parsed.pipelines


class _RepeatedKey(Exception):
    """A mapping of a yaml document that holds one key twice; ``where`` is its key path."""

    def __init__(self, where: str, line: int, first: int) -> None:
        super().__init__(f"{where}: key repeated at line {line} (first at line {first}); YAML keeps only the "
                         "last, so the first would be silently ignored: remove one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a repeated mapping key (two pipelines ``a:``, two ``store:``
    keys in one pipeline) instead of keeping the last one."""

    def construct_document(self, node: yaml.Node) -> Any:
        # Checked on the node tree before construction, where every key still has its own line
        # and its key path is known; merge keys (`<<: *base`) are not keys of the mapping.
        self._check_unique(node, (), set())
        return super().construct_document(node)

    def _check_unique(self, node: yaml.Node, where: tuple, seen_nodes: set[int]) -> None:
        if id(node) in seen_nodes:  # an alias of a node already checked (or a recursive one)
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise _RepeatedKey(_loc((*where, str(key))), line, first_line[key])
                first_line[key] = line
                self._check_unique(value_node, (*where, str(key)), seen_nodes)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._check_unique(item, (*where, index), seen_nodes)


def _read_yaml(path: Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except _RepeatedKey as exc:
        raise ConfigError(f"{path}: 1 problem(s)\n  {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _raw_pipelines(path: Path) -> dict[str, Any]:
    """The ``pipelines`` mapping of a file, unvalidated."""
    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("pipelines"), dict):
        raise ConfigError(f"{path}: top level must be a mapping with a `pipelines` key")
    return data["pipelines"]


# --------------------------------------------------------------------------------------------------
# Where pipelines come from


def shipped_pipelines_file() -> Path:
    """The pipelines that ship with iis (smoke, smoke-text, demo), as package data."""
    return Path(str(resources.files("iis.data") / "pipelines.yaml"))


def starter_file() -> Path:
    """The commented starter that ``iis init`` copies (it holds a GPU pipeline)."""
    return Path(str(resources.files("iis.data") / "starter.yaml"))


def is_shipped(path: Path) -> bool:
    """True for the shipped pipelines file, also when reached through a link (the checkout's
    top-level pipelines.yaml is one)."""
    return Path(path).resolve() == shipped_pipelines_file().resolve()


def _bases(path: Path) -> dict[str, Path]:
    """Where a file's relative paths resolve: its own folder; for the shipped file, inputs inside
    the package and outputs (store, results) under the current directory."""
    path = Path(path)
    if is_shipped(path):
        return {"base": shipped_pipelines_file().resolve().parent, "out_base": Path.cwd()}
    return {"base": path.resolve().parent, "out_base": path.resolve().parent}


def load_pipelines(path: Path, *, check_inputs: bool = True) -> dict[str, PipelineConfig]:
    """Read and validate every pipeline of one pipelines.yaml."""
    path = Path(path)
    return parse_pipelines(_read_yaml(path), source=str(path), check_inputs=check_inputs, **_bases(path))


def load_pipeline(path: Path, name: str, *, check_inputs: bool = True) -> PipelineConfig:
    """Read and validate one named pipeline of one file; an unknown name lists the known ones.

    Only that pipeline is validated, so a pipeline whose files live on another machine (a GPU
    node's dataset, say) does not stop the others from running here.
    """
    path = Path(path)
    raw = _raw_pipelines(path)
    if name not in raw:
        raise ConfigError(f"{path}: no pipeline {name!r}; known: {', '.join(sorted(raw))}")
    return parse_pipelines({"pipelines": {name: raw[name]}}, source=str(path), check_inputs=check_inputs,
                           pipeline_stores=raw, **_bases(path))[name]


def pipeline_files(config: Path | None = None) -> list[Path]:
    """The files searched for a pipeline name, first match first.

    ``config`` (an error if missing), or else ``./pipelines.yaml`` when it exists; then the
    shipped pipelines, unless that file is already the first.
    """
    files: list[Path] = []
    if config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config file not found: {config}")
        files.append(Path(config))
    elif Path("pipelines.yaml").is_file():
        files.append(Path("pipelines.yaml"))
    if not any(is_shipped(f) for f in files):
        files.append(shipped_pipelines_file())
    return files


def describe_file(path: Path) -> str:
    """How `iis pipelines` and errors name a file: its path, or "shipped" for the package's."""
    return f"shipped ({path})" if is_shipped(path) else str(path)


def find_pipeline(name: str, config: Path | None = None, *, check_inputs: bool = True) -> PipelineConfig:
    """The pipeline ``name`` from the user's file (``config`` or ./pipelines.yaml), else the shipped ones.

    ``check_inputs``: as for :func:`parse_pipelines`; each command checks only what it uses.
    """
    return load_pipeline(locate_pipeline(name, config), name, check_inputs=check_inputs)


def locate_pipeline(name: str, config: Path | None = None) -> Path:
    """The file that defines pipeline ``name`` (searched as :func:`find_pipeline` does), without
    validating it: cheap, as it imports nothing (validation imports timm to check backbones)."""
    files = pipeline_files(config)
    known: set[str] = set()
    for path in files:
        raw = _raw_pipelines(path)
        if name in raw:
            return path
        known |= set(raw)
    raise ConfigError(f"no pipeline {name!r}; known: {', '.join(sorted(known))} "
                      f"(from {' and '.join(describe_file(f) for f in files)})")


@dataclass(frozen=True)
class PipelineEntry:
    """One pipeline as ``iis pipelines`` lists it (unvalidated; the listing validates each on its own).

    Attributes:
        name: the pipeline's name.
        path: the file that defines it.
        shipped: True when that file is the shipped one.
        shadowed: True when an earlier file defines the same name (that one is used).
        raw: the pipeline's yaml mapping.
    """

    name: str
    path: Path
    shipped: bool
    shadowed: bool
    raw: Mapping[str, Any]


def list_pipelines(config: Path | None = None) -> list[PipelineEntry]:
    """Every pipeline of every searched file, in search order (see :func:`pipeline_files`)."""
    entries: list[PipelineEntry] = []
    seen: set[str] = set()
    for path in pipeline_files(config):
        for name, raw in _raw_pipelines(path).items():
            entries.append(PipelineEntry(name=name, path=path, shipped=is_shipped(path), shadowed=name in seen,
                                         raw=raw if isinstance(raw, dict) else {}))
        seen |= {e.name for e in entries}
    return entries
