"""2-D loss slices: a quadratic whose slice is known in closed form (exact equality), filter normalisation by
construction, a tiny BN + dropout net against a plain loop of model evaluations, the least-squares projection
of the trajectory, and the probe in a loop: bounded snapshots, resume, and never perturbing training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgdscope.curvature.flat import get_flat, set_flat
from sgdscope.landscape import filter_normalized_direction, loss_slice, plane_coordinates, slice_axis
from sgdscope.models.quadratic import Quadratic, output_mean
from sgdscope.policy import fixed_masks, measurement_mode

F64 = torch.float64


def test_quadratic_slice_is_its_closed_form_exactly():
    """L(w) = ½wᵀAw: S(a, b) = ½(θ + a d₁ + b d₂)ᵀA(θ + a d₁ + b d₂); integers throughout, so the float64
    arithmetic is exact in any order and the two must be equal bit for bit."""
    A = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, -1.0], [0.0, -1.0, 6.0]], dtype=F64)
    theta = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    d1, d2 = torch.tensor([1.0, 0.0, 2.0], dtype=F64), torch.tensor([0.0, -1.0, 1.0], dtype=F64)
    q = Quadratic(A, theta)
    axis = slice_axis(2.0, 5, theta)  # -2, -1, 0, 1, 2
    got = loss_slice(q, theta, d1, d2, axis, axis, [(torch.zeros(4), torch.zeros(4))], loss_fn=output_mean)
    want = torch.empty(5, 5, dtype=F64)
    for i, a in enumerate(axis.tolist()):
        for j, b in enumerate(axis.tolist()):
            w = theta + a * d1 + b * d2
            want[i, j] = 0.5 * (w @ A @ w)
    assert torch.equal(got, want)
    assert torch.equal(q.w.detach(), theta)  # the centre is restored


def test_filter_normalisation_by_construction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4)).to(F64)
    rng = torch.get_rng_state()
    d = filter_normalized_direction(model, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), rng)  # only the given generator was used
    i = 0
    for name, p in model.named_parameters():
        part = d[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
        if p.ndim == 1:  # biases and BN parameters are not perturbed
            assert torch.equal(part, torch.zeros_like(p)), name
        else:  # each filter (output channel / row) has the norm of θ's filter
            torch.testing.assert_close(part.reshape(len(p), -1).norm(dim=1), p.detach().reshape(len(p), -1).norm(dim=1))
    assert torch.equal(d, filter_normalized_direction(model, torch.Generator().manual_seed(5)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.drop, self.b = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.bn(self.a(x)))))


def test_tiny_net_slice_equals_a_plain_loop_of_model_evaluations():
    """BN on batch statistics, dropout with the slice's one set of masks, uneven batches; vmap and loop."""
    torch.manual_seed(1)
    model = Tiny().to(F64)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)) for n in (7, 4)]
    theta = get_flat(model)
    d1, d2 = torch.randn(len(theta), generator=g, dtype=F64), torch.randn(len(theta), generator=g, dtype=F64)
    axis = slice_axis(0.5, 3, theta)
    bn = model.bn
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    kw = dict(loss_fn=F.cross_entropy, bn_policy="train-restore", mask_seed=9)
    want = torch.empty(3, 3, dtype=F64)
    for i, a in enumerate(axis.tolist()):
        for j, b in enumerate(axis.tolist()):
            set_flat(model, theta + a * d1 + b * d2)
            total = 0.0
            with measurement_mode(model, "train-restore"):
                for k, (x, y) in enumerate(batches):
                    with fixed_masks(9, k):
                        total = total + len(y) * F.cross_entropy(model(x), y)
            want[i, j] = total / 11
    set_flat(model, theta)
    for method in ("loop", "vmap"):
        got = loss_slice(model, theta, d1, d2, axis, axis, batches, method=method, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(get_flat(model), theta)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])


def test_plane_coordinates_recover_known_coefficients_and_off_plane_residual():
    g = torch.Generator().manual_seed(3)
    d1, d2 = torch.randn(20, generator=g, dtype=F64), torch.randn(20, generator=g, dtype=F64)
    D = torch.stack([d1, d2])
    off = torch.randn(20, generator=g, dtype=F64)
    off = off - D.T @ torch.linalg.solve(D @ D.T, D @ off)  # orthogonal to the plane
    disp = torch.stack([0.3 * d1 - 2.0 * d2, 1.5 * d1 + 0.25 * d2 + off])
    coords, res = plane_coordinates(d1, d2, disp)
    torch.testing.assert_close(coords, torch.tensor([[0.3, -2.0], [1.5, 0.25]], dtype=F64))
    torch.testing.assert_close(res, torch.stack([torch.zeros((), dtype=F64), off.norm()]), atol=1e-12, rtol=1e-10)


def test_probe_in_an_own_loop_never_perturbs_keeps_bounded_snapshots_and_resumes():
    from test_scope import data, fresh, loop

    from sgdscope import Scope

    model_a, opt_a = fresh()
    loop(model_a, opt_a, 6)
    (u, v), y = data(seed=1)
    probes = {"slice2d": {"every": 1, "grid": 3, "span": 0.5, "directions": "random", "max_snapshots": 2}}
    model, opt = fresh()
    scope = Scope(model, F.mse_loss, ((u, v), y), probes=probes, seed=3)
    assert scope.env.tracker is None  # random directions do not need the eigen tracker
    loop(model, opt, 6, scope)
    for a, b in zip(model_a.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # parameters and BN running statistics, bit for bit
    sl, path = scope.table("slice2d"), scope.table("slice2d_path")
    assert len(sl) == 7 * 9 and set(sl["directions"]) == {"random"}
    # at most max_snapshots + 1 kept; after thinning the stride doubles: 0..6 due steps keep 0, 4 at the end
    last = path[path["step"] == 6]
    assert sorted(last["snapshot_step"]) == [0, 4] and len(scope.env.tracker or []) == 0
    # the centre is in every grid; the current iterate is kept only on stride (6 is not), so no zero row
    centre = sl[(sl["a"] == 0) & (sl["b"] == 0)]
    assert len(centre) == 7
    # resume: a fresh Scope from the state at step 3 writes the same rows for steps 4..6
    model_r, opt_r = fresh()
    scope_r = Scope(model_r, F.mse_loss, ((u, v), y), probes=probes, seed=3)
    loop(model_r, opt_r, 3, scope_r)
    state = scope_r.state_dict()
    scope_s = Scope(model_r, F.mse_loss, ((u, v), y), probes=probes, seed=3)
    scope_s.load_state_dict(state)
    (u2, v2), y2 = data()
    for t in range(3, 6):
        sl_ = slice(16 * (t % 6), 16 * (t % 6) + 16)
        with scope_s.step(opt_r):
            opt_r.zero_grad()
            F.mse_loss(model_r(u2[sl_], v2[sl_]), y2[sl_]).backward()
            opt_r.step()
    p1 = path[path["step"] > 3].reset_index(drop=True)
    p2 = scope_s.table("slice2d_path").reset_index(drop=True)
    cols = ["step", "snapshot_step", "a", "b", "residual"]
    assert p1[cols].equals(p2[cols])


def test_eigen_directions_use_the_tracker_and_project_the_path():
    from test_scope import data, fresh, loop

    from sgdscope import Scope

    (u, v), y = data(seed=1)
    model, opt = fresh()
    alone = Scope(model, F.mse_loss, ((u, v), y), probes={"slice2d": {}})
    assert alone.env.tracker is not None and alone.env.tracker.k >= 2  # eigen directions: slice2d alone builds it
    scope = Scope(model, F.mse_loss, ((u, v), y), probes={"slice2d": {"every": 2, "grid": 3, "span": 0.2},
                                                         "eigen": {"every": 2, "k": 2, "tol": 0.05, "max_hvps": 60}},
                  seed=3)
    loop(model, opt, 4, scope)
    path = scope.table("slice2d_path")
    last = path[path["step"] == 4].set_index("snapshot_step")
    assert list(last.index) == [0, 2, 4]
    assert last.loc[4, "a"] == 0 and last.loc[4, "b"] == 0 and last.loc[4, "distance"] == 0
    # e₁, e₂ orthonormal: the coordinates are the plain inner products, and a² + b² + residual² = distance²
    lhs = (last["a"] ** 2 + last["b"] ** 2 + last["residual"] ** 2).to_numpy()
    torch.testing.assert_close(torch.tensor(lhs), torch.tensor((last["distance"] ** 2).to_numpy()),
                               rtol=1e-4, atol=1e-8)
    assert set(scope.table("slice2d")["directions"]) == {"eigen"}
