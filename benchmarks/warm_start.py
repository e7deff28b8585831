"""Warm starts along the ratio grid: every ratio's heads from zeros, against every ratio's heads
started from the dense heads of their penalty on a fraction of the schedule (the default).

For each workload (or a real store and library), in one process on one thread, it fits the default
grid twice or more: ``heads_default.fit_default`` with ``warm_start=False`` (each head from zeros
on its whole schedule), then with warm starts at each ``--fractions`` value of
``WARM_STEP_FRACTION`` (the share of the schedule that the heads that drop a concept, but are not
sparse, train after their start; sparse heads keep their longer schedule). It prints val-chosen
test top-1 per ratio, the difference to the cold grid and CPU seconds. Results and the decision:
benchmarks/README.md, "Warm starts along the ratio grid" (the variants measured there that start
the sparse heads on a shorter schedule, or chain the ratios, are in this script at commit 9561676).

    python benchmarks/warm_start.py --workloads planted-100k planted-30k --seeds 0 1 --fractions 0.5 0.75
    python benchmarks/warm_start.py --store cache/demo/r10@e3.zarr --library prototype
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from iis.analyze import heads_default as default
from iis.analyze.heads_default import Schedule, fit_default
from workloads import QUICK, WORKLOADS, make

RATIOS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]
Splits = dict[str, tuple[torch.Tensor, torch.Tensor]]


def fit_grid(splits: Splits, classes: int, seed: int, *, warm: bool, fraction: float) -> tuple[list[float], float]:
    """Test top-1 per ratio (%) and CPU seconds of one default grid."""
    saved = default.WARM_STEP_FRACTION
    default.WARM_STEP_FRACTION = fraction
    try:
        schedule = Schedule.resolve(splits["train"][0].shape[0], epochs=None, batch_size=None)
        cpu = time.process_time()
        fit = fit_default(splits, num_classes=classes, ratios=RATIOS, seed=seed, schedule=schedule, warm_start=warm)
        return [100 * float(t) for t in fit.test_top1], time.process_time() - cpu
    finally:
        default.WARM_STEP_FRACTION = saved


def store_splits(path: str, library: str, seed: int, num_concepts: int) -> tuple[Splits, int]:
    """Concept activations of a real store under one of its libraries, as the pipeline builds it."""
    from iis.analyze.store import open_feature_store
    from iis.analyze.tasks import TaskSpec, build_task

    lib = build_task(TaskSpec(store=path, library=library, seed=seed, num_concepts=num_concepts,
                              ratios=tuple(RATIOS)))
    store = open_feature_store(Path(path))
    splits = {}
    for name in ("train", "val", "test"):
        data = store.read_split(name, transform=lib.activations)
        splits[name] = (torch.as_tensor(data.x).float(), torch.as_tensor(data.labels))
    return splits, store.num_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="*", default=["planted-quick"], choices=[*WORKLOADS, *QUICK])
    parser.add_argument("--store", help="a feature store, instead of the workloads")
    parser.add_argument("--library", default="prototype")
    parser.add_argument("--num-concepts", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[default.WARM_STEP_FRACTION])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [(args.store, None)] if args.store else [(name, {**WORKLOADS, **QUICK}[name]) for name in args.workloads]
    for name, spec in cases:
        for seed in args.seeds:
            if spec is None:
                splits, classes = store_splits(name, args.library, seed, args.num_concepts)
            else:
                _, activations, _ = make(spec, seed)
                splits, classes = {k: (x.float(), y) for k, (x, y) in activations.items()}, spec.classes
            cold, cold_cpu = fit_grid(splits, classes, seed, warm=False, fraction=1.0)
            print(f"\n{name}, seed {seed}: test top-1 per ratio {RATIOS}")
            print(f"{'from zeros':>12}  cpu {cold_cpu:6.1f} s  " + " ".join(f"{t:6.2f}" for t in cold))
            for fraction in args.fractions:
                top1, cpu = fit_grid(splits, classes, seed, warm=True, fraction=fraction)
                diffs = [a - b for a, b in zip(top1, cold)]
                print(f"{f'warm {fraction:g}':>12}  cpu {cpu:6.1f} s  " + " ".join(f"{d:+6.2f}" for d in diffs)
                      + f"  mean {sum(diffs) / len(diffs):+.2f}  cpu {cpu / cold_cpu:.2f}x")


if __name__ == "__main__":
    main()
