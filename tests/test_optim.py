"""Nudged SGD, isotropic-noise GD and learning-rate schedules."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from sgdscope.config import ScheduleConfig
from sgdscope.curvature.flat import get_flat
from sgdscope.errors import ConfigError
from sgdscope.losses import cross_entropy
from sgdscope.optim import IsotropicNoise, LRSchedule, NudgedSGD, build_schedule, gradient_variance


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------------------------- NSGD


def _train(make_opt, steps=20, subspace=None):
    model = _mlp()
    opt = make_opt(model.parameters())
    if subspace is not None:
        opt.set_subspace(subspace)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 6, generator=g), torch.randint(0, 4, (200,), generator=g)
    for _ in range(steps):
        idx = torch.randperm(200, generator=g)[:32]
        opt.zero_grad()
        cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_gamma_one_is_bit_identical_to_torch_sgd(momentum):
    n = get_flat(_mlp()).numel()
    basis, _ = torch.linalg.qr(torch.randn(n, 3, generator=torch.Generator().manual_seed(2)))
    ref, _ = _train(lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum, dampening=0))
    nudged, _ = _train(lambda p: NudgedSGD(p, lr=0.05, momentum=momentum, gamma=1.0), subspace=basis.T)
    bare, _ = _train(lambda p: NudgedSGD(p, lr=0.05, momentum=momentum, mode="only"))  # no subspace: SGD
    for a, b, c in zip(ref.parameters(), nudged.parameters(), bare.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_weight_decay_is_the_gradient_of_lambda_sum_w2():
    ref, _ = _train(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=2 * 0.01), steps=5)
    ours, _ = _train(lambda p: NudgedSGD(p, lr=0.05, momentum=0.9, gamma=1.0, weight_decay=0.01), steps=5)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ours.parameters()))


class _Quadratic(nn.Module):
    """½θᵀAθ with a diagonal A, so ∇ = Aθ; the parameter is split in two to exercise the flat slicing."""

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        self.v = nn.Parameter(torch.tensor([[3.0, 1.0], [-1.0, 2.0]]))
        self.register_buffer("a", torch.tensor([5.0, 1.0, 0.5, 2.0, 0.1, 1.5, 3.0]))

    def loss(self) -> torch.Tensor:
        theta = torch.cat([self.u, self.v.reshape(-1)])
        return 0.5 * (self.a * theta * theta).sum()


def _one_step(mode, gamma, basis, momentum=0.0, steps=1, freeze=False):
    model = _Quadratic()
    opt = NudgedSGD(model.parameters(), lr=0.1, momentum=momentum, gamma=gamma, mode=mode)
    opt.set_subspace(basis, freeze=freeze)
    thetas = [get_flat(model)]
    for _ in range(steps):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
        thetas.append(get_flat(model))
    return model, opt, thetas


BASIS = torch.linalg.qr(torch.randn(7, 2, generator=torch.Generator().manual_seed(4)))[0].T


@pytest.mark.parametrize(
    "mode, top, rest", [("scale", 0.3, 1.0), ("fixed", 0.3, 1.0), ("only", 1.0, 0.0), ("remove", 0.0, 1.0)]
)
def test_step_is_rescaled_in_the_subspace_only(mode, top, rest):
    _, _, (theta0, theta1) = _one_step(mode, 0.3, BASIS)
    sgd = -0.1 * _Quadratic().a * theta0  # the plain SGD step −η·Aθ
    step = theta1 - theta0
    proj = BASIS.T @ BASIS
    torch.testing.assert_close(BASIS @ step, top * (BASIS @ sgd))
    torch.testing.assert_close(step - proj @ step, rest * (sgd - proj @ sgd))


def test_momentum_buffer_keeps_the_unnudged_direction():
    gamma, mu, lr = 0.2, 0.9, 0.1
    model, opt, thetas = _one_step("scale", gamma, BASIS, momentum=mu, steps=2)
    a, proj = model.a, BASIS.T @ BASIS
    b1 = a * thetas[0]
    b2 = mu * b1 + a * thetas[1]
    torch.testing.assert_close(thetas[1], thetas[0] - lr * (b1 + (gamma - 1) * proj @ b1))
    torch.testing.assert_close(thetas[2], thetas[1] - lr * (b2 + (gamma - 1) * proj @ b2))
    buffers = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(buffers, b2)


def test_fixed_and_frozen_subspaces_ignore_later_updates():
    other = torch.linalg.qr(torch.randn(7, 2, generator=torch.Generator().manual_seed(5)))[0].T
    _, fixed, _ = _one_step("fixed", 0.5, BASIS)
    assert fixed.frozen and not fixed.set_subspace(other) and not fixed.set_subspace(None)
    assert torch.equal(fixed.subspace, BASIS)
    _, only, _ = _one_step("only", 0.5, BASIS, freeze=True)
    assert not only.set_subspace(other) and torch.equal(only.subspace, BASIS)
    _, scale, _ = _one_step("scale", 0.5, BASIS)
    assert scale.set_subspace(other) and torch.equal(scale.subspace, other)
    assert scale.set_subspace(None) and scale.subspace is None


def test_nsgd_state_dict_roundtrip_with_weights_only():
    model, opt, _ = _one_step("only", 0.5, BASIS, momentum=0.9, steps=2, freeze=True)
    fresh = NudgedSGD(model.parameters(), lr=0.1, momentum=0.9, mode="only")
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    assert fresh.frozen and torch.equal(fresh.subspace, BASIS)
    assert torch.equal(fresh.state[model.u]["momentum_buffer"], opt.state[model.u]["momentum_buffer"])


def test_nsgd_rejects_bad_input():
    with pytest.raises(ConfigError, match="mode"):
        NudgedSGD(_mlp().parameters(), lr=0.1, mode="top")
    with pytest.raises(ValueError, match="subspace"):
        NudgedSGD(_mlp().parameters(), lr=0.1).set_subspace(torch.ones(2, 3))


# --------------------------------------------------------------------------------------------- noise


def _per_example_grads(model, x, y):
    params = list(model.parameters())
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_gradient_variance_against_per_example_gradients(chunk):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(14, 3), torch.randint(0, 2, (14,))
    per_example = _per_example_grads(model, x, y)
    chunks = per_example.split(chunk)  # the last chunk may be shorter
    means = torch.stack([c.mean(0) for c in chunks])
    sizes = torch.tensor([float(len(c)) for c in chunks])
    overall = per_example.mean(0)
    expected = (sizes[:, None] * (means - overall) ** 2).mean(0)
    torch.testing.assert_close(gradient_variance(model, cross_entropy, x, y, chunk), expected)
    if chunk == 1:  # plain per-example (population) variance
        torch.testing.assert_close(expected, per_example.var(0, unbiased=False))
    noise = IsotropicNoise.estimate(model, cross_entropy, x, y, chunk, factor=0.5)
    assert noise.max_var == pytest.approx(expected.max().item()) and noise.sigma == pytest.approx(0.5 * noise.max_var)


def test_gradient_variance_matches_the_authors_formula_for_equal_chunks():
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    m = 4
    means = _per_example_grads(model, x, y).reshape(3, m, -1).mean(1)
    authors = m * ((means**2).mean(0) - means.mean(0) ** 2)
    torch.testing.assert_close(gradient_variance(model, cross_entropy, x, y, m), authors, rtol=1e-4, atol=1e-7)
    with pytest.raises(ConfigError, match="chunks"):
        gradient_variance(model, cross_entropy, x, y, 12)


@pytest.mark.parametrize("scales, sigma", [("std", 0.3), ("variance", math.sqrt(0.3))])
def test_noise_has_the_right_std_and_its_own_stream(scales, sigma):
    noise = IsotropicNoise(max_var=1.5, factor=0.2, scales=scales)
    assert noise.sigma == pytest.approx(sigma)
    rng = torch.get_rng_state()
    flat = torch.zeros(200_000)
    noise.add_(flat, torch.Generator().manual_seed(0))
    assert torch.equal(rng, torch.get_rng_state())
    assert flat.std().item() == pytest.approx(sigma, rel=0.01) and abs(flat.mean().item()) < 5 * sigma / 447
    again = torch.zeros(200_000)
    noise.add_(again, torch.Generator().manual_seed(0))
    assert torch.equal(flat, again)


def test_noise_goes_into_parameter_grads():
    model = _mlp()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    IsotropicNoise(max_var=1.0, factor=1.0).add_(model.parameters(), torch.Generator().manual_seed(0))
    assert all(p.grad is not None and bool((p.grad != 0).all()) for p in model.parameters())
    assert (model[0].weight.grad - 1).std().item() == pytest.approx(1.0, rel=0.2)
    with pytest.raises(ConfigError, match="scales"):
        IsotropicNoise(max_var=1.0, factor=1.0, scales="var")


# ------------------------------------------------------------------------------------------ schedules


def _lrs(schedule: LRSchedule, steps, spe=10):
    return [round(schedule.lr_at(s, s // spe), 10) for s in steps]


def test_constant_and_step_schedules():
    assert _lrs(build_schedule(ScheduleConfig(), 0.1, 10), [0, 5, 10**6]) == [0.1, 0.1, 0.1]
    step = build_schedule(ScheduleConfig(name="step", milestones=[0.3, 2], factor=0.5), 0.8, 10)
    assert _lrs(step, [0, 2, 3, 19, 20, 500]) == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2]


def test_cyclic_schedule():
    cfg = ScheduleConfig(name="cyclic", max_lr=0.9, step_size=4)
    assert _lrs(build_schedule(cfg, 0.1, 10), [0, 1, 4, 7, 8, 10, 12, 16]) == [0.1, 0.3, 0.9, 0.3, 0.1, 0.5, 0.9, 0.1]
    low = build_schedule(ScheduleConfig(name="cyclic", base_lr=0.5, max_lr=0.9, step_size=4), 0.1, 10)
    assert _lrs(low, [0, 2]) == [0.5, 0.7]
    with pytest.raises(ConfigError, match="max_lr"):
        build_schedule(ScheduleConfig(name="cyclic"), 0.1, 10)


def test_trapezoid_schedule():
    cfg = ScheduleConfig(name="trapezoid", max_lr=1.0, t_up=4, t_flat=3, t_down=5, min_lr=0.01)
    got = _lrs(build_schedule(cfg, 0.2, 10), [0, 2, 4, 7, 8, 12, 13, 100])
    assert got == [0.2, 0.6, 1.0, 1.0, 0.802, 0.01, 0.01, 0.01]
    no_warmup = ScheduleConfig(name="trapezoid", max_lr=1.0, t_up=0, t_flat=0, t_down=2)
    assert _lrs(build_schedule(no_warmup, 0.2, 10), [0, 1, 2]) == [1.0, 0.5, 0.0]


def test_plateau_schedule_with_scripted_metrics_and_resume():
    cfg = ScheduleConfig(name="plateau", monitor="val_acc", factor=0.1, patience=2, threshold=0.01, min_lr=1e-3)
    sched = build_schedule(cfg, 1.0, 10)
    accs = [0.5, 0.6, 0.605, 0.61, 0.7, 0.69, 0.7, float("nan"), 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    expect = [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]
    got = []
    for epoch, acc in enumerate(accs):
        sched.observe(epoch, {"val_acc": acc, "val_loss": 0.0})
        got.append(round(sched.lr_at(0, epoch), 10))
        if epoch == 4:
            resumed = build_schedule(cfg, 1.0, 10)
            resumed.load_state_dict(_roundtrip(sched.state_dict()))
            sched = resumed
    assert got == expect


def test_plateau_relative_threshold_on_a_loss():
    cfg = ScheduleConfig(
        name="plateau", monitor="val_loss", factor=0.5, patience=1, threshold=0.1, threshold_mode="rel"
    )
    sched = build_schedule(cfg, 1.0, 10)
    for loss, lr in [(10.0, 1.0), (9.5, 0.5), (8.9, 0.5), (8.5, 0.25)]:  # 9.5 > 10·0.9: not an improvement
        sched.observe(0, {"val_loss": loss})
        assert sched.lr_at(0, 0) == lr
    with pytest.raises(ConfigError, match="monitor"):
        sched.observe(0, {"train_loss": 1.0})


def test_apply_sets_every_group():
    model = _mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 5.0}], lr=1.0)
    sched = build_schedule(ScheduleConfig(name="step", milestones=[1], factor=0.1), 1.0, 10)
    assert sched.apply(opt, 10, 1) == pytest.approx(0.1)
    assert [g["lr"] for g in opt.param_groups] == [sched.lr_at(10, 1)] * 2
    assert sched.state_dict() == {}
