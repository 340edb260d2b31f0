"""Gradient noise against curvature: the covariance of minibatch gradients, seen along the Hessian's
top eigenvectors (Xing et al. 2018, Appendix D, name the comparison as future work).

Which covariance. Let the measurement set hold M examples with per-example gradients ∇ℓ_i and mean
ḡ = ∇L. A minibatch B is a size-B subset drawn uniformly *without replacement* (a prefix of a random
permutation, as :func:`sgdscope.landscape.minibatch_grads` draws it), and g_B = (1/B)·Σ_{i∈B} ∇ℓ_i its mean
gradient. Its covariance is the finite-population one

    C = Cov(g_B) = (M − B)/(B·(M − 1)) · Σ,     Σ = (1/M)·Σ_i (∇ℓ_i − ḡ)(∇ℓ_i − ḡ)ᵀ,

Σ the per-example covariance over the measurement set (C = 0 at B = M; C ≈ Σ/B for B ≪ M). Where a
batch's loss is not a mean of per-example terms (BatchNorm batch statistics, padded sequences weighted by
tokens) C is still the covariance of the drawn g_B, but not this closed form in Σ. An explicit L2 term
adds the same 2λθ to every g_B and so does not change C (it does add 2λI to H).

Estimators, from n independent draws g_1..g_n (each its own subset), D the (n, p) matrix of g_j − ḡ_n:

* Ĉ = DᵀD/(n − 1), unbiased; σ_i² = e_iᵀĈe_i = Var_j⟨g_j, e_i⟩ (the unbiased sample variance);
* tr(Ĉ) = ‖D‖_F²/(n − 1), unbiased for tr(C);
* the top-m eigenvectors of Ĉ from the n × n Gram matrix DDᵀ = QΛQᵀ: u_a = Dᵀq_a/√Λ_a (rank ≤ n − 1, so
  m ≤ n − 1); never a p × p matrix;
* overlap = ‖U_Cᵀ V_H‖_F² / m for the (K, p) orthonormal Hessian eigenvectors V_H: 1 when the m noise
  directions lie in the Hessian's top-K subspace, 0 when orthogonal to it (at most min(m, K)/m). A
  uniformly random m-dimensional subspace gives E‖UᵀV_H‖_F² = m·K/p, i.e. an overlap of K/p (the chance
  level, :func:`overlap_chance`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NoiseStats:
    """``variance`` (K,) σ_i² along each row of V; ``trace`` tr(Ĉ); ``overlap`` ‖U_CᵀV‖_F²/m (NaN where
    Ĉ has fewer than m non-zero eigenvalues); ``top`` (m,) the top-m eigenvalues of Ĉ; ``n`` draws."""

    variance: Tensor
    trace: float
    overlap: float
    top: Tensor
    n: int


def overlap_chance(k: int, n_params: int) -> float:
    """E[‖UᵀV‖_F²]/m = K/p for a uniformly random m-dimensional U and a fixed orthonormal K-frame V in ℝᵖ
    (E[UUᵀ] = (m/p)·I, so E tr(UUᵀVVᵀ) = m·K/p)."""
    return k / n_params


def gradient_noise(grads: Tensor, vectors: Tensor, m: int) -> NoiseStats:
    """The estimators of the module docstring for the ``(n, p)`` minibatch gradients ``grads`` and the
    ``(K, p)`` orthonormal rows ``vectors``; the top ``m`` (≤ n − 1) noise directions.

    Two draws d apart along e₁ only: variance d²/2 along e₁, 0 along e₂, and the one noise direction is e₁:

    >>> g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    >>> s = gradient_noise(g, torch.eye(3, dtype=torch.float64)[:2], m=1)
    >>> s.variance.tolist(), s.trace, round(s.overlap, 12)
    ([2.0, 0.0], 2.0, 1.0)
    """
    n = grads.shape[0]
    if n < 2 or not 1 <= m <= n - 1:
        raise ValueError(f"gradient_noise: needs n >= 2 gradients and 1 <= m <= n - 1; got n = {n}, m = {m}")
    D = grads - grads.mean(dim=0, keepdim=True)
    proj = D @ vectors.T  # (n, K): ⟨g_j − ḡ, e_i⟩
    variance = proj.square().sum(dim=0) / (n - 1)
    trace = float(D.square().sum()) / (n - 1)
    # eigenvectors of DᵀD from the n × n Gram matrix (float64: small eigenvalues of a near-rank-deficient Gram)
    evals, Q = torch.linalg.eigh((D @ D.T).double())
    evals, Q = evals.flip(0)[:m], Q.flip(1)[:, :m]
    # a noise eigenvalue at the round-off of centring gradients of this size is no direction at all
    tiny = torch.finfo(grads.dtype).eps * n * float(grads.double().square().sum())
    if float(evals[-1]) <= tiny:  # fewer than m noise directions (e.g. every draw the same batch)
        return NoiseStats(variance, trace, float("nan"), (evals / (n - 1)).to(grads.dtype), n)
    # u_a = Dᵀq_a/√Λ_a, so ⟨u_a, e_i⟩ = (D e_i)ᵀ q_a/√Λ_a: the overlap needs only the projections
    cross = (proj.double().T @ Q) / evals.sqrt()  # (K, m) = V_H U_C
    return NoiseStats(variance, trace, float(cross.square().sum()) / m, (evals / (n - 1)).to(grads.dtype), n)
