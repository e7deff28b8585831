"""How do the wall time and peak memory of `iis analyze` grow with the number of train rows?

For each size N it writes one synthetic feature store (D 512, float16, C 100 classes,
``train`` N rows, ``val`` and ``test`` N/10 each, E 2,000 visual elements; features are class
means plus Gaussian noise, written a whole block at a time), then runs the real CLI in a
subprocess, in explicit mode::

    iis analyze --store S --results R --libraries prototype --num-concepts 200 \\
                --seeds 0 --bootstrap 200 --synchronous        # the default 8 ratios

``--synchronous`` (the default here) runs both tasks, the standard head and the prototype
library, one after the other in that one process; ``--mode worker`` runs them on a LocalCluster
of one worker process (``--workers 1``) instead, and the whole process tree is measured.

Measured per size:

- **wall s**: the CLI's wall time (interpreter start and imports included).
- **peak RSS MB (tree)**: the sum of the RSS of the CLI process and all its descendants,
  sampled every 20 ms with psutil; **max proc MB**: the exact peak RSS of the largest single
  process of the tree (``ru_maxrss`` from ``wait4``).
- **s / 100k**: wall time per 100,000 train rows.
- **RSS / NxK f32**: peak tree RSS over ``N * K * 4`` bytes (the train activations).
- **RSS / NxD f16**: peak tree RSS over ``N * D * 2`` bytes (the train features as stored).

The aims: time roughly linear in N; memory bounded by the ``N x K`` activations plus a few
chunks (the first ratio falling towards a small constant as N grows), never by ``N x D`` (the
second ratio must not stay near or above 1 as N grows, where a full float32 copy of the
features alone would make it 2).

``--per-task`` additionally runs each task (``standard``, ``prototype``) alone in a child
process that records the peak RSS reached inside the main steps (reading a split, fitting the
heads, ranking activations, evaluating), to show where the memory goes.

Examples::

    python benchmarks/analyze_scaling.py                              # 10k, 100k, 1M
    python benchmarks/analyze_scaling.py --sizes 10k,100k --per-task
    python benchmarks/analyze_scaling.py --sizes 1M --per-task --keep /scratch/bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

MB = 1 << 20


def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="10k,100k,1M", help="train rows N, comma-separated (k/M suffixes)")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--classes", type=int, default=100, help="classes C")
    p.add_argument("--elements", type=int, default=2000, help="visual elements E")
    p.add_argument("--num-concepts", type=int, default=200, help="K")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--eval-fraction", type=float, default=0.1, help="val and test rows, each, as a fraction of N")
    p.add_argument("--block-rows", type=int, default=65536)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--mode", default="synchronous", choices=["synchronous", "worker"],
                   help="synchronous: tasks in the CLI process; worker: a LocalCluster of one worker")
    p.add_argument("--threads", type=int, default=1, help="torch/BLAS threads per task (--threads of the CLI)")
    p.add_argument("--per-task", action="store_true", help="also profile each task alone, step by step")
    p.add_argument("--keep", type=Path, help="work in this folder and keep the stores (default: a temporary one)")
    p.add_argument("--interval", type=float, default=0.02, help="RSS sampling interval, seconds")
    p.add_argument("--task", nargs=2, metavar=("STORE", "LIBRARY"), help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Store generation
# ------------------------------------------------------------------------------------------


def write_store(path: Path, *, n_train: int, args: argparse.Namespace, seed: int = 0) -> dict[str, int]:
    """A complete store of random class-mean + noise features, written a whole block at a time."""
    from iis.extract import store as st

    rng = np.random.default_rng(seed)
    d, c, e = args.dim, args.classes, args.elements
    n_eval = max(c, round(n_train * args.eval_fraction))
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    means = rng.standard_normal((c, d), dtype=np.float32)
    noise = 2.0  # classes overlap: accuracies well below 1, so the heads have work to do
    element_labels = np.arange(e) % c
    provenance = st.ElementProvenance(
        source_id=np.array([f"train/{i}" for i in range(e)]), source_index=np.arange(e), label=element_labels,
        box=np.tile([0, 0, 16, 16], (e, 1)), kind=np.array(["grid"] * e), segment=np.full(e, -1),
    )
    group = st.create_store(path, split_sizes=sizes, feature_dim=d, block_rows=args.block_rows, dtype=args.dtype,
                            elements=provenance, attrs={"model": path.stem, "dataset": f"synthetic-{n_train}",
                                                        "backbone": "synthetic", "weights": "random",
                                                        "classes": [f"c{i}" for i in range(c)]})

    def features(labels: np.ndarray, scale: float) -> np.ndarray:
        x = rng.standard_normal((labels.size, d), dtype=np.float32)
        x *= scale
        x += means[labels]
        return x.astype(args.dtype)

    for split, n in sizes.items():
        for b in range(st.num_blocks(n, args.block_rows)):
            span = st.block_slice(b, rows=n, block_rows=args.block_rows)
            labels = rng.integers(0, c, span.stop - span.start)
            st.write_block(group, split, b, features=features(labels, noise), labels=labels,
                           ids=np.array([f"{split}/{i}" for i in range(span.start, span.stop)]),
                           valid=np.ones(labels.size, dtype=bool))
    for b in range(st.num_blocks(e, args.block_rows)):
        span = st.block_slice(b, rows=e, block_rows=args.block_rows)
        st.write_block(group, st.ELEMENTS, b, features=features(element_labels[span], 0.5 * noise))
    assert st.finalize_store(group, path)
    return sizes


# ------------------------------------------------------------------------------------------
# Measuring a process tree
# ------------------------------------------------------------------------------------------


def measure(cmd: list[str], *, interval: float, log: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; wall time, sampled peak RSS of its whole tree, exact peak of its largest process."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    root = psutil.Process(proc.pid)
    peak = 0
    while True:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                pass
        peak = max(peak, total)
        try:
            # Reaped by wait4 below, not here: only look whether it has exited.
            if root.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "peak_tree": peak, "max_proc": usage.ru_maxrss * 1024, "rc": proc.returncode}


# ------------------------------------------------------------------------------------------
# Child mode: one task alone, step by step
# ------------------------------------------------------------------------------------------


class _Steps:
    """Peak RSS inside each wrapped call, sampled by a background thread."""

    def __init__(self, interval: float):
        self.proc = psutil.Process()
        self.open: list[dict] = []
        self.done: list[dict] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def _sample(self, interval: float) -> None:
        while True:
            rss = self.proc.memory_info().rss
            with self.lock:
                for step in self.open:
                    step["peak"] = max(step["peak"], rss)
            time.sleep(interval)

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            rss = self.proc.memory_info().rss
            step = {"step": label, "before": rss, "peak": rss, "depth": len(self.open)}
            with self.lock:
                self.open.append(step)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                step["seconds"] = time.perf_counter() - t
                step["after"] = self.proc.memory_info().rss
                step["peak"] = max(step["peak"], step["after"])
                with self.lock:
                    self.open.remove(step)
                self.done.append(step)

        setattr(owner, name, wrapped)


def run_child(args: argparse.Namespace) -> None:
    import iis.analyze.heads_default
    import iis.analyze.tasks
    from iis.analyze.store import FeatureStore
    from iis.analyze.tasks import TaskSpec, run_task

    from iis.config import DEFAULT_RATIOS

    steps = _Steps(args.interval / 2)
    steps.wrap(FeatureStore, "read_split", "read_split")
    steps.wrap(iis.analyze.tasks, "fit_heads", "fit_heads")
    steps.wrap(iis.analyze.heads_default, "keep_mask", "  keep_mask")
    steps.wrap(iis.analyze.heads_default, "evaluate", "  evaluate")
    steps.wrap(iis.analyze.tasks, "_ci", "bootstrap CI")
    store, library = args.task
    spec = TaskSpec(store=store, library=library, seed=0, num_concepts=args.num_concepts,
                    ratios=tuple(DEFAULT_RATIOS), bootstrap=args.bootstrap, threads=args.threads)
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    run_task(spec)
    # Merge repeated steps (three read_split calls, one CI per ratio): keep the worst peak.
    merged: dict[str, dict] = {}
    for s in steps.done:
        m = merged.setdefault(s["step"], {**s, "calls": 0, "seconds": 0.0})
        m["calls"] += 1
        m["seconds"] += s["seconds"]
        if s["peak"] - s["before"] >= m["peak"] - m["before"]:
            m.update(before=s["before"], peak=s["peak"], after=s["after"])
    print("STEPS " + json.dumps({"baseline": baseline, "seconds": time.perf_counter() - start,
                                 "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                 "steps": list(merged.values())}))


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def cli_command(store: Path, results: Path, args: argparse.Namespace) -> list[str]:
    iis = Path(sys.executable).parent / "iis"
    cmd = [str(iis)] if iis.exists() else [sys.executable, "-m", "iis"]
    cmd += ["analyze", "--store", str(store), "--results", str(results), "--libraries", "prototype",
            "--num-concepts", str(args.num_concepts), "--seeds", "0", "--bootstrap", str(args.bootstrap),
            "--threads", str(args.threads)]
    return cmd + (["--synchronous"] if args.mode == "synchronous" else ["--workers", "1"])


def child_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def per_task(store: Path, n: int, args: argparse.Namespace, work: Path) -> None:
    for library in ("standard", "prototype"):
        log = work / f"task-{n}-{library}.log"
        cmd = [sys.executable, __file__, "--task", str(store), library, "--num-concepts", str(args.num_concepts),
               "--bootstrap", str(args.bootstrap), "--threads", str(args.threads),
               "--interval", str(args.interval)]
        result = measure(cmd, interval=args.interval, log=log, env=child_env(args.threads))
        line = next((ln for ln in log.read_text().splitlines() if ln.startswith("STEPS ")), None)
        if result["rc"] != 0 or line is None:
            print(f"  {library}: failed (exit {result['rc']}); see {log}")
            continue
        info = json.loads(line[len("STEPS "):])
        print(f"  N={n:,} task {library}: {info['seconds']:.1f} s, peak RSS {info['max_rss'] / MB:,.0f} MB "
              f"(after imports {info['baseline'] / MB:,.0f} MB)")
        print(f"    {'step':<20} {'calls':>5} {'s':>7} {'before MB':>10} {'peak MB':>9} {'+peak MB':>9} {'after MB':>9}")
        for s in info["steps"]:
            print(f"    {s['step']:<20} {s['calls']:>5} {s['seconds']:>7.1f} {s['before'] / MB:>10,.0f} "
                  f"{s['peak'] / MB:>9,.0f} {(s['peak'] - s['before']) / MB:>9,.0f} {s['after'] / MB:>9,.0f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.task:
        run_child(args)
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    work = args.keep or Path(tempfile.mkdtemp(prefix="iis-analyze-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"iis analyze scaling: D={args.dim} {args.dtype}, C={args.classes}, E={args.elements}, "
          f"K={args.num_concepts}, library prototype, 8 default ratios, seed 0, bootstrap {args.bootstrap}, "
          f"mode {args.mode}, {args.threads} thread(s); {psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM; work dir {work}", flush=True)
    rows = []
    try:
        for n in sizes:
            store = work / f"bench-{n}.zarr"
            if not (store / "zarr.json").exists():
                t = time.perf_counter()
                write_store(store, n_train=n, args=args)
                print(f"  wrote {store.name} in {time.perf_counter() - t:.1f} s", flush=True)
            results = work / f"results-{n}"
            shutil.rmtree(results, ignore_errors=True)
            log = work / f"analyze-{n}.log"
            cmd = cli_command(store, results, args)
            r = measure(cmd, interval=args.interval, log=log, env=child_env(args.threads))
            if r["rc"] != 0:
                print(log.read_text()[-3000:])
                raise SystemExit(f"`{' '.join(cmd)}` failed with exit code {r['rc']}")
            r.update(n=n, nk=n * args.num_concepts * 4, nd=n * args.dim * np.dtype(args.dtype).itemsize)
            rows.append(r)
            print(f"  N={n:,}: {r['wall']:.1f} s, peak tree RSS {r['peak_tree'] / MB:,.0f} MB", flush=True)
            if args.per_task:
                per_task(store, n, args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'N':>10} {'wall s':>8} {'peak RSS MB (tree)':>19} {'max proc MB':>12} {'s / 100k':>9} "
          f"{'RSS / NxK f32':>14} {'RSS / NxD ' + ('f16' if args.dtype == 'float16' else 'f32'):>14}")
    for r in rows:
        print(f"{r['n']:>10,} {r['wall']:>8.1f} {r['peak_tree'] / MB:>19,.0f} {r['max_proc'] / MB:>12,.0f} "
              f"{r['wall'] / (r['n'] / 1e5):>9.2f} {r['peak_tree'] / r['nk']:>14.2f} {r['peak_tree'] / r['nd']:>14.2f}")
    print("Aims: wall time roughly linear in N (s / 100k flat once start-up is amortised); peak RSS bounded by "
          "the N x K float32 activations plus a few chunks, never by N x D (RSS / NxD must fall well below 1 "
          "as N grows).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
