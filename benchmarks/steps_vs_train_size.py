"""Is a fixed number of optimiser steps enough at every train size?

The default protocol trains ``STEPS`` batches of ``BATCH`` rows, at least ``MIN_EPOCHS`` epochs
(``analyze/heads_default.py``). At 100k rows 1,000 batches are 2.6 epochs; at ImageNet's 1.28M they
would be a fifth of one. This benchmark grows one planted spec's train split (val and test fixed,
larger than the workloads' so that a few tenths of a point show) and trains the dense heads (one
per penalty of ``CONCEPT_INVERSE_L2``, every concept kept, the heads every other ratio starts from)
for each given number of steps, on the same activations and batches. It prints, per (N, steps),
the CPU seconds, each penalty's val and test top-1 and the test top-1 of val's choice. With
``--standard`` it fits the standard head on the raw features instead (its nine (C, rate) pairs,
val's choice).

    python benchmarks/steps_vs_train_size.py --sizes 25000 100000 400000 --steps 1000 2000 4000
    python benchmarks/steps_vs_train_size.py --sizes 200000 --steps 1000 2000 --workload planted-30k
    python benchmarks/steps_vs_train_size.py --standard --sizes 100000 400000 --steps 1000 3125

Results: benchmarks/README.md, "Steps and the train size".
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import time
from dataclasses import replace

import torch
from iis.analyze import heads_default as default
from workloads import WORKLOADS, make

log = logging.getLogger("steps_vs_train_size")


def dense_heads_top1(splits: dict, classes: int, steps: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Train the dense heads for ``steps`` batches; CPU seconds, val and test top-1 per penalty ``(M,)``."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (splits[s] for s in ("train", "val", "test"))
    num_train, num_inputs = x_train.shape
    batch = default.Schedule.resolve(num_train, epochs=None, batch_size=None).batch_size
    cpu = time.process_time()
    heads = default.fit_dense((x_train, y_train), num_classes=classes, seed=0,
                              schedule=default.Schedule(steps=steps, batch_size=batch)).heads
    cpu = time.process_time() - cpu
    keep = torch.full((len(default.CONCEPT_INVERSE_L2),), num_inputs)

    def top1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 100 * default._val_top1(heads.weight, heads.bias, heads.affine, keep, prep_val=x, y_val=y,
                                       num_classes=classes, standard=False)[:, 0]

    return cpu, top1(x_val, y_val), top1(x_test, y_test)


def standard_head_top1(splits: dict, classes: int, steps: int) -> tuple[float, float, float, str]:
    """Fit the standard head for ``steps`` batches; CPU seconds, val and test top-1 of val's choice
    and that choice."""
    schedule = default.Schedule(steps=steps, batch_size=default.Schedule.resolve(
        splits["train"][0].shape[0], epochs=None, batch_size=None).batch_size)
    cpu = time.process_time()
    fit = default.fit_default(splits, num_classes=classes, ratios=None, seed=0, schedule=schedule)
    cpu = time.process_time() - cpu
    choice = f"C {float(fit.inverse_l2[0]):g}, rate {float(fit.learning_rate[0]):g}"
    return cpu, 100 * float(fit.val_top1[0]), 100 * float(fit.test_top1[0]), choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="planted-100k", choices=[n for n in WORKLOADS if n.startswith("planted")])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 100_000, 400_000], help="N_train values")
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--n-val", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--standard", action="store_true", help="the standard head on the raw features instead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    log.info("%s, torch %s, one thread; %s with N_train in %s, val %d, test %d", platform.processor() or platform.machine(),
             torch.__version__, args.workload, args.sizes, args.n_val, args.n_test)
    for size in args.sizes:
        spec = replace(WORKLOADS[args.workload], n_train=size, n_val=args.n_val, n_test=args.n_test)
        features, activations, _ = make(spec, args.seed)
        splits = {k: (x.float(), y) for k, (x, y) in (features if args.standard else activations).items()}
        batches = math.ceil(size / default.Schedule.resolve(size, epochs=None, batch_size=None).batch_size)
        for steps in args.steps:
            if args.standard:
                cpu, val, test, choice = standard_head_top1(splits, spec.classes, steps)
                print(f"N {size:>8,} steps {steps:>5} ({steps / batches:4.1f} epochs) {cpu:6.1f} CPU-s | standard head,"
                      f" val's choice {choice}: val {val:.2f}, test {test:.2f}", flush=True)
                continue
            cpu, val, test = dense_heads_top1(splits, spec.classes, steps)
            choice = int(val.argmax())
            print(f"N {size:>8,} steps {steps:>5} ({steps / batches:4.1f} epochs) {cpu:6.1f} CPU-s | val "
                  + " ".join(f"{v:5.2f}" for v in val.tolist()) + " | test "
                  + " ".join(f"{t:5.2f}" for t in test.tolist())
                  + f" | val's choice C {default.CONCEPT_INVERSE_L2[choice]:g}: test {float(test[choice]):.2f},"
                  f" mean over C {float(test.mean()):.2f}", flush=True)


if __name__ == "__main__":
    main()
