"""Warm starts along the ratio grid: do the interpretable heads need their whole schedule when they
start from the s = 0 heads instead of from zeros?

For each workload (or a real store and library), in one process on one thread, it fits the default
grid cold (every head from zeros, as the pipeline does), then the s = 0 heads alone, and from them:

- ``star:F``: every other ratio at once, each ratio's head of L2 strength C starting from the s = 0
  head of that C, on F times the schedule (the sparse heads keep their extra factor);
- ``chain:F``: one ratio after another, each from the previous ratio's heads, F times the schedule;
- ``dense:F``: as ``star:F`` for the ratios that keep more than the sparse fraction, and the sparse
  ones from s = 0 on their whole schedule.

It prints val-chosen test top-1 per ratio, the difference to the cold grid, CPU seconds and
head-steps. Results and the decision: benchmarks/README.md, "Warm starts along the ratio grid".

    python benchmarks/warm_start.py --workloads planted-100k planted-30k --seeds 0 1 --variants star:0.5 star:1
    python benchmarks/warm_start.py --store cache/demo/r10@e3.zarr --library prototype --variants star:0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from iis.analyze import heads_default as default
from iis.analyze.activations import keep_counts
from iis.analyze.heads_default import GridState, Schedule, fit_default_grid
from workloads import QUICK, WORKLOADS, make

RATIOS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]
Splits = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Outcome:
    top1: list[float]  # test top-1 per ratio, %
    cpu: float
    head_steps: int


class Fitter:
    """Fits parts of the grid on one workload with the default trainer's choices, timed."""

    def __init__(self, splits: Splits, classes: int, seed: int) -> None:
        self.splits, self.classes, self.seed = splits, classes, seed
        self.schedule = Schedule.resolve(splits["train"][0].shape[0], epochs=None, batch_size=None)
        self.num_inputs = splits["train"][0].shape[1]

    def fit(self, ratios: list[float], fraction: float = 1.0, start: GridState | None = None
            ) -> tuple[list[float], GridState, float, int]:
        schedule = dataclasses.replace(self.schedule, steps=max(1, round(fraction * self.schedule.steps)))
        cpu = time.process_time()
        fit, state = fit_default_grid(self.splits, num_classes=self.classes, ratios=ratios, seed=self.seed,
                                      schedule=schedule, warm_start=start)
        keep = keep_counts(ratios, self.num_inputs).repeat_interleave(len(default.CONCEPT_INVERSE_L2))
        steps = int((schedule.steps * default.step_factors(keep, self.num_inputs)).sum())
        return [100 * float(t) for t in fit.test_top1], state, time.process_time() - cpu, steps


def s0_heads(state: GridState, ratio_index: int) -> GridState:
    """The ``M`` heads (one per L2 strength) of one ratio of a grid's state."""
    m = len(default.CONCEPT_INVERSE_L2)
    rows = slice(ratio_index * m, (ratio_index + 1) * m)
    return tuple(None if t is None else t[rows].clone() for t in state)


def run_variant(fitter: Fitter, variant: str, base: tuple[list[float], GridState, float, int]) -> Outcome:
    kind, fraction = variant.split(":")
    f = float(fraction)
    top1, state, cpu, steps = base
    top1, cpu, steps = list(top1), cpu, steps
    start = s0_heads(state, 0)
    if kind == "star":
        t, _, c, n = fitter.fit(RATIOS[1:], f, start)
        return Outcome(top1 + t, cpu + c, steps + n)
    if kind == "chain":
        for ratio in RATIOS[1:]:
            t, state, c, n = fitter.fit([ratio], f, start)
            top1, cpu, steps, start = top1 + t, cpu + c, steps + n, s0_heads(state, 0)
        return Outcome(top1, cpu, steps)
    if kind == "dense":
        keep = keep_counts(RATIOS, fitter.num_inputs)
        sparse = [r for r, k in zip(RATIOS, keep.tolist()) if k <= default.SPARSE_KEEP_FRACTION * fitter.num_inputs]
        dense = [r for r in RATIOS[1:] if r not in sparse]
        t1, _, c1, n1 = fitter.fit(dense, f, start)
        t2, _, c2, n2 = fitter.fit(sparse, 1.0, start)
        return Outcome(top1 + t1 + t2, cpu + c1 + c2, steps + n1 + n2)
    raise SystemExit(f"unknown variant {variant!r}: star:F, chain:F or dense:F")


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
    parser.add_argument("--variants", nargs="+", default=["star:0.5", "star:1"])
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
            fitter = Fitter(splits, classes, seed)
            cold_top1, _, cold_cpu, cold_steps = fitter.fit(RATIOS)
            base = fitter.fit([0.0])
            print(f"\n{name}, seed {seed}: test top-1 per ratio {RATIOS}")
            print(f"{'cold':>10}  cpu {cold_cpu:6.1f} s  head-steps {cold_steps:6d}  "
                  + " ".join(f"{t:6.2f}" for t in cold_top1))
            for variant in args.variants:
                out = run_variant(fitter, variant, base)
                diffs = [a - b for a, b in zip(out.top1, cold_top1)]
                print(f"{variant:>10}  cpu {out.cpu:6.1f} s  head-steps {out.head_steps:6d}  "
                      + " ".join(f"{d:+6.2f}" for d in diffs) + f"  mean {sum(diffs) / len(diffs):+.2f}")


if __name__ == "__main__":
    main()
