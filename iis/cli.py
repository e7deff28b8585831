"""The `iis` command line: `iis extract|analyze|run|report|explain|finetune|export-h5|import-h5|info|pipelines|init`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from iis import __version__
from iis.config import ConfigError, find_pipeline, locate_pipeline
from iis.logs import configure_logging

log = logging.getLogger("iis")


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/n, e.g. 0/4; got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return index, count


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (``--workers 0`` would wait forever)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _device(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, refused at once if absent here."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return text


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line (the failing flag and the fix), exit status 2, like every expected failure."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path,
                   help="your pipelines file (default: ./pipelines.yaml when it exists); "
                        "the pipelines shipped with iis are always available after it")


# Stage 1 reads the dataset and the weights; stage 2 only the stores and the results folder, so a
# CPU node without /data and /models runs analyze, report and explain.
_NEEDS_INPUTS = {"extract": True, "run": True, "finetune": True, "analyze": False, "report": False, "explain": False}


def _pipeline(args: argparse.Namespace):
    """The named pipeline, checked for what this command uses."""
    return find_pipeline(args.pipeline, args.config, check_inputs=_NEEDS_INPUTS[args.command])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iis", description="How interpretable is a vision representation: the Inherent "
                     "Interpretability Score (IIS). `iis COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"iis {__version__}")
    _add_loudness(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="stage 1: run backbones over a pipeline's data into Zarr stores")
    p.add_argument("pipeline")
    _add_config(p)
    p.add_argument("--model", action="append", help="only this model (repeatable)")
    p.add_argument("--shard", type=_shard, help="fill block range i of n (i/n); 0 creates the store (default: unsharded)")
    p.add_argument("--device", type=_device, help="cpu, cuda, cuda:N or auto (overrides the pipeline)")
    p.add_argument("--num-workers", type=_count(0), help="DataLoader workers (overrides the pipeline)")

    p = sub.add_parser("analyze", help="stage 2: libraries, heads, IIS and correlation tables")
    p.add_argument("pipeline", nargs="?", help="a pipeline name; or use --store/--results")
    _add_config(p)
    p.add_argument("--store", action="append", type=Path, help="explicit mode: a store (repeatable)")
    p.add_argument("--results", type=Path, help="explicit mode: where tables go")
    p.add_argument("--clip-store", type=Path, help="explicit mode: the CLIP store, for the text library")
    p.add_argument("--library-from", type=Path, metavar="STORE",
                   help="explicit mode: build every store's libraries from this store's visual elements "
                        "(same backbone, weights and layer; as analysis.library_from: {store: ...})")
    p.add_argument("--libraries", type=_csv(str),
                   help="comma-separated concept libraries (`iis pipelines --libraries` lists them; default: the "
                        "pipeline's analysis.libraries)")
    p.add_argument("--num-concepts", type=_count(1), help="concepts K per library (default: analysis.num_concepts)")
    p.add_argument("--ratios", type=_csv(float),
                   help="comma-separated sparsity ratios s in [0, 1), at least two (default: analysis.ratios)")
    p.add_argument("--seeds", type=_csv(int), help="comma-separated library seeds (default: analysis.seeds)")
    p.add_argument("--protocol", choices=["default", "fixed-scale", "reference"],
                   help="default: METHOD.md's heads, every choice on val; fixed-scale: the same without the "
                        "learnt per-concept scale, for comparison; reference: the authors' protocol, which "
                        "SELECTS ON TEST (comparison only, rows marked)")
    p.add_argument("--bootstrap", type=_count(0), help="bootstrap resamples for confidence intervals")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (default: a LocalCluster)")
    p.add_argument("--workers", type=_count(1), help="LocalCluster worker processes (default 2)")
    p.add_argument("--threads", type=_count(1), help="torch/BLAS threads per task (default 1)")
    p.add_argument("--memory-budget-mb", type=_count(1),
                   help="MB of train features (float16 stores: as float16) a standard head may hold in memory "
                        "before it streams them from the store (default: a quarter of the machine's RAM)")
    p.add_argument("--head-parts", type=_count(1),
                   help="tasks each library's ratio grid is split over, so that idle workers share it "
                        "(default: the workers' slots divided among the library tasks, rounded down; "
                        "1: never split)")
    p.add_argument("--synchronous", action="store_true", help="run tasks in this process, without Dask")

    p = sub.add_parser("report", help="write <results>/report.html from a pipeline's tables")
    p.add_argument("pipeline")
    _add_config(p)

    p = sub.add_parser("explain", help="application 2: predict with g∘g_s∘a and explain each prediction")
    p.add_argument("pipeline")
    _add_config(p)
    p.add_argument("--model", help="a model of the pipeline (default: explain.model, else the final-layer model "
                   "best by the standard head's val top-1)")
    p.add_argument("--library", help="default: explain.library, else the first of analysis.libraries")
    p.add_argument("--ratio", type=float, help="sparsity ratio s of the head, one of analysis.ratios "
                   "(default: explain.ratio, else 0.9 or the analysis ratio nearest it)")
    p.add_argument("--split", choices=["train", "val", "test"], help="default test")
    p.add_argument("--images", nargs="+", help="ids of the images to explain (default: the first --limit)")
    p.add_argument("--limit", type=_count(1), help="images explained when --images is not given (default 16)")
    p.add_argument("--top", type=_count(1), help="concepts listed per image, by |contribution| (default 5); "
                   "the others are summed in the rest term")
    p.add_argument("--seed", type=int, help="which analysis seed's library (default: the first)")

    p = sub.add_parser("finetune", help="application 1: fine-tune with interpretability maximisation vs lambda=0")
    p.add_argument("pipeline")
    _add_config(p)
    p.add_argument("--model", help="a model of the pipeline (default: the pipeline's finetune.model)")
    p.add_argument("--lambda", dest="lam", type=float, help="weight of the interpretable-head loss")
    p.add_argument("--epochs", type=_count(1), help="training epochs of each arm (default: finetune.epochs)")
    p.add_argument("--seeds", type=_csv(int), help="training seeds, comma-separated (default: finetune.seeds)")
    p.add_argument("--device", type=_device, help="cpu, cuda, cuda:N or auto (overrides the pipeline)")

    p = sub.add_parser("run", help="the main job: extract, analyze, explain, fine-tune, report")
    p.add_argument("pipeline")
    _add_config(p)
    p.add_argument("--workers", type=_count(1), help="LocalCluster worker processes (default 2)")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler")
    p.add_argument("--device", type=_device, help="cpu, cuda, cuda:N or auto (overrides the pipeline)")

    p = sub.add_parser("export-h5", help="write a store to one HDF5 file")
    p.add_argument("store", type=Path)
    p.add_argument("file", type=Path)

    p = sub.add_parser("import-h5", help="create a store from an HDF5 file")
    p.add_argument("file", type=Path)
    p.add_argument("store", type=Path)
    p.add_argument("--block-rows", type=_count(1), help="rows per block of the new store (default 1024)")

    p = sub.add_parser("info", help="summarise a store, a folder of stores, or a results folder")
    p.add_argument("path", type=Path)

    p = sub.add_parser("pipelines", help="list the pipelines available here and the file each comes from")
    _add_config(p)
    p.add_argument("--libraries", action="store_true", help="also list the concept libraries and their options")

    p = sub.add_parser("init", help="write a commented starter pipelines.yaml (a GPU pipeline to edit)")
    p.add_argument("path", nargs="?", type=Path, default=Path("pipelines.yaml"),
                   help="the file, or a folder to put pipelines.yaml in (default: ./pipelines.yaml)")
    # -v / -q after the command too (`iis info x -v`, where a user adds it to the command that just
    # failed). SUPPRESS: a subcommand's unset flag must not overwrite one given before the command.
    for command in sub.choices.values():
        _add_loudness(command, default=argparse.SUPPRESS)
    return parser


def _add_loudness(parser: argparse.ArgumentParser, *, default: object) -> None:
    """``-v`` / ``-q``, one or the other."""
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", default=default,
                      help="debug logging, and Dask's own INFO logs")
    loud.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def _cmd_extract(args: argparse.Namespace) -> int:
    from iis.jobs import extract_pipeline

    cfg = _pipeline(args)
    status = extract_pipeline(cfg, models=args.model, shard=args.shard, device=args.device,
                              num_workers=args.num_workers)
    for name, complete in status.items():
        log.info("%s: %s", cfg.store_path(name), "complete" if complete else "waiting for other shards")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from iis.jobs import analyze_explicit, analyze_pipeline

    options = dict(libraries=args.libraries, num_concepts=args.num_concepts, ratios=args.ratios,
                   seeds=args.seeds, protocol=args.protocol, bootstrap=args.bootstrap,
                   scheduler=args.scheduler, workers=args.workers, threads=args.threads,
                   synchronous=args.synchronous, memory_budget_mb=args.memory_budget_mb,
                   head_parts=args.head_parts)
    if args.store:
        if args.pipeline or not args.results:
            wrong = (f"a pipeline ({args.pipeline}) was named too" if args.pipeline else "--results DIR is missing")
            raise ConfigError(f"explicit mode takes --store DIR [--store DIR …] --results DIR and no pipeline: {wrong}")
        analyze_explicit(stores=args.store, results=args.results, clip_store=args.clip_store,
                         library_from=args.library_from, **options)
    elif args.pipeline:
        if args.library_from:
            raise ConfigError("--library-from is for explicit mode (--store … --results …); a pipeline "
                              "sets analysis.library_from")
        analyze_pipeline(_pipeline(args), **options)
    else:
        raise ConfigError("name a pipeline, or give --store … --results …")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from iis.jobs import report_pipeline

    report_pipeline(_pipeline(args))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from iis.jobs import describe_explanation, explain_pipeline

    summary = explain_pipeline(_pipeline(args), model=args.model, library=args.library,
                               ratio=args.ratio, split=args.split, images=args.images, seed=args.seed,
                               limit=args.limit, top=args.top)
    # The one figure a user asked for goes to stdout, once; the rest is in explanations.parquet.
    sys.stdout.write(describe_explanation(summary) + "\n")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from iis.jobs import finetune_pipeline

    cfg = _pipeline(args)
    if cfg.finetune is None and (args.model is None or args.lam is None):
        raise ConfigError(f"pipeline {cfg.name!r} has no finetune: section; pass --model and --lambda")
    finetune_pipeline(cfg, model=args.model, lam=args.lam, epochs=args.epochs, seeds=args.seeds,
                      device=args.device)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    locate_pipeline(args.pipeline, args.config)  # an unknown name is said at once, not after the imports
    # Said before the imports, so that a new user's first run does not sit silent while Python
    # compiles torch's and timm's modules (the install skips byte-compiling; README, "Time").
    log.info("run %s: loading torch, timm and Dask (the first run after an install also compiles them, "
             "about 20 s)", args.pipeline)
    from iis.jobs import run_pipeline

    run_pipeline(_pipeline(args), workers=args.workers, scheduler=args.scheduler,
                 device=args.device)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from iis.extract.h5io import export_h5

    export_h5(args.store, args.file)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from iis.extract.h5io import import_h5

    import_h5(args.file, args.store, **({} if args.block_rows is None else {"block_rows": args.block_rows}))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from iis.info import describe

    sys.stdout.write(describe(args.path))
    return 0


def _cmd_pipelines(args: argparse.Namespace) -> int:
    from iis.catalog import describe_libraries, describe_pipelines

    text, invalid = describe_pipelines(args.config)
    sys.stdout.write(text)
    if args.libraries:
        sys.stdout.write(describe_libraries())
    if invalid:
        log.error("%d pipeline(s) marked INVALID above; `iis run NAME` lists every problem", invalid)
        return 2
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from iis.catalog import write_starter

    path = write_starter(args.path)
    # Only ./pipelines.yaml is read without --config.
    found = path.resolve() == (Path.cwd() / "pipelines.yaml").resolve()
    config = "" if found else f" --config {path}"
    log.info("wrote %s: edit the paths of its pipeline, then `iis run imagenet-subset%s` "
             "(`iis pipelines%s` lists it beside the shipped ones)", path, config, config)
    return 0


_COMMANDS = {
    "extract": _cmd_extract,
    "analyze": _cmd_analyze,
    "report": _cmd_report,
    "explain": _cmd_explain,
    "finetune": _cmd_finetune,
    "run": _cmd_run,
    "export-h5": _cmd_export,
    "import-h5": _cmd_import,
    "info": _cmd_info,
    "pipelines": _cmd_pipelines,
    "init": _cmd_init,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status.

    0 on success; 2 for an expected failure (bad flag, config, store, permissions, disk), logged
    as one line naming the thing (``-v`` adds the traceback); 130 after Ctrl-C, with one line
    saying that a rerun resumes.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a bad flag (already reported in one line)
        return int(exit_.code or 0)
    configure_logging(1 if args.verbose else -1 if args.quiet else 0)
    # Importing `distributed` sets its logger from dask's config (INFO), and worker processes
    # configure themselves the same way: so the config says it too (the environment reaches
    # workers; dask reads it on import). The handler's filter (iis.logs) covers this process.
    dask_level = "info" if args.verbose else "warning"
    os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", dask_level)
    if "dask" in sys.modules:  # imported already: the environment is read
        import dask

        dask.config.set({"distributed.logging.distributed": dask_level})
    from iis.errors import WeightsError
    from iis.store_format import StoreError

    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, StoreError, WeightsError, ValueError, OSError, *_loaded_errors()) as err:
        # Expected failures get one clear line, not a traceback (-v shows it). OSError covers
        # missing files, permissions and a full disk; its message names the path.
        log.error("%s", err, exc_info=args.verbose)
        return 2
    except KeyboardInterrupt:
        # Every stage writes atomically and resumes, so stopping is safe at any point.
        log.error("interrupted; rerun to resume", exc_info=args.verbose)
        return 130


# Expected failures defined in modules that import torch (or open_clip): named here by module, not
# imported, so that `iis --help` and stage 2 stay free of torch. An exception of one of them can
# only come from its module, which is then loaded.
_HEAVY_ERRORS = (("iis.extract.clip", "ClipError"), ("iis.extract.datasets", "ImageLoadError"))


def _loaded_errors() -> tuple[type[BaseException], ...]:
    """The classes of :data:`_HEAVY_ERRORS` whose modules are imported (evaluated when an error is caught)."""
    found = (getattr(sys.modules.get(module), name, None) for module, name in _HEAVY_ERRORS)
    return tuple(cls for cls in found if cls is not None)  # a module that failed half-way may lack it


if __name__ == "__main__":
    sys.exit(main())
