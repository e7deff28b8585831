"""The IIS authors' head-fitting protocol, for comparison only. **It selects on the TEST set.**

Kept apart from the default protocol (``heads_default.py``) so that nothing there can borrow its
test-set selection by accident. Rows fitted this way carry a caveat in the tables.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from iis.analyze.activations import keep_counts
from iis.analyze.heads_batching import materialize
from iis.analyze.heads_model import HeadFit, empty_fit, evaluate, reference_logits

logger = logging.getLogger(__name__)

EPOCHS = 30
BATCH = 1024
LR = 1e-2
GAMMA = 0.99  # ExponentialLR, stepped once per epoch


def head_generator(seed: int, ratio: float | None) -> torch.Generator:
    """The generator of one head's initialisation and batches, seeded by ``(seed, ratio)``: a head
    does not depend on which other ratios are fitted, or in what order (a grid split over several
    tasks fits the same heads: :mod:`iis.analyze.parts`)."""
    if ratio is None:
        return torch.Generator().manual_seed(seed)
    entropy = np.random.SeedSequence([seed, round(float(ratio) * 1_000_000)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(entropy))


def fit_reference(splits: dict[str, tuple[torch.Tensor, torch.Tensor]], *, num_classes: int,
                  ratios: list[float] | None, seed: int, epochs: int, batch_size: int,
                  learn_layer_norm: bool = True) -> HeadFit:
    """The IIS authors' protocol. **It selects the reported epoch on the TEST set.**

    Each ratio's head is fitted separately: a learnable LayerNorm over the ``K`` inputs, then
    ``g_s`` (the same ``k(s)`` as the default protocol), then a linear layer. Adam, lr 1e-2,
    ExponentialLR with gamma 0.99 stepped once per epoch, 30 epochs, batch 1024. After every
    epoch the head is evaluated on test, and the state with the best test top-1 is kept, so the
    reported test top-1 is the maximum over epochs: an optimistic number that METHOD.md's default
    protocol exists to avoid. Val is evaluated after every epoch too, for the record only
    (``HeadFit.epoch_top1``: what choosing the epoch on val would have reported).
    ``learn_layer_norm=False`` freezes the LayerNorm at the identity (a diagnostic).
    """
    x_train, y_train = splits["train"]
    x_train = materialize(x_train).float()  # the reference is for comparison only: no memory tricks
    num_train, num_inputs = x_train.shape
    keep = torch.tensor([num_inputs]) if ratios is None else keep_counts(ratios, num_inputs)
    bound = 1.0 / math.sqrt(num_inputs)  # torch.nn.Linear's default initialisation
    layer_norms, weights, biases, best_epochs, history = [], [], [], [], []
    for r, k in enumerate(keep.tolist()):
        generator = head_generator(seed, None if ratios is None else ratios[r])
        layer_norm = torch.stack([torch.ones(num_inputs), torch.zeros(num_inputs)]).requires_grad_(learn_layer_norm)
        weight = ((torch.rand(num_inputs, num_classes, generator=generator) * 2 - 1) * bound).requires_grad_()
        bias = ((torch.rand(num_classes, generator=generator) * 2 - 1) * bound).requires_grad_()
        trained = [layer_norm, weight, bias] if learn_layer_norm else [weight, bias]
        optimizer = torch.optim.Adam(trained, lr=LR)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=GAMMA)
        best_top1, best_state, best_epoch, head_history = -1.0, None, 0, []
        for epoch in range(epochs):
            order = torch.randperm(num_train, generator=generator)
            for start in range(0, num_train, batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(reference_logits(x_train[idx], layer_norm, weight, bias, k), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
            with torch.no_grad():
                # Selection on test, as in the authors' code.
                top1, val_top1 = (
                    (reference_logits(x, layer_norm, weight, bias, k).argmax(1) == y).double().mean().item()
                    for x, y in (splits["test"], splits["val"]))
            head_history.append((val_top1, top1))
            if top1 > best_top1:
                best_top1, best_epoch = top1, epoch
                best_state = [t.detach().clone() for t in (layer_norm, weight, bias)]
        logger.debug("reference head %d: best test top-1 %.4f at epoch %d", r, best_top1, best_epoch)
        layer_norms.append(best_state[0])
        weights.append(best_state[1])
        biases.append(best_state[2])
        best_epochs.append(best_epoch)
        history.append(head_history)
    # The standard head's LayerNorm is part of the reference's model too; HeadFit applies it.
    fit = empty_fit(ratios, torch.stack(weights), torch.stack(biases), torch.stack(layer_norms),
                    np.array(best_epochs, dtype=np.int64), "reference")
    fit.epoch_top1 = np.array(history, dtype=np.float64)
    evaluate(fit, splits["val"], splits["test"])
    return fit
