"""The head trainer (iis.analyze.heads): both protocols, on tiny synthetic data, CPU only."""

from __future__ import annotations

import iis.analyze.heads_default as default
import iis.analyze.heads_reference as reference
import numpy as np
import pytest
import torch
from iis.analyze.activations import keep_count, keep_counts
from iis.analyze.heads import fit_heads


def _blobs(seed: int, n: int, *, dim: int = 16, classes: int = 4, spread: float = 0.3):
    """Well-separated Gaussian classes: ``(n, dim)`` float32 features and ``(n,)`` labels."""
    g = torch.Generator().manual_seed(1234)  # the class means are shared by every split
    means = torch.randn(classes, dim, generator=g) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + spread * torch.randn(n, dim, generator=g), y


def _splits(n_train: int = 400, n_val: int = 150, n_test: int = 200, **kw):
    return {"train": _blobs(1, n_train, **kw), "val": _blobs(2, n_val, **kw), "test": _blobs(3, n_test, **kw)}


def _buried_signal(seed: int, n: int):
    """4 informative columns of magnitude <= 0.6, and 16 pure-noise columns of magnitude >= 1.

    ``g_s`` keeps the largest magnitudes, so once ``k(s) <= 16`` it keeps noise only.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    signal = torch.full((n, 4), -0.5)
    signal[torch.arange(n), y] = 0.5
    signal += 0.05 * torch.randn(n, 4, generator=g)
    noise = torch.randn(n, 16, generator=g)
    noise = noise.sign() * (1 + noise.abs())
    return torch.cat([signal, noise], dim=1), y


def test_standard_head_separates_separable_classes():
    fit = fit_heads(**_splits(), num_classes=4, ratios=None, seed=0)
    assert fit.ratios is None
    assert fit.weight.shape == (1, 16, 4) and fit.bias.shape == (1, 4)
    assert fit.test_top1[0] == 1.0 and fit.val_top1[0] == 1.0
    assert fit.active_concepts.tolist() == [16]
    assert fit.test_correct.shape == (1, 200) and fit.test_correct.dtype == bool
    assert fit.test_pred.dtype == np.int64
    assert fit.input_scale is None


def test_fixed_standardisation_keeps_only_noise_once_k_is_small():
    """With γ = 1, β = 0 (the option), g_s keeps the largest raw magnitudes: noise only here."""
    splits = {name: _buried_signal(seed, n) for name, seed, n in (("train", 1, 600), ("val", 2, 200), ("test", 3, 400))}
    ratios = [0.0, 0.5, 0.8, 0.95]
    assert [keep_count(r, 20) for r in ratios] == [20, 10, 4, 1]
    fit = fit_heads(**splits, num_classes=4, ratios=ratios, seed=0, protocol="fixed-scale")
    assert fit.input_scale is None
    assert fit.weight.shape == (4, 20, 4)
    assert fit.test_top1[0] > 0.95  # everything kept: the signal columns are there
    assert fit.test_top1[1] < 0.4 and fit.test_top1[2] < 0.4 and fit.test_top1[3] < 0.4  # chance is 0.25
    # Only the 16 noise columns ever survive g_s at s >= 0.5; at s = 0 all 20 do.
    assert fit.active_concepts.tolist() == [20, 16, 16, 16]


def test_fit_is_deterministic_given_the_seed():
    splits = {name: _buried_signal(seed, n) for name, seed, n in (("train", 1, 300), ("val", 2, 100), ("test", 3, 100))}
    first = fit_heads(**splits, num_classes=4, ratios=[0.0, 0.5], seed=7, max_epochs=3)
    again = fit_heads(**splits, num_classes=4, ratios=[0.0, 0.5], seed=7, max_epochs=3)
    other = fit_heads(**splits, num_classes=4, ratios=[0.0, 0.5], seed=8, max_epochs=3)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    assert np.array_equal(first.test_pred, again.test_pred)
    assert not torch.equal(first.weight, other.weight)  # the seed drives the shuffling


def test_heads_trained_together_match_heads_trained_alone():
    splits = {name: _buried_signal(seed, n) for name, seed, n in (("train", 1, 300), ("val", 2, 100), ("test", 3, 100))}
    together = fit_heads(**splits, num_classes=4, ratios=[0.0, 0.8], seed=3, max_epochs=5)
    for r, ratio in enumerate([0.0, 0.8]):
        alone = fit_heads(**splits, num_classes=4, ratios=[ratio], seed=3, max_epochs=5)
        torch.testing.assert_close(together.weight[r], alone.weight[0], atol=1e-5, rtol=1e-4)
        assert together.best_epoch[r] == alone.best_epoch[0]
        assert together.val_top1[r] == alone.val_top1[0]


def test_sparsest_heads_train_longer_and_order_does_not_matter(monkeypatch):
    """Heads keeping <= 10% of the inputs train _SPARSE_EPOCH_FACTOR times the epochs, on their own
    schedule; with the ratios out of order, the long heads are not contiguous (the gather/scatter
    update path), and every head still equals the same head trained alone."""
    splits = {name: _buried_signal(seed, n) for name, seed, n in (("train", 1, 300), ("val", 2, 100), ("test", 3, 100))}
    ratios = [0.95, 0.0, 0.9]  # keep 1, 20 and 2 of 20: the first and last train longer
    together = fit_heads(**splits, num_classes=4, ratios=ratios, seed=3, max_epochs=3)
    for r, ratio in enumerate(ratios):
        alone = fit_heads(**splits, num_classes=4, ratios=[ratio], seed=3, max_epochs=3)
        torch.testing.assert_close(together.weight[r], alone.weight[0], atol=1e-5, rtol=1e-4)
        assert together.best_epoch[r] == alone.best_epoch[0]
    monkeypatch.setattr(default, "SPARSE_EPOCH_FACTOR", 1)
    short = fit_heads(**splits, num_classes=4, ratios=ratios, seed=3, max_epochs=3)
    torch.testing.assert_close(short.weight[1], together.weight[1])  # the dense head is untouched
    assert not torch.allclose(short.weight[0], together.weight[0])  # the sparse ones trained longer
    assert not torch.allclose(short.weight[2], together.weight[2])


def _spy_on_val_evaluations(monkeypatch) -> list[torch.Tensor]:
    """Record every ``(H, L)`` val top-1 tensor the default protocol computes."""
    seen: list[torch.Tensor] = []
    original = default._val_top1

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(default, "_val_top1", spy)
    return seen


def test_each_ratio_keeps_the_penalty_best_on_val(monkeypatch):
    """Every ratio trains one head per C of the grid (here the three-value grid's window is all of
    it, or all but the weakest); the one kept has the best val top-1 of its ratio's trained heads
    (ties: the first, the strongest penalty), and its penalty is scaled by the fraction of concepts
    the ratio keeps."""
    seen = _spy_on_val_evaluations(monkeypatch)
    grid = (1e-4, 1e-2, 1e2)  # a 10^6 spread: the heads of a ratio differ
    monkeypatch.setattr(default, "CONCEPT_INVERSE_L2", grid)
    monkeypatch.setattr(default, "SPARSE_STRONG_END", ())  # its own test: below
    splits = {name: _buried_signal(seed, n) for name, seed, n in (("train", 1, 300), ("val", 2, 100), ("test", 3, 100))}
    ratios = [0.0, 0.5, 0.9]
    fit = fit_heads(**splits, num_classes=4, ratios=ratios, seed=3, max_epochs=4)
    # Two evaluations: the dense heads' (their choice sets the other ratios' penalty window), then
    # every head's (-1 for those outside the window, never trained).
    assert len(seen) == 2 and seen[0].shape == (len(grid), 1) and seen[1].shape == (len(ratios) * len(grid), 1)
    per_ratio = seen[1].view(len(ratios), len(grid))
    for r in range(len(ratios)):
        best = int(per_ratio[r].argmax())  # argmax returns the first of tied maxima
        assert fit.inverse_l2[r] == grid[best]
        assert fit.val_top1[r] == pytest.approx(float(per_ratio[r, best]))
    # The strongest penalty shrinks the dense head's weights far more than the sparse head's
    # (its strength is scaled by k/K = 1 against 0.1).
    monkeypatch.setattr(default, "CONCEPT_INVERSE_L2", (1e-4,))
    monkeypatch.setattr(default, "SPARSE_STRONG_END", ())
    strong = fit_heads(**splits, num_classes=4, ratios=[0.0, 0.9], seed=3, max_epochs=4)
    assert strong.inverse_l2.tolist() == [1e-4, 1e-4]
    assert strong.weight[0].norm() < 0.5 * strong.weight[1].norm()


def test_warm_ratios_train_only_the_penalties_next_to_the_dense_heads_choice(monkeypatch):
    """With warm starts the ratios that drop concepts train only the penalties of the window around
    the dense heads' val choice: the same heads as in the whole grid, the rest never trained nor chosen."""
    seen = _spy_on_val_evaluations(monkeypatch)
    monkeypatch.setattr(default, "CONCEPT_INVERSE_L2", (1e-4, 1e-3, 1e-2, 1e-1, 1.0))
    monkeypatch.setattr(default, "SPARSE_STRONG_END", (1e-5,))
    grid = default.concept_penalties()  # the strong end first: the sparse ratio's alone
    splits = {name: _buried_signal(seed, n) for name, seed, n in (("train", 1, 300), ("val", 2, 100), ("test", 3, 100))}
    ratios = [0.0, 0.5, 0.9]
    windowed = fit_heads(**splits, num_classes=4, ratios=ratios, seed=3, max_epochs=4)
    anchor_val, final_val = seen[0].view(-1), seen[-1].view(len(ratios), len(grid)).clone()
    num_inputs = splits["train"][0].shape[1]
    sparse = default.sparse_heads(keep_counts(ratios, num_inputs), num_inputs).tolist()
    assert sparse == [False, False, True]  # s = 0.9 keeps 2 of 20 columns: the sparse window
    windows = [default.penalty_window(int(anchor_val.argmax()), sparse=sp) for sp in sparse]
    for sp, window in zip(sparse, windows):
        below, above = default.SPARSE_PENALTY_WINDOW if sp else default.WARM_PENALTY_WINDOW
        assert window.stop - window.start <= below + above + 1 < len(grid)
        assert window.start >= (0 if sp else 1)  # the strong end: the sparse ratio's alone
    everywhere = (len(grid), len(grid))
    monkeypatch.setattr(default, "WARM_PENALTY_WINDOW", everywhere)
    monkeypatch.setattr(default, "SPARSE_PENALTY_WINDOW", everywhere)
    seen.clear()
    whole = fit_heads(**splits, num_classes=4, ratios=ratios, seed=3, max_epochs=4)
    whole_val = seen[-1].view(len(ratios), len(grid))
    torch.testing.assert_close(final_val[0, 1:], whole_val[0, 1:])  # the dense heads: every penalty
    assert final_val[0, 0] == whole_val[0, 0] == -1  # ...but the strong end
    assert windowed.inverse_l2[0] == whole.inverse_l2[0]
    for r in (1, 2):
        window = windows[r]
        torch.testing.assert_close(final_val[r, window], whole_val[r, window])  # the same heads
        outside = torch.ones(len(grid), dtype=torch.bool)
        outside[window] = False
        assert (final_val[r, outside] == -1).all()
        assert windowed.inverse_l2[r] == grid[window.start + int(whole_val[r, window].argmax())]


def test_sparse_ratios_reach_a_stronger_penalty_from_the_strongest_dense_head(monkeypatch):
    """SPARSE_STRONG_END is trained at the sparse ratios only: never by the dense heads nor by the
    ratios that are not sparse (with warm starts or without), and with warm starts from the
    strongest dense head."""
    seen = _spy_on_val_evaluations(monkeypatch)
    calls = []  # per call to the trainer: (weights before, weights after, keep, l2 of the first column)
    train = default._Trainer.train

    def spy(self, heads, **kw):
        before = heads.weight.clone()
        train(self, heads, **kw)
        calls.append((before, heads.weight.clone(), kw["keep"].clone(), kw["l2"][:, 0].clone()))

    monkeypatch.setattr(default._Trainer, "train", spy)
    monkeypatch.setattr(default, "CONCEPT_INVERSE_L2", (1e-4, 1e-2, 1e2))
    monkeypatch.setattr(default, "SPARSE_STRONG_END", (1e-6,))
    monkeypatch.setattr(default, "WARM_PENALTY_WINDOW", (9, 9))  # every penalty open to each ratio
    monkeypatch.setattr(default, "SPARSE_PENALTY_WINDOW", (9, 9))
    splits = {name: _buried_signal(seed, n) for name, seed, n in (("train", 1, 300), ("val", 2, 100), ("test", 3, 100))}
    ratios = [0.0, 0.5, 0.9]  # keep 20, 10 and 2 of 20: the last one sparse
    warm_calls = []
    for warm_start in (True, False):
        seen.clear()
        calls.clear()
        fit = fit_heads(**splits, num_classes=4, ratios=ratios, seed=3, max_epochs=4, warm_start=warm_start)
        val = seen[-1].view(len(ratios), 4)
        assert (val[:2, 0] == -1).all()  # s = 0 and 0.5: never the strong end
        assert (val[:2, 1:] >= 0).all() and (val[2] >= 0).all()
        assert fit.inverse_l2[2] in default.concept_penalties()
        trained_keep = torch.cat([keep for _, _, keep, _ in calls])
        assert (trained_keep == 2).sum() == 4 and (trained_keep == 10).sum() == 3  # the sparse ratio 4 penalties
        if warm_start:
            warm_calls = list(calls)
        else:
            assert len(calls) == 1 and not calls[0][0].any()  # one call, every head from zeros
    # Warm: the dense heads (1e-4, 1e-2, 1e2) trained first; the strong-end head of s = 0.9 (its
    # strongest penalty: the largest L2 coefficient) starts from the dense head of 1e-4.
    (_, dense_after, dense_keep, _), (rest_before, _, rest_keep, rest_l2) = warm_calls
    assert dense_keep.tolist() == [20] * 3
    sparse = torch.nonzero(rest_keep == 2).view(-1)
    strong_end = sparse[rest_l2[sparse].argmax()]
    torch.testing.assert_close(rest_before[strong_end], dense_after[0], rtol=0, atol=0)
    assert not torch.equal(rest_before[strong_end], dense_after[1])


def _overfitting_splits():
    """One informative column among 30 noise columns, 40 train images, 20% of their labels flipped."""

    def make(seed: int, n: int, flip: float):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 31, generator=g)
        x[:, 0] += 2.0 * (2 * y - 1)
        flipped = torch.rand(n, generator=g) < flip
        return x, torch.where(flipped, 1 - y, y)

    return {"train": make(1, 40, 0.2), "val": make(2, 400, 0.0), "test": make(3, 400, 0.0)}


def test_default_protocol_regularises_to_the_end_and_looks_at_val_once(monkeypatch):
    """No early stopping: the L2 penalty keeps 40 noisy labels from being memorised, every head
    keeps its final state, and val is evaluated once, to choose the learning rate."""
    seen = _spy_on_val_evaluations(monkeypatch)
    epochs = 60
    fit = fit_heads(**_overfitting_splits(), num_classes=2, ratios=None, seed=0, max_epochs=epochs)
    assert len(seen) == 1 and seen[0].shape == (1, len(default.STANDARD_INVERSE_L2) * len(default.STANDARD_LRS))
    assert fit.best_epoch.tolist() == [epochs - 1]
    assert fit.val_top1[0] == pytest.approx(float(seen[0].max()), abs=1.5 / 400)  # the val-chosen rate
    assert fit.test_top1[0] > 0.88
    monkeypatch.setattr(default, "STANDARD_INVERSE_L2", (1e9,))  # (almost) no penalty: the noise is learnt
    unregularised = fit_heads(**_overfitting_splits(), num_classes=2, ratios=None, seed=0, max_epochs=epochs)
    assert unregularised.test_top1[0] < fit.test_top1[0] - 0.05


def _quiet_signal_splits(classes: int = 5, signal: int = 8, nuisance: int = 56):
    """Raw features like a trained network's: the classes differ along a few quiet dimensions
    (std 0.1), beside loud class-blind ones (std 3). Telling them apart takes large weights on the
    quiet dimensions, which a strong L2 penalty forbids."""
    means = torch.randn(classes, signal, generator=torch.Generator().manual_seed(0)) * 0.15

    def make(seed: int, n: int):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, classes, (n,), generator=g)
        quiet = means[y] + 0.1 * torch.randn(n, signal, generator=g)
        return torch.cat([quiet, 3.0 * torch.randn(n, nuisance, generator=g)], dim=1), y

    return {"train": make(1, 1000), "val": make(2, 500), "test": make(3, 500)}


def test_standard_head_chooses_its_penalty_and_rate_on_val(monkeypatch):
    """Every (C, rate) pair of the standard head's grids trains; val picks the weak penalty where
    the signal needs large weights, and its rate carries that penalty's factor. One C of 0.03, as
    the standard head had before, stays near chance here."""
    seen = _spy_on_val_evaluations(monkeypatch)
    splits = _quiet_signal_splits()
    fit = fit_heads(**splits, num_classes=5, ratios=None, seed=0)
    options = [(c, lr * default.standard_lr_factor(c)) for c in default.STANDARD_INVERSE_L2 for lr in default.STANDARD_LRS]
    assert seen[0].shape == (1, len(options))
    best = int(seen[0][0].argmax())
    assert (fit.inverse_l2[0], fit.learning_rate[0]) == pytest.approx(options[best])
    assert fit.inverse_l2[0] > 0.03 and fit.test_top1[0] > 0.8
    monkeypatch.setattr(default, "STANDARD_INVERSE_L2", (0.03,))
    strong = fit_heads(**splits, num_classes=5, ratios=None, seed=0)
    assert strong.test_top1[0] < 0.4


@pytest.mark.parametrize("protocol", ["default", "reference"])
@pytest.mark.parametrize("ratios", [None, [0.0, 0.5, 0.9]], ids=["standard", "grid"])
def test_logits_reproduce_the_reported_predictions(protocol, ratios):
    splits = _splits(dim=10)
    fit = fit_heads(**splits, num_classes=4, ratios=ratios, seed=0, protocol=protocol, max_epochs=4)
    x_test, y_test = splits["test"]
    for r in range(fit.weight.shape[0]):
        logits = fit.logits(x_test, r)
        assert logits.shape == (200, 4)
        assert np.array_equal(logits.argmax(1).numpy(), fit.test_pred[r])
        assert fit.test_top1[r] == pytest.approx((logits.argmax(1) == y_test).double().mean().item())
        # Top-5 of 4 classes is top-4: always right.
        assert fit.test_top5[r] == 1.0
    # The reference's LayerNorm applies to every head; the default's (γ, β) to the concept heads.
    assert (fit.input_scale is None) == (protocol == "default" and ratios is None)


def test_reference_protocol_selects_on_test(monkeypatch):
    """Spy on the reference head's evaluations: the reported test top-1 is their maximum."""
    splits = _overfitting_splits()
    x_test, y_test = splits["test"]
    seen: list[float] = []
    original = reference.reference_logits

    def spy(x, *args):
        out = original(x, *args)
        if x.data_ptr() == x_test.data_ptr():  # val has as many rows: told apart by storage
            seen.append((out.argmax(1) == y_test).double().mean().item())
        return out

    monkeypatch.setattr(reference, "reference_logits", spy)
    epochs = 12
    fit = fit_heads(**splits, num_classes=2, ratios=None, seed=0, protocol="reference", max_epochs=epochs,
                    batch_size=8)
    per_epoch = seen[:epochs]  # then the final evaluation, and logits() below
    assert fit.test_top1[0] == max(per_epoch)
    assert fit.best_epoch[0] == int(np.argmax(per_epoch))
    # The case is one where test selection matters: the last epoch is worse than the best.
    assert per_epoch[-1] < max(per_epoch)
    # Every epoch's val and test top-1 are on record, the test column being what was selected on.
    assert fit.epoch_top1.shape == (1, epochs, 2)
    assert fit.epoch_top1[0, :, 1].tolist() == per_epoch
    assert 0.0 < fit.epoch_top1[0, :, 0].min() <= fit.epoch_top1[0, :, 0].max() <= 1.0
    assert reference.fit_reference.__doc__ and "TEST" in reference.fit_reference.__doc__
    assert fit.input_scale.shape == (1, 2, 31)


def test_schedule_is_a_fixed_number_of_steps_until_that_is_too_few_epochs():
    """STEPS batches whatever the train size, but at least MIN_EPOCHS epochs on a large one (a
    fraction of an epoch left 400k-row heads 0.8 points short); batches shrink on a tiny one."""
    resolve = default.Schedule.resolve
    assert (default.STEPS, default.BATCH, default.MIN_EPOCHS) == (1000, 256, 2)
    assert resolve(3_500, epochs=None, batch_size=None) == default.Schedule(steps=1000, batch_size=256)
    assert resolve(100_000, epochs=None, batch_size=None).steps == 1000  # 1000 batches are 2.56 epochs
    assert resolve(128_000, epochs=None, batch_size=None).steps == 1000  # the crossing
    assert resolve(400_000, epochs=None, batch_size=None).steps == 3125  # 2 epochs of 1563 batches
    assert resolve(1_281_167, epochs=None, batch_size=None).steps == 10_010  # ImageNet-1k's train split
    assert resolve(800, epochs=None, batch_size=None) == default.Schedule(steps=1000, batch_size=100)
    assert resolve(400_000, epochs=3, batch_size=None).steps == 3 * 1563  # epochs given: exactly those


def test_invalid_arguments_raise():
    splits = _splits()
    with pytest.raises(ValueError, match="protocol"):
        fit_heads(**splits, num_classes=4, ratios=None, seed=0, protocol="sklearn")
    with pytest.raises(ValueError, match="train: label 3 at row .* out of range for 3 classes"):
        fit_heads(**splits, num_classes=3, ratios=None, seed=0)
    x_val, y_val = splits["val"]
    with pytest.raises(ValueError, match="val: label 0.5 .* not a whole number"):  # refused, never truncated
        fit_heads(**{**splits, "val": (x_val, y_val.double() + 0.5)}, num_classes=4, ratios=None, seed=0)
    with pytest.raises(ValueError):
        fit_heads(**splits, num_classes=4, ratios=[], seed=0)
    # A repeated ratio would be fitted twice and one of its rows dropped by the tables (keyed by ratio).
    with pytest.raises(ValueError, match=r"ratios must not repeat, got \[0\.3, 0\.5, 0\.3\]"):
        fit_heads(**splits, num_classes=4, ratios=[0.3, 0.5, 0.3], seed=0)


def test_analysis_refuses_a_repeated_ratio_before_any_task(tmp_path):
    from iis.analyze.pipeline import analyze_stores

    with pytest.raises(ValueError, match=r"sparsity ratios must not repeat, got \[0\.0, 0\.5, 0\.5\]"):
        analyze_stores([tmp_path / "no-store"], results=tmp_path / "results", libraries=["prototype"],
                       num_concepts=4, ratios=[0.5, 0, 0.5], seeds=[0])
    assert not (tmp_path / "results").exists()


class _Chunks:
    """A tensor served a chunk at a time, as a feature store's ChunkedSplit serves one."""

    def __init__(self, x: torch.Tensor, rows: int):
        self.x, self.rows = x, rows
        self.shape = tuple(x.shape)
        self.num_chunks = -(-x.shape[0] // rows)
        self.served = 0

    def chunk(self, index: int):
        self.served += 1
        start = index * self.rows
        return self.x[start : start + self.rows], start


def test_standard_head_trains_from_chunks_without_holding_the_split():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(4, 24, generator=generator) * 2
    def split(n):
        y = torch.arange(n) % 4
        return means[y] + torch.randn(n, 24, generator=generator), y
    (x_train, y_train), val, test = split(900), split(300), split(300)
    chunks = _Chunks(x_train, rows=128)
    streamed = fit_heads(train=(chunks, y_train), val=val, test=test, num_classes=4, ratios=None, seed=1)
    again = fit_heads(train=(_Chunks(x_train, rows=128), y_train), val=val, test=test, num_classes=4,
                      ratios=None, seed=1)
    whole = fit_heads(train=(x_train, y_train), val=val, test=test, num_classes=4, ratios=None, seed=1)
    assert chunks.served > chunks.num_chunks  # read again every epoch, never materialised once
    assert torch.equal(streamed.weight, again.weight)  # deterministic
    assert streamed.test_top1[0] > 0.9 and abs(streamed.test_top1[0] - whole.test_top1[0]) < 0.03
    with pytest.raises(ValueError, match="only train may be chunked"):
        fit_heads(train=(x_train, y_train), val=(_Chunks(val[0], 64), val[1]), test=test, num_classes=4,
                  ratios=None, seed=1)
