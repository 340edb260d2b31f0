"""Figures and tables on synthetic run stores with known contents (figures read only from the store)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sgdscope.errors import ConfigError, RunStoreError
from sgdscope.plots import FIGURES, plot, run_figures, sweep_figures
from sgdscope.store import RunStore
from sgdscope.sweepview import open_sweep
from sgdscope import tables

from stores import ALPHAS, BARRIER_STEPS, SPE, lam1, synthetic_run, synthetic_sweep


def _is_png(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 2000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- figures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return synthetic_run(tmp_path_factory.mktemp("plots") / "run").path


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    grid = {"optimizer.lr": [0.05, 0.2], "optimizer.batch_size": [32, 128]}
    return synthetic_sweep(tmp_path_factory.mktemp("plots") / "sweep", grid)


RUN_FIGS = [n for n, f in FIGURES.items() if f.sweep_keys is None]
SWEEP_FIGS = [n for n, f in FIGURES.items() if f.sweep_keys is not None]


@pytest.mark.parametrize("name", RUN_FIGS)
def test_run_figure_writes_png(run_dir, name):
    paths = plot(run_dir, name)
    assert paths and all(_is_png(p) and p.parent == run_dir / "figures" for p in paths)


def test_walk_and_bowl_give_one_file_per_block_and_eigenvector(run_dir):
    assert sorted(p.name for p in plot(run_dir, "walk")) == ["walk_1.png", "walk_2.png"]  # epochs 1 and 6
    assert sorted(p.name for p in plot(run_dir, "bowl")) == ["bowl_e1.png", "bowl_e3.png"]


@pytest.mark.parametrize("name", SWEEP_FIGS)
def test_sweep_figure_writes_png(sweep_dir, name):
    paths = plot(sweep_dir, name)
    assert paths and all(_is_png(p) and p.parent == sweep_dir / "figures" for p in paths)


def test_figure_availability(run_dir, sweep_dir, tmp_path):
    assert run_figures(RunStore(run_dir)) == RUN_FIGS
    bare = synthetic_run(tmp_path / "bare", full=False)
    assert run_figures(bare) == ["learning_curves"]
    # an lr × batch-size grid: no γ / schedule / optimizer axis, so those comparisons are not offered
    assert set(sweep_figures(open_sweep(sweep_dir))) == {"sweep_curves", "peak_lambda", "cosine_distance", "cosine_curves"}


def test_comparisons_follow_the_grid(tmp_path):
    view_dir = synthetic_sweep(tmp_path / "gd", {"optimizer.name": ["gd", "sgd"]}, full=False)
    assert set(sweep_figures(open_sweep(view_dir))) == {"sweep_curves", "cosine_curves", "gd_vs_noise"}
    assert _is_png(plot(view_dir, "cosine_curves")[0])  # no lr/bs axis: one cosine and one distance panel


def test_plot_errors(run_dir, sweep_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown figure 'nope'; choose one of: learning_curves"):
        plot(run_dir, "nope")
    with pytest.raises(ConfigError, match="compares the runs of a sweep"):
        plot(run_dir, "peak_lambda")
    with pytest.raises(ConfigError, match="draws one run"):
        plot(sweep_dir, "walk")
    bare = synthetic_run(tmp_path / "bare", full=False)
    with pytest.raises(RunStoreError, match="table 'eigen'"):
        plot(bare.path, "eigenvalues")
    with pytest.raises(RunStoreError, match="not a sgdscope run"):
        plot(tmp_path, "walk")


def test_cli_plot(run_dir):
    cmd = [sys.executable, "-m", "sgdscope.cli", "plot"]
    ok = subprocess.run([*cmd, str(run_dir), "k_min"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(run_dir / "figures" / "k_min.png")
    bad = subprocess.run([*cmd, str(run_dir), "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "choose one of" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# -------------------------------------------------------------------------------------------- tables


def test_jastrzebski_table1_known_answers(tmp_path):
    # val acc peaks at epoch 3 of 12: every "best-val" column must come from epoch 3 (step 30)
    accs = [0.5, 0.6, 0.9, 0.7, 0.7, 0.8, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    s = synthetic_run(tmp_path / "r", epochs=12, val_accs=accs)
    row = tables.jastrzebski_table1({"a": s}, window=1).loc["a"]
    assert row["best-val epoch"] == 3
    assert row["test acc"] == pytest.approx(0.9 - 0.03)
    assert row["dist. best-val"] == pytest.approx(0.1 * 30 ** 0.5 * 1.1)  # train.param_distance at step 30
    assert row["ρ(W)"] == pytest.approx(4.0)
    assert row["val acc @ epoch 12"] == pytest.approx(0.6)  # fewer than 50 epochs: the last, and the label says so
    assert row["loss last-10"] == pytest.approx(np.mean([2.3 * math.exp(-e / 2) for e in range(3, 13)]))
    frob = lambda t: math.sqrt(sum((lam1(t, 0.1) / i) ** 2 for i in (1, 2, 3)))  # noqa: E731
    assert row["‖H‖_F best-val"] == pytest.approx(frob(30))
    assert row["‖H‖_F last-10"] == pytest.approx(np.mean([frob(e * SPE) for e in range(3, 13)]))
    md = tables.to_markdown(tables.jastrzebski_table1({"a": s}))
    assert md.splitlines()[0].startswith("| run | best-val epoch | ‖H‖_F best-val")
    assert md.splitlines()[2].startswith("| a | 3 |")


def test_jastrzebski_val_acc_at_epoch_50(tmp_path):
    accs = [0.1] * 49 + [0.42] + [0.2] * 5
    s = synthetic_run(tmp_path / "r", epochs=55, val_accs=accs, full=False)
    assert tables.jastrzebski_table1({"a": s}).loc["a", "val acc @ epoch 50"] == pytest.approx(0.42)


def test_xing_tables_count_what_was_put_in(sweep_dir, tmp_path):
    b = tables.barriers_per_epoch(sweep_dir)
    assert list(b.columns) == ["epoch 1", "epoch 6"]
    assert (b["epoch 1"] == 0).all() and (b["epoch 6"] == len(BARRIER_STEPS)).all()
    assert len(b) == 4 and "η=0.05, S=32" in b.index
    h = tables.heights_per_epoch(sweep_dir)
    expect = np.mean([1.0 / (1 + t) + 0.3 * 0.36 - min(1.0 / (1 + t) + 0.3 * (a - 0.6) ** 2 for a in ALPHAS)
                      for t in range(10)])
    assert h.loc["η=0.05, S=32", "epoch 1"] == pytest.approx(expect)
    path = tables.write_table(b, tmp_path / "t1.csv")
    assert path.read_text().splitlines()[0] == "run,epoch 1,epoch 6"
    with pytest.raises(ConfigError):
        tables.write_table(b, tmp_path / "t1.xlsx")


def test_run_summary_numbers(run_dir):
    df = tables.run_summary(RunStore(run_dir)).set_index("quantity")
    pk = tables.peak_lambda(RunStore(run_dir))
    assert df.loc["peak λ₁ (5-point smoothed)", "value"] == pytest.approx(pk["peak"])
    assert pk["t90_step"] <= pk["peak_step"] and pk["raw_max"] >= pk["peak"]
    assert df.loc["k_min along e1, 1% rise", "value"] == 1.0
    assert df.loc["k_min along e3, 10% rise", "value"] == 4.0
    assert df.loc["α = 2 along e1: loss change", "value"] == pytest.approx(2.0)
    assert df.loc["α = 0.25 along random: loss change", "value"] == pytest.approx(0.0)
    assert df.loc["barriers crossed", "value"] == len(BARRIER_STEPS)
    assert df.loc["epoch 6: mean height above floor", "detail"].startswith(f"barriers {len(BARRIER_STEPS)}/10")


def test_peak_lambda_is_earlier_and_lower_for_larger_lr(tmp_path):
    lo, hi = (tables.peak_lambda(synthetic_run(tmp_path / str(lr), lr=lr, epochs=8)) for lr in (0.05, 0.2))
    assert hi["peak"] < lo["peak"] and hi["t90_epoch"] < lo["t90_epoch"]
