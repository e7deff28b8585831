"""Splitting a library's ratio grid over several tasks: the plan, and that the parts' heads are
the whole grid's heads (so a split analysis writes the tables an unsplit one writes:
``tests/test_dask.py::test_split_ratio_grid_matches_synchronous_run``)."""

from __future__ import annotations

from dataclasses import replace

import iis.analyze.heads_default as default
import numpy as np
import pytest
import torch
from iis.analyze.activations import concept_activations
from iis.analyze.heads import fit_dense_heads, fit_heads
from iis.analyze.heads_model import concat_fits
from iis.analyze.parts import plan_parts, ratio_costs, split_ratios, task_cost
from iis.analyze.pipeline import ClusterOptions
from iis.analyze.planted import PlantedSpec, planted_concepts
from iis.analyze.tasks import STANDARD, TaskSpec

GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)


def _spec(library: str, ratios: tuple[float, ...] = GRID, **kw) -> TaskSpec:
    return TaskSpec(store="/stores/m0.zarr", library=library, seed=0, num_concepts=200, ratios=ratios, **kw)


def test_ratio_costs_follow_the_trainers_schedules():
    # keep <= 10% of 200 concepts from s = 0.9 on: those heads train twice the steps, for the 6
    # penalties of CONCEPT_INVERSE_L2 and the 2 of their strong end.
    assert (len(default.CONCEPT_INVERSE_L2), len(default.SPARSE_STRONG_END)) == (6, 2)
    assert ratio_costs(GRID, 200, "default") == pytest.approx([1, 1, 1, 1, 1, 8 / 3, 8 / 3, 8 / 3])
    assert ratio_costs(GRID, 200, "reference") == [1] * 8
    # Warm-started: the dense heads (s = 0) are trained once for the grid (counted once, in the
    # whole task's cost), the other non-sparse heads train 3/4 of the schedule, and every other
    # ratio trains at most 4 penalties (a window around the dense heads' choice; the sparse ones'
    # window reaches one further down, into their strong end, and has none weaker).
    assert default.WARM_STEP_FRACTION == 0.75
    assert (default.WARM_PENALTY_WINDOW, default.SPARSE_PENALTY_WINDOW) == ((2, 1), (3, 0))
    assert ratio_costs(GRID, 200, "default", warm=True) == pytest.approx([0] + [0.5] * 4 + [4 / 3] * 3)
    # Tasks start longest first: the whole grid, then its parts, then the standard head.
    assert task_cost(_spec("prototype")) == 7  # 1 (dense heads) + 4 x 0.5 + 3 x 4/3
    assert task_cost(_spec("prototype", part=(0.3, 0.9, 0.98))) == 3  # 0.5 + 8/3 (the dense heads train before)
    assert task_cost(_spec("prototype", protocol="reference")) == 8
    assert task_cost(_spec("end2end")) == 13  # one library per ratio: every head from zeros (5 + 3 x 8/3)
    assert task_cost(_spec(STANDARD)) == 0


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8, 20])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_split_covers_the_grid_once_in_balanced_ascending_parts(parts, warm):
    groups = split_ratios(GRID, parts, num_concepts=200, protocol="default", warm=warm)
    assert len(groups) == min(parts, len(GRID))
    assert sorted(r for g in groups for r in g) == list(GRID)
    assert all(list(g) == sorted(g) for g in groups)
    cost = dict(zip(GRID, ratio_costs(GRID, 200, "default", warm=warm)))
    loads = [sum(cost[r] for r in g) for g in groups]
    # Greedy longest-first is within the largest single cost of a perfect balance.
    assert max(loads) - min(loads) <= 2
    if parts == 2:
        assert sorted(loads) == pytest.approx([17 / 6, 19 / 6] if warm else [19 / 3, 20 / 3])


def test_plan_splits_only_when_slots_would_idle():
    specs = [_spec(STANDARD), _spec("prototype")]
    assert plan_parts(specs, slots=2, head_parts=None) == {1: split_ratios(GRID, 2, num_concepts=200,
                                                                           protocol="default", warm=True)}
    assert len(plan_parts(specs, slots=16, head_parts=None)[1]) == 8  # never more parts than ratios
    # Two library tasks on two slots keep both busy already; head_parts 1 turns splitting off.
    assert plan_parts([*specs, _spec("cluster")], slots=2, head_parts=None) == {}
    assert plan_parts(specs, slots=8, head_parts=1) == {}
    assert set(plan_parts([*specs, _spec("cluster")], slots=2, head_parts=3)) == {1, 2}
    # A per-ratio library (built once per ratio anyway) splits too; one ratio cannot; no slots, no split.
    assert len(plan_parts([_spec("end2end")], slots=8, head_parts=None)[0]) == 8
    assert plan_parts([_spec("prototype", ratios=(0.5,))], slots=8, head_parts=None) == {}
    assert plan_parts(specs, slots=0, head_parts=None) == {}


def test_part_keys_are_distinct_dask_keys():
    spec = _spec("prototype")
    groups = split_ratios(GRID, 3, num_concepts=200, protocol="default")
    labelled = {replace(spec, part=g, part_label=f"{j + 1}of3").key for j, g in enumerate(groups)}
    assert len(labelled | {spec.key}) == 4 and spec.key + "-part1of3" in labelled
    # Without a label the ratios name the part, in full: ratios alike to six digits stay apart.
    near = _spec("prototype", ratios=(0.1234561, 0.1234562))
    assert replace(near, part=(0.1234561,)).key != replace(near, part=(0.1234562,)).key


def test_head_parts_must_be_a_positive_count():
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="head_parts must be a positive integer"):
            ClusterOptions(head_parts=bad)
    assert ClusterOptions(head_parts=None).head_parts is None


@pytest.mark.parametrize("protocol", ["default", "reference"])
def test_parts_fit_the_heads_of_the_whole_grid(protocol):
    """Each head sees the same batches whatever heads train beside it: the parts' heads, joined,
    are the whole grid's heads, bit for bit."""
    spec = PlantedSpec(n_train=1200, n_val=300, n_test=300, dim=48, classes=6, concepts=30, per_class=3)
    features, directions = planted_concepts(spec, 0)
    splits = {name: (concept_activations(z, directions), y) for name, (z, y) in features.items()}
    ratios = [0.0, 0.5, 0.9, 0.95]
    kw = dict(num_classes=spec.classes, seed=3, protocol=protocol,
              max_epochs=2 if protocol == "reference" else None)
    whole = fit_heads(**splits, ratios=ratios, **kw)
    parts = [fit_heads(**splits, ratios=part, **kw) for part in ([0.5, 0.95], [0.0, 0.9])]
    joined = concat_fits(parts)
    assert joined.ratios == ratios
    for name in ("weight", "bias", "input_scale"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    for name in ("val_top1", "test_top1", "test_correct", "test_pred", "active_concepts", "best_epoch"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name), err_msg=name)
    assert len(set(whole.test_top1)) > 1  # the heads differ: a mix-up of ratios would show
    with pytest.raises(ValueError, match="overlap"):
        concat_fits([parts[0], parts[0]])
    if protocol == "reference":
        return
    # The dense heads trained once and shared by the parts (as a split analysis does): the same
    # heads again, a part of the dense ratio alone included.
    dense = fit_dense_heads(train=splits["train"], num_classes=spec.classes, seed=3, protocol=protocol)
    shared = concat_fits([fit_heads(**splits, ratios=part, dense_heads=dense, **kw)
                          for part in ([0.5, 0.95], [0.9], [0.0])])
    for name in ("weight", "bias", "input_scale"):
        assert torch.equal(getattr(shared, name), getattr(whole, name)), name
    np.testing.assert_array_equal(shared.test_correct, whole.test_correct)


def test_shared_dense_heads_are_refused_for_another_fit():
    """Dense heads trained on other inputs or settings would start every other ratio from the wrong
    place: each mismatch is refused by name."""
    spec = PlantedSpec(n_train=600, n_val=200, n_test=200, dim=40, classes=5, concepts=24, per_class=3)
    features, directions = planted_concepts(spec, 1)
    splits = {name: (concept_activations(z, directions), y) for name, (z, y) in features.items()}
    dense = fit_dense_heads(train=splits["train"], num_classes=5, seed=0, max_epochs=1)
    kw = dict(num_classes=5, ratios=[0.5], max_epochs=1, dense_heads=dense)
    x, y = splits["train"]
    with pytest.raises(ValueError, match="other train activations"):
        fit_heads(**{**splits, "train": (x, y.roll(1))}, seed=0, **kw)
    with pytest.raises(ValueError, match="seed"):
        fit_heads(**splits, seed=1, **kw)
    with pytest.raises(ValueError, match="schedule"):
        fit_heads(**splits, seed=0, **{**kw, "max_epochs": 2})
    with pytest.raises(ValueError, match="learnt scale"):
        fit_heads(**splits, seed=0, protocol="fixed-scale", **kw)
    with pytest.raises(ValueError, match="does not start from them"):
        fit_heads(**splits, seed=0, warm_start=False, **kw)
    with pytest.raises(ValueError, match="no dense heads"):
        fit_dense_heads(train=splits["train"], num_classes=5, seed=0, protocol="reference")
    fit_heads(**splits, seed=0, **kw)  # the matching fit is accepted
