"""Flat parameter views: the model's trainable parameters as one vector θ ∈ R^n, and back.

The order is ``model.named_parameters()`` order, restricted to parameters with ``requires_grad`` and, if
given, to those whose name matches ``param_filter`` (a regular expression, a list of name prefixes, or a
callable ``name -> bool``), so curvature can be measured per layer.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn

ParamFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


def _matcher(param_filter: ParamFilter) -> Callable[[str], bool]:
    if param_filter is None:
        return lambda name: True
    if callable(param_filter):
        return param_filter
    if isinstance(param_filter, str):
        rx = re.compile(param_filter)
        return lambda name: rx.search(name) is not None
    prefixes = tuple(param_filter)
    return lambda name: name.startswith(prefixes)


def named_trainable(model: nn.Module, param_filter: ParamFilter = None) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs that are trainable and pass ``param_filter``, in model order."""
    keep = _matcher(param_filter)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and keep(n)]


def flatten(tensors: Iterable[Tensor], batch_dims: int = 0) -> Tensor:
    """Concatenate tensors into one flat vector (a copy).

    With ``batch_dims=d`` the first d dimensions of every tensor are kept as leading dimensions (a block of
    flat vectors, the inverse of :func:`unflatten` on a batch).

    >>> flatten([torch.ones(2, 1, 2), torch.zeros(2, 3)], batch_dims=1)
    tensor([[1., 1., 0., 0., 0.],
            [1., 1., 0., 0., 0.]])
    """
    return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in tensors], dim=-1)


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector (or a batch of them, shape (..., n)) into views shaped like ``like``."""
    out, i = [], 0
    lead = vec.shape[:-1]
    for t in like:
        out.append(vec[..., i : i + t.numel()].reshape(*lead, *t.shape))
        i += t.numel()
    if i != vec.shape[-1]:
        raise ValueError(f"vector has {vec.shape[-1]} entries, parameters have {i}")
    return out


def get_flat(model: nn.Module, param_filter: ParamFilter = None) -> Tensor:
    """θ as a detached flat copy."""
    return flatten(p.detach() for _, p in named_trainable(model, param_filter))


@torch.no_grad()
def set_flat(model: nn.Module, vec: Tensor, param_filter: ParamFilter = None,
             params: Sequence[Tensor] | None = None) -> None:
    """Write the flat vector ``vec`` into the model's parameters, in place. ``params``: the trainable
    parameters already looked up (``named_trainable`` order), for a caller that writes many points."""
    if params is None:
        params = [p for _, p in named_trainable(model, param_filter)]
    for p, v in zip(params, unflatten(vec, params)):
        p.copy_(v)


def grad_flat(model: nn.Module, param_filter: ParamFilter = None) -> Tensor:
    """The parameters' ``.grad`` as one flat vector (zeros where a parameter got no gradient)."""
    return flatten(
        p.grad.detach() if p.grad is not None else torch.zeros_like(p) for _, p in named_trainable(model, param_filter)
    )
