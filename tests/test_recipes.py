"""The bundled recipes: every one validates (with each grid point applied), and every ``*-cpu`` recipe runs
end to end in a shortened, CI-sized version whose runs its claim function reads."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from sgdscope import claims
from sgdscope.config import validate
from sgdscope.recipes import list_recipes, resolve
from sgdscope.store import RunStore
from sgdscope.sweep import _with_overrides, expand_grid

RECIPES = list_recipes()
CPU = [r.name for r in RECIPES if r.size == "cpu"]
EXPERIMENTS = ["sharpest-lr-sweep", "sharpest-batch-sweep", "bowl-alpha-step", "subspace-variants", "subspace-gamma",
               "nsgd-table1", "walk-gd-vs-sgd", "valley-height-vs-lr", "barriers-per-epoch", "cosine-vs-batch-and-lr",
               "isotropic-noise", "lr-schedules"]


def test_every_experiment_has_both_sizes():
    names = {r.name for r in RECIPES}
    for e in EXPERIMENTS:
        assert {f"{e}-cpu", f"{e}-paper"} <= names, e


@pytest.mark.parametrize("name", [r.name for r in RECIPES])
def test_recipe_validates_with_its_grid(name):
    from sgdscope.plots import FIGURES

    raw, meta = resolve(name)
    assert meta is not None and meta.size in ("cpu", "paper") and meta.claim and meta.reproduces
    assert name.endswith(f"-{meta.size}")
    assert set(meta.figures) <= set(FIGURES), set(meta.figures) - set(FIGURES)
    validate(raw)
    for overrides in expand_grid(meta.grid) if meta.grid else []:
        cfg = validate(_with_overrides(raw, overrides))
        for key, value in overrides.items():  # the grid key really lands in the config
            node: Any = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, (key, node, value)
    if meta.size == "paper":
        assert raw["data"]["name"] in ("cifar10", "mnist") and raw["data"].get("root")


def _shorten(raw: dict[str, Any]) -> dict[str, Any]:
    """A CI-sized version of a cpu recipe: a little data, a few steps, cheap eigen-solves."""
    raw = copy.deepcopy(raw)
    raw["device"] = "cpu"
    data = raw.setdefault("data", {})
    data.update({"mnist1d_samples": 600, "train_size": None})
    train = raw.setdefault("train", {})
    spe = train.get("epoch_size")
    train["epochs"] = 4 if spe and spe <= 128 else 2   # one-step "epochs" (walk, cosine) get a few more
    if spe and spe > 1024:  # adaptive-sharpness: 36,000 examples per "epoch", 282 steps once S is cut to 128
        train["epoch_size"] = 1024
    if raw["optimizer"]["name"] in ("gd", "noisy_gd"):
        train["epochs"] = 3
    raw["optimizer"]["gd_chunk"] = 100
    raw["optimizer"]["batch_size"] = min(raw["optimizer"].get("batch_size", 128), 128)
    if raw["optimizer"].get("nudge_from"):
        raw["optimizer"]["nudge_from"] = 2
    raw["measure"] = {**raw.get("measure", {}), "min_subset": 200}
    probes = raw.get("probes") or {}
    if "eigen" in probes:
        probes["eigen"].update(tol=0.1, max_hvps=80, first_steps=min(probes["eigen"].get("first_steps", 0), 2))
    if "interpolation" in probes:
        probes["interpolation"]["epochs"] = [1]
    for p in ("direction", "alpha_step"):
        if p in probes:
            probes[p]["n_grads"] = 2
    if "slice2d" in probes:
        probes["slice2d"]["grid"] = 5
    if "gradient_noise" in probes:  # fewer eigenpairs: the top-k solve is most of its cost
        probes["gradient_noise"].update(n_grads=6, trace_samples=4, k=2, m=1)
        probes["eigen"]["k"] = 2
    if "batch_sharpness" in probes:
        probes["batch_sharpness"].update(n_batches=2, max_hvps=30)
    if "preconditioned_sharpness" in probes:
        probes["preconditioned_sharpness"].update(tol=0.1, max_hvps=40)
    sched = raw.get("schedule") or {}
    for k in ("step_size", "t_up", "t_flat", "t_down"):
        if k in sched:
            sched[k] = 2
    return raw


# grid points whose pair the claim function can compare (elsewhere: the first and the last point)
CI_POINTS = {
    "subspace-variants-cpu": [{"optimizer.mode": "scale", "optimizer.freeze_subspace": False},
                              {"optimizer.mode": "remove", "optimizer.freeze_subspace": False}],
    "nsgd-table1-cpu": [{"optimizer.gamma": 0.1, "optimizer.lr": 0.3}, {"optimizer.gamma": 1.0, "optimizer.lr": 0.3}],
    "ggn-fisher-cpu": [{"probes.eigen.curvature": "hessian"}, {"probes.eigen.curvature": "ggn"}],
}


def _points(name: str, grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Two grid points of the recipe (the first and the last, the extremes of every axis, unless CI_POINTS
    names a pair), or the single run of a recipe without a grid."""
    pts = expand_grid(grid) if grid else [{}]
    if name in CI_POINTS:
        assert all(p in pts for p in CI_POINTS[name]), name
        return CI_POINTS[name]
    return [pts[0], pts[-1]] if len(pts) > 1 else pts


@pytest.mark.parametrize("name", CPU)
def test_cpu_recipe_runs_shortened(name, tmp_path):
    from sgdscope.store import RunStore
    from sgdscope.train import run

    raw, meta = resolve(name)
    base = _shorten(raw)
    runs = []
    for i, overrides in enumerate(_points(name, meta.grid)):
        cfg = _with_overrides(base, overrides)
        if "optimizer.batch_size" in overrides:  # the grid's large batches exceed the tiny training set
            cfg["optimizer"]["batch_size"] = min(cfg["optimizer"]["batch_size"], 128)
        path = run(cfg, tmp_path / f"p{i}", progress=False)
        store = RunStore(path)
        assert store.status()["state"] == "done"
        assert len(store.table("train")) and len(store.table("epoch"))
        runs.append((overrides, path))
    probes = raw.get("probes") or {}
    tables = set(RunStore(runs[0][1]).tables())
    expected = {"eigen": {"eigen"}, "direction": {"direction", "k_min"}, "alpha_step": {"alpha_step"},
                "interpolation": {"interpolation", "valley"}, "slice2d": {"slice2d", "slice2d_path"},
                "gradient_noise": {"gradient_noise", "gradient_noise_step"}, "batch_sharpness": {"batch_sharpness"},
                "preconditioned_sharpness": {"preconditioned_sharpness"}}
    for p in probes:
        assert expected.get(p, set()) <= tables, (p, tables)
    check_claim(name, runs)


def check_claim(name: str, runs: list[tuple[dict[str, Any], Any]]) -> None:
    """At CI size the verdict may go either way; what must hold is that the verdict follows from the checks
    and that the numbers the claim reports are the ones their definitions give on these stores."""
    result = claims.check(name, runs)
    experiment = claims.experiment_of(name)
    assert result.experiment == experiment
    assert result.checks and all(isinstance(v, bool) for v in result.checks.values())
    hard = [v for k, v in result.checks.items() if k not in result.soft]
    assert result.held is (bool(hard) and all(hard))
    cells = [c for _, row in result.numbers.reset_index().iterrows() for c in _cells(row.tolist())]
    assert cells and not any(math.isinf(c) for c in cells), result.numbers
    for _, path in runs:
        for values, may_be_nan in _per_run_values(experiment, path):
            assert may_be_nan or all(math.isfinite(v) for v in values), (experiment, values)
            assert _has_row_with(result.numbers, values), (experiment, values, result.numbers.to_string())


# ---------------------------------------------------------------------- claim numbers, recomputed


def _setting(path, key: str):
    """A run's resolved setting, read from its own config.yaml."""
    node = RunStore(path).config()
    for part in key.split("."):
        node = node[part]
    return node


def _lambda1(store) -> np.ndarray:
    """λ₁ per measured step, in step order."""
    eig = store.table("eigen")
    return eig[eig["index"] == 1].groupby("step")["value"].mean().sort_index().to_numpy()


def _last_steps(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """The rows of the last ``n`` logged steps (the claims' "last points")."""
    return df[df["step"].isin(sorted(df["step"].unique())[-n:])]


def _cells(row) -> list[float]:
    """The numeric cells of a row (NaN for a missing value); labels and flags are skipped."""
    out = []
    for v in row:
        if isinstance(v, (bool, np.bool_, str)):
            continue
        try:
            out.append(math.nan if pd.isna(v) else float(v))
        except (TypeError, ValueError):
            continue
    return out


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _has_row_with(numbers: pd.DataFrame, values: list[float]) -> bool:
    """Some row of ``numbers`` (its index included) holds every one of ``values``."""
    for _, row in numbers.reset_index().iterrows():
        cells = _cells(row.tolist())
        if all(any(_same(v, c) for c in cells) for v in values):
            return True
    return False


def _per_run_values(experiment: str, path) -> list[tuple[list[float], bool]]:
    """The numbers the claim of ``experiment`` must report for one run, recomputed from the run's raw
    tables by the definitions in the claim's docstring: a list of (numbers that share one row of the claim's
    table, whether NaN is allowed). Settings (η, S, γ) come from the run's own config.yaml, as the claim reads
    them. Only the k_min means of bowl-alpha-step may be NaN (by definition, where the bowl never closed).
    Rows are matched by the values they hold, not by their prose labels or column titles."""
    s = RunStore(path)
    tr, ep, va = s.table("train"), s.table("epoch"), s.table("valley")
    lr = float(_setting(path, "optimizer.lr"))
    if experiment in ("sharpest-lr-sweep", "sharpest-batch-sweep"):
        lam = _lambda1(s)
        axis = lr if experiment == "sharpest-lr-sweep" else float(_setting(path, "optimizer.batch_size"))
        return [([axis, lam.max(), lam[-1]], False)]
    if experiment in ("subspace-variants", "subspace-gamma"):
        # λ₁ and training loss at the end: means of the last 5 measurements
        row = [_lambda1(s)[-5:].mean(), ep["train_loss"].to_numpy()[-5:].mean()]
        if experiment == "subspace-gamma":
            row.append(float(_setting(path, "optimizer.gamma")))
        return [(row, False)]
    if experiment == "nsgd-table1":
        best = ep.loc[ep["val_acc"].idxmax()]
        nsgd = _setting(path, "optimizer.name") == "nsgd"
        gamma = float(_setting(path, "optimizer.gamma")) if nsgd else 1.0
        return [([lr, gamma, float(best["test_acc"]), ep["train_loss"].to_numpy()[-10:].mean(),
                  float(best["weight_spectral_norm_mean"])], False)]
    if experiment == "walk-gd-vs-sgd":
        cos = tr["grad_cosine_prev"].to_numpy()
        return [([np.nanmean(cos), np.nanmean(cos[-50:]), float(tr["param_distance"].iloc[-1]),
                  va["height"].mean(), float(va["barrier"].sum()), float(len(va))], False)]
    if experiment == "cosine-vs-batch-and-lr":
        return [([lr, float(_setting(path, "optimizer.batch_size")), np.nanmean(tr["grad_cosine_prev"].to_numpy()),
                  float(tr["param_distance"].iloc[-1])], False)]
    if experiment == "valley-height-vs-lr":
        return [([lr, *va.groupby("epoch")["height"].mean().tolist()], False)]
    if experiment == "barriers-per-epoch":
        per_epoch = va.groupby("epoch")["barrier"].sum().astype(float).tolist()
        return [([*per_epoch, float(len(va)), va["barrier"].sum() / len(va)], False)]
    if experiment == "isotropic-noise":
        last = ep.iloc[-1]
        return [([float(last["train_loss"]), float(last["val_acc"]), float(last["param_norm"]),
                  float(tr["param_distance"].iloc[-1])], False)]
    if experiment == "lr-schedules":
        best = ep.loc[ep["val_acc"].idxmax()]
        return [([float(ep["train_loss"].iloc[-1]), float(ep["val_acc"].iloc[-1]), float(best["val_acc"]),
                  float(best["test_acc"]), float(ep["test_acc"].iloc[-1])], False)]
    if experiment == "bowl-alpha-step":
        rows = []
        d = _last_steps(s.table("direction"), 25)
        e1 = d[d["eigen_index"] == 1]
        base = e1[e1["k"] == 0].set_index("step")["loss"]
        far = e1[e1["k"].abs() >= 2]
        rows.append(([float((far["loss"].to_numpy() > base.loc[far["step"]].to_numpy()).mean())], False))
        km = _last_steps(s.table("k_min"), 25)
        rows += [([float(g.mean())], True) for _, g in km.groupby(["eigen_index", "threshold"])["k_min"]]
        al = _last_steps(s.table("alpha_step"), 25)
        rows += [([100 * float(g.mean())], False) for _, g in al.groupby(["direction", "alpha"])["relative_change"]]
        return rows
    if experiment == "ggn-fisher":
        eig = s.table("eigen")
        top = eig[eig["index"] == 1].groupby("step")["value"].mean().sort_index()
        late = top.iloc[len(top) // 2 :]
        return [([float(top.iloc[-1]), float(top.max()), float(late.mean())], False)]
    if experiment == "loss-slice":
        sl = s.table("slice2d")
        last = sl[sl["step"] == sl["step"].max()]
        span = last["a"].abs().max()
        edge = last[(last["a"].abs() == span) | (last["b"].abs() == span)]["loss"].min()
        centre = float(last[(last["a"] == 0) & (last["b"] == 0)]["loss"].iloc[0])
        return [([centre, float(last["loss"].min()), float(edge), float(edge) - centre], False)]
    if experiment == "gradient-noise":
        gn, st = _late_half(s.table("gradient_noise")), _late_half(s.table("gradient_noise_step"))
        pos = gn[gn["ratio"] > 0].groupby("step")["ratio"]
        spread = float(np.median([g.max() / g.min() for _, g in pos if len(g) > 1]))
        return [([spread, float(gn["ratio"].median()), st["overlap"].mean(), st["overlap_chance"].mean(),
                  st["trace_ratio"].mean()], False)]
    if experiment in ("adaptive-sharpness", "batch-sharpness"):
        bs, ps = _late_half(s.table("batch_sharpness")), _late_half(s.table("preconditioned_sharpness"))
        return [([lr, (ps["preconditioned_sharpness"] / ps["threshold"]).mean(), float(ps["ratio"].max()),
                  (bs["batch_sharpness"] / bs["threshold"]).mean(), (bs["lambda_max"] / bs["threshold"]).mean()],
                 False)]
    if experiment == "walk-geometry":
        # rotation: medians over the measurements after epoch 2 of θ1 and θK (NaN in the 2-epoch CI run);
        # classes: recomputed from the raw interpolated losses by the definitions of step_class, not read
        # from the probe's step_class column
        rot = s.table("rotation")
        k = int(rot["index"].max())
        late = rot[(rot["epoch"] > 2) & rot["angle_prev_deg"].notna()]
        rows = [([late[late["index"] == 1]["angle_prev_deg"].median(), late[late["index"] == k]["angle_prev_deg"].median()],
                 True)]
        interp = s.table("interpolation")
        classes = {}
        for step, g in interp.groupby("step"):
            g = g.sort_values("alpha")
            l0, l1, floor = g["loss"].iloc[0], g["loss"].iloc[-1], g["loss"].min()
            tol = 1e-6 * max(abs(l0), abs(l1))
            classes[step] = ("climb" if l1 > l0 + tol else "cross" if floor < min(l0, l1) - tol
                             else "descend" if l1 < l0 - tol else "flat")
        cls = va["step"].map(classes)
        first = va["epoch"] == va["epoch"].min()
        per_epoch = pd.crosstab(va["epoch"], cls)
        excess = (per_epoch.get("climb", 0) - per_epoch.get("cross", 0))
        rows.append(([float((cls[first] == "cross").mean()), float(np.max(excess))], False))
        return rows
    raise AssertionError(f"no recomputation for {experiment}")


def _late_half(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the last ⌈n/2⌉ of the n measured steps (the issue-13 claims' "late half")."""
    steps = sorted(df["step"].unique())
    return df[df["step"].isin(steps[len(steps) // 2:])]
