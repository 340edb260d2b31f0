"""Hessian operator and eigensolver against independent oracles.

Oracles: ``torch.autograd.functional.hessian`` of the mean loss as a function of the flat parameters (with
its own example weighting), ``torch.linalg.eigh`` of that matrix, scipy's ARPACK ``eigsh``, and quadratics
with a known Hessian.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before scipy: ARPACK's BLAS threads fight torch's

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.func import functional_call

from sgdscope.curvature import (
    BLOCK_METHODS,
    HVP_METHODS,
    HessianOperator,
    frobenius_topk,
    hutchinson_trace,
    spectral_density,
    top_eigenpairs,
)
from sgdscope.curvature.eigen import random_start
from sgdscope.curvature.flat import flatten, get_flat, set_flat, unflatten
from sgdscope.errors import ConfigError
from sgdscope.losses import cross_entropy, split_batches
from sgdscope.models.quadratic import Quadratic, output_mean
from sgdscope.policy import BN_POLICIES, fixed_masks

F64 = torch.float64
# every product kernel: the single-product methods (each with its own block method) and the batched
# double backward for blocks
KERNELS = [{"method": m} for m in HVP_METHODS] + [{"method": "jvp", "block_method": "double-backward-batched"}]
KERNEL_IDS = [k.get("block_method", k["method"]) for k in KERNELS]


def mlp(sizes=(5, 8, 3), seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).to(F64)


def cnn(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Dropout(dropout), nn.Linear(18, 3)
    ).to(F64)


def data(n, shape=(5,), classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=F64), torch.randint(0, classes, (n,), generator=g)


def oracle_loss(model, batches, names=None, mask_seed=None):
    """The mean loss Σ_b |b| L_b / Σ|b| as a function of the flat vector of the named parameters (all the
    trainable ones by default), in the model's current mode, and the model's current flat vector. Batch b's
    forward pass draws its dropout masks under ``fixed_masks(mask_seed, b)`` (the masks the operator is
    defined with)."""
    params = dict(model.named_parameters())
    names = names or [n for n, p in params.items() if p.requires_grad]
    like = [params[n] for n in names]
    buffers = dict(model.named_buffers())
    total = sum(len(y) for _, y in batches)

    def loss(theta):
        state = {n: p.detach() for n, p in params.items()} | {n: b.clone() for n, b in buffers.items()}
        state |= dict(zip(names, unflatten(theta, like)))
        out = 0.0
        for b, (x, y) in enumerate(batches):
            with fixed_masks(mask_seed, b):
                out = out + len(y) * cross_entropy(functional_call(model, state, (x,)), y)
        return out / total

    return loss, flatten(p.detach() for p in like)


def oracle_hessian(model, batches, names=None, mask_seed=None):
    """Dense Hessian of :func:`oracle_loss` at the model's parameters."""
    return torch.autograd.functional.hessian(*oracle_loss(model, batches, names, mask_seed))


def sgd_steps(model, x, y, steps, lr=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()


def quadratic_op(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = torch.tensor(eigenvalues, dtype=F64)
    q = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=F64)).Q
    A = q @ torch.diag(lam) @ q.T
    w0 = torch.randn(len(lam), generator=g, dtype=F64)
    return HessianOperator(Quadratic((A + A.T) / 2, w0), output_mean, [(torch.zeros(1), torch.zeros(1))])


# -- the operator ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_operator_matches_autograd_hessian(kernel):
    model = mlp()
    batches = split_batches(*data(30), 12)
    H = oracle_hessian(model, batches)
    op = HessianOperator(model, cross_entropy, batches, **kernel)
    assert op.n_params == 75 and op.dtype == F64 and op.device.type == "cpu"
    torch.testing.assert_close(op.dense(), H, rtol=0, atol=1e-12)
    V = torch.randn(4, op.n_params, dtype=F64)
    torch.testing.assert_close(op.matvec(V[0]), H @ V[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=0, atol=1e-12)


def fake_clock(monkeypatch, cost, fail=()):
    """Products "take" ``cost[method]`` seconds of a fake clock, whatever the machine does; the methods in
    ``fail`` raise as torch.func does on a model it cannot trace. Returns the log of timed calls."""
    import sgdscope.curvature.hessian as hess

    monkeypatch.setattr(hess, "AUTO_CHOICES", {})
    clock, log = {"t": 0.0}, []
    real = HessianOperator._hvp

    def fake(self, method, *a, **kw):
        log.append(method)
        if method in fail:
            raise RuntimeError("cannot trace")
        clock["t"] += cost[method]
        return real(self, method, *a, **kw)

    monkeypatch.setattr(HessianOperator, "_hvp", fake)
    monkeypatch.setattr(hess.time, "perf_counter", lambda: clock["t"])
    return log


def test_auto_method_times_every_method_keeps_the_fastest_and_caches_it(monkeypatch):
    """"auto" times each method on the first product (single products by HVP_METHODS, blocks by
    BLOCK_METHODS, interleaved), keeps the fastest, and an operator built again on the same model and
    batch shapes reuses the choice without timing."""
    model = mlp()
    batches = [data(9)]
    log = fake_clock(monkeypatch, {"jvp": 1.0, "double-backward": 3.0, "double-backward-batched": 0.5})
    auto = HessianOperator(model, cross_entropy, batches)
    assert auto.method is None and auto.block_method is None
    dense = auto.dense()  # a block: times the block products
    assert auto.block_method == "double-backward-batched" and auto.method is None
    assert auto.method_timings["block"] == {"jvp": 1.0, "double-backward": 3.0, "double-backward-batched": 0.5}
    assert log[:6] == list(BLOCK_METHODS) * 2  # alternating rounds
    v = torch.randn(auto.n_params, dtype=F64)
    hv = auto.matvec(v)
    assert auto.method == "jvp" and auto.n_hvps == auto.n_params + 1
    assert auto.method_timings["single"] == {"jvp": 1.0, "double-backward": 3.0}
    # best of two per method (a block on 2 rows); not in n_hvps
    assert auto.n_timing_hvps == 2 * len(BLOCK_METHODS) * 2 + 2 * len(HVP_METHODS)
    exact = HessianOperator(model, cross_entropy, batches, method="double-backward")
    torch.testing.assert_close(dense, exact.dense())
    torch.testing.assert_close(hv, exact.matvec(v))
    again = HessianOperator(model, cross_entropy, batches)
    again.matvec(v)
    assert again.method == "jvp" and again.n_timing_hvps == 0  # cached per model and batch shape
    other = HessianOperator(model, cross_entropy, [data(7)])  # another batch shape is timed afresh
    other.matvec(v[: other.n_params])
    assert other.n_timing_hvps == 4


def test_auto_keeps_double_backward_unless_another_method_is_clearly_faster(monkeypatch):
    """A near tie (within 25%) is not a reason to switch: the noise of a busy machine would otherwise pick
    the method, and two runs of one config would differ in the last bits."""
    model = mlp()
    fake_clock(monkeypatch, {"jvp": 0.85, "double-backward": 1.0, "double-backward-batched": 0.82})
    near = HessianOperator(model, cross_entropy, [data(9)])
    near.matmat(torch.randn(3, near.n_params, dtype=F64))
    near.matvec(torch.randn(near.n_params, dtype=F64))
    assert near.method == near.block_method == "double-backward"
    fake_clock(monkeypatch, {"jvp": 0.75, "double-backward": 1.0, "double-backward-batched": 0.70})
    clear = HessianOperator(model, cross_entropy, [data(8)])  # another batch shape: timed afresh
    clear.matmat(torch.randn(3, clear.n_params, dtype=F64))
    clear.matvec(torch.randn(clear.n_params, dtype=F64))
    assert clear.method == "jvp" and clear.block_method == "double-backward-batched"


def test_auto_times_millisecond_products_more_often(monkeypatch):
    """Products of a few milliseconds are timed for up to 10 rounds (or 50 ms in all), not 2: the best of
    two such is the machine's noise. Slow ones stay at two rounds (the test above)."""
    model = mlp()
    log = fake_clock(monkeypatch, {"jvp": 0.001, "double-backward": 0.002, "double-backward-batched": 0.004})
    op = HessianOperator(model, cross_entropy, [data(9)])
    op.matvec(torch.randn(op.n_params, dtype=F64))
    assert log[:20] == list(HVP_METHODS) * 10 and op.n_timing_hvps == 10 * 2  # 3 ms a round: the cap of 10
    assert log[20:] == ["jvp"] and op.method == "jvp"  # then the product itself, by the clear winner
    log.clear()
    op.matmat(torch.randn(3, op.n_params, dtype=F64))
    assert log[: 3 * 8] == list(BLOCK_METHODS) * 8  # 7 ms a round: 8 rounds reach the 50 ms
    assert log[3 * 8:] == ["jvp"]  # then the block itself, by the clear winner
    assert op.n_timing_hvps == 10 * 2 + 8 * 3 * 2 and op.block_method == "jvp"


def test_auto_skips_a_method_that_fails_and_a_fixed_block_method_is_not_timed(monkeypatch):
    model = mlp()
    batches = [data(9)]
    log = fake_clock(monkeypatch, {"jvp": 1.0, "double-backward": 3.0, "double-backward-batched": 0.5},
                     fail=("jvp", "double-backward-batched"))
    auto = HessianOperator(model, cross_entropy, batches)
    auto.matmat(torch.randn(3, auto.n_params, dtype=F64))
    assert auto.block_method == "double-backward" and auto.method_timings["block"]["jvp"] == float("inf")
    assert auto.n_timing_hvps == 2 * 2  # only the method that ran counts, best of two on 2 rows
    assert log.count("jvp") == 1  # a failed method is not tried again
    log.clear()
    mixed = HessianOperator(model, cross_entropy, batches, method="double-backward", block_method="auto")
    assert mixed.method == "double-backward" and mixed.block_method is None
    fixed = HessianOperator(model, cross_entropy, batches, method="auto", block_method="double-backward")
    fixed.matmat(torch.randn(3, fixed.n_params, dtype=F64))
    assert fixed.block_method == "double-backward" and fixed.n_timing_hvps == 0 and log == ["double-backward"]


@pytest.mark.parametrize("block_method", BLOCK_METHODS)
def test_every_block_method_matches_the_dense_hessian_and_the_single_products(block_method):
    """Two oracles per block kernel: the dense autograd Hessian, and a loop of single products by the
    other route (forward over reverse for the double backwards, double backward for jvp)."""
    model = mlp(sizes=(5, 8, 8, 3))
    batches = split_batches(*data(30), 12)
    H = oracle_hessian(model, batches)
    op = HessianOperator(model, cross_entropy, batches, block_method=block_method,
                         method="double-backward" if block_method == "jvp" else "jvp")
    V = torch.randn(5, op.n_params, dtype=F64)
    block = op.matmat(V)
    torch.testing.assert_close(block, V @ H, rtol=0, atol=1e-12)
    torch.testing.assert_close(block, torch.stack([op.matvec(v) for v in V]), rtol=0, atol=1e-12)
    assert op.block_method == block_method and op.n_hvps == 10


def test_float32_products_agree_across_methods_to_round_off():
    """In float32 every route gives the float64 product to round-off, on a ReLU MLP (whose double backward
    goes through threshold_backward's zero second derivative)."""
    model = mlp(sizes=(6, 16, 16, 4), act=nn.ReLU).float()
    x, y = data(40, shape=(6,), classes=4)
    batches = split_batches(x.float(), y, 16)
    exact = HessianOperator(mlp(sizes=(6, 16, 16, 4), act=nn.ReLU), cross_entropy, split_batches(x, y, 16),
                            method="double-backward")
    V = torch.randn(3, exact.n_params, dtype=F64)
    want = exact.matmat(V)
    for m in BLOCK_METHODS:
        op = HessianOperator(model, cross_entropy, batches, method=m if m in HVP_METHODS else "jvp", block_method=m)
        got = op.matmat(V.float()).double()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
        torch.testing.assert_close(op.matvec(V[0].float()).double(), want[0], rtol=0,
                                   atol=1e-5 * float(want.abs().max()))


def test_uneven_batches_weighted_exactly():
    model = mlp()
    x, y = data(10)
    one = HessianOperator(model, cross_entropy, [(x, y)])
    split = HessianOperator(model, cross_entropy, [(x[:7], y[:7]), (x[7:], y[7:])])
    v = torch.randn(one.n_params, dtype=F64)
    torch.testing.assert_close(split.matvec(v), one.matvec(v), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split.gradient(), one.gradient(), rtol=1e-12, atol=1e-14)
    # float32 too, to float tolerance
    model32 = mlp().float()
    x32 = x.float()
    v32 = v.float()
    a = HessianOperator(model32, cross_entropy, [(x32, y)]).matvec(v32)
    b = HessianOperator(model32, cross_entropy, [(x32[:7], y[:7]), (x32[7:], y[7:])]).matvec(v32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_matches_autograd():
    model = mlp()
    x, y = data(10)
    model.zero_grad()
    cross_entropy(model(x), y).backward()
    want = flatten(p.grad for p in model.parameters())
    got = HessianOperator(model, cross_entropy, split_batches(x, y, 4)).gradient()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("policy", ["eval", "train-restore", "train"])
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_batchnorm_cnn_each_policy(policy, kernel):
    model = cnn()
    x, y = data(17, shape=(1, 5, 5))
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    sgd_steps(model, x, y, 3, lr=0.1)  # moves the running statistics away from their init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval() if policy == "eval" else model.train()
    H = oracle_hessian(model, batches)
    model.train()
    op = HessianOperator(model, cross_entropy, batches, bn_policy=policy, **kernel)
    torch.testing.assert_close(op.dense(), H, rtol=0, atol=1e-11)
    for k, v in model.state_dict().items():  # no policy lets an HVP write the running statistics
        assert torch.equal(v, before[k]), k
    assert model.training


def test_train_and_eval_hessians_differ_with_batchnorm():
    model = cnn()
    batches = [data(12, shape=(1, 5, 5))]
    sgd_steps(model, *batches[0], 3, lr=0.1)
    ev = HessianOperator(model, cross_entropy, batches, bn_policy="eval").dense()
    tr = HessianOperator(model, cross_entropy, batches, bn_policy="train-restore").dense()
    assert (ev - tr).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_train_restore_leaves_no_trace(kernel):
    model = cnn(dropout=0.5)
    x, y = data(12, shape=(1, 5, 5))
    sgd_steps(model, x, y, 2, lr=0.1)
    model.train()
    model[1].eval()  # a mixed-flag model: each module's own flag must come back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()

    op = HessianOperator(model, cross_entropy, [(x[:8], y[:8]), (x[8:], y[8:])], **kernel)
    v = torch.randn(op.n_params, generator=torch.Generator().manual_seed(0), dtype=F64)
    first = op.matvec(v)
    block = op.matmat(torch.stack([v, 2 * v, v.flip(0)]))
    op.gradient()
    top_eigenpairs(op, k=2, tol=1e-4)
    again = op.matvec(v)

    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k
    # the same dropout masks for every product: the operator is one fixed matrix
    assert torch.equal(first, again)
    torch.testing.assert_close(block[0], first, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block[1], 2 * first, rtol=1e-10, atol=1e-12)


# -- dropout: one set of masks per batch for every product (issue 11 §1) ------------------------------


def mlp_dropout(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(F64)


def dropout_case(kind):
    """A dropout model in train mode and two uneven batches: "mlp" (Linear-Tanh-Dropout-Linear) or "cnn"
    (Conv-BatchNorm-ReLU-Dropout-Linear)."""
    if kind == "mlp":
        model, (x, y) = mlp_dropout(), data(17)
    else:
        model, (x, y) = cnn(dropout=0.5), data(17, shape=(1, 5, 5))
        sgd_steps(model, x, y, 2, lr=0.1)
    model.train()
    return model, [(x[:10], y[:10]), (x[10:], y[10:])]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_both_methods_give_one_symmetric_operator_on_a_dropout_model(kind):
    model, batches = dropout_case(kind)
    H = oracle_hessian(model, batches, mask_seed=3)
    dense = {}
    for method, kernel in zip(KERNEL_IDS, KERNELS):
        op = HessianOperator(model, cross_entropy, batches, **kernel, mask_seed=3)
        dense[method] = op.dense()  # a block product: vmap (jvp) or one graph per block (double backward)
        torch.testing.assert_close(dense[method], H, rtol=0, atol=1e-11)
        v = torch.randn(op.n_params, generator=torch.Generator().manual_seed(1), dtype=F64)
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-11)  # a single product: the same masks
    torch.testing.assert_close(dense["jvp"], dense["double-backward"], rtol=0, atol=1e-12)
    torch.testing.assert_close(dense["jvp"], dense["jvp"].T, rtol=0, atol=1e-12)
    # the top eigenvalues no longer depend on the method (they were 1% apart with fresh masks)
    tops = [top_eigenpairs(HessianOperator(model, cross_entropy, batches, method=m, mask_seed=3), k=2, tol=1e-8)
            for m in HVP_METHODS]
    torch.testing.assert_close(tops[0].values, tops[1].values, rtol=1e-7, atol=0)


def test_the_mask_seed_chooses_the_operator():
    model, batches = dropout_case("mlp")

    def dense(seed, policy="train-restore"):
        return HessianOperator(model, cross_entropy, batches, bn_policy=policy, mask_seed=seed).dense()

    assert torch.equal(dense(None), dense(0))  # None is the fixed default seed
    assert (dense(1) - dense(2)).abs().max() > 1e-3
    assert torch.equal(dense(1, "eval"), dense(2, "eval"))  # no dropout in eval mode


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_gradient_and_products_share_the_masks(kernel):
    # Central differences of the gradient along v equal Hv only if the gradient at θ ± εv and the product
    # use one set of masks; with fresh masks the difference quotient would be O(1/ε).
    model, batches = dropout_case("mlp")
    op = HessianOperator(model, cross_entropy, batches, **kernel, mask_seed=4)
    theta = get_flat(model)
    v = torch.randn(op.n_params, generator=torch.Generator().manual_seed(2), dtype=F64)
    hv = op.matvec(v)
    eps = 1e-5
    set_flat(model, theta + eps * v)
    g_plus = op.gradient()
    set_flat(model, theta - eps * v)
    g_minus = op.gradient()
    set_flat(model, theta)
    torch.testing.assert_close((g_plus - g_minus) / (2 * eps), hv, rtol=1e-6, atol=1e-8)
    # and the gradient is the oracle's, with the masks of fixed_masks(4, b) for batch b
    want = torch.autograd.functional.jacobian(*oracle_loss(model, batches, mask_seed=4))
    torch.testing.assert_close(op.gradient(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("policy", BN_POLICIES)
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_products_leave_rng_and_batchnorm_as_found_under_every_policy(policy, kernel):
    model, batches = dropout_case("cnn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(21)
    rng = torch.get_rng_state()
    op = HessianOperator(model, cross_entropy, batches, bn_policy=policy, **kernel)
    v = torch.randn(op.n_params, generator=torch.Generator().manual_seed(0), dtype=F64)
    first = op.matvec(v)
    op.matmat(torch.stack([v, -v]))
    op.gradient()
    assert torch.equal(torch.get_rng_state(), rng)  # "train" included: no measurement moves a stream
    after = torch.randn(5)  # what training draws next ...
    torch.manual_seed(21)
    assert torch.equal(after, torch.randn(5))  # ... is what it draws without the measurement
    for k, t in model.state_dict().items():  # no product writes the running statistics, under any policy
        assert torch.equal(t, state[k]), k
    torch.manual_seed(99)  # another training RNG state: the operator does not see it
    assert torch.equal(op.matvec(v), first)


# -- inputs of any form and weighting by real targets (issue 10) --------------------------------------


class TwoInputs(nn.Module):
    """``mlp_dropout`` behind forward(a, b) = inner(cat(a, b))."""

    def __init__(self):
        super().__init__()
        self.inner = mlp_dropout()

    def forward(self, a, b):
        return self.inner(torch.cat([a, b], dim=-1))


@pytest.mark.parametrize("form", ["tuple", "dict"])
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_inputs_of_any_form(form, kernel):
    plain, batches = dropout_case("mlp")
    model = TwoInputs().train()
    split = (lambda x: (x[:, :2], x[:, 2:])) if form == "tuple" else (lambda x: {"b": x[:, 2:], "a": x[:, :2]})
    formed = [(split(x), y) for x, y in batches]
    op = HessianOperator(model, cross_entropy, formed, **kernel)
    ref = HessianOperator(plain, cross_entropy, batches, **kernel)
    torch.testing.assert_close(op.dense(), ref.dense(), rtol=0, atol=1e-12)
    torch.testing.assert_close(op.gradient(), ref.gradient(), rtol=0, atol=1e-12)


class TokenModel(nn.Module):
    """Next-token logits from each token alone: ids (B, T) -> (B, T, V), so padding positions change no
    real token's loss and only the weighting can go wrong."""

    def __init__(self, vocab=5):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 3)
        self.head = nn.Linear(3, vocab)
        self.to(F64)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def padded_lm_batches(lengths, vocab=5, seed=0):
    """Batches of sequences with the given real lengths, inputs padded with id 0 and targets with -100,
    and the unpadded concatenation of their real tokens as one (1, N) batch."""
    g = torch.Generator().manual_seed(seed)
    batches, xs, ys = [], [], []
    for group in lengths:
        x = torch.zeros(len(group), max(max(group), 1), dtype=torch.long)
        y = torch.full_like(x, -100)
        for i, n in enumerate(group):
            x[i, :n], y[i, :n] = torch.randint(0, vocab, (2, n), generator=g)
            xs.append(x[i, :n])
            ys.append(y[i, :n])
        batches.append((x, y))
    return batches, (torch.cat(xs)[None], torch.cat(ys)[None])


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_padding_weighs_as_the_unpadded_concatenation(kernel):
    model = TokenModel()
    batches, whole = padded_lm_batches([[5, 2, 4], [1, 3], [0, 0]])  # the last batch is all padding
    H = oracle_hessian(model, [whole])
    op = HessianOperator(model, cross_entropy, batches, **kernel, ignore_index=-100)
    torch.testing.assert_close(op.dense(), H, rtol=0, atol=1e-12)
    ref = HessianOperator(model, cross_entropy, [whole], **kernel)
    torch.testing.assert_close(op.gradient(), ref.gradient(), rtol=0, atol=1e-12)
    # counting the padding as targets weighs the two real batches 15:6 instead of 11:4
    wrong = HessianOperator(model, cross_entropy, batches[:2], **kernel).dense()
    assert (wrong - H).abs().max() > 1e-4


def test_a_batch_without_targets_is_skipped():
    x, y = data(6)
    empty = (torch.zeros(0, 5, dtype=F64), torch.zeros(0, dtype=torch.long))
    # one method for both (auto may time them to different ones): the comparison is exact
    torch.testing.assert_close(
        HessianOperator(mlp(), cross_entropy, [empty, (x, y), empty], method="double-backward").dense(),
        HessianOperator(mlp(), cross_entropy, [(x, y)], method="double-backward").dense(),
        rtol=0, atol=0,
    )


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(8, 3)
        self.unused = nn.Linear(4, 2)
        self.a.bias.requires_grad_(False)
        self.to(F64)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_unused_and_frozen_parameters(kernel):
    model = WithUnused()
    batches = [data(9)]
    op = HessianOperator(model, cross_entropy, batches, **kernel)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "a.bias" not in names and op.n_params == 40 + 27 + 10
    H = op.dense()
    torch.testing.assert_close(H, oracle_hessian(model, batches, names), rtol=0, atol=1e-12)
    assert torch.equal(H[-10:], torch.zeros_like(H[-10:])) and torch.equal(H[:, -10:], torch.zeros_like(H[:, -10:]))
    assert torch.equal(op.gradient()[-10:], torch.zeros(10, dtype=F64))


def test_param_filter_is_a_principal_block():
    model = mlp()
    batches = [data(9)]
    full = HessianOperator(model, cross_entropy, batches).dense()
    first = HessianOperator(model, cross_entropy, batches, param_filter=["0."]).dense()
    torch.testing.assert_close(first, full[:48, :48], rtol=0, atol=1e-13)
    last = HessianOperator(model, cross_entropy, batches, param_filter=r"^2\.").dense()
    torch.testing.assert_close(last, full[48:, 48:], rtol=0, atol=1e-13)


def test_l2_adds_exactly_two_lambda():
    model = mlp()
    batches = [data(9)]
    base = HessianOperator(model, cross_entropy, batches)
    l2 = HessianOperator(model, cross_entropy, batches, weight_decay=0.05)
    off = HessianOperator(model, cross_entropy, batches, weight_decay=0.05, include_l2=False)
    eye = torch.eye(base.n_params, dtype=F64)
    torch.testing.assert_close(l2.dense() - base.dense(), 0.1 * eye, rtol=0, atol=1e-14)
    torch.testing.assert_close(off.dense(), base.dense(), rtol=0, atol=0)
    torch.testing.assert_close(l2.gradient() - base.gradient(), 0.1 * get_flat(model), rtol=0, atol=1e-14)


def test_hvp_counter():
    op = HessianOperator(mlp(), cross_entropy, [data(9)], max_block=3)
    op.matvec(torch.zeros(op.n_params))
    assert op.n_hvps == 1
    op.matmat(torch.zeros(7, op.n_params))
    assert op.n_hvps == 8
    op.dense()
    assert op.n_hvps == 8 + 75
    res = top_eigenpairs(op, k=2, tol=1e-3)
    assert op.n_hvps == 83 + res.n_hvps
    op.gradient()
    assert op.n_hvps == 83 + res.n_hvps


def test_operator_follows_the_model():
    model = mlp()
    op = HessianOperator(model, cross_entropy, [data(9)])
    before = op.dense()
    set_flat(model, get_flat(model) * 1.5)
    assert (op.dense() - before).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batches": []}, ValueError, "empty"),
        # a batch without targets has weight 0 and is skipped (issue 10); only a list of such batches is refused
        ({"batches": [(torch.zeros(0, 5, dtype=F64), torch.zeros(0, dtype=torch.long))]}, ValueError, "hold no target"),
        ({"method": "finite-differences"}, ValueError, "method"),
        ({"bn_policy": "frozen"}, ConfigError, "bn_policy"),
        ({"param_filter": "nothing-matches"}, ValueError, "param_filter"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"batches": [data(4)]} | kwargs
    with pytest.raises(error, match=match):
        HessianOperator(mlp(), cross_entropy, **args)


def test_bad_shapes():
    op = HessianOperator(mlp(), cross_entropy, [data(4)])
    with pytest.raises(ValueError, match="n = 75"):
        op.matvec(torch.zeros(74))
    with pytest.raises(ValueError, match=r"\(m, n\)"):
        op.matmat(torch.zeros(75))
    with pytest.raises(ValueError, match="init"):
        top_eigenpairs(op, k=2, init=torch.zeros(2, 74))
    with pytest.raises(ValueError, match="which"):
        top_eigenpairs(op, which="SA")
    with pytest.raises(ValueError, match="k=80"):
        top_eigenpairs(op, k=80)


# -- eigenpairs ----------------------------------------------------------------------------------------


def dense_top(H, k, which):
    lam, Q = torch.linalg.eigh(H)
    idx = torch.argsort(lam.abs() if which == "LM" else lam, descending=True)[:k]
    idx = idx[torch.argsort(lam[idx], descending=True)]
    return lam[idx], Q[:, idx].T


def check_against_dense(res, H, k, which, rel=1e-4):
    lam, Q = dense_top(H, k, which)
    assert res.converged and res.which == which
    torch.testing.assert_close(res.values, lam, rtol=rel, atol=0)
    cos = (res.vectors * Q).sum(dim=1).abs()
    assert (cos > 1 - 1e-6).all(), cos
    torch.testing.assert_close(res.vectors @ res.vectors.T, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)
    true_res = (res.vectors @ H - res.values[:, None] * res.vectors).norm(dim=1) / res.values.abs()
    assert (true_res <= res.tol * 1.01).all()
    torch.testing.assert_close(res.residuals, true_res, rtol=1e-3, atol=1e-12)


@pytest.fixture(scope="module")
def trained_mlp():
    model = mlp((10, 16, 4), seed=3)
    x, y = data(200, shape=(10,), classes=4, seed=4)
    sgd_steps(model, x, y, 40)
    return model, split_batches(x, y, 64)


@pytest.mark.parametrize("which", ["LA", "LM"])
@pytest.mark.parametrize("block_size", [1, 7])
def test_top_eigenpairs_trained_mlp(trained_mlp, which, block_size):
    model, batches = trained_mlp
    op = HessianOperator(model, cross_entropy, batches)
    H = oracle_hessian(model, batches)
    res = top_eigenpairs(op, k=5, which=which, tol=1e-6, block_size=block_size)
    check_against_dense(res, H, 5, which)
    assert res.n_hvps == op.n_hvps and res.values.device == res.vectors.device == op.device


def test_negative_eigenvalues_at_init_need_lm():
    model = mlp((10, 16, 16, 4), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # a large-weight tanh net at init is far from convex
    batches = [data(60, shape=(10,), classes=4, seed=6)]
    op = HessianOperator(model, cross_entropy, batches)
    H = op.dense()
    lam_lm, _ = dense_top(H, 8, "LM")
    lam_la, _ = dense_top(H, 8, "LA")
    assert (lam_lm < 0).any() and (lam_la > 0).all()  # the case really tells LM from LA
    lm = top_eigenpairs(op, k=8, which="LM", tol=1e-6)
    check_against_dense(lm, H, 8, "LM")
    assert lm.has_negative
    la = top_eigenpairs(op, k=8, which="LA", tol=1e-6)
    check_against_dense(la, H, 8, "LA")
    assert not la.has_negative


@pytest.mark.parametrize("which", ["LA", "LM"])
def test_quadratic_with_large_negative_eigenvalues(which):
    lam = [-9.0, -8.5, 7.0, 6.0, 5.5, -3.0, 2.0] + list(np.linspace(-1, 1, 53))
    op = quadratic_op(lam)
    res = top_eigenpairs(op, k=4, which=which, tol=1e-8)
    want = [7.0, 6.0, 5.5, 2.0] if which == "LA" else [7.0, 6.0, -8.5, -9.0]
    torch.testing.assert_close(res.values, torch.tensor(want, dtype=F64), rtol=1e-10, atol=0)
    assert res.has_negative == (which == "LM")


def test_agrees_with_scipy_eigsh(trained_mlp):
    model, batches = trained_mlp
    op = HessianOperator(model, cross_entropy, batches)
    n = op.n_params
    lin = LinearOperator((n, n), matvec=lambda v: op.matvec(torch.from_numpy(v.ravel())).numpy(), dtype=np.float64)
    ref = np.sort(eigsh(lin, k=5, which="LA", tol=1e-10, v0=np.ones(n))[0])[::-1]
    res = top_eigenpairs(op, k=5, which="LA", tol=1e-6)
    np.testing.assert_allclose(res.values.numpy(), ref, rtol=1e-6)


def test_warm_start_after_one_sgd_step(trained_mlp):
    model, batches = trained_mlp
    model = mlp((10, 16, 4), seed=3)
    model.load_state_dict(trained_mlp[0].state_dict())
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    before = top_eigenpairs(HessianOperator(model, cross_entropy, batches), k=5, tol=1e-4)
    sgd_steps(model, x, y, 1, lr=0.1)
    op = HessianOperator(model, cross_entropy, batches)
    cold = top_eigenpairs(op, k=5, tol=1e-4)
    warm = top_eigenpairs(op, k=5, tol=1e-4, init=before.vectors)
    assert cold.converged and warm.converged
    torch.testing.assert_close(warm.values, cold.values, rtol=1e-6, atol=0)
    assert warm.n_hvps < cold.n_hvps, (warm.n_hvps, cold.n_hvps)


def test_budget_cap_reports_not_converged():
    op = HessianOperator(mlp(), cross_entropy, [data(20)])
    res = top_eigenpairs(op, k=3, tol=1e-12, max_hvps=6)
    assert not res.converged and res.n_hvps <= 6 and "NOT converged" in res.message
    assert res.values.shape == (3,) and res.vectors.shape == (3, 75)


def test_deterministic_and_global_rng_untouched():
    op = HessianOperator(mlp(), cross_entropy, [data(20)])
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    a = top_eigenpairs(op, k=3, tol=1e-5, generator=torch.Generator().manual_seed(11))
    b = top_eigenpairs(op, k=3, tol=1e-5, generator=torch.Generator().manual_seed(11))
    c = top_eigenpairs(op, k=3, tol=1e-5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a.vectors, b.vectors) and a.n_hvps == b.n_hvps
    torch.testing.assert_close(a.values, c.values, rtol=1e-8, atol=0)


def test_float32_model_cold_tolerance():
    model = mlp((10, 16, 4), seed=3).float()
    x, y = data(200, shape=(10,), classes=4, seed=4)
    sgd_steps(model, x.float(), y, 40)
    op = HessianOperator(model, cross_entropy, [(x.float(), y)])
    res = top_eigenpairs(op, k=5, tol=1e-3)
    lam = torch.linalg.eigvalsh(op.dense().double()).flip(0)[:5]
    assert res.converged and res.values.dtype == torch.float32
    torch.testing.assert_close(res.values.double(), lam, rtol=1e-4, atol=0)


# -- estimators ----------------------------------------------------------------------------------------


def test_frobenius_topk():
    assert frobenius_topk(torch.tensor([1.0, -2.0, 2.0])) == 3.0


def test_hutchinson_trace_against_dense(trained_mlp):
    model, batches = trained_mlp
    op = HessianOperator(model, cross_entropy, batches)
    est = hutchinson_trace(op, n=300, generator=torch.Generator().manual_seed(0))
    trace = float(oracle_hessian(model, batches).trace())
    assert est.n_hvps == 300 and est.stderr > 0
    assert abs(est.value - trace) < 4 * est.stderr


def test_slq_quadrature_is_exact_for_low_degree_polynomials(trained_mlp):
    model, batches = trained_mlp
    op = HessianOperator(model, cross_entropy, batches)
    H = oracle_hessian(model, batches)
    steps = 6
    sd = spectral_density(op, n_vectors=2, n_steps=steps, generator=torch.Generator().manual_seed(5))
    assert sd.n_hvps == 2 * steps and sd.weights.sum(dim=1).allclose(torch.ones(2, dtype=F64))
    gen = torch.Generator().manual_seed(5)
    for i in range(2):
        u = random_start(op, 1, gen, kind="rademacher")[0]
        u = u / u.norm()
        for p in range(1, 2 * steps):
            exact = u @ torch.linalg.matrix_power(H, p) @ u
            quad = (sd.weights[i] * sd.nodes[i] ** p).sum()
            torch.testing.assert_close(quad, exact, rtol=1e-8, atol=1e-14)


def test_slq_moments_and_density(trained_mlp):
    model, batches = trained_mlp
    op = HessianOperator(model, cross_entropy, batches)
    lam = torch.linalg.eigvalsh(oracle_hessian(model, batches))
    sd = spectral_density(op, n_vectors=20, n_steps=25, generator=torch.Generator().manual_seed(1))
    assert sd.nodes.max() <= lam.max() + 1e-10 and sd.nodes.min() >= lam.min() - 1e-10
    torch.testing.assert_close(sd.nodes.max(), lam.max(), rtol=1e-6, atol=0)  # extremes converge first
    for p in (1, 2):
        assert abs(sd.moment(p) - float((lam**p).mean())) < 0.2 * float((lam.abs() ** p).mean())
    grid, dens = sd.density()
    assert abs(float(torch.trapezoid(dens, grid)) - 1.0) < 1e-3
