"""The whole `iis analyze` command against the authors' head protocol, on the same features.

One planted-concept workload (``benchmarks/workloads.py``; by default N_train 100k, D 512, C 100,
K 200) is written to a float16 feature store whose visual elements are the K concept directions.
Then, in one run, on the same cores:

- **ours**: the real CLI in a subprocess, ``iis analyze --store S --results R --libraries
  prototype --num-concepts K`` with every default (a LocalCluster, the 8 default ratios, the
  standard head, bootstrap intervals, tables and library files written): interpreter start,
  imports, Dask start and shutdown included; with ``--unsplit``, also with ``--head-parts 1``
  (the library's ratio grid in one task, as before the grid could be split over workers);
- **reference**: the authors' protocol on the same store: read the features, project them on the
  same library, fit the standard head and the 8 ratios' heads (``fit_heads(protocol="reference")``,
  torch on every core).

It prints both wall times, their ratio (aim: >= 10x), the heads' share of ours, and test top-1 per
head side by side.

    python benchmarks/analyze_vs_reference.py
    python benchmarks/analyze_vs_reference.py --workload planted-20k
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from iis.analyze.activations import concept_activations
from iis.analyze.heads import fit_heads
from iis.analyze.store import open_feature_store
from iis.extract import store as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, make  # noqa: E402

RATIOS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]
SPEED_AIM = 10.0
BLOCK_ROWS = 4096


def write_store(path: Path, features: dict, library: torch.Tensor, classes: int) -> None:
    """A complete float16 store of the workload; its elements are the library's concept directions."""
    k = library.shape[0]
    provenance = st.ElementProvenance(
        source_id=np.array([f"concept/{i}" for i in range(k)]), source_index=np.arange(k),
        label=np.arange(k) % classes, box=np.tile([0, 0, 1, 1], (k, 1)), kind=np.array(["planted"] * k),
        segment=np.full(k, -1))
    sizes = {split: len(y) for split, (_, y) in features.items()}
    group = st.create_store(path, split_sizes=sizes, feature_dim=library.shape[1], block_rows=BLOCK_ROWS,
                            elements=provenance, attrs={"model": "planted", "dataset": "planted",
                                                        "backbone": "planted", "weights": "planted",
                                                        "classes": [f"c{i}" for i in range(classes)]})
    for split, (z, y) in features.items():
        n = len(y)
        columns = {"features": z.numpy().astype(np.float16), "labels": y.numpy(),
                   "ids": np.array([f"{split}/{i}" for i in range(n)]), "valid": np.ones(n, dtype=bool)}
        for b in range(st.num_blocks(n, BLOCK_ROWS)):
            span = st.block_slice(b, rows=n, block_rows=BLOCK_ROWS)
            st.write_block(group, split, b, **{c: v[span] for c, v in columns.items()})
    for b in range(st.num_blocks(k, BLOCK_ROWS)):
        span = st.block_slice(b, rows=k, block_rows=BLOCK_ROWS)
        st.write_block(group, st.ELEMENTS, b, features=library.numpy().astype(np.float16)[span])
    assert st.finalize_store(group, path)


def run_ours(store: Path, results: Path, k: int, extra: tuple[str, ...] = ()) -> float:
    cmd = [str(Path(sys.executable).parent / "iis"), "-q", "analyze", "--store", str(store), "--results", str(results),
           "--libraries", "prototype", "--num-concepts", str(k), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"iis analyze failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def run_reference(store_path: Path, classes: int) -> tuple[float, list[float]]:
    """The authors' protocol on the store's features and the same library; wall time and top-1s."""
    start = time.perf_counter()
    store = open_feature_store(store_path)
    library = torch.from_numpy(np.asarray(store.group["elements/features"][:], dtype=np.float32))
    splits = {s: store.read_split(s) for s in ("train", "val", "test")}
    features = {s: (d.x, d.labels) for s, d in splits.items()}
    activations = {s: (concept_activations(x, library), y) for s, (x, y) in features.items()}
    standard = fit_heads(**features, num_classes=classes, ratios=None, seed=0, protocol="reference")
    grid = fit_heads(**activations, num_classes=classes, ratios=RATIOS, seed=0, protocol="reference")
    return time.perf_counter() - start, [standard.test_top1[0], *grid.test_top1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="planted-100k", choices=[n for n in WORKLOADS if n.startswith("planted")])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write the store and results here instead of a temp dir")
    parser.add_argument("--unsplit", action="store_true",
                        help="also time iis analyze with --head-parts 1 (the library's ratio grid in one task)")
    args = parser.parse_args()
    spec = WORKLOADS[args.workload]
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {platform.machine()}; workload {args.workload}: {spec}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        features, _, library = make(spec, args.seed)
        store = root / "planted.zarr"
        write_store(store, features, library, spec.classes)
        del features
        ours_wall = run_ours(store, root / "results", spec.concepts)
        unsplit_wall = None
        if args.unsplit:
            unsplit_wall = run_ours(store, root / "results-unsplit", spec.concepts, ("--head-parts", "1"))
            same = pd.read_parquet(root / "results-unsplit" / "accuracy.parquet").sort_values(["library", "sparsity"])
            mine = pd.read_parquet(root / "results" / "accuracy.parquet").sort_values(["library", "sparsity"])
            identical = same.test_top1.tolist() == mine.test_top1.tolist()
        ref_wall, ref_top1 = run_reference(store, spec.classes)
        acc = pd.read_parquet(root / "results" / "accuracy.parquet")
        standard = acc[acc.library == "standard"].test_top1.item()
        grid = acc[acc.library == "prototype"].sort_values("sparsity")
        ours_top1 = [standard, *grid.test_top1.tolist()]
        fit_seconds = acc.fit_seconds.sum()
    print(f"{'head':>9} {'ours':>7} {'ref':>7} {'diff':>6}")
    for name, o, r in zip(["standard", *[f"s={x:g}" for x in RATIOS]], ours_top1, ref_top1):
        print(f"{name:>9} {100 * o:7.2f} {100 * r:7.2f} {100 * (o - r):+6.2f}")
    print(f"iis analyze (whole command): {ours_wall:.1f} s wall, of which head fitting {fit_seconds:.1f} s")
    if unsplit_wall is not None:
        print(f"iis analyze --head-parts 1 (the grid in one task): {unsplit_wall:.1f} s wall "
              f"({unsplit_wall / ours_wall:.2f}x the default's); test top-1 identical: {identical}")
    print(f"reference protocol (read, project, fit): {ref_wall:.1f} s wall, {torch.get_num_threads()} torch threads")
    ratio = ref_wall / ours_wall
    print(f"speed ratio (reference / iis analyze): {ratio:.1f}x; aim >= {SPEED_AIM:g}x: "
          f"{'PASS' if ratio >= SPEED_AIM else 'FAIL'}")


if __name__ == "__main__":
    main()
