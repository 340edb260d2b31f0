"""Extreme eigenpairs of a symmetric operator from Hessian-vector products.

The solver is a block Krylov–Schur method written as a thick-restart Rayleigh–Ritz iteration:

* keep an orthonormal basis V (rows) and its image HV, and the projected matrix T = V·HVᵀ;
* the Ritz pairs (θ_i, y_i = Vᵀ s_i) come from ``eigh(T)`` in float64; their residuals
  r_i = H y_i − θ_i y_i = HVᵀ s_i − θ_i Vᵀ s_i are exact (no extra products) and orthogonal to V;
* the basis grows by the residuals of the wanted pairs that have not converged (soft locking: converged
  pairs stay in the basis and keep being refined, but stop costing products);
* when the basis is full it restarts on the best ``k + guard`` Ritz vectors.

Started from one random vector, all Ritz residuals of a Krylov space are parallel, the basis grows by one
vector per product and this *is* Lanczos with full reorthogonalisation and Krylov–Schur restarts. Started
from a block (``init``: the previous eigenvectors along a trajectory) it is block Lanczos on that block: the
first block product already gives the Rayleigh–Ritz pairs of the old subspace, and an eigenspace that moved
little converges in a few more; along a trajectory the previous call's ``basis`` (its k + guard Ritz
vectors) is that block. The stopping rule is on each of the k wanted pairs, never on an iteration count
alone: its residual ‖H y_i − θ_i y_i‖ ≤ tol·|θ_i| and its eigenvalue error bound (:func:`ritz_error_bounds`,
quadratic in the residuals where the Ritz values are separated) ≤ tol_eig·|θ_i|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sgdscope.curvature.hessian import HessianOperator
from sgdscope.curvature.krylov import KrylovBasis

WHICH = ("LA", "LM")
# Default residual targets (relative) from a random start and from a warm block; the default eigenvalue
# target tol_eig = 1e-3 then decides a warm solve. bench/results/tracking.json measures both.
COLD_TOL, WARM_TOL = 1e-3, 5e-2


@dataclass
class EigenResult:
    """Eigenpairs of H, sorted by value, descending.

    ``values`` (k,); ``vectors`` (k, n) orthonormal rows on the operator's device; ``residuals`` (k,) the
    *relative* residuals ‖Hv − λv‖/|λ|; ``error_bounds`` (k,) an *absolute* bound on |λ_true − λ| (see
    :func:`ritz_error_bounds` for the formula and what it assumes); ``basis`` (k + guard, n) orthonormal rows:
    ``vectors`` followed by the guard Ritz vectors, to pass as ``init`` to the next solve along a trajectory;
    ``n_hvps`` products spent; ``converged``: every wanted pair meets ``tol`` on its residual and, when
    ``tol_eig`` is set, error_bound ≤ tol_eig·|λ|; ``which``; ``iterations`` (basis expansions);
    ``has_negative`` (a negative value is in the set).
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    n_hvps: int
    converged: bool
    which: str
    iterations: int
    tol: float
    error_bounds: Tensor
    basis: Tensor
    tol_eig: float | None = None

    @property
    def has_negative(self) -> bool:
        return bool((self.values < 0).any())

    @property
    def message(self) -> str:
        """One line, fit for a log or a warning."""
        worst = float(self.residuals.max())
        err = float((self.error_bounds / self.values.abs().clamp_min(torch.finfo(self.values.dtype).tiny)).max())
        state = "converged" if self.converged else "NOT converged"
        target = f"tol {self.tol:.0e}" + (f", tol_eig {self.tol_eig:.0e}" if self.tol_eig is not None else "")
        return (
            f"top-{len(self.values)} {self.which} eigenpairs {state}: max residual {worst:.2e}, max relative "
            f"eigenvalue error bound {err:.2e} ({target}) after {self.n_hvps} HVPs, {self.iterations} iterations"
        )


def ritz_error_bounds(theta: Tensor, gram: Tensor, k: int, roundoff: float = 0.0) -> Tensor:
    """Absolute error bounds for the first ``k`` Ritz values ``theta`` (all m of the basis, float64, best
    first), from ``gram`` = R Rᵀ (p × p), the Gram matrix of the residuals r_j = H y_j − θ_j y_j of the first
    p ≥ k Ritz pairs.

    For a unit vector y with Rayleigh quotient θ and residual r = ‖Hy − θy‖:

    * Bauer–Fike (Krylov–Weinstein for symmetric H): some eigenvalue lies in [θ − r, θ + r];
    * Kato–Temple: if δ is the distance from θ to every *other* eigenvalue, the eigenvalue that y
      approximates lies within r²/δ of θ.

    The bound for pair i is e_i = min(r_i, r_i²/δ_i), with δ_i = min_{j≠i} (|θ_i − θ_j| − e_j) over all Ritz
    values of the basis (wanted, guard and the rest; e_j = 0 beyond the p whose residuals are known). The
    eigenvalue of θ_j lies within e_j of it, so δ_i lower-bounds the distance from θ_i to the eigenvalues the
    other Ritz pairs have found; δ_i ≤ 0 (a cluster the basis cannot split yet), or no other Ritz value,
    gives r_i. The e_j start as r_j (Bauer–Fike) and a few passes replace them by the bounds themselves.

    A tight cluster would leave every member at r_i, so the same bound is also taken for windows W of Ritz
    pairs adjacent in value (the cluster-robust form, Kahan and Mathias for a Rayleigh–Ritz block): with
    ρ_W = ‖R_W‖₂ and η_W = min_{i∈W, j∉W} (|θ_i − θ_j| − r_j), each θ_i of W is within min(ρ_W, ρ_W²/η_W) of
    its eigenvalue; pair i gets the smallest bound of the windows that contain it (W = {i} is the above).

    The last (least wanted) Ritz value of the basis borders the part of the spectrum the basis has not
    explored, so windows that contain it get no gap (the bound r): a basis of exactly k vectors certifies
    its k-th value by the residual alone, while k + guard vectors give it a neighbour on that side.

    Assumption (the part no Krylov method can check): no eigenvalue the basis has missed lies closer to θ_i
    than the gap used. For which="LA", Cauchy interlacing also gives θ_i ≤ λ_i: the error is one-sided.
    ``roundoff`` is added to every bound: the solver passes √n·ε·max|θ|, the typical error of a Ritz value
    accumulated over n entries in a dtype with machine epsilon ε (5e-7 relative was measured on a float32
    MLP of 17k parameters, where min(r, r²/δ) alone claimed 1e-11).

    >>> ritz_error_bounds(torch.tensor([3.0, 1.0], dtype=torch.float64), torch.diag(torch.tensor([0.01, 0.25])), 2)
    tensor([0.0067, 0.5000], dtype=torch.float64)
    """
    # A handful of tiny matrices: on the CPU, where each step is not a device launch. Every window is
    # handled at once (a batched eigvalsh and masked reductions): the loop over windows cost 19 ms a call
    # in Python, a quarter of an epoch-wise eigen probe on a small MLP; tests keep that loop as an oracle.
    device, theta, gram = theta.device, theta.cpu(), gram.cpu().to(theta.dtype)
    m, p = len(theta), len(gram)
    # err[j]: a radius around θ_j holding its eigenvalue, r_j to begin with (0 where unknown, j ≥ p).
    err = torch.zeros_like(theta)
    err[:p] = gram.diagonal().clamp_min(0).sqrt() + roundoff
    # Windows: runs a..b of the first p pairs in value order; member[w, i] says pair i is in window w.
    a, b = torch.triu_indices(p, p)
    ranks = torch.empty(p, dtype=torch.long)
    ranks[torch.argsort(theta[:p])] = torch.arange(p)
    member = (a[:, None] <= ranks[None, :]) & (ranks[None, :] <= b[:, None])
    inside = torch.zeros(len(a), m, dtype=torch.bool)
    inside[:, :p] = member
    # ρ_W: the zero padding of a PSD block leaves its largest eigenvalue (clamped at 0) unchanged.
    pad = member[:, :, None] & member[:, None, :]
    rho = torch.linalg.eigvalsh(torch.where(pad, gram[None], 0.0))[:, -1].clamp_min(0).sqrt()
    big = torch.tensor(float("inf"), dtype=theta.dtype)
    dist = torch.where(member[:, :, None], (theta[:p, None] - theta[None, :]).abs()[None], big).amin(dim=1)
    # The least wanted Ritz value borders the spectrum the basis has not explored: no gap there.
    gapless = inside[:, m - 1] | inside.all(dim=1)
    # The gaps shrink by the neighbours' radii; once those are quadratic bounds themselves the gaps widen,
    # so a few passes tighten every bound (each pass keeps them valid: it only uses valid radii).
    for _ in range(3):
        eta = torch.where(inside, big, dist - err[None, :]).amin(dim=1)
        eta = torch.where(gapless | (eta <= 0), 0.0, eta)
        bound = torch.where(eta > 0, torch.minimum(rho, rho**2 / torch.where(eta > 0, eta, 1.0)), rho) + roundoff
        new = torch.minimum(err[:p], torch.where(member, bound[:, None], big).amin(dim=0))
        if torch.equal(new, err[:p]):
            break
        err[:p] = new
    return err[:k].to(device)


def default_generator(op: HessianOperator, generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a fresh one seeded with 0 on the operator's device: random starts never touch the
    global random streams (which training uses) and are reproducible."""
    return generator if generator is not None else torch.Generator(op.device).manual_seed(0)


def random_start(op: HessianOperator, m: int, generator: torch.Generator, kind: str = "gaussian") -> Tensor:
    """m random rows of length n on the operator's device: Gaussian, or Rademacher (±1) with ``kind``."""
    shape = (m, op.n_params)
    if kind == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=generator.device).to(op.dtype) * 2 - 1
    else:
        z = torch.randn(shape, generator=generator, device=generator.device, dtype=op.dtype)
    return z.to(op.device)


def top_eigenpairs(
    op: HessianOperator,
    k: int = 5,
    which: str = "LA",
    tol: float | None = None,
    max_hvps: int = 500,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    block_size: int = 1,
    guard: int = 3,
    max_basis: int | None = None,
    tol_eig: float | None = 1e-3,
) -> EigenResult:
    """The k eigenpairs of H with the largest values (``which="LA"``) or magnitudes (``"LM"``).

    A wanted Ritz pair has converged when ‖Hy − θy‖ ≤ tol·|θ| and, unless ``tol_eig`` is None, when its
    eigenvalue error bound (:func:`ritz_error_bounds`) is ≤ tol_eig·|θ|. ``tol=None`` (the default) is
    ``WARM_TOL`` when ``init`` has at least k rows and ``COLD_TOL`` otherwise: a warm block already spans
    the neighbourhood of the wanted eigenvalues, so the bound can govern, while a Krylov space grown from
    one random vector can still be missing an eigenvalue when its bounds look good (their gaps assume none
    is missed; bench/tracking.py saw a cold solve at tol 5e-2 stop 11% off), and the tighter residual keeps
    it growing until one would have shown. The solve stops when all k have converged, or when the next
    expansion would exceed ``max_hvps`` products (then ``converged`` is False and the best pairs so far
    are returned). ``init`` (m, n): vectors to start from, any m; along a trajectory pass the
    previous call's ``basis`` (its k + guard Ritz vectors): the first block product then gives the
    Rayleigh–Ritz pairs of the old subspace, and a solve whose warm block already meets the criteria stops
    after those k + guard products. Otherwise ``block_size`` random vectors from ``generator``. ``guard``
    extra Ritz pairs are kept across restarts and returned in ``basis``; the basis holds at most
    ``max_basis`` vectors (default max(4(k + guard), 40)). For "LM" the set is the k largest |λ|, returned
    sorted by value (``has_negative`` flags negatives).

    Diagonal H = diag(5, 4, -6, 1, 0.5, 0.1):

    >>> import torch
    >>> from sgdscope.models.quadratic import Quadratic, output_mean
    >>> A = torch.diag(torch.tensor([5.0, 4.0, -6.0, 1.0, 0.5, 0.1], dtype=torch.float64))
    >>> op = HessianOperator(Quadratic(A), output_mean, [(torch.zeros(1), torch.zeros(1))])
    >>> top_eigenpairs(op, k=2, tol=1e-10).values.round(decimals=8)
    tensor([5., 4.], dtype=torch.float64)
    >>> res = top_eigenpairs(op, k=2, which="LM", tol=1e-10)
    >>> res.values.round(decimals=8), res.has_negative, res.converged
    (tensor([ 5., -6.], dtype=torch.float64), True, True)
    >>> res.vectors.abs().round()
    tensor([[1., 0., 0., 0., 0., 0.],
            [0., 0., 1., 0., 0., 0.]], dtype=torch.float64)
    >>> warm = top_eigenpairs(op, k=2, which="LM", tol=1e-10, init=res.basis)
    >>> warm.n_hvps == len(res.basis) == 2 + 3, warm.converged
    (True, True)
    """
    n = op.n_params
    if which not in WHICH:
        raise ValueError(f"which={which!r} is not one of {', '.join(WHICH)}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of parameters ({n})")
    if init is not None and (init.ndim != 2 or init.shape[1] != n):
        raise ValueError(f"init must have shape (m, {n}), got {tuple(init.shape)}")
    if tol is None:
        tol = WARM_TOL if init is not None and len(init) >= k else COLD_TOL
    if tol <= 0 or (tol_eig is not None and tol_eig <= 0) or block_size < 1 or guard < 0:
        raise ValueError("tol and tol_eig must be positive, block_size at least 1 and guard non-negative")
    keep = min(k + guard, n)
    max_basis = min(n, max_basis or max(4 * keep, 40))
    if max_basis < keep + 1 and max_basis < n:
        raise ValueError(f"max_basis={max_basis} must exceed k + guard = {keep}")

    roundoff = n**0.5 * torch.finfo(op.dtype).eps
    start_hvps = op.n_hvps
    gen = default_generator(op, generator)
    basis = KrylovBasis(op, max_size=max_basis)
    start = init.to(device=op.device, dtype=op.dtype) if init is not None else random_start(op, block_size, gen)
    basis.extend(start, min(max_hvps, max_basis))

    def assess(gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Relative residuals, error bounds and the converged mask of the wanted pairs, from a residual Gram."""
        rnorm = gram.diagonal().clamp_min(0).sqrt()
        bounds = ritz_error_bounds(theta_all, gram, min(k, len(theta)), roundoff * float(theta_all.abs().max()))
        scale = theta[:k].abs().clamp_min(torch.finfo(torch.float64).tiny)
        res = rnorm[:k] / scale
        ok = res <= tol
        if tol_eig is not None:
            ok &= bounds <= tol_eig * scale
        return res, bounds, ok

    iterations = 0
    while True:
        theta_all, S_all = basis.ritz(which)
        theta, S = theta_all[:keep], S_all[:, :keep]
        # The kept pairs and the next one, whose distance bounds the last kept pair's gap. Their residuals
        # are formed explicitly: one pass over V and HV that serves the decision and the expansion alike.
        Sp, theta_p = S_all[:, : keep + 1], theta_all[: keep + 1]
        Y, R = basis.explicit(Sp, theta_p)
        gram = (R @ R.T).double()
        res, bounds, ok = assess(gram)
        budget = max_hvps - (op.n_hvps - start_hvps)
        if (len(res) == k and bool(ok.all())) or budget <= 0:
            break
        active = (~ok).nonzero().flatten()
        W = basis.residual_span(R, gram, active) if len(active) else None
        if W is not None and len(basis) + len(W) > max_basis:
            basis.restart(S, theta)
        limit = min(budget, max_basis - len(basis))
        added = basis.extend(W, limit) if W is not None else 0
        if not added and len(basis) < n:
            # Too few pairs yet, or residuals lost in round-off: widen the basis at random.
            added = basis.extend(random_start(op, 1, gen), limit)
        if not added:  # nothing left to add (the whole space, or round-off): report the basis as it is now
            theta_all, S_all = basis.ritz(which)
            theta, Sp, theta_p = theta_all[:keep], S_all[:, : keep + 1], theta_all[: keep + 1]
            Y, R = basis.explicit(Sp, theta_p)
            res, bounds, ok = assess((R @ R.T).double())
            break
        iterations += 1

    order = torch.argsort(theta[:k], descending=True)
    kept = torch.cat([order, torch.arange(len(order), len(theta), device=order.device)])
    return EigenResult(
        values=theta[order].to(op.dtype),
        vectors=Y[order],
        residuals=res[order].to(op.dtype),
        n_hvps=op.n_hvps - start_hvps,
        converged=len(res) == k and bool(ok.all()),
        which=which,
        iterations=iterations,
        tol=tol,
        error_bounds=bounds[order].to(op.dtype),
        basis=Y[kept],
        tol_eig=tol_eig,
    )
