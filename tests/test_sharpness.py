"""Batch sharpness and preconditioned sharpness against independent oracles, Adam in the config, and the
promise that neither these probes nor gradient_noise perturb training (parameters and Adam state bit for bit).

* P^{-1/2}HP^{-1/2} on a quadratic with known H and diagonal P: dense eigh of the symmetric form and the
  (real) eigenvalues of the non-symmetric P⁻¹H;
* P read from a real torch.optim.Adam / AdamW (and AMSGrad) after a few steps against √v̂ + ε computed by
  hand from the gradients the optimizer saw (an EMA written out, not its state);
* batch sharpness against dense Hessians (torch.autograd.functional.hessian) of every drawn batch.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sgdscope import seeds
from sgdscope.config import validate
from sgdscope.curvature import HessianOperator, top_eigenpairs
from sgdscope.curvature.flat import get_flat
from sgdscope.curvature.preconditioned import PreconditionedOperator, read_preconditioner, stability_threshold
from sgdscope.errors import ConfigError
from sgdscope.measure.scope import Scope
from sgdscope.store import RunStore
from sgdscope.models.quadratic import Quadratic, output_mean
from sgdscope.train.build import build_optimizer

F64 = torch.float64
N, D, B, SEED = 48, 3, 12, 4


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=F64)
    return x, torch.sin(2 * x[:, 0]) + 0.3 * torch.randn(N, generator=g, dtype=F64)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def train(model, opt, steps, scope=None):
    x, y = data()
    for t in range(steps):
        sl = slice(B * (t % 4), B * (t % 4) + B)
        with scope.step(opt) if scope is not None else _Null():
            opt.zero_grad()
            mse(model(x[sl]), y[sl]).backward()
            opt.step()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def loss(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return mse(functional_call(model, parts, (x,)), y)

    return torch.autograd.functional.hessian(loss, get_flat(model))


# ------------------------------------------------------------------------------------------ kernels


def test_preconditioned_operator_on_a_quadratic_with_known_h_and_p():
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64)).Q
    H = Q @ torch.diag(torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5, -0.3], dtype=F64)) @ Q.T
    p = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.1, 1.5], dtype=F64)
    op = PreconditionedOperator(HessianOperator(Quadratic(H), output_mean, [(torch.zeros(1), torch.zeros(1))]), p)
    res = top_eigenpairs(op, k=2, tol=1e-10)
    S = torch.diag(p.rsqrt()) @ H @ torch.diag(p.rsqrt())
    assert res.values.tolist() == pytest.approx(torch.linalg.eigvalsh(S).flip(0)[:2].tolist(), rel=1e-9)
    # the non-symmetric P⁻¹H has the same (real) spectrum
    nonsym = torch.linalg.eigvals(torch.diag(1 / p) @ H).real.sort(descending=True).values
    assert res.values.tolist() == pytest.approx(nonsym[:2].tolist(), rel=1e-9)
    assert op.n_hvps == res.n_hvps > 0


@pytest.mark.parametrize("cls,kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.1}),
                                    (torch.optim.Adam, {"amsgrad": True})])
def test_preconditioner_read_from_torch_adam_equals_the_hand_computed_one(cls, kw):
    model = net()
    betas, eps, lr = (0.8, 0.95), 1e-6, 0.05
    opt = cls(model.parameters(), lr=lr, betas=betas, eps=eps, **kw)
    assert read_preconditioner(opt, model) is None  # before the first step v̂ = 0/0
    x, y = data()
    v = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=F64)
    vmax = v.clone()
    steps = 5
    for t in range(steps):
        opt.zero_grad()
        mse(model(x[t::4]), y[t::4]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        v = betas[1] * v + (1 - betas[1]) * g * g
        vmax = torch.maximum(vmax, v)
        opt.step()
    before = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    pre = read_preconditioner(opt, model)
    vv = vmax if kw.get("amsgrad") else v
    want = (vv / (1 - betas[1] ** steps)).sqrt() + eps
    assert pre.kind == "adam" and pre.lr == lr and pre.beta1 == 0.8
    assert torch.allclose(pre.diag, want, rtol=1e-12, atol=0)
    assert pre.threshold == pytest.approx((2 + 2 * 0.8) / (0.2 * lr))
    after = opt.state_dict()["state"]
    assert all(torch.equal(before[k][n], after[k][n]) for k in before for n in before[k])  # only read


def test_thresholds_and_unsupported_optimizers():
    assert stability_threshold("adam", 0.001, 0.9) == pytest.approx(38 / 0.001)
    model = net()
    pre = read_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), model)
    assert pre.diag is None and pre.threshold == pytest.approx(3.0 / 0.1)
    for opt in (torch.optim.RMSprop(model.parameters(), lr=0.1),
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, nesterov=True)):
        with pytest.raises(ConfigError, match="preconditioned_sharpness"):
            read_preconditioner(opt, model)
    scope = Scope(model, mse, data(), probes={"preconditioned_sharpness": {}}, batch_size=B)
    with pytest.raises(ConfigError, match=r"scope\.step\(optimizer\)"):
        with scope.step():
            pass


# ------------------------------------------------------------------------------------------ probes


def test_preconditioned_probe_with_adam_equals_dense_eigh_of_the_hand_preconditioned_hessian():
    model = net()
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    scope = Scope(model, mse, (x, y), seed=SEED, batch_size=B,
                  probes={"preconditioned_sharpness": {"every": 3, "tol": 1e-10, "max_hvps": 300}})
    train(model, opt, 3, scope)
    rows = scope.table("preconditioned_sharpness")
    assert rows["step"].tolist() == [3]  # no row at step 0: Adam had no state
    r = rows.iloc[0]
    st = [opt.state[p] for p in model.parameters()]
    p_diag = torch.cat([(s["exp_avg_sq"] / (1 - 0.999 ** 3)).sqrt().reshape(-1) + 1e-8 for s in st])
    H = dense_hessian(model, x, y)
    S = torch.diag(p_diag.rsqrt()) @ H @ torch.diag(p_diag.rsqrt())
    assert r["preconditioned_sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(S)[-1]), rel=1e-7)
    assert r["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-3)
    assert r["threshold"] == pytest.approx(38 / 0.02) and r["ratio"] == pytest.approx(r["preconditioned_sharpness"] / r["threshold"])
    assert r["optimizer"] == "adam" and r["converged"] == 1


def test_batch_sharpness_equals_the_mean_of_dense_minibatch_hessians():
    model = net()
    x, y = data()
    nb = 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    scope = Scope(model, mse, (x, y), seed=SEED, batch_size=B,
                  probes={"batch_sharpness": {"every": 2, "n_batches": nb, "tol": 1e-10, "max_hvps": 200},
                          "preconditioned_sharpness": {"every": 2}, "eigen": {"every": 2, "k": 1, "tol": 1e-10}})
    train(model, opt, 2, scope)
    r = scope.table("batch_sharpness").set_index("step").loc[2]
    gen = seeds.generator(SEED, "batch-sharpness", 2)
    lams = []
    for _ in range(nb):
        idx = torch.randperm(N, generator=gen)[:B]
        lams.append(float(torch.linalg.eigvalsh(dense_hessian(model, x[idx], y[idx]))[-1]))
    assert r["batch_sharpness"] == pytest.approx(sum(lams) / nb, rel=1e-8)
    assert (r["batch_sharpness_min"], r["batch_sharpness_max"]) == pytest.approx((min(lams), max(lams)), rel=1e-8)
    assert r["batch_sharpness_std"] == pytest.approx(float(torch.tensor(lams).std()), rel=1e-6)
    lam_full = float(torch.linalg.eigvalsh(dense_hessian(model, x, y))[-1])
    assert r["lambda_max"] == pytest.approx(lam_full, rel=1e-8)
    assert r["lr_batch_sharpness"] == pytest.approx(0.1 * r["batch_sharpness"])
    assert r["threshold"] == pytest.approx((2 + 2 * 0.5) / 0.1) and r["converged"] == 1
    # SGD: P = I, so the preconditioned sharpness is λ₁ and its threshold (2 + 2β)/η
    pre = scope.table("preconditioned_sharpness").set_index("step").loc[2]
    assert pre["preconditioned_sharpness"] == pytest.approx(lam_full, rel=1e-8) and pre["n_hvps"] == 0
    assert pre["threshold"] == pytest.approx(30.0)


NEW = {"gradient_noise": {"every": 4, "n_grads": 4, "k": 2, "m": 1, "trace_samples": 4},
       "batch_sharpness": {"every": 4, "n_batches": 2}, "preconditioned_sharpness": {"every": 4}}


class DropNet(nn.Module):
    """BatchNorm and dropout: the measurements must leave running statistics and global RNG alone too."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.drop, self.b = nn.Linear(D, 6), nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Linear(6, 1)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.bn(self.a(x)))))


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.Adam(ps, lr=0.01),
                                      lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)], ids=["adam", "sgd"])
def test_new_probes_never_perturb_training(make_opt):
    def fresh():
        torch.manual_seed(0)
        m = DropNet().double()
        return m, make_opt(m.parameters())

    model_a, opt_a = fresh()
    train(model_a, opt_a, 5)
    rng_a = torch.get_rng_state()
    model_b, opt_b = fresh()
    scope = Scope(model_b, mse, data(), probes=NEW, batch_size=B, seed=1)
    train(model_b, opt_b, 5, scope)
    assert torch.equal(torch.get_rng_state(), rng_a)  # training's dropout stream was not advanced
    for (k, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), k  # parameters and BN running statistics, bit for bit
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert all(torch.equal(torch.as_tensor(sa[i][n]), torch.as_tensor(sb[i][n])) for n in sa[i]), i
    for t in ("gradient_noise", "gradient_noise_step", "batch_sharpness", "preconditioned_sharpness"):
        assert len(scope.table(t)), t  # it did measure


# ------------------------------------------------------------------------------------------ config


def test_adam_in_the_config():
    cfg = validate({"optimizer": {"name": "adam", "lr": 0.001, "betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.01}})
    model = net()
    opt = build_optimizer(cfg, list(model.parameters()))
    assert isinstance(opt, torch.optim.Adam)
    g = opt.param_groups[0]
    assert (g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) == (0.001, (0.8, 0.99), 1e-7, 0.0)  # L2 is in the loss
    for bad, field in (({"name": "adam", "momentum": 0.9}, "optimizer"), ({"name": "adam", "betas": [0.9, 1.0]}, "optimizer.betas"),
                       ({"name": "adam", "eps": 0}, "optimizer.eps")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
            validate({"optimizer": bad})
        assert "\n" not in str(err.value)


def test_trainer_with_adam_is_not_perturbed_by_the_new_probes(tmp_path):
    from sgdscope.train import run

    def cfg(probes):
        return {"seed": 3, "device": "cpu", "data": {"name": "synthetic", "n_samples": 200, "input_shape": [6],
                                                      "num_classes": 3},
                "model": {"name": "mlp", "widths": [8], "batchnorm": True, "dropout": 0.2},
                "optimizer": {"name": "adam", "lr": 0.01, "batch_size": 32, "weight_decay": 1e-3},
                "train": {"epochs": 1}, "measure": {"subset": 0.5, "min_subset": 50, "batch_size": 64},
                "probes": probes}

    a = run(cfg({}), tmp_path / "a", progress=False)
    b = run(cfg({k: {**v, "every": 3} for k, v in NEW.items()}), tmp_path / "b", progress=False)
    ca, cb = (torch.load(p / "checkpoints" / "last.pt", weights_only=True) for p in (a, b))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])  # with BN running statistics
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])  # Adam's m, v and step
    rows = RunStore(b).table("preconditioned_sharpness")
    assert len(rows) and (rows["optimizer"] == "adam").all()
    assert rows["threshold"].tolist() == pytest.approx([38 / 0.01] * len(rows))
