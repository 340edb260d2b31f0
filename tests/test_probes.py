"""Each trajectory probe against closed forms on a least-squares model.

With L(w) = (1/N)·Σ (x_iᵀw − y_i)², the Hessian is exactly H = (2/N)·XᵀX and the loss along any direction
is an exact parabola: L(w + t·e) = L(w) + t·⟨∇L, e⟩ + ½·t²·eᵀHe. So the eigenpairs, the bowl, k_min, the
α-steps and the interpolation the probes report can all be computed by hand, independently of the
probes' code paths (no HVPs, no functional calls: plain linear algebra in float64).
"""

import math

import pytest
import torch
from torch import nn

from sgdscope.config import AlphaStepProbe as AlphaCfg
from sgdscope.config import DirectionProbe as DirCfg
from sgdscope.config import EigenProbe as EigCfg
from sgdscope.config import InterpolationProbe as InterpCfg
from sgdscope.config import validate
from sgdscope.curvature.flat import get_flat, set_flat
from sgdscope.probes.base import Context, StepInfo
from sgdscope.probes.eigen import EigenProbe, EigenTracker
from sgdscope.probes.sharpest import AlignmentProbe, AlphaStepProbe, DirectionProbe
from sgdscope.probes.walk import InterpolationProbe

N, D, BATCH, LR = 64, 6, 16, 0.05


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * scales
    y = torch.randn(N, generator=g, dtype=torch.float64)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, D, generator=g, dtype=torch.float64))
    cfg = validate({"seed": 1, "device": "cpu", "optimizer": {"lr": LR, "batch_size": BATCH}})
    ctx = Context(
        cfg=cfg, model=model, loss_fn=mse, dataset=None, device=torch.device("cpu"), measure_x=x, measure_y=y,
        measure_batches=[(x[:40], y[:40]), (x[40:], y[40:])],  # uneven on purpose
        train_batches=[(x, y)], theta0=get_flat(model), steps_per_epoch=4,
    )
    ctx.tracker = EigenTracker(ctx, k=3, tol=1e-10, max_hvps=200)
    H = 2 * x.T @ x / N
    evals, evecs = torch.linalg.eigh(H)
    return ctx, x, y, H, evals.flip(0), evecs.flip(1).T

    
def loss(w, x, y):
    return float(((x @ w - y) ** 2).mean())


def grad(w, x, y):
    return 2 * x.T @ (x @ w - y) / len(x)


def minibatch_grads_by_hand(ctx, tag, step, n, w, x, y):
    gen = ctx.generator(tag, step)
    out = []
    for _ in range(n):
        idx = torch.randperm(N, generator=gen)[:BATCH]
        out.append(grad(w, x[idx], y[idx]))
    return torch.stack(out)


def info(step=4):
    return StepInfo(step=step, epoch=1, epoch_end=True, lr=LR)


def test_eigen_probe_matches_dense_eigh(setup):
    ctx, x, y, H, evals, evecs = setup
    rows = EigenProbe(EigCfg(k=3, tol=1e-10), ctx).measure(info())
    got = [r["value"] for r in rows["eigen"]]
    assert got == pytest.approx(evals[:3].tolist(), rel=1e-8)
    assert rows["curvature"][0]["frobenius_topk"] == pytest.approx(float(evals[:3].norm()), rel=1e-8)
    assert all(r["converged"] == 1 for r in rows["eigen"])


def test_direction_probe_bowl_and_k_min_by_hand(setup):
    ctx, x, y, H, evals, evecs = setup
    ks = [0, 0.5, -0.5, 1, -1, 2, -2, 4, -4, 8, -8]
    rows = DirectionProbe(DirCfg(eigen_indices=[1, 3], ks=ks, n_grads=5, thresholds=[0.01, 0.1]), ctx).measure(info())
    w = get_flat(ctx.model)
    G = minibatch_grads_by_hand(ctx, "direction", 4, 5, w, x, y)
    l0, g = loss(w, x, y), grad(w, x, y)
    res = ctx.tracker.get(4)
    for i in (1, 3):
        e = res.vectors[i - 1]
        assert abs(float(e @ evecs[i - 1])) == pytest.approx(1.0, abs=1e-8)
        scale = LR * float((G @ e).abs().mean())  # Jastrzebski's typical step along e_i
        mine = [r for r in rows["direction"] if r["eigen_index"] == i]
        assert mine[0]["step_scale"] == pytest.approx(scale, rel=1e-10)
        lam = float(e @ H @ e)
        expect = {k: l0 + k * scale * float(g @ e) + 0.5 * lam * (k * scale) ** 2 for k in sorted(set(ks))}
        for r in mine:
            assert r["loss"] == pytest.approx(expect[r["k"]], rel=1e-10)
        for t in (0.01, 0.1):  # smallest grid k > 0 with a rise ≥ t·L(θ) on both sides
            up = lambda k: expect[k] >= (1 + t) * l0  # noqa: E731
            pos = [k for k in sorted(expect) if k > 0 and up(k)]
            want = min(pos) if pos and any(up(k) for k in expect if k < 0) else math.nan
            got = next(r["k_min"] for r in rows["k_min"] if r["eigen_index"] == i and r["threshold"] == t)
            assert (math.isnan(got) and math.isnan(want)) or got == want


def test_alpha_step_probe_by_hand(setup):
    ctx, x, y, H, evals, evecs = setup
    alphas = [0.25, 0.5, 1, 2, 4]
    rows = AlphaStepProbe(AlphaCfg(eigen_indices=[1], alphas=alphas, n_grads=4), ctx).measure(info())["alpha_step"]
    w = get_flat(ctx.model)
    G = minibatch_grads_by_hand(ctx, "alpha-step", 4, 4, w, x, y)
    e = ctx.tracker.get(4).vectors[0]
    l0 = loss(w, x, y)
    for a in alphas:
        change = sum(loss(w - a * LR * float(gj @ e) * e, x, y) for gj in G) / len(G) - l0
        r = next(r for r in rows if r["eigen_index"] == 1 and r["alpha"] == a)
        assert r["loss_change"] == pytest.approx(change, rel=1e-9, abs=1e-14)
        assert r["relative_change"] == pytest.approx(change / l0, rel=1e-9, abs=1e-14)
    assert {r["direction"] for r in rows} == {"e1", "random"}


def test_alignment_probe_by_hand(setup):
    ctx, x, y, H, evals, evecs = setup
    w = get_flat(ctx.model)
    g_mini = grad(w, x[:BATCH], y[:BATCH])
    rows = AlignmentProbe(EigCfg(), ctx).measure(StepInfo(step=4, epoch=1, epoch_end=True, lr=LR, grad=g_mini))
    g = grad(w, x, y)
    for r in rows["alignment"]:
        e = ctx.tracker.get(4).vectors[r["eigen_index"] - 1]
        assert r["cos_full"] == pytest.approx(float(g @ e / g.norm()), rel=1e-8)
        assert r["cos_minibatch"] == pytest.approx(float(g_mini @ e / g_mini.norm()), rel=1e-8)


def test_interpolation_probe_is_the_exact_parabola(setup):
    ctx, x, y, H, evals, evecs = setup
    a = get_flat(ctx.model)
    b = a - 0.9 * (2 / float(evals[0])) * grad(a, x, y)  # a long step: the segment dips and rises again
    set_flat(ctx.model, b)
    probe = InterpolationProbe(InterpCfg(alphas=10, epochs=None), ctx)
    assert probe.wants_prev(5, 1, False)
    rows = probe.measure(StepInfo(step=5, epoch=1, epoch_end=False, lr=LR, theta_prev=a))
    curve = [loss((1 - al) * a + al * b, x, y) for al in torch.linspace(0, 1, 11).tolist()]
    assert [r["loss"] for r in rows["interpolation"]] == pytest.approx(curve, rel=1e-10)
    v = rows["valley"][0]
    assert v["step"] == 4 and v["floor"] == pytest.approx(min(curve), rel=1e-10)
    assert v["height"] == pytest.approx(curve[0] - min(curve), rel=1e-9)
    assert v["barrier"] == 0  # a convex parabola has no interior point above both ends
