"""The cheap measurements taken at every step and every epoch.

Per step (table ``train``): batch loss and accuracy, ‖g‖, d_t = ‖θ_t − θ_0‖ and the cosine of consecutive
minibatch gradients cos(g_{t−1}, g_t) = ⟨g_{t−1}, g_t⟩ / (‖g_{t−1}‖‖g_t‖), all on the gradient actually
used by the update (it includes the explicit L2 term 2λθ when the run has weight decay; the column
``grad_cosine_prev_data`` then gives the cosine of the data-loss gradients alone, as Xing et al.'s code did).

Per epoch (table ``epoch``): ρ(W), the mean over weight matrices of their largest singular value (conv
kernels reshaped to (out, in·kh·kw)), and ‖θ‖.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def weight_matrices(model: nn.Module) -> list[Tensor]:
    """Weight tensors with ≥ 2 dimensions (linear, conv, recurrent), embeddings excluded."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [p for n, p in model.named_parameters() if p.ndim >= 2 and id(p) not in skip]


@torch.no_grad()
def weight_spectral_norm_mean(model: nn.Module) -> float:
    """ρ(W) = mean_l σ_max(W_l), each W_l reshaped to (out, ∏ rest).

    >>> m = nn.Linear(2, 2, bias=False)
    >>> m.weight.data = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> weight_spectral_norm_mean(m)
    3.0
    """
    mats = weight_matrices(model)
    if not mats:
        return float("nan")
    return float(sum(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).float(), ord=2) for w in mats) / len(mats))


class StepStats:
    """Keeps the previous minibatch gradient to report the cosine of consecutive gradients."""

    def __init__(self) -> None:
        self.prev: Optional[Tensor] = None
        self.prev_data: Optional[Tensor] = None

    def row(self, grad: Tensor, theta: Tensor, theta0: Tensor, l2_grad: Optional[Tensor]) -> dict[str, Any]:
        row = {
            "grad_norm": float(grad.norm()),
            "param_distance": float((theta - theta0).norm()),
            "grad_cosine_prev": _cos(self.prev, grad) if self.prev is not None else float("nan"),
        }
        self.prev = grad.clone()
        if l2_grad is not None:
            data = grad - l2_grad
            row["grad_cosine_prev_data"] = _cos(self.prev_data, data) if self.prev_data is not None else float("nan")
            self.prev_data = data
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self.prev, "prev_data": self.prev_data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev, self.prev_data = state.get("prev"), state.get("prev_data")
