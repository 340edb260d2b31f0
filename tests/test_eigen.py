"""The eigensolver's error bounds, bound-based stopping, warm basis and tracking, against independent oracles.

Oracles: ``torch.linalg.eigh`` of matrices built with a known spectrum, scipy's ARPACK ``eigsh`` on a
``LinearOperator``, and (when installed) hessian-eigenthings' Hessian operator and Lanczos solver.
The solver only needs ``matvec``, ``matmat``, ``n_params``, ``device``, ``dtype`` and ``n_hvps`` from its
operator, so most tests drive it with a dense matrix behind that interface.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before scipy: ARPACK's BLAS threads fight torch's

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from sgdscope.curvature import HessianOperator, top_eigenpairs
from sgdscope.curvature.eigen import ritz_error_bounds
from sgdscope.losses import cross_entropy

F64 = torch.float64
K, GUARD = 5, 3  # top_eigenpairs' defaults


class MatrixOp:
    """A dense symmetric matrix behind the operator interface that ``top_eigenpairs`` uses."""

    def __init__(self, H: torch.Tensor) -> None:
        self.H, self.n_params, self.device, self.dtype, self.n_hvps = H, H.shape[0], H.device, H.dtype, 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_hvps += 1
        return self.H @ v

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.n_hvps += len(V)
        return V @ self.H  # rows H v_i, H being symmetric


def orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)).Q


def with_spectrum(lam, seed: int = 0) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=F64)
    Q = orthogonal(len(lam), seed)
    H = Q @ torch.diag(lam) @ Q.T
    return (H + H.T) / 2


def bulk(n: int, top: list[float], seed: int) -> list[float]:
    """``top`` followed by n − len(top) values spread over [−0.5, 1] (a Hessian-like bulk near zero)."""
    rest = torch.rand(n - len(top), generator=torch.Generator().manual_seed(seed), dtype=F64) * 1.5 - 0.5
    return list(top) + rest.tolist()


def true_top(H: torch.Tensor, k: int, which: str = "LA") -> torch.Tensor:
    lam = torch.linalg.eigvalsh(H)
    idx = torch.argsort(lam.abs() if which == "LM" else lam, descending=True)[:k]
    return lam[idx].sort(descending=True).values


SPECTRA = {
    "separated": [10.0, 8.0, 6.5, 5.0, 4.0, 3.0, 2.5],
    "clustered": [10.0, 9.99, 9.98, 6.0, 5.999, 5.0, 4.99],  # two clusters the solver cannot split early
    "hessian-like": [9.3, 8.9, 8.2, 8.1, 7.5, 7.2, 6.9],  # a trained MLP's top-7 (bench/tracking.py)
}


def kept_ritz(H: torch.Tensor, res) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values and absolute residual norms of all k + guard kept pairs (``res.basis``), from H."""
    HB = res.basis @ H
    theta = (HB * res.basis).sum(dim=1)
    return theta, (HB - theta[:, None] * res.basis).norm(dim=1)


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("max_hvps", [12, 20, 35, 500])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_bounds_bound_the_true_error(spectrum, max_hvps, seed):
    """On budget-cut and converged solves alike |θ_i − λ_i| ≤ error_bounds[i] wherever the bound's stated
    assumption holds, and the bound is never looser than the residual (Bauer–Fike, |θ|·residual).

    The assumption fails early in a solve, when the Krylov space has not found an eigenvalue yet (λ = 5 of
    "separated" at 12 products, seed 0; or the partner of a tight pair): the oracle sees it as a kept Ritz
    value lying further below its λ_i than its residual (interlacing makes θ_i ≤ λ_i). There only the
    rigorous part is checked: each θ_i has an eigenvalue within its residual. From 20 products on the
    assumption holds in every case here, which the test checks too.
    """
    H = with_spectrum(bulk(300, SPECTRA[spectrum], seed), seed)
    res = top_eigenpairs(MatrixOp(H), k=K, tol=1e-9, max_hvps=max_hvps, generator=torch.Generator().manual_seed(seed))
    lam = torch.linalg.eigvalsh(H).flip(0)
    abs_res = res.residuals * res.values.abs()
    assert (res.error_bounds <= abs_res + 1e-12).all()
    nearest = (res.values[:, None] - lam[None, :]).abs().min(dim=1).values
    assert (nearest <= abs_res + 1e-12).all()
    theta, r = kept_ritz(H, res)
    found_all = bool((lam[: len(theta)] - theta <= r + 1e-12).all())
    assert found_all or max_hvps < 20
    if found_all:
        err = (res.values - lam[:K]).abs()
        # + 1e-12: the dense reference's own error (≈ n·ε·‖H‖ = 7e-13 here), as in the assertions above
        assert (err <= res.error_bounds + 1e-12).all(), (err, res.error_bounds)
    if max_hvps == 500:
        assert res.converged


def test_error_bounds_are_quadratic_in_the_residual_when_separated():
    """Separated pairs get r²/δ, not r: at residual 1e-4 the bound is about 1e-8, and still holds."""
    H = with_spectrum(bulk(200, SPECTRA["separated"], 3), 3)
    res = top_eigenpairs(MatrixOp(H), k=K, tol=1e-4)
    abs_res = res.residuals * res.values.abs()
    err = (res.values - true_top(H, K)).abs()
    assert (err <= res.error_bounds).all()
    assert (res.error_bounds <= abs_res**2 / 0.5 + 1e-12).all()  # true gaps are ≥ 1
    assert (res.error_bounds < abs_res / 100).all()


def test_ritz_error_bounds_formula():
    """Hand-derived cases: the quadratic bound with gaps shrunk by the neighbours' bounds; the pair block
    form; the last Ritz value (the frontier of the unexplored spectrum) and overlaps get r."""
    theta = torch.tensor([5.0, 4.0, 1.0], dtype=F64)
    r = torch.tensor([0.1, 0.2, 0.5], dtype=F64)
    gram = torch.diag(r**2)
    # θ=4: as a block with 5 (residual norm 0.2, gap to 1 is 3 less its radius 0.5) 0.2²/2.5, below its
    # own 0.2²/(1 − e_5); θ=5: 0.1²/(1 − e_4); θ=1 borders the unexplored spectrum: r.
    want = torch.tensor([0.01 / (1 - 0.016), 0.04 / 2.5, 0.5], dtype=F64)
    torch.testing.assert_close(ritz_error_bounds(theta, gram, 3), want)
    torch.testing.assert_close(ritz_error_bounds(theta[:1], gram[:1, :1], 1), r[:1])
    close = torch.tensor([5.0, 4.9, 1.0], dtype=F64)
    torch.testing.assert_close(ritz_error_bounds(close[:2], gram[:2, :2], 2), r[:2])
    # With the third value the overlapping pair is a block 3.9 − 0.5 away from the rest.
    torch.testing.assert_close(ritz_error_bounds(close, gram, 2), torch.full((2,), 0.04 / 3.4, dtype=F64))
    with_roundoff = ritz_error_bounds(close, gram, 2, roundoff=1e-3)
    assert (with_roundoff >= 0.04 / 3.4 + 1e-3).all()


def test_a_basis_of_k_vectors_certifies_the_last_value_by_its_residual():
    """With init = k vectors the k-th Ritz value has no neighbour below it in the basis: its bound is its
    residual, not a quadratic bound against the values above it (which would claim far too much)."""
    H = with_spectrum(bulk(200, SPECTRA["hessian-like"], 9), 9)
    lam, Q = torch.linalg.eigh(H)
    noise = 1e-2 * torch.randn(K, 200, generator=torch.Generator().manual_seed(9), dtype=F64)
    res = top_eigenpairs(MatrixOp(H), k=K, init=Q[:, -K:].T + noise, max_hvps=K)
    torch.testing.assert_close(res.error_bounds[-1], res.residuals[-1] * res.values[-1].abs(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_stopping_on_the_eigenvalue_bound_meets_its_target(spectrum):
    """tol_eig alone (tol = 1, i.e. no residual criterion) stops when bound ≤ tol_eig·|θ|: the true error
    meets the target, and the solve is cheaper than asking the residual for the same accuracy."""
    H = with_spectrum(bulk(300, SPECTRA[spectrum], 4), 4)
    lam = true_top(H, K)
    by_bound = top_eigenpairs(MatrixOp(H), k=K, tol=1.0, tol_eig=1e-8)
    assert by_bound.converged and by_bound.tol_eig == 1e-8
    assert ((by_bound.values - lam).abs() / lam.abs() <= 1e-8).all()
    assert (by_bound.error_bounds / by_bound.values.abs() <= 1e-8).all()
    by_residual = top_eigenpairs(MatrixOp(H), k=K, tol=1e-8)
    assert by_bound.n_hvps < by_residual.n_hvps, (by_bound.n_hvps, by_residual.n_hvps)


def test_both_criteria_must_hold():
    """converged means residual ≤ tol and bound ≤ tol_eig: a tight residual tol still governs."""
    H = with_spectrum(bulk(200, SPECTRA["separated"], 5), 5)
    res = top_eigenpairs(MatrixOp(H), k=K, tol=1e-7, tol_eig=1e-2)
    assert res.converged and (res.residuals <= 1e-7).all()
    loose = top_eigenpairs(MatrixOp(H), k=K, tol=1e-2, tol_eig=1e-2)
    assert loose.n_hvps < res.n_hvps
    assert "tol_eig" in res.message and "eigenvalue error bound" in res.message


def test_basis_round_trips_as_init():
    """``basis`` is k + guard orthonormal rows starting with ``vectors``; fed back at the same operator it
    meets the criteria after exactly one block product of k + guard."""
    H = with_spectrum(bulk(200, SPECTRA["hessian-like"], 6), 6)
    res = top_eigenpairs(MatrixOp(H), k=K, tol=1e-6)
    assert res.basis.shape == (K + GUARD, 200)
    torch.testing.assert_close(res.basis @ res.basis.T, torch.eye(K + GUARD, dtype=F64), rtol=0, atol=1e-10)
    assert torch.equal(res.basis[:K], res.vectors)
    op = MatrixOp(H)
    warm = top_eigenpairs(op, k=K, tol=1e-6, init=res.basis)
    assert warm.converged and warm.n_hvps == op.n_hvps == K + GUARD
    torch.testing.assert_close(warm.values, res.values, rtol=1e-10, atol=0)
    # More rows than k + guard are accepted; the basis returned is k + guard again.
    extra = torch.cat([res.basis, torch.randn(4, 200, generator=torch.Generator().manual_seed(0), dtype=F64)])
    wide = top_eigenpairs(MatrixOp(H), k=K, tol=1e-6, init=extra)
    assert wide.converged and wide.n_hvps == K + GUARD + 4 and wide.basis.shape == (K + GUARD, 200)


def rotating(n: int, steps: int, seed: int = 7):
    """H_t = Q_t Λ_t Q_tᵀ: Q_t = Q_0·exp(tS) for a small random skew S (‖S‖₂ = 0.007: the eigenvectors turn by at
    most 0.7% a step), Λ_t drifting by up to 0.2% a step."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64)
    step = torch.linalg.matrix_exp(3e-4 * (A - A.T) / 2)
    lam0 = torch.tensor(bulk(n, SPECTRA["hessian-like"], seed), dtype=F64)
    Q = orthogonal(n, seed)
    for t in range(steps):
        lam = lam0 * (1 + 0.002 * t * torch.linspace(1, -1, n, dtype=F64))
        H = Q @ torch.diag(lam) @ Q.T
        yield (H + H.T) / 2
        Q = Q @ step


def test_warm_tracking_along_a_rotating_trajectory():
    """Warm solves (init = the previous basis) at the default settings take a median of ≤ 2k products,
    every value within 1e-3 of eigh and every residual ≤ 5e-2; cold solves at the defaults cost more.
    (Most steps stop after the one block product of the warm basis, k + guard = 8.)"""
    warm_hvps, cold_hvps, prev = [], [], None
    for H in rotating(300, 25):
        lam = true_top(H, K)
        cold = top_eigenpairs(MatrixOp(H), k=K)
        res = top_eigenpairs(MatrixOp(H), k=K, init=prev.basis) if prev is not None else cold
        for r in (cold, res):
            assert r.converged and ((r.values - lam).abs() / lam <= 1e-3).all() and (r.residuals <= 5e-2).all()
            assert ((r.values - lam).abs() <= r.error_bounds).all()
        if prev is not None:
            warm_hvps.append(res.n_hvps)
            cold_hvps.append(cold.n_hvps)
        prev = res
    assert np.median(warm_hvps) <= 2 * K, warm_hvps
    assert np.median(warm_hvps) < np.median(cold_hvps), (warm_hvps, cold_hvps)
    assert min(warm_hvps) == K + GUARD


@pytest.mark.parametrize("which", ["LA", "LM"])
def test_agrees_with_eigsh_on_a_linear_operator(which):
    lam = bulk(250, [7.0, -9.0, 6.0, 5.5, -6.2, 4.0], 8)
    H = with_spectrum(lam, 8)
    lin = LinearOperator((250, 250), matvec=lambda v: (H @ torch.from_numpy(v.ravel())).numpy(), dtype=np.float64)
    ref = np.sort(eigsh(lin, k=K, which=which, tol=1e-12, v0=np.ones(250))[0])[::-1]
    res = top_eigenpairs(MatrixOp(H), k=K, which=which, tol=1e-6, tol_eig=1e-10)
    np.testing.assert_allclose(res.values.numpy(), ref, rtol=1e-9)
    assert ((res.values.numpy() - ref) ** 2 <= res.error_bounds.numpy() ** 2 + 1e-24).all()


def test_cross_library_hessian_eigenthings():
    """Our operator and solver against hessian-eigenthings' Hessian operator and Lanczos on a small MLP."""
    he = pytest.importorskip("hessian_eigenthings")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 6, generator=g, dtype=F64), torch.randint(0, 3, (60,), generator=g)
    batches = [(x[:30], y[:30]), (x[30:], y[30:])]  # equal sizes: the peer averages batch means
    peer_op = he.HessianOperator(model, batches, he.supervised_loss(cross_entropy))
    ours_op = HessianOperator(model, cross_entropy, batches)
    v = torch.randn(ours_op.n_params, generator=g, dtype=F64)
    torch.testing.assert_close(ours_op.matvec(v), peer_op.matvec(v), rtol=1e-10, atol=1e-12)
    peer = he.lanczos(peer_op, k=K, which="LA", tol=1e-10, seed=0, max_iter=ours_op.n_params, reorthogonalize=True)
    assert bool(peer.converged.all())
    res = top_eigenpairs(ours_op, k=K, tol=1e-6, tol_eig=1e-10)
    torch.testing.assert_close(res.values, peer.eigenvalues.sort(descending=True).values, rtol=1e-8, atol=0)


def test_bad_tol_eig():
    op = MatrixOp(with_spectrum(bulk(20, [3.0, 2.0], 0)))
    for bad in (0.0, -1e-3):
        with pytest.raises(ValueError, match="tol_eig"):
            top_eigenpairs(op, k=2, tol_eig=bad)


def test_error_bounds_cover_float32_roundoff():
    """A float32 operator's Ritz values carry round-off that no residual shows (min(r, r²/δ) falls far
    below it at a tight tol): the bound's √n·ε·max|θ| term covers the error against the float64 Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 5))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(400, 20, generator=g), torch.randint(0, 5, (400,), generator=g)
    res = top_eigenpairs(HessianOperator(model, cross_entropy, [(x, y)]), k=K, tol=1e-5)
    exact = HessianOperator(model.to(F64), cross_entropy, [(x.to(F64), y)]).dense()
    err = (res.values.double() - true_top(exact, K)).abs()
    assert res.converged and (err <= res.error_bounds.double()).all(), (err, res.error_bounds)
    assert (res.error_bounds / res.values.abs() < 1e-4).all()


def _bounds_loop(theta, gram, k, roundoff=0.0):
    """ritz_error_bounds written as the plain loop over windows it was first (the vectorised one's oracle)."""
    m, p = len(theta), len(gram)
    err = torch.zeros_like(theta)
    err[:p] = gram.diagonal().clamp_min(0).sqrt() + roundoff
    by_value = torch.argsort(theta[:p])
    windows = []
    for a in range(p):
        for b in range(a, p):
            W = by_value[a : b + 1]
            outside = torch.ones(m, dtype=torch.bool)
            outside[W] = False
            rho = float(torch.linalg.eigvalsh(gram[W][:, W])[-1].clamp_min(0).sqrt())
            dist = (theta[W, None] - theta[None, outside]).abs().min(dim=0).values
            windows.append((W, outside, dist, rho, bool((W == m - 1).any())))
    for _ in range(3):
        new = err[:p].clone()
        for W, outside, dist, rho, frontier in windows:
            eta = float((dist - err[outside]).min()) if outside.any() and not frontier else 0.0
            new[W] = new[W].clamp_max((min(rho, rho**2 / eta) if eta > 0 else rho) + roundoff)
        if torch.equal(new, err[:p]):
            break
        err[:p] = new
    return err[:k]


@pytest.mark.parametrize("seed", range(40))
def test_ritz_error_bounds_equal_the_plain_loop(seed):
    """The batched windows give the loop's bounds: random Ritz values (with clusters), residual Grams of
    any rank, p ≤ m known residuals, with and without round-off."""
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 12, (1,), generator=g))
    p = int(torch.randint(1, m + 1, (1,), generator=g))
    theta = torch.randn(m, generator=g, dtype=F64).sort(descending=True).values
    if seed % 3 == 0 and m > 2:  # a tight cluster
        theta[1] = theta[0] - 1e-3
    R = torch.randn(p, int(torch.randint(1, p + 1, (1,), generator=g)), generator=g, dtype=F64) * 10.0 ** float(
        torch.randint(-4, 0, (1,), generator=g))
    gram = R @ R.T
    k = int(torch.randint(1, p + 1, (1,), generator=g))
    roundoff = 1e-6 if seed % 2 else 0.0
    torch.testing.assert_close(ritz_error_bounds(theta, gram, k, roundoff), _bounds_loop(theta, gram, k, roundoff),
                               rtol=1e-12, atol=1e-15)


def test_basis_memory_is_bounded_by_max_basis():
    """The V/HV buffers never hold more than max_basis rows (2·max_basis·n numbers), however many products
    a slow solve spends on restarts."""
    from sgdscope.curvature.krylov import KrylovBasis

    H = with_spectrum(bulk(300, SPECTRA["clustered"], 1), seed=3)
    op = MatrixOp(H)
    basis = KrylovBasis(op, max_size=20)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        basis.extend(torch.randn(7, 300, generator=g, dtype=F64), 20 - len(basis))
        assert len(basis) <= 20 and basis.nbytes <= 2 * 20 * 300 * 8
    res = top_eigenpairs(op, k=K, tol=1e-8, max_basis=20, max_hvps=400)
    assert res.converged
    torch.testing.assert_close(res.values, true_top(H, K), rtol=1e-7, atol=0)
