"""Losses with exact example weighting over uneven batches.

A *batch list* is a list of ``(inputs, targets)`` tensor pairs already on the model's device. The weight
of a batch is the number of targets it holds (examples for classification, tokens for language models),
so a mean over a batch list is the mean over examples, whatever the batch sizes:

    L = Σ_b n_b · L_b / Σ_b n_b,   with L_b the mean loss on batch b and n_b its number of targets.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every target: ``outputs`` (..., C) against integer ``targets`` (...)."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def n_targets(targets: Tensor) -> int:
    """The weight of a batch in a mean over examples (tokens for sequence targets)."""
    return targets.numel()


def split_batches(x: Tensor, y: Tensor, batch_size: int) -> list[Batch]:
    """Cut ``(x, y)`` into consecutive batches of ``batch_size`` (the last may be shorter). Views, no copies."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def l2_penalty(params: Sequence[Tensor], weight_decay: float) -> Tensor | float:
    """The explicit L2 term λ·Σ‖w‖² (its gradient is 2λw, its Hessian 2λI)."""
    if weight_decay == 0.0:
        return 0.0
    return weight_decay * sum((p * p).sum() for p in params)


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]) -> tuple[float, float]:
    """Exactly weighted mean loss and accuracy of ``model`` in its current mode over ``batches``.

    Returns ``(Σ_b n_b L_b / Σ_b n_b, correct / Σ_b n_b)``; NaN for both if the list is empty.
    """
    total, loss_sum, correct = 0, None, None
    for x, y in batches:
        out = model(x)
        n = n_targets(y)
        l = loss_fn(out, y) * n
        c = (out.argmax(-1) == y).sum()
        loss_sum = l if loss_sum is None else loss_sum + l
        correct = c if correct is None else correct + c
        total += n
    if total == 0:
        return float("nan"), float("nan")
    return float(loss_sum) / total, float(correct) / total
