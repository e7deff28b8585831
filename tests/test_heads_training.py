"""The default head trainer's numerics: its hand-written gradients and Adam step, its convergence,
and the learnt per-concept scale that lets a sparse head choose its concepts (METHOD.md, step 3)."""

from __future__ import annotations

import iis.analyze.heads_default as default
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from iis.analyze.activations import concept_activations, keep_count, keep_mask, magnitude_ranks
from iis.analyze.heads import fit_heads
from iis.analyze.heads_default import Adam, cross_entropy_grads, head_grid_inputs
from iis.analyze.planted import PlantedSpec, planted_concepts


@pytest.mark.parametrize("classes", [5, 40])  # narrow and wide heads
def test_closed_form_gradients_match_autograd(classes):
    g = torch.Generator().manual_seed(0)
    heads, batch, width = 3, 32, 12
    x = torch.randn(batch, width, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    keep = torch.tensor([12, 6, 2])
    scale = torch.stack([1 + 0.3 * torch.randn(heads, width, generator=g), 0.2 * torch.randn(heads, width, generator=g)], 1)
    weight = torch.randn(heads, width, classes, generator=g)
    bias = torch.randn(heads, 1, classes, generator=g)

    inputs, mask = head_grid_inputs(x, scale, keep)
    d_weight, d_bias, d_inputs = cross_entropy_grads(inputs, y, weight.transpose(1, 2).contiguous(),
                                                     bias.transpose(1, 2).contiguous(), classes)
    d_weight, d_bias = d_weight.transpose(1, 2), d_bias.transpose(1, 2)  # the trainer holds them classes-first
    d_tilde = d_inputs * mask
    d_scale = torch.stack([(d_tilde * x).sum(1), d_tilde.sum(1)], 1)

    params = [t.clone().requires_grad_() for t in (weight, bias, scale)]
    tilde = params[2][:, 1:2] + params[2][:, 0:1] * x  # (H, B, K)
    logits = torch.baddbmm(params[1], tilde * mask, params[0])
    loss = sum(F.cross_entropy(logits[h], y) for h in range(heads))
    loss.backward()
    for ours, reference in zip((d_weight, d_bias, d_scale), params):
        torch.testing.assert_close(ours, reference.grad, atol=1e-5, rtol=1e-4)
    # The mask keeps exactly k(s) entries per row, the largest |γx + β|.
    assert mask.sum(-1).tolist() == [[12] * batch, [6] * batch, [2] * batch]
    assert torch.equal(mask[2].bool(), tilde[2].detach().abs().topk(2, dim=1).indices.new_zeros(batch, width, dtype=torch.bool)
                       .scatter_(1, tilde[2].detach().abs().topk(2, dim=1).indices, True))


def test_closed_form_gradients_of_several_column_blocks_match_autograd():
    """The standard head holds one block of C classes per (C, learning rate) option in one weight
    (``(H, L*C, K)``): each block is a softmax of its own, with its own one-hot entries. Without a
    learnt (γ, β) the input gradient is not computed at all."""
    g = torch.Generator().manual_seed(4)
    heads, blocks, classes, batch, width = 2, 3, 7, 20, 5
    x = torch.randn(heads, batch, width, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    weight = torch.randn(heads, blocks * classes, width, generator=g)
    bias = torch.randn(heads, blocks * classes, 1, generator=g)
    d_weight, d_bias, d_inputs = cross_entropy_grads(x, y, weight, bias, classes, input_grad=False)
    assert d_inputs is None
    params = [t.clone().requires_grad_() for t in (weight, bias)]
    logits = torch.baddbmm(params[1], params[0], x.transpose(1, 2))  # (H, L*C, B)
    loss = sum(F.cross_entropy(logits[h, b * classes:(b + 1) * classes].T, y)
               for h in range(heads) for b in range(blocks))
    loss.backward()
    torch.testing.assert_close(d_weight, params[0].grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(d_bias, params[1].grad, atol=1e-5, rtol=1e-4)


def test_dense_heads_take_no_mask():
    """Heads that keep every concept (trained first, on their own) skip the mask: their inputs are
    ``ã`` itself, as the masked path gives them."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, generator=g)
    scale = torch.stack([1 + 0.3 * torch.randn(2, 6, generator=g), 0.2 * torch.randn(2, 6, generator=g)], 1)
    inputs, mask = head_grid_inputs(x, scale, torch.tensor([6, 6]))
    assert mask is None
    masked, ones = head_grid_inputs(x, scale, torch.tensor([6, 5]))
    assert torch.equal(inputs[0], masked[0]) and bool(ones[0].eq(1).all())
    shared, mask = head_grid_inputs(x, None, torch.tensor([6, 6]))
    assert mask is None and shared.shape == (2, 16, 6) and torch.equal(shared[1], x)


def test_keep_mask_shared_values_broadcast_over_heads():
    values = torch.tensor([[[0.1, -3.0, 2.0, 0.5]]])  # (1, 1, 4)
    mask = keep_mask(values, torch.tensor([4, 2, 1]))
    assert mask.tolist() == [[[True] * 4], [[False, True, True, False]], [[False, True, False, False]]]


def test_keep_mask_equals_ranks_and_breaks_ties_by_lower_index():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-3, 4, (500, 12), generator=g).float()  # many exact ties, zeros included
    for keep in range(1, 13):
        mask = keep_mask(values, keep)
        assert torch.equal(mask, magnitude_ranks(values) < keep), keep
        assert (mask.sum(1) == keep).all()


def test_keep_mask_of_stacked_heads_equals_ranks_per_head():
    # Heads with their own values and counts, some keeping every entry (no sort), with exact ties.
    g = torch.Generator().manual_seed(2)
    values = torch.randint(-2, 3, (5, 300, 9), generator=g).float()
    counts = torch.tensor([9, 4, 9, 1, 8])
    for as_float in (False, True):
        mask = keep_mask(values, counts, as_float=as_float)
        assert mask.dtype == (torch.float32 if as_float else torch.bool)
        expected = magnitude_ranks(values.view(-1, 9)).view(5, 300, 9) < counts.view(-1, 1, 1)
        assert torch.equal(mask.bool(), expected)


def test_keep_mask_in_float64_keeps_its_own_threshold():
    # 0.3 is the largest magnitude; rounded to float32 it would compare above itself and drop out.
    values = torch.tensor([[0.1, 0.3, 0.2]], dtype=torch.float64)
    assert keep_mask(values, 1).tolist() == [[False, True, False]]
    assert keep_mask(values, 2).tolist() == [[False, True, True]]


@pytest.mark.parametrize("shared", [False, True], ids=["own-values", "shared-values"])
def test_keep_mask_torch_path_equals_numpy_path(shared):
    """Values numpy cannot sort (bfloat16 here; CUDA tensors in fine-tuning) take torch's sort on
    their device; the mask is the same, ties included (bfloat16 rounds many values together)."""
    g = torch.Generator().manual_seed(3)
    values = torch.randn(1 if shared else 4, 200, 16, generator=g).bfloat16()
    counts = torch.tensor([3, 16, 1, 9])  # a dense head in the middle: the sorted heads are not a range
    as_float = keep_mask(values, counts, as_float=True)
    assert as_float.dtype == torch.float32
    expected = keep_mask(values.float(), counts)
    assert torch.equal(keep_mask(values, counts), expected)
    assert torch.equal(as_float.bool(), expected)
    assert (expected.sum(-1) == counts.view(-1, 1)).all()


def test_adam_step_matches_torch_adam_with_l2():
    g = torch.Generator().manual_seed(1)
    param = torch.randn(2, 4, 3, generator=g)
    ours = Adam([param.clone()], [torch.tensor(0.05)], [0.1])
    theirs = param.clone().requires_grad_()
    torch_adam = torch.optim.Adam([theirs], lr=0.05, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(2, 4, 3, generator=g)
        ours.step([grad], torch.tensor(1.0), slice(0, 2))
        theirs.grad = grad.clone()
        torch_adam.step()
        torch.testing.assert_close(ours.params[0], theirs.detach(), atol=1e-6, rtol=1e-5)
    # Updating a subset of heads (an index tensor: gather, update, scatter) leaves the others alone.
    before = ours.params[0].clone()
    ours.step([torch.ones(1, 4, 3)], torch.tensor(1.0), torch.tensor([1]))
    assert torch.equal(ours.params[0][0], before[0]) and not torch.equal(ours.params[0][1], before[1])


def _planted_activations(seed: int = 0, **overrides):
    spec = PlantedSpec(n_train=3000, n_val=600, n_test=1500, dim=96, classes=10, concepts=60, per_class=3,
                       **overrides)
    features, directions = planted_concepts(spec, seed)
    return {name: (concept_activations(z, directions), y) for name, (z, y) in features.items()}, spec


def test_learnt_scale_chooses_the_informative_concepts_at_high_sparsity():
    """The class signal lies in a few quiet concepts; loud distractors fire on every image. A fixed
    standardisation keeps the loudest entries, the learnt scale keeps the informative ones."""
    splits, spec = _planted_activations(distractors=0.4, distractor_std=2.5)
    ratios = [0.0, 0.95]
    assert keep_count(0.95, spec.concepts) == 3
    learnt = fit_heads(**splits, num_classes=spec.classes, ratios=ratios, seed=0)
    fixed = fit_heads(**splits, num_classes=spec.classes, ratios=ratios, seed=0, protocol="fixed-scale")
    assert learnt.test_top1[1] > fixed.test_top1[1] + 0.15
    assert abs(learnt.test_top1[0] - fixed.test_top1[0]) < 0.05  # nothing to choose when all are kept
    # What it learnt: a scale that differs between concepts (the fixed model's is 1 everywhere).
    assert learnt.input_scale[1, 0].std() > 0.05


def _objective(x, y, keep, weight, bias, scale, num_train, inverse_l2):
    inputs = head_grid_inputs(x, None if scale is None else scale.unsqueeze(0), torch.tensor([keep]))[0][0]
    ce = F.cross_entropy(inputs @ weight + bias, y)
    kept_fraction = keep / x.shape[1]  # the penalty scales with the fraction of concepts kept
    return ce + kept_fraction * weight.square().sum() / (2 * inverse_l2 * num_train)


def _lbfgs_minimum(x, y, keep, params, scale, inverse_l2) -> float:
    """Full-batch L-BFGS on the penalised objective from ``params`` (updated in place); its value."""
    lbfgs = torch.optim.LBFGS(params, lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = _objective(x, y, keep, *params, scale, len(y), inverse_l2)
        loss.backward()
        return loss

    lbfgs.step(closure)
    return float(closure().detach())


@pytest.mark.parametrize("learn_scale", [True, False], ids=["learnt-scale", "fixed"])
def test_default_heads_reach_the_lbfgs_optimum_of_their_objective(learn_scale):
    """From each head's final state, full-batch L-BFGS on the same penalised objective (the train
    mean cross-entropy plus the L2 term on W) can barely lower it, and the val loss it reaches is
    the head's own to within a small tolerance. With the learnt scale, (γ, β) and so the kept
    concepts stay as learnt: unpenalised, γ could grow while W shrinks, lowering the L2 term at
    no cost to the fit, so the convex part given the selection is what converges."""
    splits, spec = _planted_activations(seed=1)
    ratios = [0.0, 0.5, 0.9]
    fit = fit_heads(**splits, num_classes=spec.classes, ratios=ratios, seed=0,
                    protocol="default" if learn_scale else "fixed-scale")
    for ratio, gap, ours_val, best_val in _distance_to_lbfgs(fit, splits, spec, ratios):
        assert gap < 0.01, (ratio, gap)  # nats of penalised train loss
        assert ours_val < best_val + 0.01, (ratio, ours_val, best_val)


@pytest.mark.parametrize("inverse_l2", [0.1, 1.0])
def test_weakly_penalised_heads_reach_their_optimum_too(monkeypatch, inverse_l2):
    """A weak penalty's optimum lies far from the origin: at the strong penalties' learning rate
    the C = 0.1 heads stopped 0.004-0.007 nats short of it on this workload (and several points
    of top-1 short on trained networks' stores). Their own, faster rate gets them there, and so
    for the grid's weakest penalty."""
    assert inverse_l2 in default.CONCEPT_INVERSE_L2
    monkeypatch.setattr(default, "CONCEPT_INVERSE_L2", (inverse_l2,))
    monkeypatch.setattr(default, "SPARSE_STRONG_END", ())  # every head of this one penalty
    splits, spec = _planted_activations(seed=1)
    ratios = [0.0, 0.5, 0.9]
    fit = fit_heads(**splits, num_classes=spec.classes, ratios=ratios, seed=0)
    assert fit.learning_rate.tolist() == [default.CONCEPT_LRS[0] * default.concept_lr_factor(inverse_l2)] * 3
    for ratio, gap, _, _ in _distance_to_lbfgs(fit, splits, spec, ratios):
        assert gap < 0.002, (ratio, gap)


@pytest.mark.parametrize("learn_scale", [True, False], ids=["learnt-scale", "fixed"])
def test_heads_start_from_the_dense_head_of_their_penalty(monkeypatch, learn_scale):
    """With warm starts, a head that drops a concept starts where the dense head (every concept
    kept) of its penalty ended. Cut its own schedule to one step, and the s = 0.1 head (90% of the
    concepts kept) is still about as good as the dense one; started from zeros, one step is not
    enough to learn anything. The dense heads are the grid's s = 0 heads, trained on the whole
    schedule; a sparse head keeps its own, longer schedule."""
    monkeypatch.setattr(default, "WARM_STEP_FRACTION", 1e-9)  # rounds to one step
    splits, spec = _planted_activations(seed=2)
    ratios = [0.0, 0.1, 0.95]
    protocol = "default" if learn_scale else "fixed-scale"
    warm = fit_heads(**splits, num_classes=spec.classes, ratios=ratios, seed=0, protocol=protocol)
    schedule = default.Schedule.resolve(len(splits["train"][1]), epochs=None, batch_size=None)
    cold = default.fit_default(splits, num_classes=spec.classes, ratios=[0.1], seed=0, learn_scale=learn_scale,
                               schedule=default.Schedule(steps=1, batch_size=schedule.batch_size), warm_start=False)
    assert warm.test_top1[1] > warm.test_top1[0] - 0.03
    assert warm.test_top1[1] > cold.test_top1[0] + 0.2
    steps_per_epoch = -(-len(splits["train"][1]) // schedule.batch_size)
    assert warm.best_epoch.tolist() == [(schedule.steps - 1) // steps_per_epoch, 0,
                                        (default.SPARSE_EPOCH_FACTOR * schedule.steps - 1) // steps_per_epoch]


def _distance_to_lbfgs(fit, splits, spec, ratios):
    """Per head: ``(ratio, train objective above its L-BFGS optimum, its val loss, the optimum's
    val loss)``, the optimum taken with (γ, β) and so the kept concepts as the head learnt them."""
    (x, y), (x_val, y_val) = splits["train"], splits["val"]
    out = []
    for r, ratio in enumerate(ratios):
        keep = keep_count(ratio, spec.concepts)
        scale = None if fit.input_scale is None else fit.input_scale[r].clone()
        params = [fit.weight[r].clone().requires_grad_(), fit.bias[r].clone().requires_grad_()]
        inverse_l2 = float(fit.inverse_l2[r])  # the head's own penalty, chosen on val
        start = float(_objective(x, y, keep, *params[:2], scale, len(y), inverse_l2).detach())
        optimum = _lbfgs_minimum(x, y, keep, params, scale, inverse_l2)
        with torch.no_grad():
            ours_val = F.cross_entropy(fit.logits(x_val, r), y_val)
            inputs = head_grid_inputs(x_val, None if scale is None else scale.unsqueeze(0), torch.tensor([keep]))[0][0]
            best_val = F.cross_entropy(inputs @ params[0] + params[1], y_val)
        out.append((ratio, start - optimum, float(ours_val), float(best_val)))
    return out


def _subnormals_flushed() -> bool:
    """Whether float32 arithmetic on this thread flushes subnormals (1e-40 is one) to zero."""
    return float((torch.tensor([1e-40]) * 1.0).item()) == 0.0


def test_trainer_flushes_subnormals_while_it_trains_and_restores_the_default(monkeypatch):
    """A confident head's softmax holds subnormal probabilities, which slow its gradient matmuls
    several times on x86 (benchmarks/README.md, "subnormals.py"): the trainer flushes them
    while it trains, and leaves torch's default (off) behind."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    assert not _subnormals_flushed()
    seen = []
    grads = default.cross_entropy_grads

    def probe(*args, **kwargs):
        seen.append(_subnormals_flushed())
        return grads(*args, **kwargs)

    monkeypatch.setattr(default, "cross_entropy_grads", probe)
    splits, spec = _planted_activations()
    fit_heads(**splits, num_classes=spec.classes, ratios=[0.0, 0.9], seed=0, max_epochs=1)
    fit_heads(**splits, num_classes=spec.classes, ratios=None, seed=0, max_epochs=1)  # the standard head too
    assert seen and all(seen)
    assert not _subnormals_flushed()


def test_non_finite_inputs_and_out_of_range_labels_are_refused():
    splits, spec = _planted_activations()
    x, y = splits["train"]
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fit_heads(train=(bad, y), val=splits["val"], test=splits["test"], num_classes=spec.classes, ratios=[0.5], seed=0)
    with pytest.raises(ValueError, match="train: label -1 at row .* is negative"):
        fit_heads(train=(x, torch.where(y == 0, -1, y)), val=splits["val"], test=splits["test"],
                  num_classes=spec.classes, ratios=[0.5], seed=0)
    assert np.isfinite(fit_heads(**splits, num_classes=spec.classes, ratios=[0.5], seed=0, max_epochs=1).test_top1).all()


def test_non_finite_rows_are_counted_block_by_block_and_overflowing_sums_are_not_flagged():
    """The check sums a block of rows before looking at its entries: rows with NaN, +inf or -inf in
    any block are counted exactly, and finite values whose sum overflows float32 are not flagged."""
    from iis.analyze.heads import _non_finite_rows
    from iis.analyze.heads_batching import EVAL_CHUNK

    x = torch.randn(2 * EVAL_CHUNK + 100, 6)
    assert _non_finite_rows(x) == 0
    x[EVAL_CHUNK + 5] = 3e38  # finite, but the block's float32 sum is inf
    x[7, 2], x[EVAL_CHUNK + 9, 0], x[2 * EVAL_CHUNK + 50, 5] = float("nan"), float("inf"), float("-inf")
    x[2 * EVAL_CHUNK + 51, :2] = float("inf")  # one row, two entries
    assert _non_finite_rows(x) == 4
    assert _non_finite_rows(x.double()) == 4
    assert _non_finite_rows(x.clamp(-1e4, 1e4).half()) == 1  # the infinities clamp; the NaN stays
    assert _non_finite_rows(torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).half()) == 1  # 3e38: float16 inf
    y = torch.zeros(x.shape[0], dtype=torch.int64)
    with pytest.raises(ValueError, match="train: 4 row"):
        fit_heads(train=(x, y), val=(x[:10].nan_to_num(), y[:10]), test=(x[:10].nan_to_num(), y[:10]),
                  num_classes=2, ratios=None, seed=0)


def test_val_top1_of_many_heads_is_the_same_in_blocks_of_any_size(monkeypatch):
    """Many heads are evaluated on val in blocks of rows sized to bound the (H, rows, K) temporaries;
    the counts do not depend on the block size (blocks of 7 rows, a last block short, against one)."""
    import iis.analyze.heads_batching as batching

    splits, spec = _planted_activations()
    x_val, y_val = splits["val"]
    g = torch.Generator().manual_seed(0)
    heads, k = 12, spec.concepts
    weight, bias = torch.randn(heads, spec.classes, k, generator=g), torch.randn(heads, spec.classes, 1, generator=g)
    affine = torch.stack([1 + 0.3 * torch.randn(heads, k, generator=g), 0.1 * torch.randn(heads, k, generator=g)], 1)
    keep = torch.tensor([k, 30, 6, 3] * 3)
    args = dict(prep_val=x_val, y_val=y_val, num_classes=spec.classes, standard=False)
    assert batching.stacked_eval_rows(heads, k) >= x_val.shape[0]  # one block
    whole = default._val_top1(weight, bias, affine, keep, **args)
    monkeypatch.setattr(batching, "EVAL_STACK_ENTRIES", 7 * heads * k)
    assert batching.stacked_eval_rows(heads, k) == 7 and x_val.shape[0] % 7 != 0
    torch.testing.assert_close(default._val_top1(weight, bias, affine, keep, **args), whole, rtol=0, atol=0)
    assert 0.0 < float(whole.min()) and float(whole.max()) < 1.0


def test_keep_mask_caches_threshold_indices_for_batches_only():
    """A trainer's batch-sized calls reuse their threshold indices; a split-sized call computes
    them without caching them (megabytes an entry), and both equal the ranks' selection."""
    from iis.analyze import activations

    activations._threshold_index.cache_clear()
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(3, 64, 10, generator=generator)
    keep = torch.tensor([7, 3, 1])
    for _ in range(2):
        mask = keep_mask(batch, keep)
    assert activations._threshold_index.cache_info().hits == 1
    for h in range(3):
        assert torch.equal(mask[h], magnitude_ranks(batch[h]) < keep[h])
    split = torch.randn(activations._CACHED_INDEX_ENTRIES + 1, 10, generator=generator)
    assert torch.equal(keep_mask(split, 4), magnitude_ranks(split) < 4)
    assert activations._threshold_index.cache_info().currsize == 1
