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
    """An orthonormal basis V (rows), its image HV and the projected matrix T = V·HVᵀ (float64, m × m).

    The solver reads the residuals of its Ritz pairs explicitly at every iteration, R = SᵀHV − ΘSᵀV for
    coefficient columns S and values Θ (:meth:`explicit`): that is one pass over V and HV, and the new
    directions are combinations of those rows (:meth:`residual_span`), so the residuals that decide
    convergence and the vectors that extend the basis come from the same pass. (An earlier version
    steered on the cheap Gram SᵀGS − Θ² of G = HV·HVᵀ, which costs no pass but in float32 cannot see a
    residual below √ε·|θ|, 3e-4 relative; near the default tolerance it then needed explicit checks as
    well, and keeping G cost a pass per product.)
    V and HV live in buffers that grow by doubling up to ``max_size`` rows, so adding a vector rarely copies
    the basis and the memory is bounded: at most 2·max_size·n numbers of the operator's dtype (the solver's
    default max_size of 40 is 1.9 GB for a 5.8M-parameter float32 model), plus the Ritz vectors and
    residuals of one iteration, 2·(k + guard + 1)·n.
    """

    def __init__(self, op: HessianOperator, capacity: int = 16, max_size: int | None = None) -> None:
        self.op, self.m, self.max_size = op, 0, max_size or op.n_params
        # With a stated bound the buffers take it at once: growing them copied V and HV twice on the way to
        # 40 rows (a tenth of a 5.8M-parameter solve), and on the CPU untouched pages cost no memory.
        capacity = max_size if max_size is not None else min(capacity, self.max_size)
        self._V = torch.empty(capacity, op.n_params, device=op.device, dtype=op.dtype)
        self._HV = torch.empty_like(self._V)
        self.T = torch.empty(0, 0, dtype=torch.float64, device=op.device)
        self._Y = self._R = self._last = self._last_S = None  # explicit()'s buffers and its last call

    @property
    def nbytes(self) -> int:
        """Bytes held by the V and HV buffers now."""
        return 2 * self._V.numel() * self._V.element_size()

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
        if len(W) <= 1:  # a Householder QR of an (n, 1) matrix is a normalisation at several times its cost
            return W / W.norm(dim=1, keepdim=True) if len(W) else W
        return torch.linalg.qr(W.T).Q.T

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
            cap = max(min(2 * len(self._V), self.max_size), m + b)
            self._V = torch.cat([self.V, self._V.new_empty(cap - m, self._V.shape[1])])
            self._HV = torch.cat([self.HV, self._HV.new_empty(cap - m, self._HV.shape[1])])
        self.T = self._grow(self.T, (self.V @ HP.T).double(), (P @ HP.T).double())
        self._V[m : m + b], self._HV[m : m + b], self.m = P, HP, m + b
        self._last = None
        return b

    @staticmethod
    def _grow(A: Tensor, cross: Tensor, corner: Tensor) -> Tensor:
        """The symmetric matrix [[A, cross], [crossᵀ, corner]] (corner symmetrised)."""
        m, b = cross.shape
        out = torch.zeros(m + b, m + b, dtype=torch.float64, device=A.device)
        out[:m, :m], out[:m, m:], out[m:, :m], out[m:, m:] = A, cross, cross.T, (corner + corner.T) / 2
        return out

    def explicit(self, S: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        """The Ritz vectors Y = SᵀV and their residuals R = SᵀHV − ΘY, as n-vectors (rows).

        They are written into buffers that the next call overwrites (copy what must outlive it): on the
        CPU a fresh (p, n) tensor is a fresh mapping whose pages fault in one by one, which made this pass
        2-3x slower at 5.8M parameters than the products into a reused buffer."""
        p, Sd = S.shape[1], S.to(self._V.dtype)
        if self._Y is None or len(self._Y) < p:
            self._Y, self._R = self._V.new_empty(p, self._V.shape[1]), self._V.new_empty(p, self._V.shape[1])
        Y, R = self._Y[:p], self._R[:p]
        self._last, self._last_S = (Y, R), S
        torch.matmul(Sd.T, self.V, out=Y)
        torch.matmul(Sd.T, self.HV, out=R)
        R.sub_(theta.to(Y.dtype)[:, None] * Y)
        return Y, R

    @staticmethod
    def residual_span(R: Tensor, gram: Tensor, rows: Tensor) -> Tensor:
        """The span of the residuals ``R[rows]`` (``gram`` = R·Rᵀ, float64) without the directions that carry
        nothing new, strongest first.

        From a Krylov space the residuals of all Ritz pairs are parallel: the Gram matrix of the normalised
        residuals has one eigenvalue that matters, and one direction is added instead of len(rows). Kept are
        the combinations whose normalised Gram eigenvalue exceeds ``_RANK_TOL²``. (The combinations are
        taken over all rows of R, zero outside ``rows``, so no (len(rows), n) copy is made.)"""
        sub = gram[rows][:, rows]
        d = sub.diagonal().clamp_min(0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        evals, Q = torch.linalg.eigh(sub / d[:, None] / d[None, :])
        Q = Q[:, evals > _RANK_TOL**2].flip(1)
        if not Q.shape[1]:  # all residuals zero: let the strongest one speak
            j = int(d.argmax())
            Q = torch.eye(len(d), dtype=Q.dtype, device=Q.device)[:, j : j + 1]
        C = Q.new_zeros(len(R), Q.shape[1])
        C[rows] = Q / d[:, None]
        return C.T.to(R.dtype) @ R

    def ritz(self, which: str) -> tuple[Tensor, Tensor]:
        """Ritz values (float64) and coefficient columns, best first for ``which``."""
        theta, S = torch.linalg.eigh(self.T)
        order = torch.argsort(theta.abs() if which == "LM" else theta, descending=True)
        return theta[order], S[:, order]

    def restart(self, S: Tensor, theta: Tensor) -> None:
        """Compress the basis to the Ritz vectors with coefficient columns ``S`` and values ``theta``.

        When :meth:`explicit` last ran on coefficients whose first columns are ``S`` (as the solver calls
        it), its Ritz vectors are the new V and R + ΘY the new HV: no pass over the basis."""
        p = S.shape[1]
        Y, R = self._last if self._last is not None else (None, None)
        if Y is None or len(Y) < p or not torch.equal(self._last_S[:, :p], S):
            Y, R = self.explicit(S, theta)
        self._V[:p] = Y[:p]
        torch.addcmul(R[:p], theta.to(Y.dtype)[:, None], Y[:p], out=self._HV[:p])
        self.m, self.T, self._last = p, torch.diag(theta), None
