"""Losses with exact example weighting over uneven batches, for inputs of any form.

A *batch* is a pair ``(x, y)`` already on the model's device. ``y`` is a tensor of targets whose first
dimension counts the batch's examples; ``x`` is what the model takes:

* a tensor: the model runs as ``model(x)``;
* a tuple or list: ``model(*x)`` (several positional inputs, e.g. tokens and a mask);
* a dict: ``model(**x)`` (keyword inputs, as language models take them).

:func:`forward` and :func:`functional_forward` are the one place that applies these rules.

The weight of a batch is its number of *real* targets n_b (examples for classification, tokens for
language models; targets equal to ``ignore_index`` do not count), so a mean over a batch list is the mean
over real targets, whatever the batch sizes and the padding:

    L = Σ_b n_b · L_b / Σ_b n_b,   with L_b the mean loss over the real targets of batch b.

A batch with no real target (n_b = 0: all padding, or empty) has weight 0 and is skipped; a list in which
every batch has weight 0 is an error, because the mean is undefined.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Inputs = Union[Tensor, Sequence[Any], Mapping[str, Any]]
Batch = tuple[Inputs, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every target: ``outputs`` (..., C) against integer ``targets`` (...).

    (torch's default ``ignore_index=-100`` applies: such targets are left out of the mean.)
    """
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean over examples of ½‖f(x) − e_y‖², with e_y the one-hot vector of the integer target y (the squared
    loss of edge-of-stability studies, Cohen et al. 2021). Its Hessian in the outputs is the identity.

    >>> float(mse(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])))
    0.25
    """
    flat = outputs.reshape(-1, outputs.shape[-1])
    onehot = F.one_hot(targets.reshape(-1), flat.shape[-1]).to(flat.dtype)
    return 0.5 * ((flat - onehot) ** 2).sum(-1).mean()


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}  # the built-in trainer's ``train.loss``


# -- inputs of any form -------------------------------------------------------------------------------


def _call_args(x: Inputs) -> tuple[tuple, dict]:
    """The positional and keyword arguments a model is called with for the inputs ``x``."""
    if isinstance(x, Mapping):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


def forward(model: nn.Module, x: Inputs) -> Tensor:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor, a tuple/list or a dict ``x``.

    >>> forward(lambda a, b: a - b, (torch.tensor(3), torch.tensor(1)))
    tensor(2)
    >>> forward(lambda *, a, b: a * b, {"a": torch.tensor(3), "b": torch.tensor(2)})
    tensor(6)
    """
    args, kwargs = _call_args(x)
    return model(*args, **kwargs)


def functional_forward(
    model: nn.Module, state: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]], x: Inputs
) -> Tensor:
    """``torch.func.functional_call(model, state, args, kwargs)`` with ``args``/``kwargs`` formed from ``x``
    by the rules of :func:`forward`; ``state`` maps parameter and buffer names to the tensors to use (or is
    a sequence of such dicts)."""
    args, kwargs = _call_args(x)
    return functional_call(model, state, args, kwargs)


def take(x: Inputs, index: Tensor | slice | int) -> Inputs:
    """``x`` with every tensor in it indexed by ``index`` along dim 0 (its example dimension).

    Tuples, lists and dicts are followed (nested ones too); anything else (a flag, a string) is passed on
    as it is, because it does not belong to any one example.

    >>> take({"ids": torch.arange(6).reshape(3, 2), "causal": True}, torch.tensor([2, 0]))
    {'ids': tensor([[4, 5],
            [0, 1]]), 'causal': True}
    """
    if isinstance(x, Tensor):
        return x[index]
    if isinstance(x, Mapping):
        return {k: take(v, index) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        items = [take(v, index) for v in x]
        if hasattr(x, "_fields"):  # a namedtuple is rebuilt from its fields
            return type(x)(*items)
        return type(x)(items)
    return x


def split_batches(x: Inputs, y: Tensor, batch_size: int) -> list[Batch]:
    """Cut ``(x, y)`` into consecutive batches of ``batch_size`` examples (the last may be shorter).

    Every tensor of ``x`` is sliced along dim 0 together with ``y`` (see :func:`take`); views, no copies.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    return [(take(x, slice(i, i + batch_size)), y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


# -- weights ------------------------------------------------------------------------------------------


def n_targets(targets: Tensor, ignore_index: int | None = None) -> int:
    """The weight of a batch in a mean over targets: how many entries of ``targets`` differ from
    ``ignore_index`` (all of them when it is None; tokens for sequence targets).

    >>> n_targets(torch.tensor([[3, 1, -100], [2, -100, -100]]), ignore_index=-100), n_targets(torch.zeros(2, 3))
    (3, 6)
    """
    if ignore_index is None:
        return targets.numel()
    return int((targets != ignore_index).sum())


class Weighted(NamedTuple):
    """A batch of a batch list with its weight: ``index`` is its position in the list (which names its
    dropout-mask stream, see :func:`sgdscope.policy.fixed_masks`), ``n`` its number of real targets."""

    index: int
    x: Inputs
    y: Tensor
    n: int


def weigh(batches: Sequence[Batch], ignore_index: int | None = None) -> tuple[list[Weighted], int]:
    """The batches that carry weight, and the total N = Σ_b n_b of real targets.

    Batches with n_b = 0 are left out (their mean loss is undefined and their weight 0); raises ValueError
    when the list is empty or no batch holds a real target.

    >>> ys = [torch.tensor([1, -100]), torch.tensor([-100]), torch.tensor([0, 2])]
    >>> ws, total = weigh([(None, y) for y in ys], ignore_index=-100)
    >>> [(w.index, w.n) for w in ws], total
    ([(0, 1), (2, 2)], 3)
    """
    if not batches:
        raise ValueError("the batch list is empty; pass at least one (inputs, targets) pair")
    weighted = [Weighted(i, x, y, n_targets(y, ignore_index)) for i, (x, y) in enumerate(batches)]
    weighted = [w for w in weighted if w.n > 0]
    if not weighted:
        what = f"every target is ignore_index={ignore_index}" if ignore_index is not None else "every batch is empty"
        raise ValueError(f"the batches hold no target ({what})")
    return weighted, sum(w.n for w in weighted)


def l2_penalty(params: Sequence[Tensor], weight_decay: float) -> Tensor | float:
    """The explicit L2 term λ·Σ‖w‖² (its gradient is 2λw, its Hessian 2λI)."""
    if weight_decay == 0.0:
        return 0.0
    return weight_decay * sum((p * p).sum() for p in params)


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], ignore_index: int | None = None
) -> tuple[float, float]:
    """Exactly weighted mean loss and accuracy of ``model`` in its current mode over ``batches``.

    Returns ``(Σ_b n_b L_b / Σ_b n_b, correct / Σ_b n_b)``, with n_b the real targets of batch b (those
    that differ from ``ignore_index``) and ``correct`` the real targets equal to the argmax of the output's
    last dimension. Batches without a real target are skipped; NaN for both if no batch has one.
    """
    total, loss_sum, correct = 0, None, None
    for x, y in batches:
        n = n_targets(y, ignore_index)
        if n == 0:
            continue
        out = forward(model, x)
        l = loss_fn(out, y) * n
        hit = out.argmax(-1) == y
        c = (hit if ignore_index is None else hit & (y != ignore_index)).sum()
        loss_sum = l if loss_sum is None else loss_sum + l
        correct = c if correct is None else correct + c
        total += n
    if total == 0:
        return float("nan"), float("nan")
    return float(loss_sum) / total, float(correct) / total
