"""The bundled recipes: every one validates (with each grid point applied), and every ``*-cpu`` recipe runs
end to end in a shortened, CI-sized version whose runs its claim function reads."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sgdscope import claims
from sgdscope.config import validate
from sgdscope.recipes import list_recipes, resolve
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
                "interpolation": {"interpolation", "valley"}}
    for p in probes:
        assert expected.get(p, set()) <= tables, (p, tables)
    result = claims.check(name, runs)  # numbers and a verdict come back, whatever the verdict at this size
    assert isinstance(result.held, bool) and len(result.numbers) and result.checks
