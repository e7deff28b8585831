"""How much of the bare forward-pass throughput does the real `iis extract` path keep?

Measures, in one process, side by side and interleaved:

- **ours**: ``iis.extract.runner.extract_store`` into a fresh temporary Zarr store: the real
  dataset, its timm eval transform, the DataLoader with block-cut batches, the forward, the
  float16 cast and the block writes (no visual elements: an empty plan list). The whole call is
  timed, store creation and finalisation included.
- **bare**: ``model(x)`` over the same images, preprocessed beforehand into in-memory batches of
  the same sizes, under ``torch.inference_mode``.

It prints images/s for each (median over the repeats) and the ratio ours / bare. The project's
aim on CPU is a ratio of at least 0.9. Where CUDA is available, the CUDA path (bf16 autocast,
channels-last, pinned memory) is measured the same way against a bare CUDA forward with the
same autocast and memory format, inputs already on the device.

Examples::

    python benchmarks/extract_overhead.py                               # resnet18 @ 224 px
    python benchmarks/extract_overhead.py --backbone resnet10t --img-size 32 --batch-size 128 --limit 2048
    python benchmarks/extract_overhead.py --profile                     # plus a cProfile of one run
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from iis.extract import store as st  # noqa: E402
from iis.extract.backbones import Backbone, create_backbone, image_transform  # noqa: E402
from iis.extract.datasets import BUILTIN, ImageDataset, Split, load_dataset  # noqa: E402
from iis.extract.runner import ExtractOptions, extract_store  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="resnet18", help="timm model name (random weights)")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (square)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block-rows", type=int, default=ExtractOptions.block_rows,
                   help="rows per store block (batches are cut at block boundaries)")
    p.add_argument("--dataset", default="mnist5k", choices=sorted(BUILTIN), help="builtin dataset")
    p.add_argument("--limit", type=int, default=256,
                   help="images per measurement, taken proportionally from train/val/test")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each measurement")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the extract path")
    p.add_argument("--dtype", default="float16", choices=st.FEATURE_DTYPES, help="stored feature dtype")
    p.add_argument("--amp", default="bfloat16", choices=("bfloat16", "float16"), help="CUDA autocast dtype")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA measurement even if available")
    p.add_argument("--profile", action="store_true",
                   help="after the CPU measurement, print a cProfile of one extract_store call")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Inputs


def limit_dataset(dataset: ImageDataset, limit: int) -> ImageDataset:
    """The first rows of each split, proportionally, ``limit`` rows in all (in-memory data only)."""
    sizes = {s: len(dataset.splits[s]) for s in st.SPLITS}
    total = sum(sizes.values())
    if limit >= total:
        return dataset
    keep = {s: int(limit * sizes[s] // total) for s in st.SPLITS}
    keep["train"] += limit - sum(keep.values())
    splits = {s: Split(ids=dataset.splits[s].ids[: keep[s]], labels=dataset.splits[s].labels[: keep[s]])
              for s in st.SPLITS}
    positions = {s: p[: keep[s]] for s, p in dataset.positions.items()}
    return replace(dataset, splits=splits, positions=positions)


def batch_rows(rows: int, *, block_rows: int, batch_size: int) -> list[range]:
    """Row ranges of the batches the runner forms for one part: cut at block boundaries."""
    out = []
    for block in range(st.num_blocks(rows, block_rows)):
        span = st.block_slice(block, rows=rows, block_rows=block_rows)
        out += [range(a, min(a + batch_size, span.stop)) for a in range(span.start, span.stop, batch_size)]
    return out


def preprocess(dataset: ImageDataset, backbone: Backbone, *, block_rows: int, batch_size: int) -> list[torch.Tensor]:
    """Every image of every split through the stored transform, as the runner's batches."""
    transform = image_transform(backbone.data_config)
    batches = []
    for split in st.SPLITS:
        for rows in batch_rows(len(dataset.splits[split]), block_rows=block_rows, batch_size=batch_size):
            batches.append(torch.stack([transform(dataset.load(split, i)) for i in rows]))
    return batches


# --------------------------------------------------------------------------------------------------
# The two measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Wall-clock and process CPU seconds of a ``with`` block.

    CPU time (all threads of this process) is the contention-robust figure: on a shared machine
    wall time also counts the time other jobs hold the cores. With one torch thread and no
    DataLoader workers, images per CPU-second is close to what an idle machine would give.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> _Clock:
        _sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def time_ours(dataset: ImageDataset, backbone: Backbone, opts: ExtractOptions, workdir: Path, tag: str) -> _Clock:
    """One extract_store call into a fresh store (creation and finalisation included)."""
    path = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=workdir)) / "bench.zarr"
    with _Clock(torch.device(opts.device)) as clock:
        complete = extract_store(path, dataset=dataset, backbone=backbone, model_name="bench",
                                 element_plans=[], elements_config=None, options=opts)
    if not complete:
        raise RuntimeError(f"{path}: extract_store did not complete the store")
    return clock


def time_bare(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, amp: str) -> _Clock:
    """``model(x)`` over every in-memory batch, inside inference mode (and autocast on CUDA)."""
    if device.type == "cuda":
        autocast = torch.autocast("cuda", dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[amp])
    else:
        autocast = contextlib.nullcontext()
    with torch.inference_mode(), autocast, _Clock(device) as clock:
        for x in batches:
            model(x)
    return clock


def measure(label: str, *, dataset: ImageDataset, backbone: Backbone, batches: list[torch.Tensor],
            opts: ExtractOptions, repeats: int, workdir: Path) -> dict:
    """Warm both paths up, then alternate them ``repeats`` times (order flipped every repeat)."""
    device = torch.device(opts.device)
    n = sum(len(b) for b in batches)
    warm = limit_dataset(dataset, min(n, 2 * opts.batch_size))
    time_ours(warm, backbone, opts, workdir, f"{label}-warmup")  # also moves the model (and makes it channels-last)
    model = backbone.model
    time_bare(model, batches[:2], device, opts.amp)
    clocks: dict[str, list[_Clock]] = {"ours": [], "bare": []}
    for r in range(repeats):
        for name in ("bare", "ours") if r % 2 == 0 else ("ours", "bare"):
            if name == "bare":
                clocks["bare"].append(time_bare(model, batches, device, opts.amp))
            else:
                clocks["ours"].append(time_ours(dataset, backbone, opts, workdir, f"{label}-{r}"))
    return {"label": label, "n": n, **clocks}


def report(result: dict) -> None:
    n, width = result["n"], 10
    print(f"\n[{result['label']}] images/s, N={n} per measurement; wall = wall-clock, "
          "cpu = per CPU-second of this process")
    print(f"{'repeat':<8}" + "".join(f"{h:>{width}}" for h in
                                     ("ours wall", "bare wall", "ratio", "ours cpu", "bare cpu", "ratio")))
    rows = []
    for i, (o, b) in enumerate(zip(result["ours"], result["bare"])):
        row = [n / o.wall, n / b.wall, b.wall / o.wall, n / o.cpu, n / b.cpu, b.cpu / o.cpu]
        rows.append(row)
        print(f"{i:<8}" + "".join(f"{v:>{width}.3f}" if j in (2, 5) else f"{v:>{width}.1f}"
                                  for j, v in enumerate(row)))
    med = [statistics.median(col) for col in zip(*rows)]
    med[2], med[5] = med[0] / med[1], med[3] / med[4]  # ratios of the medians
    print(f"{'median':<8}" + "".join(f"{v:>{width}.3f}" if j in (2, 5) else f"{v:>{width}.1f}"
                                     for j, v in enumerate(med)))
    pair = [statistics.median(r[2] for r in rows), statistics.median(r[5] for r in rows)]
    print(f"median of per-repeat ratios: wall {pair[0]:.3f}, cpu {pair[1]:.3f}")
    verdict = ", ".join(f"{k} {'met' if v >= 0.9 else 'NOT met'}" for k, v in (("wall", med[2]), ("cpu", med[5])))
    print(f"ratio ours/bare (of the medians): wall {med[2]:.3f}, cpu {med[5]:.3f}  (aim >= 0.9: {verdict})")


# (function name, file name) of the stages of one extract_store call, as cProfile names them.
_STAGES = (
    ("extract_store", "runner.py", "the whole call"),
    ("create_store", "store.py", "create the Zarr store (fixed cost)"),
    ("__next__", "dataloader.py", "DataLoader: fetch + transform + collate"),
    ("__getitem__", "runner.py", "  per image: load + transform"),
    ("load", "datasets.py", "    dataset.load (PIL image)"),
    ("to_tensor", "functional.py", "    ToTensor (uint8 -> float32)"),
    ("normalize", "_functional_tensor.py", "    Normalize (clone, sub, div)"),
    ("default_collate", "collate.py", "  collate (torch.stack)"),
    ("write_block", "store.py", "write blocks + done markers"),
    ("finalize_store", "store.py", "finalize (summary)"),
)


def profile_once(dataset: ImageDataset, backbone: Backbone, opts: ExtractOptions, workdir: Path,
                 bare_cpu_s: float) -> None:
    """cProfile one extract_store call in CPU time; print where it goes, stage by stage.

    The forward is what the bare path also pays (``bare_cpu_s``, its median CPU seconds); the
    rest is the pipeline's overhead. cProfile inflates Python-heavy stages somewhat.
    """
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    time_ours(dataset, backbone, opts, workdir, "profile")
    prof.disable()
    stats = pstats.Stats(prof).stats
    found = {}
    for (file, _line, func), (_cc, ncalls, _tt, cum, _callers) in stats.items():
        for name, suffix, label in _STAGES:
            if func == name and file.endswith(suffix) and cum > found.get(label, (0, 0))[1]:
                found[label] = (ncalls, cum)
    total = found.get(_STAGES[0][2], (0, 0.0))[1]
    print("\n[profile of one CPU extract_store call, CPU seconds (cProfile, process_time)]")
    print(f"{'stage':<44}{'calls':>8}{'cpu s':>9}{'share':>8}")
    for _name, _suffix, label in _STAGES:
        if label in found:
            calls, cum = found[label]
            print(f"{label:<44}{calls:>8}{cum:>9.3f}{cum / total:>8.1%}")
    print(f"{'bare forward of the same images (median)':<44}{'':>8}{bare_cpu_s:>9.3f}{bare_cpu_s / total:>8.1%}")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(12)
    lines = buf.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n[same profile, top 12 functions by own time]")
    print("\n".join(line for line in lines[start:] if line.strip()))


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))

    full = load_dataset(source="builtin", name=args.dataset)
    dataset = limit_dataset(full, args.limit)
    n = sum(len(dataset.splits[s]) for s in st.SPLITS)
    backbone = create_backbone(backbone=args.backbone, weights="random", img_size=args.img_size)
    cuda = torch.cuda.is_available() and not args.no_cuda
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"devices cpu{' + cuda (' + torch.cuda.get_device_name() + ')' if cuda else ''}, "
          f"backbone {args.backbone} (random weights, D={backbone.feature_dim}), "
          f"img size {args.img_size}, batch size {args.batch_size}, block rows {args.block_rows}, "
          f"N {n} ({', '.join(f'{s} {len(dataset.splits[s])}' for s in st.SPLITS)}) of {args.dataset}, "
          f"dtype {args.dtype}, num_workers {args.num_workers}, repeats {args.repeats}")

    with _Clock(torch.device("cpu")) as prep:
        batches = preprocess(dataset, backbone, block_rows=args.block_rows, batch_size=args.batch_size)
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]  # as extract feeds the model
    print(f"preprocessing for the bare path (dataset.load + transform + stack, main process): "
          f"{1e3 * prep.cpu / n:.3f} CPU ms/image, {1e3 * prep.wall / n:.3f} wall ms/image")
    base = ExtractOptions(batch_size=args.batch_size, block_rows=args.block_rows, dtype=args.dtype,
                          num_workers=args.num_workers, amp=args.amp)
    with tempfile.TemporaryDirectory(prefix="iis-bench-") as tmp:
        workdir = Path(tmp)
        cpu = measure("cpu", dataset=dataset, backbone=backbone, batches=batches,
                      opts=replace(base, device="cpu"), repeats=args.repeats, workdir=workdir)
        report(cpu)
        if args.profile:
            profile_once(dataset, backbone, replace(base, device="cpu"), workdir,
                         statistics.median(c.cpu for c in cpu["bare"]))
        if cuda:
            device = torch.device("cuda")
            gpu_batches = [b.to(device) for b in batches]
            result = measure("cuda, amp " + args.amp + ", channels-last, pinned", dataset=dataset,
                             backbone=backbone, batches=gpu_batches, opts=replace(base, device="cuda"),
                             repeats=args.repeats, workdir=workdir)
            report(result)
        elif args.no_cuda:
            print("\n[cuda] skipped (--no-cuda)")
        else:
            print("\n[cuda] skipped: torch.cuda.is_available() is False on this machine")


if __name__ == "__main__":
    main()
