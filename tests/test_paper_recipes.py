"""Every ``*-paper`` recipe runs end to end, for a few steps, on the synthetic stand-in of its dataset
(``data.synthetic: true``, same shape and classes), with every probe it enables still on; and the stand-ins
have the shape, dtype and scale the real readers give."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from sgdscope.config import FILE_DATASETS, DataConfig, validate
from sgdscope.data import load_dataset, readers, standin
from sgdscope.errors import ConfigError
from sgdscope.recipes import list_recipes, resolve
from sgdscope.store import RunStore
from sgdscope.sweep import _with_overrides

from test_data import write_cifar10, write_mnist, write_ptb, write_tiny  # noqa: E402  (tests/ is on sys.path)
from test_recipes import _points, _shorten  # noqa: E402

PAPER = [r.name for r in list_recipes() if r.size == "paper"]
CI_TRAIN, CI_BATCH = 16, 8  # two steps per pass: VGG-11 / ResNet-56 forward-backward is the cost on CPU
# grid points run in CI: the first one, and both where the second is the only run of its model (ResNet-56);
# minibatch SGD with interpolation runs in barriers / valley, so walk-gd-vs-sgd's first point (GD) suffices.
# The claims are exercised on the cpu recipes (test_recipes.py).
BOTH_POINTS = {"barriers-per-epoch-paper"}


def _ci_points(name: str, grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    pts = _points(name, grid)
    return pts if name in BOTH_POINTS else pts[:1]


def _paper_for_ci(raw: dict[str, Any]) -> dict[str, Any]:
    """``_shorten`` (the cpu recipes' CI size), then the paper-only cuts: the stand-in data at a handful of
    examples, batches of 8, one-pass "epochs" where an epoch_size spans more, tiny measurement sets and
    cheap grids. Every probe the recipe enables stays enabled with its own schedule keys."""
    raw = _shorten(raw)
    raw["train"]["epochs"] = 2 if raw["optimizer"].get("nudge_from") else 1  # 2 steps; 4 where nudging starts at 2
    raw["data"].update(synthetic=True, train_size=CI_TRAIN, val_size=8, test_size=8)
    raw["optimizer"].update(batch_size=CI_BATCH, gd_chunk=CI_BATCH)  # noisy_gd needs ≥ 2 chunks
    train = raw["train"]
    if train.get("epoch_size"):
        train["epoch_size"] = min(train["epoch_size"], CI_TRAIN)
    train["eval_batch_size"] = CI_TRAIN
    raw["measure"].update(subset=1e-3, min_subset=4)
    probes = raw.get("probes") or {}
    if "eigen" in probes:
        # k + 1 products give the k Ritz pairs and one more (converged may be False): on VGG-11's 9.8M
        # parameters each product and each Ritz step on the basis is seconds on one CPU thread
        probes["eigen"].update(max_hvps=probes["eigen"].get("k", 5) + 1)
    if "interpolation" in probes:
        probes["interpolation"]["alphas"] = 2
    if "direction" in probes:
        probes["direction"]["ks"] = [0, 1, -1, 2, -2]
    if "alpha_step" in probes:
        probes["alpha_step"]["alphas"] = [0.5, 1, 2]
    return raw


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_runs_on_its_standin(name, tmp_path):
    from sgdscope.train import run

    raw, meta = resolve(name)
    base = _paper_for_ci(raw)
    runs = []
    for i, overrides in enumerate(_ci_points(name, meta.grid)):
        cfg = _with_overrides(base, overrides)
        cfg["optimizer"]["batch_size"] = min(cfg["optimizer"]["batch_size"], CI_BATCH)  # a grid's batch axis
        if cfg["optimizer"]["name"] in ("gd", "noisy_gd"):  # one step per epoch (also where a grid picks GD)
            cfg["train"]["epochs"] = 2
        validate(cfg)
        path = run(cfg, tmp_path / f"p{i}", progress=False)
        store = RunStore(path)
        assert store.status()["state"] == "done"
        assert len(store.table("train")) >= 2 and len(store.table("epoch"))
        resolved = store.config()
        assert resolved["data"]["synthetic"] is True and resolved["data"]["name"] == raw["data"]["name"]
        assert resolved["resolved"]["data"]["source"] == "synthetic stand-in"
        runs.append((overrides, path))
    tables = set(RunStore(runs[0][1]).tables())
    expected = {"eigen": {"eigen", "curvature"}, "direction": {"direction", "k_min"}, "alpha_step": {"alpha_step"},
                "interpolation": {"interpolation", "valley"}}
    for p in raw.get("probes") or {}:
        assert expected[p] <= tables, (p, tables)
        for t in expected[p]:
            assert len(RunStore(runs[0][1]).table(t)), (p, t)


# ------------------------------------------------------------------------------------- the stand-ins


def _real_sources(tmp_path) -> dict[str, tuple[tuple[int, ...], float, torch.dtype]]:
    """What the real readers hand over for files of each format (written by test_data's fixtures)."""
    write_cifar10(tmp_path / "c10")
    (tmp_path / "mn").mkdir()
    write_mnist(tmp_path / "mn", gz=False)
    write_tiny(tmp_path / "ti")
    out = {}
    for name, root, reader in [("cifar10", "c10", readers.read_cifar), ("mnist", "mn", readers.read_mnist),
                               ("tiny_imagenet", "ti", readers.read_tiny_imagenet)]:
        src = reader(DataConfig(name=name, root=str(tmp_path / root)))
        out[name] = (tuple(src.x.shape[1:]), src.scale, src.x.dtype)
    return out


def test_standins_have_the_real_readers_shapes(tmp_path):
    assert set(FILE_DATASETS) == {*standin.IMAGES, "ptb"}
    classes = {"cifar10": 10, "mnist": 10, "tiny_imagenet": 200}  # the official files' (the fixtures hold fewer)
    for name, (shape, scale, dtype) in _real_sources(tmp_path).items():
        src = standin.images(DataConfig(name=name, synthetic=True))
        if name == "tiny_imagenet":  # the fixture's JPEGs are 8×8 RGB; the real ones 64×64
            shape = (shape[0], 64, 64)
        assert (tuple(src.x.shape[1:]), src.num_classes, src.scale) == (shape, classes[name], scale), name
        assert src.x[torch.tensor([0, 1])].dtype == dtype and src.x_test.shape[1:] == src.x.shape[1:]
    # the official sizes: CIFAR's 50,000 + 10,000 give the papers' 45,000 / 5,000 / 10,000 split by default
    d = load_dataset(DataConfig(name="cifar10", synthetic=True, train_size=64), seed=0)
    assert (len(d.train), len(d.val), len(d.test), d.num_classes) == (64, 5000, 10000, 10)
    assert d.info["source"] == "synthetic stand-in" and d.info["mimics"] == "cifar10" and d.info["files"] == []
    assert len(standin.images(DataConfig(name="mnist", synthetic=True)).y) == 60_000
    tiny = standin.images(DataConfig(name="tiny_imagenet", synthetic=True, tiny_classes=3, tiny_per_class=4))
    assert (len(tiny.y), len(tiny.y_test), tiny.num_classes) == (12, 150, 3)


def test_standin_rows_are_a_function_of_their_index():
    src = standin.images(DataConfig(name="cifar100", synthetic=True))
    idx = torch.tensor([49_999, 3, 0, 3, 17])
    block = src.x[0:20]  # a slice, built separately
    rows = src.x[idx]
    assert torch.equal(rows[1], block[3]) and torch.equal(rows[2], block[0]) and torch.equal(rows[1], rows[3])
    assert torch.equal(rows[4], block[17]) and not torch.equal(block[0], block[1])
    # x_i = (t_{y_i} + u_i) // 2 with u_i uniform bytes: each image leans towards its class template
    t = src.x.templates.to(torch.float64)
    x = src.x[torch.arange(200)].reshape(200, -1).to(torch.float64)
    own = torch.nn.functional.cosine_similarity(x - x.mean(), t[src.y[:200]] - t.mean(), dim=1)
    other = torch.nn.functional.cosine_similarity(x - x.mean(), t[(src.y[:200] + 1) % 100] - t.mean(), dim=1)
    assert (own > other).all()
    assert np.bincount(src.y.numpy(), minlength=100).min() > 350  # 500 expected per class


def test_standin_ptb_streams_and_run_config(tmp_path):
    write_ptb(tmp_path)
    real = load_dataset(DataConfig(name="ptb", root=str(tmp_path), seq_len=2), seed=0)
    fake = load_dataset(DataConfig(name="ptb", synthetic=True, seq_len=5, train_size=10), seed=0)
    assert real.task == fake.task == "lm" and real.input_shape == (2,) and fake.input_shape == (5,)
    assert fake.num_classes == standin.PTB_VOCAB and int(fake.train.x.max()) < standin.PTB_VOCAB
    assert len(fake.val) == (standin.PTB_TOKENS["val"] - 1) // 5
    assert fake.train.x.dtype == real.train.x.dtype == torch.int64


@pytest.mark.parametrize("name", ["digits", "mnist1d", "synthetic"])
def test_standin_of_an_embedded_dataset_is_refused(name):
    with pytest.raises(ConfigError, match=r"^data\.synthetic: .*stand-ins exist for cifar10"):
        validate({"data": {"name": name, "synthetic": True}})


def test_real_readers_still_need_their_files():
    raw = copy.deepcopy(resolve("bowl-alpha-step-paper")[0])
    cfg = validate(raw)
    assert cfg.data.synthetic is False
    from sgdscope.errors import DataError

    with pytest.raises(DataError, match="cifar10: expected"):
        load_dataset(cfg.data.model_copy(update={"root": "/nonexistent-cifar"}), seed=0)


# ------------------------------------------------------------------------------------- the estimates


# recipes bench/paper_estimates.py has not yet written (its run did not finish before this branch's deadline);
# `bench/paper_estimates.py --write --only NAME` fills one, and then it must leave this set
NOT_ESTIMATED = {r.name for r in list_recipes() if r.size == "paper" and r.estimate_cpu is None}


@pytest.mark.xfail(bool(NOT_ESTIMATED), reason=f"no estimate yet for {sorted(NOT_ESTIMATED)}", strict=True)
def test_every_paper_recipe_has_an_estimate():
    assert not NOT_ESTIMATED


def test_paper_recipes_carry_the_benchmarks_estimates():
    """Each paper recipe's ``estimate_cpu`` is the total bench/paper_estimates.py wrote to its JSON (rounded to
    0.1 h), over every grid point; ``estimate_gpu`` is an open slot; the listing shows both."""
    import json
    from pathlib import Path

    from sgdscope.sweep import expand_grid

    result = json.loads((Path(__file__).parents[1] / "bench/results/paper_estimates.json").read_text())
    for r in list_recipes():
        if r.size != "paper":
            assert r.estimate_cpu is None and r.estimate_line() == ""
            continue
        if r.name in NOT_ESTIMATED:
            assert r.estimate_cpu is None and r.name not in result["recipes"], r.name
            continue
        est, bench = r.estimate_cpu, result["recipes"][r.name]
        runs = len(expand_grid(r.grid)) if r.grid else 1
        assert est["runs"] == bench["runs"] == len(bench["points"]) == runs, r.name
        assert est["hours"] == round(bench["total_seconds"] / 3600, 1) > 0, r.name
        assert bench["total_seconds"] == pytest.approx(sum(p["total_seconds"] for p in bench["points"]))
        assert est["threads"] == result["threads"]
        assert r.estimate_gpu is None and "\n  estimate_gpu: null\n" in r.path.read_text()  # the lead's slot
        line = r.estimate_line()
        assert line.startswith("CPU ≈ ") and "GPU: not measured" in line and f"({runs} run" in line
