"""2-D loss slices around an iterate (Li et al. 2018, "Visualizing the loss landscape of neural nets").

The slice through θ spanned by directions d₁, d₂ is

    S(a, b) = L(θ + a·d₁ + b·d₂)   on the grid a, b ∈ linspace(−span, span, n),

evaluated by :func:`~sgdscope.landscape.interpolate.loss_at_points` (exact batch weighting, the BN policy,
one set of dropout masks for every grid point: the mask seed is fixed per slice), one grid row of n points
per call so memory stays at n flat vectors.

Directions: the top two eigenvectors (unit vectors; a and b are then distances in parameter space), or
*filter-normalised* random directions (Li et al. §4): a Gaussian d is drawn per parameter tensor and each
filter d_i (a row of a linear weight, an output channel of a conv kernel: a slice along dim 0) is rescaled to
‖θ_i‖, the norm of the same filter of θ, so a = 1 moves every filter by its own size whatever the layer's
scale. One-dimensional parameters (biases, BatchNorm weights and biases) get d = 0, the setting of Li et
al.'s figures ("we do not perturb bias and BN parameters").

The trajectory is drawn on the plane by least squares: for an earlier iterate θ_s, its coordinates (a_s, b_s)
minimise ‖(θ_s − θ) − a d₁ − b d₂‖, i.e. solve the 2×2 normal equations with the Gram matrix of (d₁, d₂)
(random directions are not orthogonal in general), and the residual says how much of the displacement lies
off the plane.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from sgdscope.curvature.flat import flatten, named_trainable
from sgdscope.landscape.interpolate import loss_at_points
from sgdscope.losses import Batch


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> Tensor:
    """A random flat direction, filter-normalised to the model's current parameters (module docstring):
    per parameter tensor p with ≥ 2 dimensions, d ~ N(0, I) with each filter d[i] rescaled to ‖p[i]‖;
    zero for 1-D parameters. Drawn from ``generator`` only (on its device), returned on the model's device."""
    parts = []
    for _, p in named_trainable(model):
        if p.ndim <= 1:
            parts.append(torch.zeros_like(p).reshape(-1))
            continue
        d = torch.randn(p.shape, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
        rows, ref = d.reshape(len(d), -1), p.detach().reshape(len(p), -1)
        rows = rows * (ref.norm(dim=1) / rows.norm(dim=1).clamp_min(torch.finfo(p.dtype).tiny)).unsqueeze(1)
        parts.append(rows.reshape(-1))
    return flatten(parts)


def slice_axis(span: float, n: int, like: Tensor) -> Tensor:
    """The grid of one axis: ``n`` evenly spaced points from −span to span, symmetric about 0 and holding 0
    exactly when n is odd (so the grid's centre is θ itself, not a rounding error away)."""
    k = torch.arange(n, dtype=like.dtype, device=like.device) - (n - 1) / 2
    return k * (2 * span / (n - 1))


@torch.no_grad()
def loss_slice(
    model: nn.Module,
    theta: Tensor,
    d1: Tensor,
    d2: Tensor,
    alphas: Tensor,
    betas: Tensor,
    batches: Sequence[Batch],
    **kw,
) -> Tensor:
    """S[i, j] = L(θ + alphas[i]·d₁ + betas[j]·d₂), shape ``(len(alphas), len(betas))``; ``kw`` are
    :func:`loss_at_points`'s (loss_fn, bn_policy, weight_decay, method, chunk_size, ignore_index, mask_seed).
    The model's parameters are left as found. With one ``mask_seed`` every grid point sees the same masks."""
    rows = []
    for a in alphas:
        points = theta + a * d1 + betas.unsqueeze(1) * d2
        rows.append(loss_at_points(model, points, batches, **kw))
    return torch.stack(rows)


def plane_coordinates(d1: Tensor, d2: Tensor, displacements: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares coordinates of each row r of ``displacements`` (S, n) in the basis (d₁, d₂):
    (a, b) = argmin ‖r − a d₁ − b d₂‖ = G⁻¹ [⟨d₁, r⟩, ⟨d₂, r⟩] with G the 2×2 Gram matrix (a
    pseudo-inverse where d₁ ∥ d₂). Returns ``(coords (S, 2), residual norms (S,))``.

    >>> d1, d2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    >>> c, res = plane_coordinates(d1, d2, torch.tensor([[3.0, 2.0, 4.0]]))
    >>> [round(v, 5) for v in c[0].tolist()], round(float(res), 5)
    ([1.0, 2.0], 4.0)
    """
    D = torch.stack([d1, d2])
    coords = (torch.linalg.pinv(D @ D.T) @ (D @ displacements.T)).T
    return coords, (displacements - coords @ D).norm(dim=1)
