"""The default head trainer of a git revision against the working tree's, side by side in one process.

A change to the trainer's inner loop is worth 10-20%, less than this machine's speed swings
between two runs minutes apart. So both trainers run in the same process, alternated (base, ours,
ours, base per round), on the same activations, and each is timed in CPU seconds; the medians are
compared. The base's ``analyze/{activations,heads_batching,heads_model,heads_default}.py`` are
read with ``git show`` and loaded as private modules. glibc's allocator is set as in the
analysis' tasks (``reuse_freed_memory``), for both.

For each workload it prints both trainers' CPU time for the standard head and for the 8-ratio
grid, their ratio, and the test top-1 of each (which differ only where a change alters float
rounding):

    python benchmarks/trainer_ab.py --base HEAD~1
    python benchmarks/trainer_ab.py --base 057f3d2 --workloads planted-100k --rounds 2
    python benchmarks/trainer_ab.py --base 057f3d2 --workloads planted-quick --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from iis.analyze import heads_default as ours
from iis.analyze.allocator import reuse_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import QUICK, WORKLOADS, make  # noqa: E402

RATIOS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]
# In dependency order: each may import the ones before it.
MODULES = ("activations", "heads_batching", "heads_model", "heads_default")
ROOT = Path(__file__).resolve().parent.parent


def load_base(revision: str) -> types.ModuleType:
    """The revision's ``heads_default`` module, its trainer dependencies loaded from the same revision."""
    loaded = {}
    for name in MODULES:
        source = subprocess.run(["git", "show", f"{revision}:analyze/{name}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        for dependency in loaded:
            source = source.replace(f"from iis.analyze.{dependency} import", f"from _base_{dependency} import")
        module = types.ModuleType(f"_base_{name}")
        sys.modules[module.__name__] = module
        exec(compile(source, f"{revision}:analyze/{name}.py", "exec"), module.__dict__)
        loaded[name] = module
    return loaded["heads_default"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a git revision (the trainer to compare against)")
    parser.add_argument("--workloads", default="planted-30k,gaussian-20k,planted-100k",
                        help=f"comma-separated, of {list(WORKLOADS) + list(QUICK)} (planted-quick: about the demo's shape)")
    parser.add_argument("--rounds", type=int, default=1, help="base, ours, ours, base per round (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reuse_freed_memory()
    base = load_base(args.base)
    print(f"torch {torch.__version__}, {platform.machine()}, one thread; base {args.base} against the working tree")
    for name in args.workloads.split(","):
        features, activations, _ = make({**WORKLOADS, **QUICK}[name], args.seed)
        classes = int(activations["train"][1].max()) + 1
        for kind, splits, ratios in (("standard", features, None), ("grid", activations, RATIOS)):
            schedule = ours.Schedule.resolve(splits["train"][0].shape[0], epochs=None, batch_size=None)
            times: dict[str, list[float]] = {"base": [], "ours": []}
            top1 = {}
            for _ in range(args.rounds):
                for tag, module in (("base", base), ("ours", ours), ("ours", ours), ("base", base)):
                    start = time.process_time()
                    fit = module.fit_default(splits, num_classes=classes, ratios=ratios, seed=args.seed,
                                             schedule=schedule)
                    times[tag].append(time.process_time() - start)
                    top1[tag] = [round(100 * float(v), 2) for v in fit.test_top1]
            b, o = statistics.median(times["base"]), statistics.median(times["ours"])
            print(f"{name} {kind}: base {b:.1f} CPU-s, ours {o:.1f} ({b / o:.2f}x); test top-1 base {top1['base']}, "
                  f"ours {top1['ours']}", flush=True)


if __name__ == "__main__":
    main()
