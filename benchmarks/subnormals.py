"""Subnormal floats in the head trainer: its time with them flushed to zero (the default) and without.

On each workload (``benchmarks/workloads.py``), in one process, the standard head plus the
default ratio grid are fitted twice by our trainer, once as it runs (subnormals flushed while it
trains, ``heads_default.denormals_flushed``) and once with the flush disabled, back to back
(unflushed first); it prints the CPU time of each, their ratio, and the largest difference of test
top-1 between the two fits. ``--reference`` times the authors' protocol with and without the flush
too, so that the speed ratio against it can be quoted with the reference at its best.

    python benchmarks/subnormals.py                              # every workload, seed 0
    python benchmarks/subnormals.py --workloads planted-20k --reference
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import iis.analyze.heads_default as default
import numpy as np
import torch
from iis.analyze.heads import fit_heads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads_vs_reference import RATIOS, warm_up  # noqa: E402
from workloads import WORKLOADS, make  # noqa: E402


def timed_fits(features, activations, *, classes: int, seed: int, protocol: str, flush: bool) -> tuple[float, np.ndarray]:
    """CPU seconds of the standard head plus the ratio grid, and their test top-1 ``(1 + R,)``."""
    saved = default.denormals_flushed
    if not flush:
        default.denormals_flushed = contextlib.nullcontext
    outer = default.denormals_flushed() if flush and protocol == "reference" else contextlib.nullcontext()
    try:
        cpu = time.process_time()
        with outer:  # the reference does not flush by itself: flushed around it
            standard = fit_heads(**features, num_classes=classes, ratios=None, seed=seed, protocol=protocol)
            grid = fit_heads(**activations, num_classes=classes, ratios=RATIOS, seed=seed, protocol=protocol)
        cpu = time.process_time() - cpu
    finally:
        default.denormals_flushed = saved
    return cpu, np.concatenate([standard.test_top1, grid.test_top1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {list(WORKLOADS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", action="store_true", help="time the authors' protocol both ways too")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every fit (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, "
          f"flush supported: {torch.set_flush_denormal(False)}")
    warm_up()
    protocols = ["default", "reference"] if args.reference else ["default"]
    ratios = {p: [] for p in protocols}
    for name in args.workloads.split(","):
        spec = WORKLOADS[name]
        features, activations, _ = make(spec, args.seed)
        for protocol in protocols:
            # Off first, then on: a slowing machine would flatter the flush less, not more.
            off_cpu, off_top1 = timed_fits(features, activations, classes=spec.classes, seed=args.seed,
                                           protocol=protocol, flush=False)
            on_cpu, on_top1 = timed_fits(features, activations, classes=spec.classes, seed=args.seed,
                                         protocol=protocol, flush=True)
            ratios[protocol].append(off_cpu / on_cpu)
            print(f"{name} {protocol}: cpu {off_cpu:.1f} s unflushed, {on_cpu:.1f} s flushed: "
                  f"{off_cpu / on_cpu:.2f}x; largest test top-1 difference "
                  f"{100 * np.abs(on_top1 - off_top1).max():.2f} points", flush=True)
    for protocol, values in ratios.items():
        print(f"{protocol}: median speed-up from the flush {np.median(values):.2f}x over {len(values)} workload(s)")


if __name__ == "__main__":
    main()
