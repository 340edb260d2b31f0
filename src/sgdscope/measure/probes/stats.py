"""The cheap statistics of every step and every epoch.

Per step (merged into the ``train`` row): ‖g‖, d_t = ‖θ_t − θ_0‖ and the cosine of consecutive gradients
cos(g_{t−1}, g_t) = ⟨g_{t−1}, g_t⟩ / (‖g_{t−1}‖‖g_t‖), on the gradient the update actually used (what the
backward left in ``.grad``; with an explicit L2 term λ‖θ‖² in the loss it includes 2λθ_t, and the column
``grad_cosine_prev_data`` gives the cosine of the data-loss gradients alone, as Xing et al.'s code did).

Per epoch end (merged into the ``epoch`` row): ρ(W), the mean over weight matrices of their largest
singular value (conv kernels reshaped to (out, in·kh·kw)), and ‖θ‖.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from sgdscope.curvature.flat import get_flat
from sgdscope.measure.probes.base import Probe, Rows, StepInfo


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
    return float(sum(_sigma_max(w.reshape(w.shape[0], -1)) for w in mats) / len(mats))


def _sigma_max(w: Tensor) -> Tensor:
    """σ_max(W) = √λ_max(W Wᵀ), the Gram matrix taken on the shorter side, in float64.

    Why not ``matrix_norm(ord=2)``: that is a full SVD of W, ~10× slower on VGG-11's 512×4608 convolutions
    (15 s against 1.5 s per epoch on one CPU thread), and it was the largest cost of a paper-size epoch's
    statistics. In float64 the Gram matrix's squaring of the condition number costs nothing that matters here:
    only the largest eigenvalue is kept, and its relative error is ~1e-16·κ-free (Weyl)."""
    w = w.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()


class _EveryStep(Probe):
    """Runs after every update (never at step 0, where no update has happened)."""

    def due(self, step: int, epoch_end: bool) -> bool:
        return step > 0


class GradientProbe(_EveryStep):
    """``train``: grad_norm, grad_cosine_prev (and grad_cosine_prev_data with an explicit L2 term).

    A skipped update (non-finite gradient) gets a NaN cosine and leaves the previous gradient in place, so
    the next step's cosine is taken with the last gradient that was used."""

    name = "gradient"
    tables = ("train",)

    def __init__(self, opts: Any, env) -> None:
        super().__init__(opts, env)
        self.wants_theta_prev = env.weight_decay > 0  # the L2 part of g_t is 2λθ_t
        self.prev: Optional[Tensor] = None
        self.prev_data: Optional[Tensor] = None

    def measure(self, info: StepInfo) -> Rows:
        g = info.grad
        row: dict[str, Any] = {"grad_norm": float(g.norm())}
        if info.skipped:
            row["grad_cosine_prev"] = float("nan")
            return {"train": [row]}
        row["grad_cosine_prev"] = _cos(self.prev, g) if self.prev is not None else float("nan")
        self.prev = g.clone()
        if self.env.weight_decay > 0:
            data = g - 2 * self.env.weight_decay * info.theta_prev
            row["grad_cosine_prev_data"] = _cos(self.prev_data, data) if self.prev_data is not None else float("nan")
            self.prev_data = data
        return {"train": [row]}

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self.prev, "prev_data": self.prev_data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev, self.prev_data = state.get("prev"), state.get("prev_data")


class DistanceProbe(_EveryStep):
    """``train``: param_distance = ‖θ_t − θ_0‖."""

    name = "distance"
    tables = ("train",)

    def measure(self, info: StepInfo) -> Rows:
        return {"train": [{"param_distance": float((get_flat(self.env.model) - self.env.theta0).norm())}]}


class WeightsProbe(Probe):
    """``epoch``: weight_spectral_norm_mean (ρ(W)) and param_norm (‖θ‖), at each epoch end."""

    name = "weights"
    tables = ("epoch",)

    def due(self, step: int, epoch_end: bool) -> bool:
        return epoch_end

    def measure(self, info: StepInfo) -> Rows:
        model = self.env.model
        return {"epoch": [{"weight_spectral_norm_mean": weight_spectral_norm_mean(model),
                           "param_norm": float(get_flat(model).norm())}]}
