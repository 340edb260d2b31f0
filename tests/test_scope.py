"""Scope in a researcher's own loop: a model the package does not define, optimizers other than SGD, losses
other than cross-entropy, tuple/dict inputs, padded targets, resume, non-perturbation, and the run directory."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdscope import Scope
from sgdscope.curvature import HessianOperator, top_eigenpairs
from sgdscope.errors import ConfigError, RunStoreError
from sgdscope.store import RunStore

ALL = {
    "eigen": {"every": 3, "k": 2, "tol": 1e-3},
    "direction": {"every": 3, "eigen_indices": [1, 2], "n_grads": 3, "ks": [0, 1, -1, 4, -4]},
    "alpha_step": {"every": 3, "eigen_indices": [1], "n_grads": 3},
    "alignment": {"every": 3},
    "interpolation": {"every": 2, "alphas": 4, "epochs": None},
}


class OwnNet(nn.Module):
    """Not a package model: BatchNorm, dropout and a two-input forward (tuple inputs)."""

    def __init__(self, d=5, h=8, out=3):
        super().__init__()
        self.a, self.b = nn.Linear(d, h), nn.Linear(d, h)
        self.bn, self.drop, self.head = nn.BatchNorm1d(h), nn.Dropout(0.3), nn.Linear(h, out)

    def forward(self, u, v):
        return self.head(self.drop(torch.tanh(self.bn(self.a(u) + self.b(v)))))


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    return (u, v), torch.randn(n, 3, generator=g)


def loop(model, opt, steps, scope=None, seed=0):
    """An ordinary loop; with a Scope every update sits in ``scope.step``."""
    (u, v), y = data(seed=seed)
    for t in range(steps):
        sl = slice(16 * (t % 6), 16 * (t % 6) + 16)
        with scope.step(opt) if scope is not None else _null() as rec:
            opt.zero_grad()
            loss = F.mse_loss(model(u[sl], v[sl]), y[sl])
            loss.backward()
            opt.step()
            if rec is not None:
                rec.record(batch_loss=loss.item())


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def fresh(seed=0):
    torch.manual_seed(seed)
    model = OwnNet()
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def test_every_probe_in_own_loop_with_adam_mse_and_tuple_inputs(tmp_path):
    model, opt = fresh()
    (u, v), y = data(seed=1)
    scope = Scope(model, F.mse_loss, ((u, v), y), out=tmp_path / "run", probes=ALL, batch_size=16, seed=3)
    loop(model, opt, 7, scope)
    scope.close()
    s = RunStore(tmp_path / "run")
    assert s.status()["state"] == "done" and s.config()["source"] == "scope"
    assert s.table("train")["step"].tolist() == list(range(1, 8))
    assert sorted(s.table("eigen")["step"].unique()) == [0, 3, 6]
    assert sorted(s.table("valley")["step"]) == [0, 2, 4, 6]
    for t in ("direction", "k_min", "alpha_step", "alignment", "interpolation", "curvature"):
        assert len(s.table(t)), t
    # the same columns a `sgdscope run` table has
    assert {"step", "epoch", "index", "value", "residual", "n_hvps", "subset_size", "bn_policy"} <= set(s.table("eigen"))
    assert {"grad_norm", "param_distance", "grad_cosine_prev", "lr", "batch_loss"} <= set(s.table("train"))
    assert (s.table("train")["lr"] == 0.01).all()


def test_scope_never_perturbs_a_bn_dropout_adam_loop():
    model_a, opt_a = fresh()
    rng0 = torch.get_rng_state()
    loop(model_a, opt_a, 7)
    model_b, opt_b = fresh()
    (u, v), y = data(seed=1)
    scope = Scope(model_b, F.mse_loss, ((u, v), y), probes=ALL, batch_size=16)
    assert torch.equal(torch.get_rng_state(), rng0)  # building it drew nothing from training's stream
    loop(model_b, opt_b, 7, scope)
    for (k, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), k  # parameters and BN running statistics, bit for bit
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert len(scope.table("eigen")) == 6  # it did measure


def test_eigenpairs_tracked_once_per_step_and_equal_a_direct_solve():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randn(40, 1, dtype=torch.float64)
    scope = Scope(model, F.mse_loss, (x, y), probes={"eigen": {"every": 1, "k": 3, "tol": 1e-8}})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with scope.step(opt):
        opt.zero_grad(); F.mse_loss(model(x), y).backward(); opt.step()
    a = scope.eigenpairs(3)
    assert scope.eigenpairs(3) is a  # cached for the step, shared with the eigen probe
    assert scope.table("eigen").query("step == 1")["value"].tolist() == a.values.tolist()
    dense = torch.linalg.eigvalsh(HessianOperator(model, F.mse_loss, [(x, y)]).dense()).flip(0)[:3]
    assert torch.allclose(a.values, dense, rtol=1e-6)
    ref = top_eigenpairs(HessianOperator(model, F.mse_loss, [(x, y)]), k=3, tol=1e-8)
    assert torch.allclose(a.values, ref.values, rtol=1e-6)


def test_padded_targets_carry_no_weight():
    """Examples whose target is the ignore index change nothing: the batch weight counts real targets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 7)).double()
    x = torch.randint(0, 7, (30, 3))
    y = torch.randint(0, 7, (30,))
    loss = nn.CrossEntropyLoss()  # ignore_index -100, read off the loss
    pad_x, pad_y = torch.randint(0, 7, (9, 3)), torch.full((9,), -100)
    padded = [(torch.cat([x[:10], pad_x[:5]]), torch.cat([y[:10], pad_y[:5]])),
              (torch.cat([x[10:], pad_x[5:]]), torch.cat([y[10:], pad_y[5:]]))]
    probes = {"eigen": {"every": 1, "k": 2, "tol": 1e-9}}
    a = Scope(model, loss, (x, y), probes=probes).eigenpairs(2).values
    b = Scope(model, loss, padded, probes=probes).eigenpairs(2).values
    assert torch.allclose(a, b, rtol=1e-7)
    c = Scope(model, loss, padded, probes=probes, ignore_index=1234).eigenpairs(2)  # padding counted: differs
    assert not torch.allclose(a, c.values, rtol=1e-3)


def test_dict_inputs_and_user_rows(tmp_path):
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, features, scale):
            return self.lin(features) * scale

    torch.manual_seed(0)
    model = DictNet()
    x = {"features": torch.randn(20, 3), "scale": torch.ones(20, 1)}
    y = torch.randint(0, 2, (20,))
    scope = Scope(model, F.cross_entropy, (x, y), out=tmp_path / "d", probes={"eigen": {"every": 2, "k": 1},
                  "direction": {"eigen_indices": [1], "n_grads": 2}, "interpolation": {"every": 1, "epochs": None}},
                  batch_size=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(4):
        with scope.step(opt):
            opt.zero_grad(); F.cross_entropy(model(**x), y).backward(); opt.step()
        if t % 2 == 1:
            scope.end_epoch(val_acc=0.5 + t / 10)
    scope.log("notes", {"step": scope.t, "what": "done"})
    scope.close()
    s = RunStore(tmp_path / "d")
    ep = s.table("epoch")
    assert ep["epoch"].tolist() == [1, 2] and ep["step"].tolist() == [2, 4]
    assert ep["val_acc"].tolist() == pytest.approx([0.6, 0.8]) and ep["param_norm"].notna().all()
    assert sorted(s.table("direction")["step"].unique()) == [0, 2, 4]  # every: epoch → step 0 and each end
    assert s.table("notes")["what"].tolist() == ["done"]
    assert s.table("interpolation")["epoch"].tolist()[:5] == [1] * 5


def test_resume_drops_rows_after_the_restored_step_and_recomputes_them(tmp_path):
    def go(out, steps, stop_at=None, state=None):
        model, opt = fresh()
        (u, v), y = data(seed=1)
        scope = Scope(model, F.mse_loss, ((u, v), y), out=out, probes=ALL, batch_size=16, resume=state is not None)
        if state is not None:
            model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); scope.load_state_dict(state["scope"])
            torch.set_rng_state(state["rng"])
        (uu, vv), yy = data(seed=0)
        saved = None
        for t in range(scope.t, steps):
            sl = slice(16 * (t % 6), 16 * (t % 6) + 16)
            with scope.step(opt) as rec:
                opt.zero_grad(); loss = F.mse_loss(model(uu[sl], vv[sl]), yy[sl]); loss.backward(); opt.step()
                rec.record(batch_loss=loss.item())
            if scope.t == 4:
                saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "scope": scope.state_dict(),
                         "opt": __import__("copy").deepcopy(opt.state_dict()), "rng": torch.get_rng_state()}
            if stop_at is not None and scope.t == stop_at:
                break  # a crash: rows of steps 5 and 6 were committed after the checkpoint at step 4
        scope.close("interrupted" if stop_at else "done")
        return saved

    go(tmp_path / "ref", 9)
    saved = go(tmp_path / "r", 9, stop_at=6)
    assert RunStore(tmp_path / "r").table("train")["step"].max() == 6
    with pytest.raises(RunStoreError, match="not empty"):
        Scope(nn.Linear(2, 1), F.mse_loss, (torch.zeros(4, 2), torch.zeros(4, 1)), out=tmp_path / "r")
    go(tmp_path / "r", 9, state=saved)
    ref, got = RunStore(tmp_path / "ref"), RunStore(tmp_path / "r")
    assert sorted(ref.tables()) == sorted(got.tables())
    for t in ref.tables():
        assert ref.table(t).equals(got.table(t)), t


def test_bad_input_is_one_line(tmp_path):
    m, xy = nn.Linear(2, 1), (torch.zeros(4, 2), torch.zeros(4, 1))
    with pytest.raises(ConfigError, match=r"^probes\.eigen\.kk: unknown key"):
        Scope(m, F.mse_loss, xy, probes={"eigen": {"kk": 1}})
    with pytest.raises(ConfigError, match=r"^probes\.interpolation\.every: must be 'epoch' or a positive"):
        Scope(m, F.mse_loss, xy, probes={"interpolation": {"every": 0}})
    with pytest.raises(ConfigError, match="measure_data"):
        Scope(m, F.mse_loss, torch.zeros(3))
    with pytest.raises(ConfigError, match="bn_policy"):
        Scope(m, F.mse_loss, xy, bn_policy="frozen")
    with pytest.raises(RunStoreError, match="cannot resume"):
        Scope(m, F.mse_loss, xy, out=tmp_path / "nope", resume=True)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunStoreError, match="not a directory"):
        Scope(m, F.mse_loss, xy, out=tmp_path / "file")


def test_one_writer_per_scope_directory(tmp_path):
    m, xy = nn.Linear(2, 1), (torch.zeros(4, 2), torch.zeros(4, 1))
    first = Scope(m, F.mse_loss, xy, out=tmp_path / "w")
    code = ("import torch, torch.nn.functional as F; from torch import nn; from sgdscope import Scope\n"
            f"Scope(nn.Linear(2, 1), F.mse_loss, (torch.zeros(4, 2), torch.zeros(4, 1)), out={str(tmp_path / 'w')!r}, resume=True)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "PID" in p.stderr and "writing" in p.stderr, p.stderr[-500:]
    first.close()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-500:]


def test_report_renders_an_own_loop_directory(tmp_path):
    from sgdscope.report import write_report

    model, opt = fresh()
    (u, v), y = data(seed=1)
    with Scope(model, F.mse_loss, ((u, v), y), out=tmp_path / "rep", probes=ALL, batch_size=16) as scope:
        loop(model, opt, 7, scope)
    page = write_report(tmp_path / "rep")
    text = page.read_text()
    assert page.is_file() and text.count("<img") >= 3
    assert math.isfinite(RunStore(tmp_path / "rep").table("eigen")["value"].iloc[0])


def test_dropout_barriers_are_a_property_of_the_parameters_not_of_the_masks():
    """Issue 11: SimpleCNN with dropout 0.5 on digits once flagged 20 of 21 steps as barriers under
    train-restore (fresh masks per point). With one fixed set of masks per measurement the valley of every
    segment is a function of the parameters: two Scopes with different mask seeds, on one trajectory, find
    barrier counts that agree within what the seed explains, and a segment of zero length is exactly flat."""
    from sgdscope.config import ModelConfig
    from sgdscope.models import build_model
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:400], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target[:400])
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="simplecnn", dropout=0.5, width_factor=0.25), (1, 8, 8), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probes = {"interpolation": {"every": 1, "epochs": None, "alphas": 10}, "gradient": None, "weights": None}
    scopes = [Scope(model, F.cross_entropy, (x[:200], y[:200]), probes=probes, seed=s) for s in (1, 2)]
    for t in range(21):
        xb, yb = x[(16 * t) % 384:(16 * t) % 384 + 16], y[(16 * t) % 384:(16 * t) % 384 + 16]
        with scopes[0].step(opt), scopes[1].step(opt):
            opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()
    counts = [int(s.table("valley")["barrier"].sum()) for s in scopes]
    assert abs(counts[0] - counts[1]) <= 2 and max(counts) <= 4, counts  # not 20 of 21
    # what barriers remain are round-off-sized bumps, not mask noise (which was of the order of the loss gaps)
    assert all(s.table("valley")["barrier_height"].max() < 1e-3 for s in scopes)
    with scopes[0].step(opt):  # an update of zero length: the segment is one point
        opt.zero_grad()
    flat = scopes[0].table("interpolation").query("step == 21")["loss"].to_numpy()
    # (1−α)θ + αθ is θ up to float32 round-off, and the masks are one set: flat to round-off, no barrier
    assert np.ptp(flat) <= 1e-6 * flat[0] and scopes[0].table("valley").iloc[-1]["barrier"] == 0


def test_epoch_ends_marked_inside_the_block_or_by_steps_per_epoch():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def one(scope, end=False, **cols):
        with scope.step(opt) as rec:
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
            if end:
                rec.end_epoch()
                rec.record_epoch(**cols)

    marked = Scope(model, F.cross_entropy, (x, y), probes={"eigen": {"k": 1}})
    one(marked); one(marked, end=True, val_acc=0.25); one(marked)
    ep = marked.table("epoch")
    assert ep[["epoch", "step", "val_acc"]].values.tolist() == [[1, 2, 0.25]] and ep["param_norm"].notna().all()
    assert marked.table("eigen")["step"].tolist() == [0, 2]  # every: epoch → step 0 and the marked end
    assert marked.table("train")["epoch"].tolist() == [1, 1, 2]
    auto = Scope(model, F.cross_entropy, (x, y), steps_per_epoch=2)
    one(auto); one(auto)
    auto.end_epoch()  # already ended by steps_per_epoch: no second row
    with pytest.raises(ValueError, match="record_epoch"):
        auto.end_epoch(val_acc=1.0)
    assert auto.table("epoch")["epoch"].tolist() == [1]


def test_the_hvp_methods_auto_chose_are_kept_for_the_run_and_its_resumption(monkeypatch):
    """The first solve's "auto" choice is reused by every later operator and travels in state_dict, so a
    resumed run does not time afresh (a near tie on a busy machine could pick another method)."""
    from sgdscope.curvature import hessian

    torch.manual_seed(0)
    m, xy = nn.Linear(3, 2), (torch.randn(16, 3), torch.randn(16, 2))
    scope = Scope(m, F.mse_loss, xy, probes={"eigen": {"every": 1, "k": 2}})
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(2):
        with scope.step(opt):
            opt.zero_grad(); F.mse_loss(m(xy[0]), xy[1]).backward(); opt.step()
    memo = scope.state_dict()
    tracker = scope.env.tracker
    assert set(tracker.hvp_methods) == {"single", "block"}  # a cold solve, then a warm block
    op = tracker.operator(5)
    assert (op.method, op.block_method) == (tracker.hvp_methods.get("single"), tracker.hvp_methods.get("block"))
    monkeypatch.setattr(hessian, "AUTO_CHOICES", {})  # a fresh process: nothing cached
    again = Scope(m, F.mse_loss, xy, probes={"eigen": {"every": 1, "k": 2}})
    again.load_state_dict(memo)
    assert again.env.tracker.hvp_methods == tracker.hvp_methods
    with again.step(opt):
        opt.zero_grad(); F.mse_loss(m(xy[0]), xy[1]).backward(); opt.step()
    assert again.env.tracker.hvp_methods == tracker.hvp_methods
    assert hessian.AUTO_CHOICES == {}  # nothing was timed: the restored choice was used
