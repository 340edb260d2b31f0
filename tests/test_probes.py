"""Each trajectory probe, driven by a Scope in a plain loop, against closed forms on a least-squares model.

With L(w) = (1/N)·Σ (x_iᵀw − y_i)², the Hessian is exactly H = (2/N)·XᵀX and the loss along any direction
is an exact parabola: L(w + t·e) = L(w) + t·⟨∇L, e⟩ + ½·t²·eᵀHe. So the eigenpairs, the bowl, k_min, the
α-steps and the interpolation the probes report can all be computed by hand, independently of the
probes' code paths (no HVPs, no functional calls: plain linear algebra in float64).
"""

import math

import pytest
import torch
from torch import nn

from sgdscope import seeds
from sgdscope.curvature.flat import get_flat
from sgdscope.measure.scope import Scope

N, D, BATCH, LR = 64, 6, 16, 0.05


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


SEED = 1
MEASURE = slice(0, 40), slice(40, None)  # uneven measurement batches on purpose


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * scales
    y = torch.randn(N, generator=g, dtype=torch.float64)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, D, generator=g, dtype=torch.float64))
    H = 2 * x.T @ x / N
    evals, evecs = torch.linalg.eigh(H)
    return model, x, y, H, evals.flip(0), evecs.flip(1).T


EIGEN = {"every": 1, "k": 3, "tol": 1e-10, "max_hvps": 200}


def scope_after_one_step(model, x, y, probes, lr=LR):
    """A Scope in a plain loop: one full-batch SGD step of ``lr`` from θ_0; returns (scope, θ_0, θ_1)."""
    scope = Scope(model, mse, [(x[s], y[s]) for s in MEASURE], probes=probes, seed=SEED, batch_size=BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    theta0 = get_flat(model)
    with scope.step(opt):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return scope, theta0, get_flat(model)


def at_step(scope, table, step=1):
    df = scope.table(table)
    return df[df["step"] == step].to_dict("records")


def loss(w, x, y):
    return float(((x @ w - y) ** 2).mean())


def grad(w, x, y):
    return 2 * x.T @ (x @ w - y) / len(x)


def minibatch_grads_by_hand(tag, step, n, w, x, y):
    gen = seeds.generator(SEED, tag, step)
    out = []
    for _ in range(n):
        idx = torch.randperm(N, generator=gen)[:BATCH]
        out.append(grad(w, x[idx], y[idx]))
    return torch.stack(out)


def test_eigen_probe_matches_dense_eigh(setup):
    model, x, y, H, evals, evecs = setup
    scope, _, _ = scope_after_one_step(model, x, y, {"eigen": EIGEN})
    rows = at_step(scope, "eigen")
    assert [r["value"] for r in rows] == pytest.approx(evals[:3].tolist(), rel=1e-8)  # H is constant in w
    assert at_step(scope, "curvature")[0]["frobenius_topk"] == pytest.approx(float(evals[:3].norm()), rel=1e-8)
    assert all(r["converged"] == 1 for r in rows)
    assert sorted(scope.table("eigen")["step"].unique()) == [0, 1]  # every: 1 → step 0 and after the update


def test_direction_probe_bowl_and_k_min_by_hand(setup):
    model, x, y, H, evals, evecs = setup
    ks = [0, 0.5, -0.5, 1, -1, 2, -2, 4, -4, 8, -8]
    probes = {"eigen": EIGEN, "direction": {"every": 1, "eigen_indices": [1, 3], "ks": ks, "n_grads": 5,
                                            "thresholds": [0.01, 0.1]}}
    scope, _, w = scope_after_one_step(model, x, y, probes)
    direction, kmins = at_step(scope, "direction"), at_step(scope, "k_min")
    G = minibatch_grads_by_hand("direction", 1, 5, w, x, y)
    l0, g = loss(w, x, y), grad(w, x, y)
    res = scope.eigenpairs()
    for i in (1, 3):
        e = res.vectors[i - 1]
        assert abs(float(e @ evecs[i - 1])) == pytest.approx(1.0, abs=1e-8)
        scale = LR * float((G @ e).abs().mean())  # Jastrzebski's typical step along e_i
        mine = [r for r in direction if r["eigen_index"] == i]
        assert mine[0]["step_scale"] == pytest.approx(scale, rel=1e-10)
        lam = float(e @ H @ e)
        expect = {k: l0 + k * scale * float(g @ e) + 0.5 * lam * (k * scale) ** 2 for k in sorted(set(ks))}
        for r in mine:
            assert r["loss"] == pytest.approx(expect[r["k"]], rel=1e-10)
        for t in (0.01, 0.1):  # smallest grid k > 0 with a rise ≥ t·L(θ) on both sides
            up = lambda k: expect[k] >= (1 + t) * l0  # noqa: E731
            pos = [k for k in sorted(expect) if k > 0 and up(k)]
            want = min(pos) if pos and any(up(k) for k in expect if k < 0) else math.nan
            got = next(r["k_min"] for r in kmins if r["eigen_index"] == i and r["threshold"] == t)
            assert (math.isnan(got) and math.isnan(want)) or got == want


def test_alpha_step_probe_by_hand(setup):
    model, x, y, H, evals, evecs = setup
    alphas = [0.25, 0.5, 1, 2, 4]
    probes = {"eigen": EIGEN, "alpha_step": {"every": 1, "eigen_indices": [1], "alphas": alphas, "n_grads": 4}}
    scope, _, w = scope_after_one_step(model, x, y, probes)
    rows = at_step(scope, "alpha_step")
    G = minibatch_grads_by_hand("alpha-step", 1, 4, w, x, y)
    e = scope.eigenpairs().vectors[0]
    l0 = loss(w, x, y)
    for a in alphas:
        change = sum(loss(w - a * LR * float(gj @ e) * e, x, y) for gj in G) / len(G) - l0
        r = next(r for r in rows if r["eigen_index"] == 1 and r["alpha"] == a)
        assert r["loss_change"] == pytest.approx(change, rel=1e-9, abs=1e-14)
        assert r["relative_change"] == pytest.approx(change / l0, rel=1e-9, abs=1e-14)
    assert {r["direction"] for r in rows} == {"e1", "random"}


def test_alignment_probe_by_hand(setup):
    model, x, y, H, evals, evecs = setup
    w0 = get_flat(model)
    g_step = grad(w0, x, y)  # the gradient the update used: full batch, at θ_0
    scope, _, w = scope_after_one_step(model, x, y, {"eigen": EIGEN, "alignment": {"every": 1}})
    g = grad(w, x, y)
    rows = at_step(scope, "alignment")
    assert len(rows) == 3
    for r in rows:
        e = scope.eigenpairs().vectors[r["eigen_index"] - 1]
        assert r["cos_full"] == pytest.approx(float(g @ e / g.norm()), rel=1e-8)
        assert r["cos_minibatch"] == pytest.approx(float(g_step @ e / g_step.norm()), rel=1e-8)


def test_interpolation_probe_is_the_exact_parabola(setup):
    model, x, y, H, evals, evecs = setup
    lr = 0.9 * 2 / float(evals[0])  # a long step: the segment dips and rises again
    scope, a, b = scope_after_one_step(model, x, y, {"interpolation": {"every": 1, "alphas": 10, "epochs": None}}, lr)
    assert torch.allclose(b, a - lr * grad(a, x, y), rtol=0, atol=1e-12)
    curve = [loss((1 - al) * a + al * b, x, y) for al in torch.linspace(0, 1, 11).tolist()]
    interp = scope.table("interpolation")
    assert interp["step"].tolist() == [0] * 11 and interp["logged_at"].tolist() == [1] * 11
    assert interp["loss"].tolist() == pytest.approx(curve, rel=1e-10)
    v = scope.table("valley").iloc[0]
    assert v["step"] == 0 and v["floor"] == pytest.approx(min(curve), rel=1e-10)
    assert v["height"] == pytest.approx(curve[0] - min(curve), rel=1e-9)
    assert v["barrier"] == 0  # a convex parabola has no interior point above both ends


def test_step_statistics_by_hand(setup):
    model, x, y, H, evals, evecs = setup
    scope = Scope(model, mse, (x, y), seed=SEED)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    theta0, grads = get_flat(model), []
    for t in range(3):
        w = get_flat(model)
        grads.append(grad(w, x[t::3], y[t::3]))
        with scope.step(opt):
            opt.zero_grad()
            mse(model(x[t::3]), y[t::3]).backward()
            opt.step()
    train = scope.table("train")
    assert train["step"].tolist() == [1, 2, 3] and train["lr"].tolist() == [LR] * 3
    assert train["grad_norm"].tolist() == pytest.approx([float(g.norm()) for g in grads], rel=1e-10)
    cos = [float(a @ b / (a.norm() * b.norm())) for a, b in zip(grads, grads[1:])]
    assert math.isnan(train["grad_cosine_prev"][0]) and train["grad_cosine_prev"][1:].tolist() == pytest.approx(cos, rel=1e-10)
    assert train["param_distance"].iloc[-1] == pytest.approx(float((get_flat(model) - theta0).norm()), rel=1e-12)
    scope.end_epoch(val_loss=0.5)
    ep = scope.table("epoch").iloc[0]
    assert (ep["epoch"], ep["step"], ep["val_loss"]) == (1, 3, 0.5)
    assert ep["weight_spectral_norm_mean"] == pytest.approx(float(get_flat(model).norm()), rel=1e-6)  # one row
