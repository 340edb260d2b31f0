"""The growing orthonormal basis of the block Krylov–Schur eigensolver (:mod:`sgdscope.curvature.eigen`):
V, its image HV, the projected matrix T and the image's Gram matrix G, with the residual bookkeeping that
keeps the solver's own work small beside its Hessian-vector products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sgdscope.curvature.hessian import HessianOperator

# A new direction whose part outside the basis is below this fraction of its length carries no new
# information (in a Krylov space all residuals are parallel up to round-off): it is dropped, not paid for.
_RANK_TOL = 1e-2


class KrylovBasis:
    """An orthonormal basis V (rows), its image HV, the projected matrix T = V·HVᵀ and the Gram matrix of
    the image G = HV·HVᵀ (both float64, m × m).

    G makes the residuals of every Ritz pair known without touching an n-vector: for coefficient columns
    S (Ritz vectors Y = SᵀV, values Θ, TS = SΘ) and V·Vᵀ = I, the residuals R = SᵀHV − ΘSᵀV have
    R·Rᵀ = SᵀGS − Θ² (:meth:`residual_gram`). That costs O(m²) instead of the 2·p·m·n of forming Y and R,
    which on a 5.8M-parameter model was a third of the solve. It loses precision where residuals are tiny
    (cancellation against Θ², and V·Vᵀ = I only to the dtype's round-off), so it only steers the iteration;
    whatever the solver reports comes from explicit residuals (:meth:`explicit`).
    V and HV live in buffers that grow by doubling, so adding a vector does not copy the basis.
    """

    def __init__(self, op: HessianOperator, capacity: int = 16) -> None:
        self.op, self.m = op, 0
        self._V = torch.empty(capacity, op.n_params, device=op.device, dtype=op.dtype)
        self._HV = torch.empty_like(self._V)
        self.T = torch.empty(0, 0, dtype=torch.float64, device=op.device)
        self.G = torch.empty(0, 0, dtype=torch.float64, device=op.device)

    def __len__(self) -> int:
        return self.m

    @property
    def V(self) -> Tensor:
        return self._V[: self.m]

    @property
    def HV(self) -> Tensor:
        return self._HV[: self.m]

    def _project_out(self, W: Tensor) -> Tensor:
        """W minus its part in span(V): classical Gram–Schmidt, repeated when a row lost most of its norm
        (then round-off in the first pass is no longer negligible; "twice is enough")."""
        for _ in range(2):
            before = W.norm(dim=1)
            W = W - (W @ self.V.T) @ self.V
            if (W.norm(dim=1) > 0.7 * before).all():
                break
        return W

    def _new_directions(self, W: Tensor) -> Tensor:
        """An orthonormal basis of the part of span(W) outside span(V), strongest directions first."""
        W = self._project_out(W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny))
        evals, Q = torch.linalg.eigh((W @ W.T).double())
        keep = evals > _RANK_TOL**2
        Q, evals = Q[:, keep].flip(1), evals[keep].flip(0)
        W = (Q.T.to(W.dtype) @ W) / evals.sqrt().to(W.dtype)[:, None]
        return torch.linalg.qr(W.T).Q.T if len(W) else W

    def extend(self, W: Tensor, limit: int) -> int:
        """Add the new directions in ``W`` (at most ``limit``), applying H to them; returns how many."""
        P = self._new_directions(W)[: max(limit, 0)]
        b = len(P)
        if not b:
            return 0
        # A single vector skips the block machinery, which has a fixed overhead.
        HP = self.op.matmat(P) if b > 1 else self.op.matvec(P[0])[None]
        m = self.m
        if m + b > len(self._V):
            cap = max(2 * len(self._V), m + b)
            self._V = torch.cat([self.V, self._V.new_empty(cap - m, self._V.shape[1])])
            self._HV = torch.cat([self.HV, self._HV.new_empty(cap - m, self._HV.shape[1])])
        self.T = self._grow(self.T, (self.V @ HP.T).double(), (P @ HP.T).double())
        self.G = self._grow(self.G, (self.HV @ HP.T).double(), (HP @ HP.T).double())
        self._V[m : m + b], self._HV[m : m + b], self.m = P, HP, m + b
        return b

    @staticmethod
    def _grow(A: Tensor, cross: Tensor, corner: Tensor) -> Tensor:
        """The symmetric matrix [[A, cross], [crossᵀ, corner]] (corner symmetrised)."""
        m, b = cross.shape
        out = torch.zeros(m + b, m + b, dtype=torch.float64, device=A.device)
        out[:m, :m], out[:m, m:], out[m:, :m], out[m:, m:] = A, cross, cross.T, (corner + corner.T) / 2
        return out

    def residual_gram(self, S: Tensor, theta: Tensor) -> Tensor:
        """R·Rᵀ = SᵀGS − Θ² for the Ritz pairs with coefficient columns ``S`` and values ``theta`` (cheap;
        see the class docstring for its precision)."""
        return S.T @ self.G @ S - torch.diag(theta**2)

    def explicit(self, S: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        """The Ritz vectors Y = SᵀV and their residuals R = SᵀHV − ΘY, as n-vectors (rows)."""
        Sd = S.to(self._V.dtype)
        Y = Sd.T @ self.V
        return Y, Sd.T @ self.HV - theta.to(Y.dtype)[:, None] * Y

    def residual_directions(self, S: Tensor, theta: Tensor, gram: Tensor, noise: float = 0.0) -> Tensor:
        """The span of the residuals of the pairs (S, theta), without the directions that carry nothing new.

        From a Krylov space the residuals of all Ritz pairs are parallel: the Gram matrix of the normalised
        residuals has one eigenvalue that matters, and one n-vector is formed instead of len(theta). The
        combinations kept are those whose normalised Gram eigenvalue exceeds ``_RANK_TOL²`` and the error
        that ``noise`` (the absolute error of the residual norms in ``gram``) puts on it, p·noise²/min_i d_i²:
        a rank decision taken on round-off would make the path depend on it."""
        d = gram.diagonal().clamp_min(0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        evals, Q = torch.linalg.eigh(gram / d[:, None] / d[None, :])
        floor = max(_RANK_TOL**2, len(d) * noise**2 / float(d.min()) ** 2)
        Q = Q[:, evals > floor].flip(1)
        if not Q.shape[1]:  # all residuals below round-off: let the strongest one speak
            j = int(d.argmax())
            Q = torch.eye(len(d), dtype=Q.dtype, device=Q.device)[:, j : j + 1]
        C = Q / d[:, None]  # combinations of the normalised residuals
        Sd, Cd = S.to(self._V.dtype), C.to(self._V.dtype)
        return (Sd @ Cd).T @ self.HV - ((Sd * theta.to(Sd.dtype)[None, :]) @ Cd).T @ self.V

    def ritz(self, which: str) -> tuple[Tensor, Tensor]:
        """Ritz values (float64) and coefficient columns, best first for ``which``."""
        theta, S = torch.linalg.eigh(self.T)
        order = torch.argsort(theta.abs() if which == "LM" else theta, descending=True)
        return theta[order], S[:, order]

    def restart(self, S: Tensor, theta: Tensor) -> None:
        """Compress the basis to the Ritz vectors with coefficient columns ``S`` and values ``theta``."""
        Sd, p = S.to(self._V.dtype), S.shape[1]
        self._V[:p], self._HV[:p] = Sd.T @ self.V, Sd.T @ self.HV
        self.m, self.T, self.G = p, torch.diag(theta), S.T @ self.G @ S
