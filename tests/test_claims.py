"""The verdict logic of sgdscope.claims on hand-built run stores with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sgdscope import claims
from sgdscope.store import RunStore


def _store(path: Path, **cfg) -> RunStore:
    base = {"seed": 0, "optimizer": {"name": "sgd", "lr": 0.1, "batch_size": 128, "gamma": 1.0, "mode": "scale",
                                     "freeze_subspace": False, "nudge_from": 0, "noise_factor": 0.0},
            "schedule": {"name": "constant"}, "resolved": {"steps_per_epoch": 10}}
    for section, values in cfg.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    s = RunStore.create(path, base)
    s.set_status("done")
    return s


def _lambda_trace(store: RunStore, values) -> None:
    store.append("eigen", [{"step": 10 * i, "epoch": i, "index": 1, "value": float(v)} for i, v in enumerate(values)])


def _bump(peak: float, at: int, n: int = 40) -> np.ndarray:
    t = np.arange(n)
    return 1 + peak * np.exp(-0.5 * ((t - at) / 3.0) ** 2)


# ----------------------------------------------------------------------------------- sharpest lr / S


def test_lr_sweep_held_and_not(tmp_path):
    runs = []
    for lr, peak, at in [(0.1, 10, 25), (0.3, 6, 15), (1.0, 3, 6)]:
        s = _store(tmp_path / f"lr{lr}", optimizer={"lr": lr})
        _lambda_trace(s, _bump(peak, at))
        runs.append(({"optimizer.lr": lr}, s.path))
    r = claims.sharpest_lr_sweep(runs)
    assert r.held and r.verdict == "held"
    assert list(r.numbers["η"]) == [0.1, 0.3, 1.0]
    assert r.numbers["peak λ₁"].is_monotonic_decreasing
    # a later peak at the largest lr breaks "earlier"
    s = _store(tmp_path / "late", optimizer={"lr": 3.0})
    _lambda_trace(s, _bump(2, 35))
    bad = claims.sharpest_lr_sweep(runs + [({"optimizer.lr": 3.0}, s.path)])
    assert not bad.held and bad.verdict == "did not hold"
    assert bad.checks["peak λ₁ decreases with η"] and not bad.checks["time to 90% of peak shrinks with η"]


def test_batch_sweep_direction(tmp_path):
    runs = {}
    for bs, peak, at in [(32, 3, 5), (128, 6, 15), (512, 8, 25)]:
        s = _store(tmp_path / f"bs{bs}", optimizer={"batch_size": bs})
        _lambda_trace(s, _bump(peak, at))
        runs[f"S={bs}"] = s.path
    assert claims.sharpest_batch_sweep(runs).held
    # same numbers read as an lr sweep go the wrong way
    assert not claims.check("sharpest-lr-sweep-cpu", {k: v for k, v in runs.items()}).held


# ---------------------------------------------------------------------------------------- bowl / α


def _bowl_store(path: Path, alpha_sign: float = 1.0, random_change: float = 0.0, kmins=(2.0, 4.0)) -> RunStore:
    s = _store(path)
    ks = [0, 0.5, -0.5, 1, -1, 2, -2, 4, -4]
    rows, km, al = [], [], []
    for step in range(0, 300, 10):
        for i in (1, 3):
            for k in ks:
                rows.append({"step": step, "epoch": step // 10, "eigen_index": i, "k": float(k),
                             "loss": 1.0 + (0.01 if i == 1 else 0.001) * k * k})
            km += [{"step": step, "eigen_index": i, "threshold": 0.01, "k_min": kmins[0] if i == 1 else math.nan},
                   {"step": step, "eigen_index": i, "threshold": 0.1, "k_min": kmins[1] if i == 1 else math.nan}]
        for a in (0.25, 0.5, 1, 2, 4):
            al.append({"step": step, "eigen_index": 1, "direction": "e1", "alpha": a,
                       "relative_change": alpha_sign * 0.02 * (a - 1)})
            al.append({"step": step, "eigen_index": 0, "direction": "random", "alpha": a, "relative_change": random_change})
    s.append("direction", rows)
    s.append("k_min", km)
    s.append("alpha_step", al)
    return s


def test_bowl_alpha_step_known_answers(tmp_path):
    good = claims.bowl_alpha_step(_bowl_store(tmp_path / "good").path)
    assert good.held, good.summary()
    nums = good.numbers.set_index("quantity")["value"]
    assert nums["k_min e1 1%"] == pytest.approx(2.0) and nums["k_min e1 10%"] == pytest.approx(4.0)
    assert nums["α-step e1 α=4 (% of L)"] == pytest.approx(6.0)
    # α-steps the wrong way round
    assert not claims.bowl_alpha_step(_bowl_store(tmp_path / "flip", alpha_sign=-1).path).held
    # a random direction that moves the loss as much as e1
    assert not claims.bowl_alpha_step(_bowl_store(tmp_path / "rnd", random_change=0.05).path).held
    # k_min of the wrong order
    assert not claims.bowl_alpha_step(_bowl_store(tmp_path / "wide", kmins=(12.0, 16.0)).path).held


# ------------------------------------------------------------------------------------ Fig. 5 variants


def _variant(path: Path, mode: str, freeze: bool, lam_end: float, loss_end: float, gamma: float = 1.0) -> RunStore:
    s = _store(path, optimizer={"name": "nsgd", "mode": mode, "freeze_subspace": freeze, "gamma": gamma,
                                "nudge_from": 100})
    lam = [5.0] * 11 + list(np.linspace(5.0, lam_end, 5)) + [lam_end] * 5  # end = mean of the last 5
    s.append("eigen", [{"step": 10 * i, "index": 1, "value": v} for i, v in enumerate(lam)])
    loss = [1.0] * 11 + list(np.linspace(1.0, loss_end, 5)) + [loss_end] * 5
    s.append("epoch", [{"epoch": i, "step": 10 * i, "train_loss": v} for i, v in enumerate(loss)])
    return s


def test_subspace_variants(tmp_path):
    runs = [({"mode": m, "freeze": f}, _variant(tmp_path / f"{m}{f}", m, f, lam, loss).path)
            for m, f, lam, loss in [("scale", False, 5.5, 0.8), ("only", False, 3.0, 1.1),
                                    ("only", True, 5.1, 1.0), ("remove", False, 8.0, 0.8)]]
    r = claims.subspace_variants(runs)
    assert r.held, r.summary()
    assert set(r.numbers.index) == {"SGD", "SGD top", "SGD constant top", "SGD no top"}
    assert r.numbers.loc["SGD top", "λ₁ end"] == pytest.approx(3.0)
    assert r.numbers.loc["SGD top", "λ₁ start"] == pytest.approx(5.0)
    # "no top" that does not sharpen
    runs[3] = ({}, _variant(tmp_path / "remove2", "remove", False, 5.0, 0.8).path)
    assert not claims.subspace_variants(runs).held


def test_subspace_gamma(tmp_path):
    runs = [({}, _variant(tmp_path / f"g{g}", "scale", False, lam, 0.9, gamma=g).path)
            for g, lam in [(0.25, 9.0), (0.5, 7.0), (1.0, 5.5), (2.0, 3.0), (4.0, 1.5)]]
    r = claims.subspace_gamma(runs)
    assert r.held and all(r.checks.values())
    runs[0] = ({}, _variant(tmp_path / "g.25b", "scale", False, 4.0, 0.9, gamma=0.25).path)
    assert not claims.subspace_gamma(runs).held


# --------------------------------------------------------------------------------------- NSGD Table 1


def _nsgd(path: Path, gamma: float, lr: float, frob: float, test_acc: float, state: str = "done") -> RunStore:
    s = _store(path, optimizer={"name": "nsgd", "gamma": gamma, "lr": lr})
    s.set_status(state)
    s.append("epoch", [{"epoch": e, "step": 10 * e, "train_loss": 0.1, "val_acc": 0.5 + 0.01 * e, "test_acc": test_acc,
                        "weight_spectral_norm_mean": 2.0} for e in range(1, 21)])
    s.append("curvature", [{"epoch": e, "step": 10 * e, "frobenius_topk": frob} for e in range(1, 21)])
    s.append("train", [{"step": 10 * e, "param_distance": 1.0} for e in range(1, 21)])
    return s


def test_nsgd_table1(tmp_path):
    runs = [({}, _nsgd(tmp_path / f"g{g}_lr{lr}", g, lr, f, a).path) for g, lr, f, a in [
        (0.01, 0.3, 50.0, 0.80), (0.1, 0.3, 30.0, 0.81), (1.0, 0.3, 10.0, 0.80), (10.0, 0.3, 2.0, 0.70),
        (1.0, 0.1, 20.0, 0.78)]]
    r = claims.nsgd_table1(runs)
    assert r.held, r.summary()
    assert r.numbers.loc[(0.3, 0.01), "‖H‖_F last-10"] == pytest.approx(50.0)
    assert r.numbers.loc[(0.1, 1.0), "test acc"] == pytest.approx(0.78)
    # sharper but much less accurate: not "similar accuracy"
    runs[0] = ({}, _nsgd(tmp_path / "worse", 0.01, 0.3, 50.0, 0.70).path)
    assert not claims.nsgd_table1(runs).held


# ------------------------------------------------------------------------------------------------ walk


def _walk(path: Path, name: str, cos: float, dist: float, heights=(0.1,), barriers=(0,), lr=0.5, bs=128) -> RunStore:
    s = _store(path, optimizer={"name": name, "lr": lr, "batch_size": bs})
    s.append("train", [{"step": i, "grad_cosine_prev": cos, "param_distance": dist * i / 99} for i in range(100)])
    rows = []
    for e, (h, b) in enumerate(zip(heights, barriers), start=1):
        rows += [{"step": 10 * e + j, "epoch": e, "height": h, "barrier": int(j < b), "interior_min": 1} for j in range(10)]
    s.append("valley", rows)
    return s


def test_walk_gd_vs_sgd(tmp_path):
    runs = [({}, _walk(tmp_path / "gd", "gd", -0.9, 5.0).path), ({}, _walk(tmp_path / "sgd", "sgd", -0.3, 9.0).path)]
    r = claims.walk_gd_vs_sgd(runs)
    assert r.held and r.numbers.loc["gd", "cos last 50"] == pytest.approx(-0.9)
    runs[1] = ({}, _walk(tmp_path / "sgd2", "sgd", -0.8, 9.0).path)
    assert not claims.walk_gd_vs_sgd(runs).held


def test_height_and_barriers(tmp_path):
    runs = [({}, _walk(tmp_path / f"lr{lr}", "sgd", -0.3, 1.0, heights=h, barriers=b, lr=lr).path)
            for lr, h, b in [(0.5, (0.05, 0.02, 0.01), (0, 0, 1)), (1.0, (0.1, 0.04, 0.02), (0, 1, 0))]]
    h = claims.valley_height_vs_lr(runs)
    assert h.held and list(h.numbers.index) == [0.5, 1.0]
    assert h.numbers.loc[1.0, "epoch 1"] == pytest.approx(0.1)
    b = claims.barriers_per_epoch_claim(runs)
    assert b.held, b.summary()
    assert int(b.numbers["epoch 3"].sum()) == 1
    early = [({}, _walk(tmp_path / "early", "sgd", -0.3, 1.0, heights=(0.1,), barriers=(2,)).path)]
    assert not claims.barriers_per_epoch_claim(early).held
    flipped = [({}, _walk(tmp_path / f"f{lr}", "sgd", -0.3, 1.0, heights=h, lr=lr).path)
               for lr, h in [(0.5, (0.1, 0.05)), (1.0, (0.05, 0.02))]]
    assert not claims.valley_height_vs_lr(flipped).held


def test_cosine_vs_batch_and_lr(tmp_path):
    runs = []
    for bs, c in [(32, -0.1), (128, -0.3), (1024, -0.6)]:
        for lr, dc in [(0.5, 0.0), (1.0, 0.02)]:
            runs.append(({}, _walk(tmp_path / f"{bs}_{lr}", "sgd", c + dc, 10 - bs / 200 + lr, bs=bs, lr=lr).path))
    r = claims.cosine_vs_batch_and_lr(runs)
    assert r.held, r.summary()
    assert r.numbers.loc[(1.0, 1024), "cos mean"] == pytest.approx(-0.58)
    # lr moves the cosine as much as the batch does: the lr part fails
    runs.append(({}, _walk(tmp_path / "x", "sgd", 0.4, 1.0, bs=32, lr=2.0).path))
    runs += [({}, _walk(tmp_path / f"x{bs}", "sgd", c, 1.0, bs=bs, lr=2.0).path) for bs, c in [(128, 0.3), (1024, 0.0)]]
    bad = claims.cosine_vs_batch_and_lr(runs)
    assert not bad.held
    assert bad.checks["larger S → more negative cosine (at every η)"]


def _final(path: Path, name: str, noise: float, loss: float, acc: float, norm: float, schedule: str = "constant") -> RunStore:
    s = _store(path, optimizer={"name": name, "noise_factor": noise}, schedule={"name": schedule})
    s.append("epoch", [{"epoch": 1, "step": 1, "train_loss": loss + 1, "val_acc": acc / 2, "test_acc": acc / 2, "param_norm": 1.0},
                       {"epoch": 2, "step": 2, "train_loss": loss, "val_acc": acc, "test_acc": acc, "param_norm": norm}])
    s.append("train", [{"step": 2, "param_distance": norm / 2}])
    return s


def test_isotropic_noise(tmp_path):
    runs = [({}, _final(tmp_path / f"n{n}", "noisy_gd", n, l, a, m).path)
            for n, l, a, m in [(0.0, 0.5, 0.8, 10.0), (0.01, 0.7, 0.7, 12.0), (0.1, 1.0, 0.5, 20.0)]]
    r = claims.isotropic_noise(runs + [({}, _final(tmp_path / "sgd", "sgd", 0.0, 0.3, 0.85, 9.0).path)])
    assert r.held and r.checks["SGD ends with the smallest norm"]
    assert r.numbers.loc["GD noise=0.1", "param norm"] == 20.0
    runs[1] = ({}, _final(tmp_path / "small", "noisy_gd", 0.01, 0.7, 0.7, 9.0).path)
    assert not claims.isotropic_noise(runs).held


def test_lr_schedules(tmp_path):
    runs = [({}, _final(tmp_path / s, "sgd", 0, 0.1, a, 1, schedule=s).path)
            for s, a in [("step", 0.80), ("cyclic", 0.81), ("trapezoid", 0.805)]]
    assert claims.lr_schedules(runs).held
    runs[1] = ({}, _final(tmp_path / "c2", "sgd", 0, 0.1, 0.70, 1, schedule="cyclic").path)
    runs[2] = ({}, _final(tmp_path / "t2", "sgd", 0, 0.1, 0.72, 1, schedule="trapezoid").path)
    assert not claims.lr_schedules(runs).held


def test_check_names_every_experiment():
    from sgdscope.errors import ConfigError
    from sgdscope.recipes import list_recipes

    for r in list_recipes():
        assert claims.experiment_of(r.name) in claims.CLAIMS, r.name
    with pytest.raises(ConfigError):
        claims.check("no-such-recipe", {})
