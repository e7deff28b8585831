"""The concept-head grid fitted several ways on the same activations: where the gap to the
"ceiling" of ``heads_vs_reference.py --ceiling`` comes from, and what the schedule's length buys.

That ceiling differs from the default grid in two ways at once: a 4x longer schedule and a wider
L2 grid (``CEILING_CONCEPT_C``). This script fits the concept-head grid several ways, one process on
one thread, and prints test (and val) top-1 per ratio:

- ``default``: the default protocol;
- ``steps4x``: 4x the steps, the default L2 grid;
- ``steps0.5x``: half the steps, the default L2 grid;
- ``sparse1.5x``: the sparsest heads (``SPARSE_KEEP_FRACTION``) train 1.5x the steps, not 2x;
- ``wideC``: the default steps, the ceiling's L2 grid;
- ``both``: the ceiling itself;
- ``no-strong-end``: the default grid without the sparse heads' strong end (``SPARSE_STRONG_END``);
- ``batch0.5x``: batches of half the default size (``BATCH``), the same number of steps.

Then, over the workloads (or stores) and seeds, the mean and worst difference of each against
``default`` at the sparse ratios (s >= 0.9) and at the others, and each one's CPU seconds against
``default``'s.

    python benchmarks/grid_variants.py                                   # planted-quick, seeds 0-4
    python benchmarks/grid_variants.py --workloads planted-20k planted-30k --seeds 3 4 \\
           --configs default no-strong-end
    python benchmarks/grid_variants.py --stores cache/demo/*.zarr --libraries prototype cluster \\
           --seeds 0 --configs default steps0.5x                       # real stores (the demo's)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from heads_vs_reference import CEILING_CONCEPT_C, CEILING_EPOCH_FACTOR, CEILING_SPARSE_STRONG_END, RATIOS
from iis.analyze import heads_default as default
from iis.analyze.heads import fit_heads
from workloads import QUICK, WORKLOADS, make

ALL = {**WORKLOADS, **QUICK}
CEILING_GRID = (CEILING_CONCEPT_C, CEILING_SPARSE_STRONG_END)
CONFIGS = {  # name: (steps factor, (L2 grid, the sparse heads' strong end) or None for the default's,
    #                 the sparsest heads' extra steps or None, batch factor)
    "default": (1, None, None, 1),
    "steps4x": (CEILING_EPOCH_FACTOR, None, None, 1),
    "steps0.5x": (0.5, None, None, 1),
    "sparse1.5x": (1, None, 1.5, 1),
    "wideC": (1, CEILING_GRID, None, 1),
    "both": (CEILING_EPOCH_FACTOR, CEILING_GRID, None, 1),
    "no-strong-end": (1, (default.CONCEPT_INVERSE_L2, ()), None, 1),
    "batch0.5x": (1, None, None, 0.5),
}
SPARSE = np.asarray(RATIOS) >= 0.9


def cases(args) -> Iterator[tuple[str, int, dict, int]]:
    """``(name, seed, activations, classes)`` of every workload-seed, or every (store, library)-seed."""
    if args.stores:
        from warm_start import store_splits

        for store in args.stores:
            for library in args.libraries:
                for seed in args.seeds:
                    splits, classes = store_splits(store, library, seed, args.num_concepts)
                    yield f"{Path(store).stem}:{library}", seed, splits, classes
        return
    for name in args.workloads:
        for seed in args.seeds:
            _, activations, _ = make(ALL[name], seed)
            yield name, seed, activations, ALL[name].classes


def fit_grid(activations, classes: int, seed: int, config: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(test top-1, val top-1, chosen C)`` per ratio, each ``(R,)``, and the fit's CPU seconds."""
    factor, grid, sparse, batch = CONFIGS[config]
    saved = (default.STEPS, default.CONCEPT_INVERSE_L2, default.SPARSE_EPOCH_FACTOR, default.BATCH,
             default.SPARSE_STRONG_END)
    default.STEPS = round(saved[0] * factor)
    default.CONCEPT_INVERSE_L2, default.SPARSE_STRONG_END = grid or (saved[1], saved[4])
    default.SPARSE_EPOCH_FACTOR, default.BATCH = sparse or saved[2], round(saved[3] * batch)
    try:
        cpu = time.process_time()
        fit = fit_heads(**activations, num_classes=classes, ratios=RATIOS, seed=seed, protocol="default")
        cpu = time.process_time() - cpu
    finally:
        (default.STEPS, default.CONCEPT_INVERSE_L2, default.SPARSE_EPOCH_FACTOR, default.BATCH,
         default.SPARSE_STRONG_END) = saved
    return np.asarray(fit.test_top1) * 100, np.asarray(fit.val_top1) * 100, np.asarray(fit.inverse_l2), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["planted-quick"], choices=sorted(ALL))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--stores", nargs="+", help="feature stores to use instead of the workloads")
    parser.add_argument("--libraries", nargs="+", default=["prototype"], help="with --stores")
    parser.add_argument("--num-concepts", type=int, default=64, help="with --stores")
    args = parser.parse_args()
    if "default" not in args.configs:
        args.configs.insert(0, "default")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; ratios {RATIOS}")
    diffs: dict[str, list[np.ndarray]] = {c: [] for c in args.configs if c != "default"}
    cpu_ratio: dict[str, list[float]] = {c: [] for c in diffs}
    for name, seed, activations, classes in cases(args):
        fits = {c: fit_grid(activations, classes, seed, c) for c in args.configs}
        print(f"\n{name}, seed {seed}: test top-1 per ratio (val top-1; chosen C)")
        for c, (test, val, chosen, cpu) in fits.items():
            cells = " ".join(f"{t:5.1f} ({v:4.1f}; {k:g})" for t, v, k in zip(test, val, chosen))
            print(f"  {c:>10}  cpu {cpu:5.1f} s  {cells}", flush=True)
        for c in diffs:
            diffs[c].append(fits[c][0] - fits["default"][0])
            cpu_ratio[c].append(fits[c][3] / fits["default"][3])
    print("\nagainst default, test top-1 points over every case and seed "
          "(mean, worst, best; sparse: s >= 0.9), and CPU (median ratio):")
    for c, d in diffs.items():
        d = np.stack(d)
        sparse, rest = d[:, SPARSE].ravel(), d[:, ~SPARSE].ravel()
        print(f"  {c:>10}  sparse {sparse.mean():+.2f} ({sparse.min():+.1f}, {sparse.max():+.1f})  "
              f"others {rest.mean():+.2f} ({rest.min():+.1f}, {rest.max():+.1f})  cpu {np.median(cpu_ratio[c]):.2f}x")


if __name__ == "__main__":
    main()
