"""Scalar summaries of the Hessian: the top-K Frobenius norm, Hutchinson's trace, the spectral density (SLQ)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from sgdscope.curvature.eigen import KrylovBasis, default_generator, random_start
from sgdscope.curvature.hessian import HessianOperator


def frobenius_topk(values: Tensor | Sequence[float]) -> float:
    """‖H‖_F ≈ sqrt(Σ_{i≤K} λ_i²) over the given top-K eigenvalues (paper A's approximation).

    >>> frobenius_topk([3.0, -4.0])
    5.0
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    return float(v.square().sum().sqrt())


class TraceEstimate(NamedTuple):
    """``value`` ± ``stderr`` (standard error of the mean), from ``n_hvps`` products."""

    value: float
    stderr: float
    n_hvps: int


def hutchinson_trace(
    op: HessianOperator, n: int = 100, generator: torch.Generator | None = None, block: int = 8
) -> TraceEstimate:
    """tr(H) ≈ (1/n) Σ_j z_jᵀ H z_j with Rademacher z_j (unbiased: E[zzᵀ] = I), and its standard error
    std(z_jᵀHz_j)/√n. Products are applied ``block`` vectors at a time.

    For a diagonal H every Rademacher sample gives the exact trace, so the error is zero:

    >>> import torch
    >>> from sgdscope.models.quadratic import Quadratic, output_mean
    >>> A = torch.diag(torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64))
    >>> op = HessianOperator(Quadratic(A), output_mean, [(torch.zeros(1), torch.zeros(1))])
    >>> hutchinson_trace(op, n=4)
    TraceEstimate(value=2.5, stderr=0.0, n_hvps=4)
    """
    if n < 2:
        raise ValueError("hutchinson_trace needs n >= 2 samples for a standard error")
    gen = default_generator(op, generator)
    start = op.n_hvps
    samples = []
    for m in [block] * (n // block) + ([n % block] if n % block else []):
        Z = random_start(op, m, gen, kind="rademacher")
        samples.append((Z * op.matmat(Z)).sum(dim=1).double())
    q = torch.cat(samples)
    return TraceEstimate(float(q.mean()), float(q.std() / math.sqrt(n)), op.n_hvps - start)


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral measure μ = (1/n) Σ_i δ(λ_i).

    For each probe vector u (unit, Rademacher direction) the m-step Lanczos tridiagonal T gives Gauss
    nodes θ_j (eigenvalues of T) and weights w_j (squared first components of its eigenvectors) with
    Σ_j w_j f(θ_j) = uᵀ f(H) u exactly for polynomials f of degree < 2m. ``nodes`` and ``weights`` are
    (n_vectors, n_steps), zero-weight padded where Lanczos ended early on an invariant subspace.
    """

    nodes: Tensor
    weights: Tensor
    n_params: int
    n_hvps: int

    def moment(self, p: int) -> float:
        """Estimate of tr(Hᵖ)/n = ∫ λᵖ dμ (for p = 1, n·moment(1) is a trace estimate)."""
        return float((self.weights * self.nodes**p).sum(dim=1).mean())

    def density(self, grid: Tensor | None = None, sigma: float | None = None) -> tuple[Tensor, Tensor]:
        """μ smoothed by a Gaussian of width ``sigma`` on ``grid``: (grid, density), density integrating to 1.

        Defaults: 1,000 points spanning the nodes with a margin, and sigma = 1% of that span.
        """
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        span = max(hi - lo, 1e-12)
        sigma = sigma if sigma is not None else 0.01 * span
        if grid is None:
            grid = torch.linspace(lo - 3 * sigma, hi + 3 * sigma, 1000, dtype=torch.float64)
        grid = grid.to(torch.float64)
        kernel = torch.exp(-0.5 * ((grid[:, None] - self.nodes.reshape(1, -1)) / sigma) ** 2)
        dens = (kernel * self.weights.reshape(1, -1)).sum(dim=1) / (len(self.nodes) * sigma * math.sqrt(2 * math.pi))
        return grid, dens


def spectral_density(
    op: HessianOperator, n_vectors: int = 10, n_steps: int = 80, generator: torch.Generator | None = None
) -> SpectralDensity:
    """SLQ (Ghorbani, Krishnan & Xiao 2019): n_steps of Lanczos with full reorthogonalisation from each of
    ``n_vectors`` Rademacher starts; costs about n_vectors·n_steps products.

    On a diagonal H the quadrature recovers the eigenvalues and E[w_j] = 1/n:

    >>> import torch
    >>> from sgdscope.models.quadratic import Quadratic, output_mean
    >>> A = torch.diag(torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64))
    >>> op = HessianOperator(Quadratic(A), output_mean, [(torch.zeros(1), torch.zeros(1))])
    >>> sd = spectral_density(op, n_vectors=1, n_steps=4)
    >>> (sd.nodes.sort().values.round(decimals=6) + 0.0).tolist(), sd.weights.round(decimals=6).tolist()
    ([[-1.0, 0.0, 0.5, 2.0]], [[0.25, 0.25, 0.25, 0.25]])
    >>> round(sd.moment(1), 12), round(sd.moment(2), 12)
    (0.375, 1.3125)
    """
    if n_vectors < 1 or n_steps < 1:
        raise ValueError("spectral_density needs n_vectors >= 1 and n_steps >= 1")
    gen = default_generator(op, generator)
    start = op.n_hvps
    nodes = torch.zeros(n_vectors, n_steps, dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    for i in range(n_vectors):
        basis = KrylovBasis(op, max_size=n_steps)
        basis.extend(random_start(op, 1, gen, kind="rademacher"), 1)
        while len(basis) < n_steps:
            # The next Lanczos direction: the newest image minus its part in the basis. Projecting before
            # the basis normalises it keeps a small β_j (a nearly invariant subspace) from being mistaken
            # for round-off.
            w = basis.HV[-1:] - (basis.HV[-1:] @ basis.V.T) @ basis.V
            if not basis.extend(w, 1):
                break
        theta, S = torch.linalg.eigh(basis.T)
        m = len(theta)
        nodes[i, :m], weights[i, :m] = theta.cpu(), S[0].square().cpu()
    return SpectralDensity(nodes, weights, op.n_params, op.n_hvps - start)
