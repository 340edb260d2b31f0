"""Gauss–Newton and empirical Fisher operators against dense and plain-loop oracles.

Oracles (independent of the operators' jvp / vjp products):
* GGN: the dense Σ_b (n_b/N) J_bᵀ H_ℓ J_b from torch.autograd.functional.jacobian (outputs in θ) and
  .hessian (loss in the outputs), and GGN = Hessian on models linear in θ (MSE and CE);
* Fisher: a plain loop of autograd.grad over the per-example losses of each batch's forward pass, and
  per-sample gradients by torch.func.vmap(grad) on one-example batches (no BN).
Every case runs on CE and MSE, with BN (batch statistics), dropout under fixed masks and ignore_index padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian

from sgdscope.curvature import HessianOperator
from sgdscope.curvature.flat import get_flat, named_trainable
from sgdscope.curvature.ggn import FisherOperator, GGNOperator
from sgdscope.policy import fixed_masks, measurement_mode

F64 = torch.float64
SEED = 11
CASES = [("mlp", "train-restore"), ("cnn_bn", "train-restore"),
         ("frozen_layer", "train-restore"), ("dropout", "train-restore")]


def _split(model, flat):
    out, i = {}, 0
    for n, p in named_trainable(model):
        out[n] = flat[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _forward(model, flat, x, b, policy):
    """The model's outputs with the trainable parameters replaced by ``flat``, batch b's masks, no BN writes."""
    state = {**{n: t.clone() for n, t in model.named_buffers()},
             **{n: p.detach() for n, p in model.named_parameters()}, **_split(model, flat)}
    with measurement_mode(model, policy), fixed_masks(SEED, b):
        return torch.func.functional_call(model, state, (x,))


def dense_ggn(model, loss_fn, batches, policy, ignore_index=None):
    theta = get_flat(model).detach()
    ns = [int((y != ignore_index).sum()) if ignore_index is not None else y.numel() for _, y in batches]
    total, G = sum(ns), torch.zeros(len(theta), len(theta), dtype=F64)
    for b, ((x, y), n) in enumerate(zip(batches, ns)):
        if n == 0:
            continue
        z = _forward(model, theta, x, b, policy)
        J = jacobian(lambda t: _forward(model, t, x, b, policy).reshape(-1), theta)
        Hl = hessian(lambda zz: loss_fn(zz.reshape(z.shape), y), z.detach().reshape(-1))
        G += n / total * J.T @ Hl @ J
    return G


def loop_fisher(model, loss_fn, batches, policy, ignore_index=None):
    """(1/N) Σ_i n_i ∇ℓ_i∇ℓ_iᵀ, ℓ_i the loss of example i on its batch's forward pass, by autograd.grad."""
    params = [p for _, p in named_trainable(model)]
    grads, weights = [], []
    for b, (x, y) in enumerate(batches):
        with measurement_mode(model, policy), fixed_masks(SEED, b):
            saved = {n: t.clone() for n, t in model.named_buffers()}
            out = model(x)
            for i in range(len(y)):
                n_i = int((y[i] != ignore_index).sum()) if ignore_index is not None else y[i].numel()
                if n_i == 0:
                    continue
                g = torch.autograd.grad(loss_fn(out[i : i + 1], y[i : i + 1]), params, retain_graph=True,
                                        allow_unused=True)
                grads.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                                        for gi, p in zip(g, params)]))
                weights.append(n_i)
            for n, t in model.named_buffers():
                t.copy_(saved[n])
    Gs, w = torch.stack(grads), torch.tensor(weights, dtype=F64)
    return (Gs.T * w) @ Gs / w.sum()


def _mse_onehot(out, y):
    return 0.5 * ((out - F.one_hot(y, out.shape[-1]).to(out.dtype)) ** 2).sum(-1).mean()


@pytest.mark.parametrize("cid,policy", CASES)
def test_ggn_equals_dense_jt_hl_j(make_case, cid, policy):
    c = make_case(cid)
    op = GGNOperator(c.model, c.loss_fn, c.batches, bn_policy=policy, mask_seed=SEED)
    torch.testing.assert_close(op.dense(), dense_ggn(c.model, c.loss_fn, c.batches, policy), rtol=1e-9, atol=1e-11)
    assert op.n_hvps == op.n_params


@pytest.mark.parametrize("cid,policy", CASES)
def test_fisher_equals_loop_over_example_gradients(make_case, cid, policy):
    c = make_case(cid)
    op = FisherOperator(c.model, c.loss_fn, c.batches, bn_policy=policy, mask_seed=SEED)
    torch.testing.assert_close(op.dense(), loop_fisher(c.model, c.loss_fn, c.batches, policy), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_padding_with_ignore_index(make_case, loss):
    """Padded targets carry no weight (a fully padded batch none at all), in G and in F, on CE and MSE, on a
    per-token model with dropout (fixed masks under train-restore)."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Dropout(0.3), nn.Linear(3, 4)).to(F64)
    pad = -100
    batches = [(torch.randint(0, 6, (n, 3), generator=g), torch.randint(0, 4, (n, 3), generator=g)) for n in (4, 3, 2)]
    batches[0][1][0, 2:] = pad
    batches[1][1][1, :] = pad  # an example without any real target: n_i = 0
    batches[2][1][:] = pad  # a batch without any: weight 0
    if loss == "ce":
        fn = lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=pad)
    else:
        def fn(out, y):  # squared error to the one-hot target over the real tokens only
            keep = y.reshape(-1) != pad
            return _mse_onehot(out.reshape(-1, out.shape[-1])[keep], y.reshape(-1)[keep])
    for policy in ("eval", "train-restore"):
        op = GGNOperator(model, fn, batches, bn_policy=policy, ignore_index=pad, mask_seed=SEED)
        torch.testing.assert_close(op.dense(), dense_ggn(model, fn, batches, policy, pad), rtol=1e-9, atol=1e-11)
    f = FisherOperator(model, fn, batches, ignore_index=pad, mask_seed=SEED, per_example="loop")
    torch.testing.assert_close(f.dense(), loop_fisher(model, fn, batches, "train-restore", pad), rtol=1e-9, atol=1e-11)


def test_fisher_per_sample_vmap_grads_and_loop_path(make_case):
    """Second Fisher oracle: per-sample gradients by vmap(grad) on one-example batches (MLP, no BN)."""
    c = make_case("mlp")
    names = [n for n, _ in named_trainable(c.model)]
    params = {n: p.detach() for n, p in c.model.named_parameters()}

    def one(p, x, y):
        return c.loss_fn(torch.func.functional_call(c.model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    x = torch.cat([x for x, _ in c.batches])
    y = torch.cat([y for _, y in c.batches])
    per = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    Gs = torch.cat([per[n].reshape(len(y), -1) for n in names], 1)
    want = Gs.T @ Gs / len(y)
    for how in ("vmap", "loop"):
        op = FisherOperator(c.model, c.loss_fn, c.batches, per_example=how)
        torch.testing.assert_close(op.dense(), want, rtol=1e-9, atol=1e-12)

    def untraceable(out, y):  # .item() cannot run under vmap: "auto" falls back to the loop
        return c.loss_fn(out, y) * (1.0 if float(out.sum().item()) == float(out.sum().item()) else 0.0)

    auto = FisherOperator(c.model, untraceable, c.batches)
    torch.testing.assert_close(auto.dense(), want, rtol=1e-9, atol=1e-12)
    assert auto.per_example == "loop"


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_ggn_is_the_hessian_of_a_linear_model(loss):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3).to(F64)
    batches = [(torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)) for n in (5, 2)]
    fn = _mse_onehot if loss == "mse" else (lambda out, y: F.cross_entropy(out, y))
    G = GGNOperator(model, fn, batches, weight_decay=0.1).dense()
    H = HessianOperator(model, fn, batches, weight_decay=0.1).dense()
    torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-12)
    if loss == "mse":  # and the closed form: kron(I_3, XᵀX/N) over (weight, bias) + 2λI
        X = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1) for x, _ in batches])
        A = X.T @ X / len(X)  # per output: [w_k (4), b_k]
        perm = [k * 4 + j for k in range(3) for j in range(4)] + [12 + k for k in range(3)]
        block = torch.zeros(15, 15, dtype=F64)
        for k in range(3):
            idx = [perm[k * 4 + j] for j in range(4)] + [perm[12 + k]]
            block[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = A
        torch.testing.assert_close(G, block + 0.2 * torch.eye(15, dtype=F64), rtol=1e-10, atol=1e-12)


def test_ggn_is_psd_where_the_hessian_is_not(make_case):
    c = make_case("mlp")
    with torch.no_grad():
        for p in c.model.parameters():
            p.mul_(3.0)  # away from the small-weight regime, where H has a clear negative curvature
    H = HessianOperator(c.model, c.loss_fn, c.batches).dense()
    G = GGNOperator(c.model, c.loss_fn, c.batches).dense()
    Fm = FisherOperator(c.model, c.loss_fn, c.batches).dense()
    assert torch.linalg.eigvalsh(H)[0] < -1e-3
    scale = torch.linalg.eigvalsh(G)[-1]
    assert torch.linalg.eigvalsh(G)[0] > -1e-10 * scale
    assert torch.linalg.eigvalsh(Fm)[0] > -1e-10 * torch.linalg.eigvalsh(Fm)[-1]


def test_protocol_blocks_l2_and_no_trace(make_case):
    """matmat rows = matvec, n_hvps counts vectors, the L2 term adds 2λI, and no product moves the BN
    running statistics (under "train" too) or the global RNG."""
    c = make_case("cnn_bn")
    bn = c.model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    rng = torch.get_rng_state()
    for cls in (GGNOperator, FisherOperator):
        op = cls(c.model, c.loss_fn, c.batches, bn_policy="train", max_block=2, mask_seed=SEED)
        op2 = cls(c.model, c.loss_fn, c.batches, bn_policy="train", weight_decay=0.3, mask_seed=SEED)
        V = torch.randn(3, op.n_params, dtype=F64, generator=torch.Generator().manual_seed(1))
        M = op.matmat(V)
        torch.testing.assert_close(M[1], op.matvec(V[1]), rtol=1e-12, atol=1e-14)
        assert op.n_hvps == 4 and op.device == V.device and op.dtype == F64
        torch.testing.assert_close(op2.matmat(V), M + 0.6 * V, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(op.gradient(), HessianOperator(c.model, c.loss_fn, c.batches, bn_policy="train",
                                                                  mask_seed=SEED).gradient())
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match="per_example"):
        FisherOperator(c.model, c.loss_fn, c.batches, per_example="batched")


# ------------------------------------------------------------------------------ the eigen probe's option


def test_eigen_probe_curvature_option_tracks_the_named_operator_and_never_perturbs():
    """``probes.eigen.curvature`` picks the tracked operator (the table says which); its λ₁ equals a direct
    dense solve of that operator with the tracker's mask seed; a BN + dropout Adam loop ends bit-identical
    with and without the probe; a bad value is a one-line ConfigError."""
    from test_scope import OwnNet, data, fresh, loop

    from sgdscope import Scope
    from sgdscope.errors import ConfigError

    model_a, opt_a = fresh()
    loop(model_a, opt_a, 4)
    (u, v), y = data(seed=1)
    lam = {}
    for curv in ("ggn", "fisher"):
        model, opt = fresh()
        scope = Scope(model, F.mse_loss, ((u, v), y), probes={"eigen": {"every": 4, "k": 1, "tol": 1e-4,
                                                                        "curvature": curv}}, seed=3)
        loop(model, opt, 4, scope)
        for a, b in zip(model_a.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)  # parameters and BN running statistics, bit for bit
        eig = scope.table("eigen")
        assert set(eig["curvature"]) == {curv} and set(scope.table("curvature")["curvature"]) == {curv}
        op = scope.env.tracker.operator(4)
        assert type(op) is {"ggn": GGNOperator, "fisher": FisherOperator}[curv]
        dense = torch.linalg.eigvalsh(op.dense().double())
        last = eig[eig["step"] == 4].sort_values("index")["value"].to_numpy()
        assert abs(last[0] - float(dense[-1])) <= 1e-3 * float(dense[-1])
        assert dense[0] > -1e-5 * dense[-1]  # both PSD
        lam[curv] = last[0]
    assert lam["ggn"] != lam["fisher"]
    with pytest.raises(ConfigError, match="probes.eigen.curvature"):
        Scope(OwnNet(), F.mse_loss, ((u, v), y), probes={"eigen": {"curvature": "kfac"}})
