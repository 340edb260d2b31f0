"""Principal angles between subspaces: how far the top-K eigenspace turns between two measurements.

For subspaces 𝒜 = span(a_1..a_p) and ℬ = span(b_1..b_q) of R^n with orthonormal bases Q_A (n×p) and
Q_B (n×q), the principal angles 0 ≤ θ_1 ≤ … ≤ θ_m ≤ π/2 (m = min(p, q)) are given by

    cos θ_i = σ_i(Q_Aᵀ Q_B)                  (σ descending)
    sin θ_i = σ_{m+1−i}((I − Q_A Q_Aᵀ) Q_B)  (for p ≥ q; swap the roles otherwise)

The cosine formula loses every digit for small angles (cos θ = 1 − θ²/2: an angle below ~1e-8 rad is 0 in
float64), the sine formula for angles near π/2. Following Knyazev & Argentati (2002), as SciPy's
``subspace_angles`` does, the angle is read from the sine where cos² θ ≥ ½ and from the cosine elsewhere;
both singular values are clamped to [0, 1] first, because round-off can push them just past 1, where
arccos / arcsin are undefined. Everything runs in float64 on the inputs' device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _basis(rows: Tensor) -> Tensor:
    """An orthonormal basis (n×p, float64) of the span of the rows of ``rows`` (p×n), by reduced QR."""
    if rows.dim() != 2 or rows.shape[0] == 0:
        raise ValueError(f"a subspace is given by a (p, n) stack of vectors, got shape {tuple(rows.shape)}")
    q, _ = torch.linalg.qr(rows.detach().to(torch.float64).T, mode="reduced")
    return q


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """The principal angles (radians, ascending, ``min(p, q)`` of them) between span(rows of ``a``) and
    span(rows of ``b``); ``a`` is (p, n), ``b`` is (q, n), e.g. two ``EigenResult.vectors``.

    The rows need not be orthonormal (they are orthonormalised by QR) but must be linearly independent.

    >>> e = torch.eye(3)
    >>> c, s = torch.cos(torch.tensor(0.3)), torch.sin(torch.tensor(0.3))
    >>> principal_angles(e[:1], torch.stack([c * e[0] + s * e[1]])).item()  # doctest: +ELLIPSIS
    0.3000...
    """
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"both subspaces must live in the same space: shapes {tuple(a.shape)} and {tuple(b.shape)}")
    qa, qb = _basis(a), _basis(b)
    if qa.shape[1] < qb.shape[1]:
        qa, qb = qb, qa  # the sine formula below needs dim 𝒜 ≥ dim ℬ
    m = qb.shape[1]
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)  # descending: cos θ_1 ≥ … ≥ cos θ_m
    perp = qb - qa @ (qa.T @ qb)  # the part of ℬ outside 𝒜
    sin = torch.linalg.svdvals(perp).clamp(0.0, 1.0).flip(0)[:m]  # ascending: sin θ_1 ≤ … ≤ sin θ_m
    small = cos**2 >= 0.5  # θ ≤ π/4: the sine is the accurate one there
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


def subspace_overlap(a: Tensor, b: Tensor) -> float:
    """‖Q_Aᵀ Q_B‖_F² / q with q = rows of ``b`` = Σ cos² θ_i / q: 1 for the same subspace, 0 for orthogonal
    ones, and about p/n for a random q-dimensional subspace against a p-dimensional one."""
    qa, qb = _basis(a), _basis(b)
    return float((qa.T @ qb).square().sum() / qb.shape[1])
