"""A quadratic "model" for analytic checks: its loss is L(w) = ½·wᵀAw whatever the data, so its Hessian is
exactly A, and GD on it shows the textbook regimes along each eigenvector (monotone for η < 1/λ,
oscillating for 1/λ < η < 2/λ, divergent above 2/λ)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Quadratic(nn.Module):
    """``forward(x)`` returns ½·wᵀAw once per example of ``x``; train it with :func:`output_mean`.

    >>> q = Quadratic(torch.diag(torch.tensor([2.0, 4.0])))
    >>> output_mean(q(torch.zeros(3)), None)
    tensor(3., grad_fn=<MeanBackward0>)
    """

    def __init__(self, a: Tensor, w0: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w0.clone() if w0 is not None else torch.ones(len(a), dtype=a.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return (0.5 * self.w @ self.a @ self.w).expand(len(x))


def output_mean(out: Tensor, y: object) -> Tensor:
    """The loss function that goes with :class:`Quadratic`: the mean of its outputs (targets ignored)."""
    return out.mean()
