"""Splitting one library's ratio grid over several Dask tasks, so that idle workers share it.

An analysis of one store and one library is two tasks: the standard head and the library's heads,
the second several times longer. On a cluster with at least twice as many task slots as library
tasks, the grid is split:
one task builds the library, one trains the dense heads that every other ratio's heads start from
(warm starts), each part task projects the store on the library and fits the heads of its ratios
from those dense heads, and the parts are merged where the tables are written
(:func:`iis.analyze.tasks.merge_parts`). A per-ratio library (end2end) is built once per ratio
anyway, and its heads start from zeros: each part builds and fits its own ratios. The heads of a
ratio do not depend on the others', so a split grid fits the same heads (``tests/test_parts.py``).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
from iis.analyze.activations import keep_counts
from iis.analyze.heads_default import sparse_grid_share, sparse_heads, step_factors, warm_penalty_share
from iis.analyze.tasks import STANDARD, TaskSpec, trains_dense_heads


def ratio_costs(ratios: Sequence[float], num_concepts: int, protocol: str, *, warm: bool = False) -> list[float]:
    """Each ratio's share of its grid's training work, in units of one dense ratio's heads.

    The default protocol trains the sparsest heads longer and, with ``warm`` starts, the other
    heads that drop a concept shorter (:func:`~iis.analyze.heads_default.step_factors`, the
    trainer's own rule) and for a window of the penalties only (at most
    :func:`~iis.analyze.heads_default.warm_penalty_share` of them; the same share at every such
    ratio, a smaller one at the sparse ratios); without warm starts every ratio trains every penalty,
    the sparse ones their strong end too. A step costs about the same at every ratio (dense products). With warm
    starts the dense heads (a ratio that keeps every concept) are trained once for the whole grid
    anyway (:func:`task_cost` counts them), so such a ratio costs nothing more. The reference protocol trains
    every ratio alike. (A per-ratio library's build, end2end's training, is about alike at every
    ratio too; the heads' share tips the balance.)
    """
    if protocol == "reference":
        return [1.0] * len(ratios)
    keep = keep_counts(list(ratios), num_concepts)
    costs = step_factors(keep, num_concepts, warm=warm)
    sparse = sparse_heads(keep, num_concepts)
    if warm:
        share = torch.where(sparse, warm_penalty_share(sparse=True), warm_penalty_share())
        costs = torch.where(keep >= num_concepts, 0.0, costs * share)
    else:  # every penalty, the sparse ratios' strong end too
        costs = torch.where(sparse, costs * sparse_grid_share(), costs)
    return costs.tolist()


def task_cost(spec: TaskSpec) -> int:
    """A task's training work in the units of :func:`ratio_costs` (its part's ratios, or all; a
    whole warm-started grid also its dense heads, 1, which a split grid trains once, before its
    parts): the order tasks start in, longest first. The standard head, one head against a
    grid's dozens, counts 0."""
    if spec.library == STANDARD:
        return 0
    warm = trains_dense_heads(spec)
    return round(sum(ratio_costs(spec.fitted_ratios, spec.num_concepts, spec.protocol, warm=warm))
                 + (warm and spec.part is None))


def split_ratios(ratios: Sequence[float], parts: int, *, num_concepts: int, protocol: str,
                 warm: bool = False) -> list[tuple[float, ...]]:
    """``ratios`` in at most ``parts`` groups of about equal cost (:func:`ratio_costs`), each ascending.

    Longest-first greedy: each ratio, costliest first, joins the group with the least cost so far.
    (With ``warm`` starts the dense heads are trained once, before the parts: no group's cost.)
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    costs = ratio_costs(ratios, num_concepts, protocol, warm=warm)
    parts = min(parts, len(ratios))
    heap = [(0.0, g) for g in range(parts)]
    groups: list[list[float]] = [[] for _ in range(parts)]
    for i in sorted(range(len(ratios)), key=lambda i: (-costs[i], i)):
        load, g = heapq.heappop(heap)
        groups[g].append(float(ratios[i]))
        heapq.heappush(heap, (load + costs[i], g))
    return sorted((tuple(sorted(g)) for g in groups if g), key=lambda g: g[0])


def splittable(spec: TaskSpec) -> bool:
    """Whether a task's grid can be split: a library task of two or more ratios."""
    return spec.library != STANDARD and spec.part is None and len(spec.ratios) > 1


def plan_parts(specs: Sequence[TaskSpec], *, slots: int, head_parts: int | None) -> dict[int, list[tuple[float, ...]]]:
    """Which tasks to split, and how: ``{index in specs: [ratios of each part]}``.

    Args:
        specs: the analysis' tasks.
        slots: task slots of the cluster (its workers' threads).
        head_parts: parts per splittable task; None: the slots divided among the splittable tasks,
            rounded down (a grid splits where there are at least twice as many slots as library
            tasks: with fewer, splitting some grids would not end the analysis sooner than the
            longest whole grid); 1: never split.
    """
    candidates = [i for i, spec in enumerate(specs) if splittable(spec)]
    if not candidates:
        return {}
    parts = head_parts if head_parts is not None else slots // len(candidates)
    if parts <= 1:
        return {}
    plan = {}
    for i in candidates:
        spec = specs[i]
        groups = split_ratios(spec.ratios, parts, num_concepts=spec.num_concepts, protocol=spec.protocol,
                              warm=trains_dense_heads(spec))
        if len(groups) > 1:
            plan[i] = groups
    return plan
