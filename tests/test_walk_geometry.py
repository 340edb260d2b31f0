"""Issue 13 (items 1 and 3) and issue 12 (the interpolation's shared end points), against oracles built here.

* Principal angles: subspaces rotated by known angles (Givens rotations in planes spanned by a basis
  vector of 𝒜 and one orthogonal to 𝒜), and SciPy's ``subspace_angles``.
* The rotation probe: dense ``torch.autograd.functional.hessian`` + ``eigh`` at every step, angles by SciPy.
* Step classes: the one-parameter quadratic L(w) = w², where an SGD step of η multiplies w by 1 − ηλ
  (λ = 2), so descend / cross / climb are the ranges ηλ < 1, 1 < ηλ < 2, ηλ > 2 in closed form.
* End-point reuse: the reused L(θ_{t+1}) against a fresh evaluation, bit for bit, with dropout and with
  BN under every policy; resumed runs against uninterrupted ones.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from sgdscope.curvature.flat import get_flat
from sgdscope.curvature.subspace import principal_angles, subspace_overlap
from sgdscope.landscape import loss_at_points, step_class, valley_profile
from sgdscope.measure.scope import Scope

F64 = torch.float64


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q


def _givens(n: int, i: int, j: int, angle: float) -> torch.Tensor:
    g = torch.eye(n, dtype=F64)
    c, s = math.cos(angle), math.sin(angle)
    g[i, i], g[j, j], g[i, j], g[j, i] = c, c, -s, s
    return g


@pytest.mark.parametrize("angles", [[1e-9, 1e-4, 0.3, 1.2], [0.0, 0.5, math.pi / 2 - 1e-7, math.pi / 2]])
def test_principal_angles_of_givens_rotations(angles):
    n, k = 11, len(angles)
    q = _orthogonal(n, 0)
    # rotate e_i towards e_{k+i} by angles[i]: the principal angles of span(e_1..e_k) and its image
    rot = torch.eye(n, dtype=F64)
    for i, a in enumerate(angles):
        rot = _givens(n, i, k + i, a) @ rot
    a_basis = q[:, :k].T
    b_basis = (q @ rot)[:, :k].T
    mix = _orthogonal(k, 1) @ torch.diag(torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=F64))  # any basis of ℬ
    got = principal_angles(a_basis, mix @ b_basis)
    want = torch.tensor(sorted(angles), dtype=F64)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-12), (got, want)
    # the small angles keep their digits (the cosine formula would give 0 for 1e-9)
    small = (want < 1e-3) & (want > 0)
    assert torch.allclose(got[small], want[small], rtol=1e-5, atol=0)
    assert subspace_overlap(a_basis, b_basis) == pytest.approx(float(torch.cos(want).square().mean()), rel=1e-12)


@pytest.mark.parametrize("p,q", [(3, 3), (2, 5), (5, 2)])
def test_principal_angles_match_scipy(p, q):
    g = torch.Generator().manual_seed(p * 10 + q)
    a = torch.randn(p, 9, generator=g, dtype=F64)
    b = torch.randn(q, 9, generator=g, dtype=F64)
    b[0] = a[0] + 1e-2 * b[0]  # one nearly shared direction (SciPy keeps only ~3 digits at 3e-7 rad)
    ref = np.sort(scipy.linalg.subspace_angles(a.numpy().T, b.numpy().T))
    got = principal_angles(a, b).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-12)
    assert 0.0 <= subspace_overlap(a, b) <= 1.0
    with pytest.raises(ValueError):
        principal_angles(a, torch.randn(2, 4, dtype=F64))


# ---------------------------------------------------------------------- the rotation probe


def _tanh_net():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 3, generator=g, dtype=F64), torch.randn(40, 1, generator=g, dtype=F64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)
    return model, x, y


def _mse(out, y):
    return ((out - y) ** 2).mean()


def _run(model, x, y, probes, steps, lr=0.3, scope=None, start=0):
    scope = scope or Scope(model, _mse, (x, y), probes=probes, seed=0, steps_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    thetas = [get_flat(model)]
    for t in range(start, steps):
        idx = torch.arange(t % 4 * 10, t % 4 * 10 + 10)
        with scope.step(opt):
            opt.zero_grad()
            _mse(model(x[idx]), y[idx]).backward()
            opt.step()
        thetas.append(get_flat(model))
    return scope, thetas


def _dense_top(model, x, y, theta, k):
    def loss(flat):
        params, i = {}, 0
        for (name, p) in model.named_parameters():
            params[name] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        return _mse(torch.func.functional_call(model, params, (x,)), y)

    h = torch.autograd.functional.hessian(loss, theta)
    w, v = torch.linalg.eigh(h)
    return v[:, -k:].T.numpy()


ROT = {"eigen": {"every": 1, "k": 3, "tol": 1e-8, "max_hvps": 200}, "rotation": {"every": 1}}


def test_rotation_probe_against_dense_hessians():
    model, x, y = _tanh_net()
    scope, thetas = _run(model, x, y, ROT, 3)
    rot = scope.table("rotation")
    assert sorted(rot["step"].unique()) == [0, 1, 2, 3] and set(rot["index"]) == {1, 2, 3}
    bases = [_dense_top(model, x, y, th, 3) for th in thetas]
    for s in range(1, 4):
        r = rot[rot["step"] == s].sort_values("index")
        want_prev = np.degrees(np.sort(scipy.linalg.subspace_angles(bases[s - 1].T, bases[s].T)))
        want_ref = np.degrees(np.sort(scipy.linalg.subspace_angles(bases[0].T, bases[s].T)))
        np.testing.assert_allclose(r["angle_prev_deg"], want_prev, atol=1e-4)
        np.testing.assert_allclose(r["angle_ref_deg"], want_ref, atol=1e-4)
        assert r["prev_step"].tolist() == [s - 1] * 3 and r["ref_step"].tolist() == [0] * 3
        assert r["overlap_prev"].iloc[0] == pytest.approx(np.mean(np.cos(np.radians(want_prev)) ** 2), abs=1e-8)
    first = rot[rot["step"] == 0]
    assert first["angle_prev_deg"].isna().all() and (first["angle_ref_deg"].abs() < 1e-6).all()
    assert scope.options.rotation.k == 3  # defaults to the eigen probe's k


def test_rotation_resume_and_reference_step():
    probes = {"eigen": {"every": 1, "k": 3, "tol": 1e-3}, "rotation": {"every": 1, "reference_step": 2}}
    model, x, y = _tanh_net()
    whole, _ = _run(model, x, y, probes, 4)
    model, x, y = _tanh_net()
    first, _ = _run(model, x, y, probes, 2)
    state = copy.deepcopy(first.state_dict())
    again = Scope(model, _mse, (x, y), probes=probes, seed=0, steps_per_epoch=2)
    again.load_state_dict(state)
    again, _ = _run(model, x, y, probes, 4, scope=again, start=2)
    a = whole.table("rotation")
    b = again.table("rotation")
    cols = ["step", "index", "angle_prev_deg", "angle_ref_deg", "overlap_prev", "overlap_ref", "prev_step", "ref_step"]
    np.testing.assert_allclose(a[a["step"] > 2][cols].to_numpy(float), b[cols].to_numpy(float), rtol=1e-9, atol=1e-9)
    assert a[a["step"] < 2]["angle_ref_deg"].isna().all() and (a[a["step"] >= 2]["ref_step"] == 2).all()


# ---------------------------------------------------------------------- step classes


def test_step_classes_on_the_quadratic():
    """L(w) = mean((w·1 − 0)²) = w²: λ = 2, and a step of η maps w to (1 − 2η)w."""
    model = nn.Linear(1, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    x, y = torch.ones(4, 1, dtype=F64), torch.zeros(4, 1, dtype=F64)
    probes = {"interpolation": {"every": 1, "epochs": None}, "eigen": {"every": 1, "k": 1, "tol": 1e-10}}
    scope = Scope(model, _mse, (x, y), probes=probes, seed=0, steps_per_epoch=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eta_lams = [0.5, 1.5, 2.5, 0.8]
    for el in eta_lams:
        opt.param_groups[0]["lr"] = el / 2
        with scope.step(opt):
            opt.zero_grad()
            _mse(model(x), y).backward()
            opt.step()
    va = scope.table("valley").sort_values("step")
    assert va["step_class"].tolist() == ["descend", "cross", "climb", "descend"]
    np.testing.assert_allclose(va["eta_lambda1"], eta_lams, rtol=1e-9)
    np.testing.assert_allclose(va["lambda1"], 2.0, rtol=1e-9)
    assert va["lambda1_step"].tolist() == [1, 2, 3, 4]  # the eigen probe solved at θ_t+1 just before
    # closed form: L1 = (1 − ηλ)² L0
    np.testing.assert_allclose(va["right_loss"], (1 - np.array(eta_lams)) ** 2 * va["left_loss"], rtol=1e-12)
    sc = scope.table("step_classes")
    assert len(sc) == 1
    row = sc.iloc[0]
    assert (row["epoch"], row["n_steps"], row["n_descend"], row["n_cross"], row["n_climb"], row["n_flat"]) == (1, 4, 2, 1, 1, 0)
    assert row["eta_lambda1_descend"] == pytest.approx(0.65) and row["eta_lambda1_climb"] == pytest.approx(2.5)
    assert row["eta_lambda1_mean"] == pytest.approx(np.mean(eta_lams))


def test_step_class_edges():
    al = [0, 0.5, 1]
    assert step_class(valley_profile([1.0, 1.0, 1.0], al)) == ("flat", 1e-6)
    assert step_class(valley_profile([1.0, 2.0, 1.5], al))[0] == "climb"  # uphill with a barrier
    assert step_class(valley_profile([1.0, 0.5, 1.0 + 1e-8], al))[0] == "cross"  # within τ of the start
    assert step_class(valley_profile([1.0, 1.0 - 1e-8, 0.5], al))[0] == "descend"  # a dip below τ is no floor
    assert step_class(valley_profile([float("nan"), 0.5, 0.4], al))[0] == "undefined"
    cls, tol = step_class(valley_profile([10.0, 9.0, 20.0], al), rel_tol=0.0, abs_tol=0.5)
    assert (cls, tol) == ("climb", 0.5)


# ---------------------------------------------------------------------- shared end points (issue 12)


@pytest.mark.parametrize("case_id,policy", [("dropout", "train-restore"), ("dropout", "eval"),
                                            ("cnn_bn", "train-restore"), ("cnn_bn", "eval"), ("cnn_bn", "train")])
def test_reused_end_point_is_a_fresh_evaluation(make_case, case_id, policy):
    case = make_case(case_id)
    model, batches = case.model, case.batches
    scope = Scope(model, case.loss_fn, batches, probes={"interpolation": {"every": 1, "epochs": None, "alphas": 4}},
                  seed=5, bn_policy=policy)
    probe = next(p for p in scope.probes if p.name == "interpolation")
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    kw = scope.env.kernel_kw("interpolation", 0)
    fresh_ends = []
    torch.manual_seed(0)
    for t in range(4):
        x, y = batches[t % len(batches)]
        with scope.step(opt):
            opt.zero_grad()
            case.loss_fn(model(x), y).backward()
            opt.step()
        theta = get_flat(model)
        fresh = loss_at_points(model, theta[None], batches, **kw)  # what segment t+1 would compute at α = 0
        assert torch.equal(probe._end[2], fresh), (t, probe._end[2], fresh)
        fresh_ends.append(fresh.item())
    interp = scope.table("interpolation")
    starts = interp[interp["alpha"] == 0].sort_values("step")["loss"].tolist()
    moved = case.has_bn and policy == "eval"  # running stats move between segments: no reuse there
    if not moved:
        assert starts[1:] == fresh_ends[:-1]  # bit for bit
    assert probe.points_evaluated == (5 * 4 if moved else 5 + 4 * 3)


def test_interpolation_resume_is_exact_and_reuse_saves_a_point(make_case):
    case = make_case("dropout")
    probes = {"interpolation": {"every": 1, "epochs": None, "alphas": 4}}

    def go(model, scope, ts):
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        for t in ts:
            x, y = case.batches[t % 3]
            with scope.step(opt):
                opt.zero_grad()
                case.loss_fn(model(x), y).backward()
                opt.step()
        return scope

    start = copy.deepcopy(case.model.state_dict())
    torch.manual_seed(0)
    whole = go(case.model, Scope(case.model, case.loss_fn, case.batches, probes=probes, seed=2, steps_per_epoch=3), range(6))
    end = get_flat(case.model)
    case.model.load_state_dict(start)
    torch.manual_seed(0)
    half = go(case.model, Scope(case.model, case.loss_fn, case.batches, probes=probes, seed=2, steps_per_epoch=3), range(3))
    state = copy.deepcopy(half.state_dict())
    again = Scope(case.model, case.loss_fn, case.batches, probes=probes, seed=2, steps_per_epoch=3)
    again.load_state_dict(state)
    go(case.model, again, range(3, 6))
    assert torch.equal(get_flat(case.model), end)
    a, b = whole.table("interpolation"), again.table("interpolation")
    assert a[a["step"] >= 3]["loss"].tolist() == b["loss"].tolist()
    sc_a, sc_b = whole.table("step_classes"), again.table("step_classes")
    assert sc_a.iloc[-1].drop("logged_at").equals(sc_b.iloc[-1].drop("logged_at"))
    probe = next(p for p in again.probes if p.name == "interpolation")
    assert probe.points_evaluated == 5 + 4 + 4  # the first segment after a restore evaluates its start


def test_interpolation_probe_leaves_training_bit_identical(make_case):
    ends = []
    for probes in ({}, {"interpolation": {"every": 1, "epochs": None}, "rotation": {"k": 2}}):
        case = make_case("dropout")
        scope = Scope(case.model, case.loss_fn, case.batches, probes=probes, seed=1)
        opt = torch.optim.SGD(case.model.parameters(), lr=0.2)
        torch.manual_seed(0)
        for t in range(3):
            x, y = case.batches[t]
            with scope.step(opt):
                opt.zero_grad()
                case.loss_fn(case.model(x), y).backward()
                opt.step()
        ends.append(get_flat(case.model))
    assert torch.equal(*ends)


def test_lambda1_solve_without_an_eigen_probe():
    """``lambda1: solve`` makes the Scope track λ₁ at every segment's end on its own (here λ = 2 exactly)."""
    model = nn.Linear(1, 1, bias=False).to(F64)
    x, y = torch.ones(4, 1, dtype=F64), torch.zeros(4, 1, dtype=F64)
    scope = Scope(model, _mse, (x, y), probes={"interpolation": {"every": 1, "epochs": None, "lambda1": "solve"}},
                  seed=0, steps_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.6)  # η·λ = 1.2: every step crosses the floor
    for _ in range(2):
        with scope.step(opt):
            opt.zero_grad()
            _mse(model(x), y).backward()
            opt.step()
    va = scope.table("valley")
    assert va["lambda1_step"].tolist() == [1, 2] and va["step_class"].tolist() == ["cross", "cross"]
    np.testing.assert_allclose(va["eta_lambda1"], 1.2, rtol=1e-6)
    assert scope.table("step_classes").iloc[0]["lambda1_source"] == "solve"
