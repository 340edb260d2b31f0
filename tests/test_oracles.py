"""Independent oracles (issue 10).

* The Hessian operator and the eigensolver, over the case matrix of ``conftest.py``: every product equals
  the dense ``torch.autograd.functional.hessian`` of the exactly weighted mean loss, and ``top_eigenpairs``
  agrees with ``torch.linalg.eigh`` of that matrix. The oracle is written from torch alone: its own
  parameter split, the case's own loss, and, where the loss is a mean of per-example terms (no batch
  statistics), one mean over all examples at once instead of a weighted sum over batches.
* The consecutive-gradient cosine of a run's ``train`` table, against gradients rebuilt from per-example
  gradients in a plain loop while replaying plain SGD from the run's initial weights.
* ρ(W), against NumPy's SVD of every reshaped weight matrix (embeddings excluded), for the function and
  for the ``epoch`` table of a run.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from sgdscope.curvature import HVP_METHODS, HessianOperator, top_eigenpairs

F64 = torch.float64


# ------------------------------------------------------------------------------- the dense oracle


def dense_hessian(case, policy: str) -> torch.Tensor:
    """∇²L at the case's parameters, L = Σ_b n_b L_b / Σ_b n_b over the trainable parameters only.

    ``policy`` "eval": the model in eval mode and L computed as one mean over the concatenated examples
    (equal to the weighted mean because every term is per example). "train-restore": train mode (batch
    statistics), so the batches cannot be merged and L is the weighted sum written out; the running
    statistics seen by the oracle are copies, so it leaves the model as it was.
    """
    model = case.model
    named = case.trainable()
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def state(theta):
        out, i = dict(fixed), 0
        for n, s in zip(names, shapes):
            out[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return {**out, **{n: b.clone() for n, b in buffers.items()}}

    if policy == "eval":
        x = torch.cat([b[0] for b in case.batches])
        y = torch.cat([b[1] for b in case.batches])

        def loss(theta):
            return case.loss_fn(functional_call(model, state(theta), (x,)), y)
    else:
        weights = [y.numel() for _, y in case.batches]

        def loss(theta):
            st = state(theta)
            return sum(w * case.loss_fn(functional_call(model, st, (x,)), y)
                       for w, (x, y) in zip(weights, case.batches)) / sum(weights)

    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    was = [(m, m.training) for m in model.modules()]
    model.train(policy != "eval")
    try:
        H = torch.autograd.functional.hessian(loss, theta0)
    finally:
        for m, f in was:
            m.training = f
    return H


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------- the HVP operator


@pytest.mark.parametrize("method", HVP_METHODS)
@pytest.mark.parametrize("policy", ["eval", "train-restore"])
def test_hvp_equals_dense_hessian(case, policy, method):
    if policy not in case.policies:
        pytest.skip(f"{case.id}: dropout draws masks in train mode, so no deterministic dense oracle")
    H = dense_hessian(case, policy)
    n = sum(p.numel() for _, p in case.trainable())
    assert H.shape == (n, n)
    # A case whose Hessian vanishes would make every comparison below vacuous.
    assert H.abs().max() > 1e-3, case.id
    before = _snapshot(case.model)
    op = HessianOperator(case.model, case.loss_fn, case.batches, bn_policy=policy, method=method)
    # Frozen parameters are not coordinates of the operator.
    assert {n for n, p in case.model.named_parameters() if not p.requires_grad} == set(case.frozen)
    total = sum(p.numel() for p in case.model.parameters())
    assert op.n_params == n and (n < total if case.frozen else n == total)
    assert op.dtype == F64
    tol = dict(rtol=1e-9, atol=1e-10 * float(H.abs().max()))
    torch.testing.assert_close(op.dense(), H, **tol)
    g = torch.Generator().manual_seed(7)
    v = torch.randn(n, generator=g, dtype=F64)
    torch.testing.assert_close(op.matvec(v), H @ v, **tol)   # the single-vector path, apart from blocks
    V = torch.randn(3, n, generator=g, dtype=F64)
    torch.testing.assert_close(op.matmat(V), V @ H, **tol)
    # No product wrote the parameters or the BatchNorm running statistics.
    after = _snapshot(case.model)
    assert all(torch.equal(before[k], after[k]) for k in before), case.id


def test_bn_policies_give_different_hessians(make_case):
    """Guards the cnn_bn case itself: if running and batch statistics gave the same Hessian, the two
    policies above would not test the policy at all."""
    c = make_case("cnn_bn")
    He, Ht = dense_hessian(c, "eval"), dense_hessian(c, "train-restore")
    assert (He - Ht).abs().max() > 1e-2 * He.abs().max()


def test_dropout_train_restore_is_a_fixed_symmetric_matrix(make_case):
    """Where no dense oracle exists (dropout in train mode), the operator must still be one fixed
    symmetric matrix: the same masks for every product and every call."""
    c = make_case("dropout")
    op = HessianOperator(c.model, c.loss_fn, c.batches, bn_policy="train-restore")
    A, B = op.dense(), op.dense()
    torch.testing.assert_close(A, B, rtol=0, atol=0)
    torch.testing.assert_close(A, A.T, rtol=1e-10, atol=1e-12)
    # And the masks matter: it is not the eval Hessian.
    assert (A - dense_hessian(c, "eval")).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ the eigensolver


@pytest.mark.parametrize("which", ["LA", "LM"])
def test_top_eigenpairs_agree_with_eigh(case, which):
    k = 3
    H = dense_hessian(case, "eval")
    lam, U = torch.linalg.eigh(H)              # ascending
    order = torch.argsort(lam, descending=True) if which == "LA" else torch.argsort(lam.abs(), descending=True)
    want = order[:k][torch.argsort(lam[order[:k]], descending=True)]  # the k wanted, sorted by value
    op = HessianOperator(case.model, case.loss_fn, case.batches, bn_policy="eval")
    res = top_eigenpairs(op, k=k, which=which, tol=1e-8, generator=torch.Generator().manual_seed(0))
    scale = float(lam.abs().max())
    assert res.converged, res.message
    torch.testing.assert_close(res.values, lam[want], rtol=0, atol=1e-7 * scale)
    Vt = res.vectors
    torch.testing.assert_close(Vt @ Vt.T, torch.eye(k, dtype=F64), rtol=0, atol=1e-8)
    # Residuals against the dense matrix, not the operator: each returned pair is an eigenpair of H.
    dense_res = (Vt @ H - res.values[:, None] * Vt).norm(dim=1)
    assert (dense_res <= 1e-6 * scale).all(), dense_res
    # Each vector is the eigenvector of eigh up to sign where its eigenvalue is separated from the others
    # (within a cluster only the span is defined).
    for i, j in enumerate(want.tolist()):
        gap = float((lam - lam[j]).abs().sort().values[1])
        if gap > 1e-3 * scale:
            assert abs(float(Vt[i] @ U[:, j])) > 1 - 1e-6, (case.id, i, gap)


# ---------------------------------------------------------------- the consecutive-gradient cosine


def _tiny_run_config(**extra):
    from sgdscope.config import validate

    raw = {
        "seed": 4, "device": "cpu",
        "data": {"name": "synthetic", "n_samples": 130, "input_shape": [5], "num_classes": 3},
        "model": {"name": "mlp", "widths": [6]},
        # 2 epochs of uneven batches: the last batch of a pass is shorter, and the second pass reshuffles.
        "optimizer": {"name": "sgd", "lr": 0.3, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 16},
        "train": {"epochs": 2},
    }
    raw.update(extra)
    return validate(raw)


def test_grad_cosine_prev_against_per_example_gradients(tmp_path):
    """Replays the run by hand: the batch of step t from BatchStream, its gradient as the float64 mean of
    per-example gradients (one backward per example), then plain SGD θ ← θ − η g; the cosine of
    consecutive gradients, the gradient norm, the batch loss and ‖θ − θ0‖ must match the train table."""
    import sgdscope
    from sgdscope.data import load_dataset
    from sgdscope.store import RunStore
    from sgdscope.train import BatchStream, Trainer

    cfg = _tiny_run_config()
    device = torch.device("cpu")
    init = Trainer(cfg, device, progress=False).model
    model = copy.deepcopy(init).to(F64)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = load_dataset(cfg.data, cfg.seed, device)
    x_all, y_all = data.train.x.to(F64), data.train.y
    n_train, bs = len(x_all), cfg.optimizer.batch_size
    assert n_train % bs, "the set-up should give an uneven last batch"

    path = sgdscope.run(cfg, tmp_path / "run", progress=False)
    tr = RunStore(path).table("train").sort_values("step")
    stream = BatchStream(n_train, bs, cfg.seed, device)
    params = dict(model.named_parameters())
    lr = cfg.optimizer.lr
    prev = None
    for _, row in tr.iterrows():
        t = int(row["step"]) - 1              # the row of step t+1 holds the update made on batch t
        idx = stream.indices(t).tolist()
        grads = [torch.zeros_like(p) for p in params.values()]
        loss_sum = 0.0
        for i in idx:                         # per-example gradients, summed by hand
            model.zero_grad(set_to_none=True)
            out = model(x_all[i : i + 1])
            loss = torch.nn.functional.cross_entropy(out, y_all[i : i + 1])
            loss.backward()
            loss_sum += float(loss.detach())
            for acc, p in zip(grads, params.values()):
                acc += p.grad
        g = torch.cat([a.reshape(-1) for a in grads]) / len(idx)
        assert row["lr"] == pytest.approx(lr)
        assert row["batch_loss"] == pytest.approx(loss_sum / len(idx), rel=1e-5)
        assert row["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
        if prev is None:
            assert math.isnan(row["grad_cosine_prev"])   # step 1 has no previous gradient
        else:
            cos = float(prev @ g) / (float(prev.norm()) * float(g.norm()))
            assert row["grad_cosine_prev"] == pytest.approx(cos, abs=1e-5), int(row["step"])
        prev = g
        with torch.no_grad():
            for p, acc in zip(params.values(), grads):
                p -= lr * acc / len(idx)
            dist = math.sqrt(sum(float(((p - theta0[n]) ** 2).sum()) for n, p in params.items()))
        assert row["param_distance"] == pytest.approx(dist, rel=1e-4)
    assert len(tr) == 2 * math.ceil(n_train / bs)
    # The cosines must not all be trivially equal (e.g. all 1): the oracle compared real variation.
    cosines = tr["grad_cosine_prev"].dropna()
    assert cosines.std() > 1e-3 and (cosines < 0.999).all()


# ----------------------------------------------------------------------------------------------- ρ(W)


def rho_oracle(mats: list[np.ndarray]) -> float:
    """Mean over matrices of the largest singular value, each reshaped to (out, rest), by NumPy's SVD."""
    return float(np.mean([np.linalg.svd(m.reshape(m.shape[0], -1), compute_uv=False)[0] for m in mats]))


class Mixed(nn.Module):
    """Linear, Conv1d, Conv2d, an LSTM, BatchNorm and an embedding: every kind of parameter ρ(W) must
    include or skip."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 7)      # excluded (a lookup table, not an operator); large on purpose
        self.conv2 = nn.Conv2d(3, 4, (3, 2))
        self.bn = nn.BatchNorm2d(4)         # 1-D weight: excluded
        self.conv1 = nn.Conv1d(2, 5, 3)
        self.lstm = nn.LSTM(3, 2)           # weight_ih (8, 3) and weight_hh (8, 2): included
        self.fc = nn.Linear(6, 3)


def test_weight_spectral_norm_mean_against_svd():
    from sgdscope.measure.probes import weight_spectral_norm_mean

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        m = Mixed()
        with torch.no_grad():
            m.emb.weight.mul_(10)           # if the embedding were counted, the mean would move a lot
    mats = [m.conv2.weight, m.conv1.weight, m.lstm.weight_ih_l0, m.lstm.weight_hh_l0, m.fc.weight]
    want = rho_oracle([w.detach().double().numpy() for w in mats])
    assert weight_spectral_norm_mean(m) == pytest.approx(want, rel=1e-5)
    with_emb = rho_oracle([w.detach().double().numpy() for w in mats + [m.emb.weight]])
    assert abs(with_emb - want) > 0.1 * want   # the exclusion is visible in the number


def test_epoch_table_rho_against_svd_of_checkpoint(tmp_path):
    """The ``epoch`` table's ρ(W) at the last epoch equals the SVD oracle on the weights the run saved
    with that epoch (checkpoints/last.pt), for a CNN with conv and linear layers."""
    import sgdscope
    from sgdscope.config import validate
    from sgdscope.store import RunStore

    cfg = validate({
        "seed": 1, "device": "cpu",
        "data": {"name": "synthetic", "n_samples": 80, "input_shape": [1, 8, 8], "num_classes": 3},
        "model": {"name": "simplecnn", "filters": [2, 2, 3, 3], "batchnorm": True},
        "optimizer": {"name": "sgd", "lr": 0.1, "batch_size": 16},
        "train": {"epochs": 1},
    })
    path = sgdscope.run(cfg, tmp_path / "cnn", progress=False)
    ep = RunStore(path).table("epoch")
    state = torch.load(path / "checkpoints" / "last.pt", weights_only=True)["model"]
    # Weight matrices are the ≥2-D entries of the state dict (BN buffers and biases are 1-D or 0-D).
    mats = [v.double().numpy() for v in state.values() if v.ndim >= 2]
    assert any(v.ndim == 4 for v in mats) and any(v.ndim == 2 for v in mats)
    assert float(ep["weight_spectral_norm_mean"].iloc[-1]) == pytest.approx(rho_oracle(mats), rel=1e-5)
