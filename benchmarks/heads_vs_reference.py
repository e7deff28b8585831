"""Default head trainer vs the IIS authors' reference protocol: accuracy per ratio, and speed.

A fixed synthetic workload (class means plus noise, 10% of labels flipped, a prototype library of
training features drawn stratified over classes) is fitted twice on the same cores in the same
run: the standard head plus every sparsity ratio, by ``fit_heads(protocol="default")`` (all
ratios in one pass, learning rate chosen on val) and by ``protocol="reference"`` (one ratio at a time,
selected on test). Aims: the default is at least 10x faster, and every ratio's test top-1 is at
least the reference's minus 0.5 points.

    python benchmarks/heads_vs_reference.py            # N_train 20,000, D 512, C 100, K 200
    python benchmarks/heads_vs_reference.py --quick    # a smaller workload, for a smoke test
    python benchmarks/heads_vs_reference.py --ablate-layernorm   # also: reference, LayerNorm frozen
    python benchmarks/heads_vs_reference.py --seeds 0,1,2,3 --ceiling   # 4 workloads, and each head
                                                   # fitted to convergence (METHOD's model, C on val)

Wall time is the aim's measure; CPU time (``time.process_time``) is printed beside it, because on
a shared machine it moves less with the other processes' load.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import iis.analyze.heads as heads
import numpy as np
import torch
from iis.analyze.activations import concept_activations, keep_counts, magnitude_ranks
from iis.analyze.heads import HeadFit, fit_heads
from iis.analyze.metrics import accuracy_retention, normalized_score

RATIOS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]
HEAD_NAMES = ["standard", *[f"s={r:g}" for r in RATIOS]]
CEILING_C = (0.01, 0.03, 0.1)
SPEED_AIM = 10.0
ACCURACY_AIM = -0.5  # points of test top-1, ours minus reference


@dataclass(frozen=True)
class Workload:
    n_train: int
    n_val: int
    n_test: int
    dim: int
    classes: int
    concepts: int
    separation: float = 0.24  # std of the class means per dimension; the noise has std 1
    offset: float = 0.5  # std of a mean shared by every class, as pooled features have
    label_noise: float = 0.1  # fraction of labels replaced by a random class


FULL = Workload(n_train=20_000, n_val=2_000, n_test=5_000, dim=512, classes=100, concepts=200)
QUICK = Workload(n_train=4_000, n_val=500, n_test=1_000, dim=128, classes=20, concepts=40, separation=0.4)

Split = tuple[torch.Tensor, torch.Tensor]


def make_workload(w: Workload, seed: int) -> tuple[dict[str, Split], dict[str, Split]]:
    """Features and prototype-library activations of train/val/test, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(w.classes, w.dim, generator=g) * w.separation
    shared = torch.randn(w.dim, generator=g) * w.offset

    def split(n: int) -> Split:
        y = torch.randint(0, w.classes, (n,), generator=g)
        z = means[y] + shared + torch.randn(n, w.dim, generator=g)
        flipped = torch.rand(n, generator=g) < w.label_noise
        return z, torch.where(flipped, torch.randint(0, w.classes, (n,), generator=g), y)

    features = {"train": split(w.n_train), "val": split(w.n_val), "test": split(w.n_test)}
    # Prototype library: K train features drawn at random, stratified over classes, normalised.
    z_train, y_train = features["train"]
    per_class = w.concepts // w.classes
    picks = [torch.nonzero(y_train == c).flatten() for c in range(w.classes)]
    picks = torch.cat([p[torch.randperm(len(p), generator=g)[:per_class]] for p in picks])
    library = torch.nn.functional.normalize(z_train[picks], dim=1)
    activations = {name: (concept_activations(z, library), y) for name, (z, y) in features.items()}
    return features, activations


@dataclass
class Timed:
    standard: HeadFit
    grid: HeadFit
    wall: float
    cpu: float


def run_protocol(features: dict[str, Split], activations: dict[str, Split], *, classes: int, seed: int,
                 protocol: str) -> Timed:
    """The standard head and the whole ratio grid, timed together."""
    wall, cpu = time.perf_counter(), time.process_time()
    standard = fit_heads(**features, num_classes=classes, ratios=None, seed=seed, protocol=protocol)
    grid = fit_heads(**activations, num_classes=classes, ratios=RATIOS, seed=seed, protocol=protocol)
    return Timed(standard, grid, time.perf_counter() - wall, time.process_time() - cpu)


def run_frozen_layernorm(activations: dict[str, Split], *, classes: int, seed: int) -> HeadFit:
    """Reference protocol with its LayerNorm frozen at the identity (a diagnostic, private hook)."""
    splits = {name: heads._check_split(name, split, classes) for name, split in activations.items()}
    return heads._fit_reference(splits, num_classes=classes, ratios=RATIOS, seed=seed, epochs=heads._REF_EPOCHS,
                                batch_size=heads._REF_BATCH, learn_layer_norm=False)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)))


def warm_up(classes: int) -> None:
    """One tiny fit per protocol, so lazy imports and allocator warm-up are not timed."""
    g = torch.Generator().manual_seed(0)
    tiny = {name: (torch.randn(64, 8, generator=g), torch.randint(0, classes, (64,), generator=g))
            for name in ("train", "val", "test")}
    for protocol in heads.PROTOCOLS:
        fit_heads(**tiny, num_classes=classes, ratios=[0.0, 0.5], seed=0, protocol=protocol, max_epochs=1)


def fit_converged(activations: dict[str, Split], *, grid: tuple[float, ...] = CEILING_C) -> list[float]:
    """Test top-1 of METHOD.md's interpretable head fitted to convergence, one per ratio.

    scikit-learn's L-BFGS multinomial logistic regression on ``g_s(a)``, with its inverse L2
    strength C selected on val from ``grid``: the best our minibatch trainer could hope for with
    METHOD's model and val selection (slow; ``--ceiling``).
    """
    from sklearn.linear_model import LogisticRegression  # only this diagnostic needs it

    ranks = {name: magnitude_ranks(x) for name, (x, _) in activations.items()}
    top1 = []
    for k in keep_counts(RATIOS, activations["train"][0].shape[1]).tolist():
        data = {name: ((x * (ranks[name] < k)).numpy(), y.numpy()) for name, (x, y) in activations.items()}
        best_val, best_test = -1.0, 0.0
        for c in grid:
            clf = LogisticRegression(C=c, max_iter=500).fit(*data["train"])
            val = clf.score(*data["val"])
            if val > best_val:
                best_val, best_test = val, clf.score(*data["test"])
        top1.append(best_test)
    return top1


@dataclass
class SeedResult:
    diffs: list[float]  # points, ours minus reference: standard head, then every ratio
    speed_wall: float


def run_seed(w: Workload, seed: int, *, ablate_layernorm: bool, ceiling: bool) -> SeedResult:
    """Fit both protocols on the workload of one seed, print its table, return the differences."""
    features, activations = make_workload(w, seed)
    ours = run_protocol(features, activations, classes=w.classes, seed=seed, protocol="default")
    ref = run_protocol(features, activations, classes=w.classes, seed=seed, protocol="reference")
    frozen = run_frozen_layernorm(activations, classes=w.classes, seed=seed) if ablate_layernorm else None
    converged = fit_converged(activations) if ceiling else None

    header = ["head", "ours top-1", "ref top-1", "diff (pts)", "ours epoch(last)", "ref epoch(test)"]
    if frozen is not None:
        header.append("ref frozen-LN top-1")
    if converged is not None:
        header.append("converged top-1 (C on val)")
    rows, diffs = [], []
    fits = [(ours.standard, ref.standard, 0, None), *[(ours.grid, ref.grid, i, i) for i in range(len(RATIOS))]]
    for name, (o, f, i, j) in zip(HEAD_NAMES, fits):
        diff = 100 * (o.test_top1[i] - f.test_top1[i])
        diffs.append(diff)
        row = [name, f"{100 * o.test_top1[i]:.2f}", f"{100 * f.test_top1[i]:.2f}", f"{diff:+.2f}",
               str(o.best_epoch[i]), str(f.best_epoch[i])]
        if frozen is not None:
            row.append("" if j is None else f"{100 * frozen.test_top1[j]:.2f}")
        if converged is not None:
            row.append("" if j is None else f"{100 * converged[j]:.2f}")
        rows.append(row)
    print(f"\nseed {seed}")
    print_table(header, rows)

    iis = {name: normalized_score(RATIOS, accuracy_retention(t.grid.test_top1, float(t.standard.test_top1[0])))
           for name, t in (("ours", ours), ("ref", ref))}
    print(f"normalised IIS: ours {iis['ours']:.4f}, reference {iis['ref']:.4f}")
    print(f"time, ours:      wall {ours.wall:7.2f} s, cpu {ours.cpu:7.2f} s "
          f"(standard {ours.standard.fit_seconds:.2f} s, grid {ours.grid.fit_seconds:.2f} s)")
    print(f"time, reference: wall {ref.wall:7.2f} s, cpu {ref.cpu:7.2f} s "
          f"(standard {ref.standard.fit_seconds:.2f} s, grid {ref.grid.fit_seconds:.2f} s)")
    print(f"speed ratio (reference / ours): wall {ref.wall / ours.wall:.1f}x, cpu {ref.cpu / ours.cpu:.1f}x")
    print_verdicts(ref.wall / ours.wall, diffs)
    return SeedResult(diffs, ref.wall / ours.wall)


def below_aim(diff: float) -> bool:
    """Whether a head's difference (points, ours minus reference) misses the accuracy aim.

    "At or above": exactly -0.5 points (25 of 5,000 images) meets it, whatever the float rounding
    of the two accuracies.
    """
    return diff < ACCURACY_AIM - 1e-6


def print_verdicts(speed_wall: float, diffs: list[float]) -> None:
    print(f"aim speed >= {SPEED_AIM:g}x (wall): {'PASS' if speed_wall >= SPEED_AIM else 'FAIL'}")
    failing = [name for name, d in zip(HEAD_NAMES, diffs) if below_aim(d)]
    verdict = "PASS" if not failing else f"FAIL ({', '.join(failing)})"
    print(f"aim every head >= reference {ACCURACY_AIM:+g} pts (worst {min(diffs):+.2f}): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workload (smoke test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both protocols (default 1: on a machine shared "
                             "with other jobs, OpenMP threads that wait on each other distort timings)")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated workload seeds (default 0); with several, a summary follows: "
                             "the mean and the worst difference per head, the median speed ratio")
    parser.add_argument("--ablate-layernorm", action="store_true",
                        help="also fit the reference protocol with its LayerNorm frozen")
    parser.add_argument("--ceiling", action="store_true",
                        help="also fit every ratio's head to convergence (scikit-learn L-BFGS, C selected on "
                             f"val from {CEILING_C}); about a minute per seed")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    torch.set_num_threads(args.threads)
    w = QUICK if args.quick else FULL
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    print(f"workload: N_train {w.n_train}, N_val {w.n_val}, N_test {w.n_test}, D {w.dim}, C {w.classes}, "
          f"K {w.concepts}, ratios {RATIOS}, seeds {seeds}")
    warm_up(w.classes)
    results = [run_seed(w, seed, ablate_layernorm=args.ablate_layernorm, ceiling=args.ceiling) for seed in seeds]
    if len(results) > 1:
        diffs = np.array([r.diffs for r in results])
        print(f"\nsummary over {len(seeds)} seeds (points, ours minus reference)")
        print_table(["head", "mean", "worst", "seeds below aim"],
                    [[name, f"{diffs[:, i].mean():+.2f}", f"{diffs[:, i].min():+.2f}",
                      str(sum(below_aim(d) for d in diffs[:, i]))] for i, name in enumerate(HEAD_NAMES)])
        print(f"median speed ratio (wall): {np.median([r.speed_wall for r in results]):.1f}x")
        print("verdicts on the mean differences and the median speed:")
        print_verdicts(float(np.median([r.speed_wall for r in results])), list(diffs.mean(axis=0)))
    if args.quick:
        print("(--quick: the aims are set for the full workload; here the reference has 4 batches an epoch)")


if __name__ == "__main__":
    main()
