"""Fewer penalties for the ratios that drop concepts: a window of the L2 grid around the dense heads'
val choice, scored offline against the whole grid.

The default protocol trained, per ratio, one head per L2 strength of ``CONCEPT_INVERSE_L2`` and kept
the one best on val. With warm starts the dense heads (every concept kept) train first; their val
choice is known before any other ratio's head trains. If each other ratio only needs the penalties
next to that choice, most of its heads need not train at all (adopted: ``WARM_PENALTY_WINDOW``;
benchmarks/README.md, "A window of penalties").

A head of one (ratio, C) does not depend on which other heads train beside it (each draws the same
batches from the seed and has its own parameters), so one default grid per case, with every head's
val and test top-1 recorded, scores any window rule exactly. For each case it fits the grid once (one
process, one thread), records ``(ratio, C, val top-1, test top-1)`` to ``--out`` (a Parquet file),
then prints, per rule, the val-chosen test top-1 against the whole grid's choice (mean over heads,
worst head, heads below -0.5 and above +0.5 points) and the share of head-steps the rule trains.

    python benchmarks/penalty_window.py --workloads planted-100k planted-30k --seeds 0 1 --out /tmp/pw.parquet
    python benchmarks/penalty_window.py --stores cache/demo/*.zarr --libraries prototype cluster --out /tmp/pwd.parquet
    python benchmarks/penalty_window.py --score /tmp/pw.parquet /tmp/pwd.parquet     # rules only, no fitting
    python benchmarks/penalty_window.py --workloads planted-100k --compare 2          # CPU: window against whole grid
    python benchmarks/penalty_window.py --strong-end-scores --score /tmp/pw.parquet   # the sparse heads' strong end

Since the sparse ratios' strong end (``SPARSE_STRONG_END``), a recorded grid holds it too: its
heads at the other ratios are never trained (val -100), and ``--strong-end C ...`` records with
another strong end (none: ``--strong-end`` alone).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from iis.analyze import heads_default as default
from iis.analyze.activations import keep_counts
from iis.analyze.heads_default import Schedule, fit_default
from warm_start import RATIOS, store_splits
from workloads import QUICK, WORKLOADS, make, planted_from_text

log = logging.getLogger("penalty_window")


def record_grid(case: str, splits: dict, classes: int, seed: int) -> pd.DataFrame:
    """One default grid; every (ratio, C) head's val and test top-1 (%), and the grid's CPU seconds."""
    x_test, y_test = splits["test"][0].float(), splits["test"][1]
    recorded = {}
    original = default._val_top1

    def both(weight, bias, affine, keep, *, prep_val, y_val, num_classes, standard):
        if "anchor" not in recorded:  # the first evaluation: the dense heads', which set the window
            recorded["anchor"] = original(weight, bias, affine, keep, prep_val=prep_val, y_val=y_val,
                                          num_classes=num_classes, standard=standard)
            return recorded["anchor"]
        recorded["test"] = original(weight, bias, affine, keep, prep_val=x_test, y_val=y_test,
                                    num_classes=num_classes, standard=standard)
        recorded["val"] = original(weight, bias, affine, keep, prep_val=prep_val, y_val=y_val,
                                   num_classes=num_classes, standard=standard)
        return recorded["val"]

    default._val_top1 = both
    try:
        schedule = Schedule.resolve(splits["train"][0].shape[0], epochs=None, batch_size=None)
        with whole_windows():
            cpu = time.process_time()
            fit_default(splits, num_classes=classes, ratios=RATIOS, seed=seed, schedule=schedule)
            cpu = time.process_time() - cpu
    finally:
        default._val_top1 = original
    grid = default.concept_penalties()
    extra = len(default.SPARSE_STRONG_END)
    assert len(default.CONCEPT_LRS) == 1, "one rate column per concept head"
    # In concept_penalties()' order, as `penalty` (the dense heads choose among CONCEPT_INVERSE_L2;
    # ties: the first, as the trainer).
    anchor = extra + int(recorded["anchor"][:, 0].argmax())
    keep = keep_counts(RATIOS, splits["train"][0].shape[1]).numpy()
    # Heads never trained (a strong-end penalty at a ratio that is not sparse) are recorded with
    # val -100 (the trainer's mark: never chosen).
    rows = [{"case": case, "seed": seed, "ratio": ratio, "keep": int(keep[r]), "penalty": m,
             "inverse_l2": grid[m], "num_inputs": splits["train"][0].shape[1],
             "val": 100 * float(recorded["val"][r * len(grid) + m, 0]),
             "test": 100 * float(recorded["test"][r * len(grid) + m, 0]), "anchor": anchor, "extra": extra,
             "cpu": cpu}
            for r, ratio in enumerate(RATIOS) for m in range(len(grid))]
    return pd.DataFrame(rows)


@contextmanager
def whole_windows() -> Iterator[None]:
    """Every ratio trains every penalty open to it (no window around the dense heads' choice)."""
    saved = default.WARM_PENALTY_WINDOW, default.SPARSE_PENALTY_WINDOW
    default.WARM_PENALTY_WINDOW = default.SPARSE_PENALTY_WINDOW = (len(default.concept_penalties()),) * 2
    try:
        yield
    finally:
        default.WARM_PENALTY_WINDOW, default.SPARSE_PENALTY_WINDOW = saved


def compare(case: str, splits: dict, classes: int, seed: int, repeats: int) -> None:
    """The default grid with the window and with every penalty at every ratio, alternated: CPU and test top-1."""
    schedule = Schedule.resolve(splits["train"][0].shape[0], epochs=None, batch_size=None)
    cpu: dict[str, list[float]] = {"window": [], "whole": []}
    top1 = {}
    for _ in range(repeats):
        for name, windows in (("whole", whole_windows), ("window", nullcontext)):
            with windows():
                start = time.process_time()
                fit = fit_default(splits, num_classes=classes, ratios=RATIOS, seed=seed, schedule=schedule)
                cpu[name].append(time.process_time() - start)
            top1[name] = [100 * float(t) for t in fit.test_top1]
    diffs = [a - b for a, b in zip(top1["window"], top1["whole"])]
    ratio = np.median(cpu["whole"]) / np.median(cpu["window"])
    print(f"{case} seed {seed}: CPU whole {' '.join(f'{c:.1f}' for c in cpu['whole'])} s, window "
          f"{' '.join(f'{c:.1f}' for c in cpu['window'])} s: {ratio:.2f}x; test top-1 window minus whole per ratio "
          + " ".join(f"{d:+.2f}" for d in diffs), flush=True)


def choose(group: pd.DataFrame, allowed: np.ndarray) -> float:
    """Test top-1 of val's choice among the allowed penalties (ties: the stronger penalty, as the trainer)."""
    sub = group[allowed]
    return float(sub.iloc[int(np.argmax(sub["val"].to_numpy()))]["test"])


def window_rules() -> dict[str, tuple[int, int, tuple[int, int] | None, bool]]:
    """name -> (below, above, the sparse heads' own (below, above) or None for every penalty,
    shifted inside the grid at its ends)."""
    rules = {}
    for below, above in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 1), (1, 2), (2, 2)]:
        rules[f"-{below}/+{above}"] = (below, above, (below, above), False)
        rules[f"-{below}/+{above}, sparse: all"] = (below, above, None, False)
    for below, above in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        rules[f"-{below}/+{above} shifted"] = (below, above, (below, above), True)
        rules[f"-{below}/+{above} shifted, sparse: all"] = (below, above, None, True)
    # The sparse heads choose stronger penalties than the dense ones: windows reaching further down
    # for them alone.
    for others in [(2, 1), (2, 0), (1, 1)]:
        for sparse in [(2, 0), (3, 1), (3, 0), (4, 0), (9, 1), (9, 0)]:
            rules[f"-{others[0]}/+{others[1]}, sparse: -{sparse[0]}/+{sparse[1]}"] = (*others, sparse, False)
    return rules


def window(anchor: int, below: int, above: int, penalties: int, shifted: bool) -> tuple[int, int]:
    """The penalties ``[first, last]`` around ``anchor``; shifted: the same width at the grid's ends."""
    first, last = anchor - below, anchor + above
    if shifted:
        shift = max(0, -first) - max(0, last - (penalties - 1))
        first, last = first + shift, last + shift
    return max(first, 0), min(last, penalties - 1)


def score(table: pd.DataFrame) -> pd.DataFrame:
    """Per rule and case: the differences to the whole grid's choice (mean, worst, counts beyond
    -0.5 and +0.5 points) and the head-step share."""
    out = []
    for (case, seed), grid in table.groupby(["case", "seed"], sort=False):
        num_inputs, penalties = int(grid["num_inputs"].iloc[0]), int(grid["penalty"].max()) + 1
        # The sparse ratios' strong end (files recorded before it: none); the other ratios never train it.
        extra = int(grid["extra"].iloc[0]) if "extra" in grid and grid["extra"].notna().all() else 0
        if "anchor" in grid and grid["anchor"].notna().all():
            anchor = int(grid["anchor"].iloc[0])
        else:  # files recorded before the anchor column: the dense heads' val in the final evaluation
            anchor = int(np.argmax(grid[grid["keep"] == num_inputs].sort_values("penalty")["val"].to_numpy()))
        for name, (below, above, sparse_window, shifted) in window_rules().items():
            first, last = window(anchor, below, above, penalties, shifted)
            if sparse_window is not None:
                sparse_first, sparse_last = window(anchor, *sparse_window, penalties, shifted)
            diffs, steps, full_steps = [], 0.0, 0.0
            for _, group in grid.groupby("ratio"):
                group = group.sort_values("penalty")
                keep = int(group["keep"].iloc[0])
                dense, sparse = keep == num_inputs, keep <= default.SPARSE_KEEP_FRACTION * num_inputs
                factor = default.SPARSE_EPOCH_FACTOR if sparse else (1.0 if dense else default.WARM_STEP_FRACTION)
                m = group["penalty"].to_numpy()
                allowed = np.ones(len(m), bool)
                whole = np.ones(len(m), bool) if sparse else m >= extra
                allowed = whole
                if not dense and not sparse:
                    allowed = (m >= max(first, extra)) & (m <= last)
                elif sparse and sparse_window is not None:
                    allowed = (m >= sparse_first) & (m <= sparse_last)
                diffs.append(choose(group, allowed) - choose(group, whole))
                steps += factor * allowed.sum()
                full_steps += factor * whole.sum()
            diffs = np.array(diffs)
            out.append({"case": case, "seed": seed, "rule": name, "heads": len(diffs), "sum": diffs.sum(),
                        "worst": diffs.min(), "below": int((diffs < -0.5).sum()), "above": int((diffs > 0.5).sum()),
                        "share": steps / full_steps})
    return pd.DataFrame(out)


def score_strong_end(table: pd.DataFrame) -> pd.DataFrame:
    """Per sparse head of tables recorded with a strong end (``extra`` > 0): test top-1 of val's
    choice in the sparse window (``SPARSE_PENALTY_WINDOW``) with the strong end and without it (the
    window cut at ``CONCEPT_INVERSE_L2``'s strongest), and the heads each trains."""
    out = []
    for (case, seed), grid in table.groupby(["case", "seed"], sort=False):
        num_inputs, penalties = int(grid["num_inputs"].iloc[0]), int(grid["penalty"].max()) + 1
        extra, anchor = int(grid["extra"].iloc[0]), int(grid["anchor"].iloc[0])
        first, last = window(anchor, *default.SPARSE_PENALTY_WINDOW, penalties, False)
        for ratio, group in grid.groupby("ratio"):
            group = group.sort_values("penalty")
            if int(group["keep"].iloc[0]) > default.SPARSE_KEEP_FRACTION * num_inputs:
                continue
            m = group["penalty"].to_numpy()
            with_end = (m >= first) & (m <= last)
            without = with_end & (m >= extra)
            chosen = group[with_end].iloc[int(np.argmax(group["val"].to_numpy()[with_end]))]  # as `choose`
            before = choose(group, without)
            out.append({"case": case, "seed": seed, "ratio": ratio, "dense_choice": f"{group['inverse_l2'].iloc[anchor]:g}",
                        "chosen": f"{chosen['inverse_l2']:g}", "without": before, "with": chosen["test"],
                        "diff": chosen["test"] - before, "heads_without": int(without.sum()),
                        "heads_with": int(with_end.sum())})
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="*", default=[], choices=[*WORKLOADS, *QUICK])
    parser.add_argument("--planted", action="append", default=[], metavar="FIELD=VALUE,...",
                        help="a planted workload of your own (fields of PlantedSpec), recorded as "
                             "planted-custom-<i>; may be given several times")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--stores", nargs="*", default=[])
    parser.add_argument("--libraries", nargs="+", default=["prototype", "cluster"])
    parser.add_argument("--num-concepts", type=int, default=64)
    parser.add_argument("--out", type=Path, help="Parquet file for the recorded heads")
    parser.add_argument("--compare", type=int, metavar="REPEATS", default=0,
                        help="instead of recording: time the window against the whole grid, alternated REPEATS times")
    parser.add_argument("--score", type=Path, nargs="*", default=[], help="recorded files to score, no fitting")
    parser.add_argument("--strong-end", type=float, nargs="*", metavar="C",
                        help="record with these penalties as SPARSE_STRONG_END (none: without one)")
    parser.add_argument("--strong-end-scores", action="store_true",
                        help="score the sparse heads of recorded files with their strong end and without it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if args.strong_end is not None:
        default.SPARSE_STRONG_END = tuple(args.strong_end)
    tables = [pd.read_parquet(p) for p in args.score]
    recorded = []
    named = {**WORKLOADS, **QUICK}
    cases = {name: named[name] for name in args.workloads}
    cases.update({f"planted-custom-{i}": planted_from_text(text) for i, text in enumerate(args.planted)})
    for name, spec in cases.items():
        for seed in args.seeds:
            _, activations, _ = make(spec, seed)
            splits = {k: (x.float(), y) for k, (x, y) in activations.items()}
            if args.compare:
                compare(name, splits, spec.classes, seed, args.compare)
                continue
            recorded.append(record_grid(name, splits, spec.classes, seed))
            log.info("%s seed %d: %.1f CPU-s", name, seed, recorded[-1]["cpu"].iloc[0])
    for store in args.stores:
        for library in args.libraries:
            splits, classes = store_splits(store, library, 0, args.num_concepts)
            recorded.append(record_grid(f"{Path(store).stem}:{library}", splits, classes, 0))
            log.info("%s %s: %.1f CPU-s", store, library, recorded[-1]["cpu"].iloc[0])
    if recorded and args.out:
        pd.concat(recorded).to_parquet(args.out)
    if not tables + recorded:
        return
    table = pd.concat(tables + recorded)
    if args.strong_end_scores:
        scores = score_strong_end(table)
        pd.set_option("display.width", 200)
        print(scores.round(2).to_string())
        for name, part in (("all", scores), ("s = 0.98", scores[scores["ratio"] == 0.98])):
            print(f"{name}: {len(part)} sparse heads, with minus without: mean {part['diff'].mean():+.3f}, worst "
                  f"{part['diff'].min():+.2f}, best {part['diff'].max():+.2f}; heads "
                  f"{part['heads_with'].sum()} against {part['heads_without'].sum()}")
        return
    scores = score(table)
    scores["kind"] = np.where(scores["case"].str.contains(":"), "demo", "workload")
    summary = scores.groupby(["kind", "rule"], sort=False).agg(
        heads=("heads", "sum"), sum=("sum", "sum"), worst=("worst", "min"), below=("below", "sum"),
        above=("above", "sum"), share=("share", "mean"))
    summary.insert(0, "mean", summary.pop("sum") / summary["heads"])
    pd.set_option("display.width", 200)
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
