"""The gradient_noise probe against two oracles on least squares, where C and H are known in closed form.

With L(w) = (1/M)·Σ_i ℓ_i, ℓ_i = (x_iᵀw − y_i)², the per-example gradients are ∇ℓ_i = 2·x_i·r_i (r_i the
residual), H = (2/M)·XᵀX exactly, and the gradient of a size-B minibatch drawn without replacement has
covariance C = (M − B)/(B·(M − 1))·Σ with Σ the per-example covariance (see sgdscope.curvature.noise).

* plain loop: the same draws (the probe's generator, replayed), per-example gradients formed explicitly,
  averaged, and the sample covariance formed densely (6 × 6) and diagonalised: equal to round-off;
* closed form: many draws against the exact C, H, tr(C)/tr(H) and the overlap of C's top-m eigenvectors
  with H's top-K, within 5 standard errors computed from the draws themselves (the CLT on n draws), and
  for the overlap within a Davis–Kahan bound computed from the sample's own ‖Ĉ − C‖.
"""

import math

import pytest
import torch
from torch import nn

from sgdscope import seeds
from sgdscope.curvature.flat import get_flat
from sgdscope.curvature.noise import gradient_noise
from sgdscope.errors import ConfigError
from sgdscope.measure.scope import Scope

M, D, B, SEED = 64, 6, 16, 2
F64 = torch.float64


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, D, generator=g, dtype=F64) * torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=F64)
    noise = torch.randn(M, generator=g, dtype=F64)
    w = torch.randn(D, generator=g, dtype=F64)
    # at the true weights, with noise whose size grows with |x₃| (a low-curvature coordinate): C is not a
    # multiple of H, and its top direction leans away from H's top subspace
    y = x @ w + noise * 6 * x[:, 3].abs()
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    return model, x, y


def measured(model, x, y, probe):
    """The probe's rows at step 0 of a Scope in a plain loop (every: 5, so only step 0 is measured)."""
    scope = Scope(model, mse, [(x[:40], y[:40]), (x[40:], y[40:])], seed=SEED, batch_size=B,
                  probes={"eigen": {"every": 5, "k": 3, "tol": 1e-10}, "gradient_noise": {"every": 5, **probe}})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with scope.step(opt):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return scope.table("gradient_noise"), scope.table("gradient_noise_step").iloc[0]


def per_example_grads(w, x, y):
    return torch.stack([2 * x[i] * (x[i] @ w - y[i]) for i in range(len(y))])


def replayed_grads(w, x, y, n):
    """The probe's n minibatch gradients by hand: its generator replayed, per-example gradients averaged."""
    per = per_example_grads(w, x, y)
    gen = seeds.generator(SEED, "gradient-noise", 0)
    return torch.stack([per[torch.randperm(M, generator=gen)[:B]].mean(dim=0) for _ in range(n)])


def closed_form(w, x, y):
    per = per_example_grads(w, x, y)
    dev = per - per.mean(dim=0)
    sigma = dev.T @ dev / M  # per-example covariance over the M examples
    C = (M - B) / (B * (M - 1)) * sigma
    H = 2 * x.T @ x / M
    return C, H


def top(mat, k):
    vals, vecs = torch.linalg.eigh(mat)
    return vals.flip(0)[:k], vecs.flip(1)[:, :k].T  # (k,), (k, d) rows


def overlap(U, V):
    return float((U @ V.T).square().sum()) / len(U)


def test_matches_a_plain_loop_over_per_example_gradients():
    model, x, y = problem()
    w = get_flat(model)
    n, k, m = 12, 3, 2
    rows, step = measured(model, x, y, {"n_grads": n, "k": k, "m": m, "trace_samples": 40})
    G = replayed_grads(w, x, y, n)
    Gc = G - G.mean(dim=0)
    C_hat = sum(torch.outer(g, g) for g in Gc) / (n - 1)
    _, H = closed_form(w, x, y)
    lam, V = top(H, k)
    for i in range(k):
        proj = [float(g @ V[i]) for g in G]
        mean = sum(proj) / n
        var = sum((p - mean) ** 2 for p in proj) / (n - 1)
        r = rows[rows["eigen_index"] == i + 1].iloc[0]
        assert r["variance"] == pytest.approx(var, rel=1e-9)
        assert r["eigenvalue"] == pytest.approx(float(lam[i]), rel=1e-9)
        assert r["ratio"] == pytest.approx(var / float(lam[i]), rel=1e-9)
    assert step["trace_c"] == pytest.approx(float(torch.trace(C_hat)), rel=1e-9)
    assert step["overlap"] == pytest.approx(overlap(top(C_hat, m)[1], V), rel=1e-7)
    assert step["noise_top"] == pytest.approx(float(top(C_hat, 1)[0][0]), rel=1e-9)
    assert step["overlap_chance"] == k / D and (step["m"], step["k"], step["n_params"]) == (m, k, D)
    assert (step["batch_size"], step["measure_size"]) == (B, M)
    # Hutchinson: unbiased, its recorded standard error covers the exact trace
    tr_h = float(torch.trace(H))
    assert 0 < step["trace_h_stderr"] and abs(step["trace_h"] - tr_h) < 5 * step["trace_h_stderr"]
    assert step["trace_ratio"] == pytest.approx(step["trace_c"] / step["trace_h"], rel=1e-12)


def test_agrees_with_the_closed_form_covariance_within_its_standard_errors():
    model, x, y = problem()
    w = get_flat(model)
    n, k, m = 800, 3, 1
    rows, step = measured(model, x, y, {"n_grads": n, "k": k, "m": m, "trace_samples": 200})
    C, H = closed_form(w, x, y)
    lam, V = top(H, k)
    G = replayed_grads(w, x, y, n)  # only for the standard errors and ‖Ĉ − C‖, never for the value tested
    Gc = G - G.mean(dim=0)
    for i in range(k):
        sq = (Gc @ V[i]).square()
        se = float(sq.std()) / math.sqrt(n)  # standard error of the sample variance (CLT on n draws)
        got = float(rows[rows["eigen_index"] == i + 1]["variance"].iloc[0])
        assert abs(got - float(V[i] @ C @ V[i])) < 5 * se, (i, got, float(V[i] @ C @ V[i]), se)
    se_tr = float(Gc.square().sum(dim=1).std()) / math.sqrt(n)
    assert abs(step["trace_c"] - float(torch.trace(C))) < 5 * se_tr
    # tr(C)/tr(H): both errors propagated (first order)
    ratio = float(torch.trace(C) / torch.trace(H))
    se_ratio = ratio * math.hypot(se_tr / float(torch.trace(C)), step["trace_h_stderr"] / float(torch.trace(H)))
    assert abs(step["trace_ratio"] - ratio) < 5 * se_ratio
    # overlap (m = 1, unit û against u): |û·Q·û − u·Q·u| = |⟨ûûᵀ − uuᵀ, Q⟩| ≤ ‖ûûᵀ − uuᵀ‖_*·‖Q‖₂ = 2·sin θ with
    # Q = V_HᵀV_H a projector, and sin θ ≤ 2‖Ĉ − C‖₂/(λ₁(C) − λ₂(C)) (Davis–Kahan as Yu, Wang & Samworth 2015
    # state it): a bound computed from this sample's own error, not a tuned tolerance
    E = Gc.T @ Gc / (n - 1) - C
    evals = torch.linalg.eigvalsh(C).flip(0)
    bound = 2 * 2 * float(torch.linalg.matrix_norm(E, 2)) / float(evals[0] - evals[1])
    want = overlap(top(C, m)[1], V)
    assert bound < 0.3  # the bound says something at this n
    assert abs(step["overlap"] - want) <= bound
    assert want < 0.9  # the closed form is not a trivial 1 here (0.884)


def test_gram_route_equals_the_dense_covariance_on_random_data():
    g = torch.Generator().manual_seed(3)
    G = torch.randn(9, 30, generator=g, dtype=F64) * torch.linspace(3, 0.1, 30, dtype=F64)
    V = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=F64)).Q.T
    s = gradient_noise(G, V, m=3)
    Gc = G - G.mean(dim=0)
    C = Gc.T @ Gc / 8  # 30 × 30: the oracle only
    assert s.overlap == pytest.approx(overlap(top(C, 3)[1], V), rel=1e-9)
    assert s.variance.tolist() == pytest.approx(torch.diagonal(V @ C @ V.T).tolist(), rel=1e-10)
    assert s.trace == pytest.approx(float(torch.trace(C)), rel=1e-12)
    same = gradient_noise(G[:1].expand(5, -1).clone(), V, m=1)  # every draw the same batch: no noise direction
    assert math.isnan(same.overlap) and same.trace < 1e-25


def test_bad_options_are_one_line_config_errors():
    model, x, y = problem()
    for bad, field in (({"m": 4, "k": 3}, "probes.gradient_noise"), ({"n_grads": 2}, "probes.gradient_noise.n_grads"),
                       ({"trace_samples": 1}, "probes.gradient_noise.trace_samples")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
            Scope(model, mse, (x, y), probes={"gradient_noise": bad})
        assert "\n" not in str(err.value)
