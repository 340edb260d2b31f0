"""The read side (figures, tables, report, claims) reads only the store: it imports no executor, trainer or
measurement layer, and it copes with a run directory holding any subset of the tables and columns (a
researcher's own loop measured by a Scope), naming what to enable instead of raising."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure as MplFigure
from PIL import Image

import sgdscope
from sgdscope import tables
from sgdscope.errors import RunStoreError
from sgdscope.plots import FIGURES, missing, plot, run_figures, sweep_figures
from sgdscope.plots._common import NOTES_KEY
from sgdscope.plots.sweep import _against
from sgdscope.report import write_report
from sgdscope.store import RunStore
from sgdscope.sweepview import open_sweep

SRC = Path(sgdscope.__file__).parent
READ_SIDE = sorted([*(SRC / "plots").glob("*.py"), *(SRC / "claims").glob("*.py"), SRC / "tables.py",
                    SRC / "report.py", SRC / "sweepview.py"])
FORBIDDEN = ("sgdscope.sweep", "sgdscope.train", "sgdscope.measure", "sgdscope.run")

# --------------------------------------------------------------------------------- imports


def test_importing_the_read_side_loads_no_executor_trainer_or_measurement_layer():
    code = ("import sys, sgdscope.report, sgdscope.plots, sgdscope.tables, sgdscope.claims\n"
            f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r}))\n"
            "print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """Every module ``path`` (a file of the package at ``root``) imports, anywhere in it (functions
    included), as absolute dotted names; ``from pkg import name`` also counts as importing ``pkg.name``
    (it may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(root.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def _forbidden(path: Path, root: Path = SRC) -> list[str]:
    return [f"{path.name}:{line} imports {name}" for line, name in _imports(path, root)
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]


def test_the_import_scan_sees_lazy_relative_and_from_imports(tmp_path):
    # the checker itself: a lazy import inside a function, a relative one and a `from sgdscope import` one
    root = tmp_path / "sgdscope"
    (root / "plots").mkdir(parents=True)
    probe = root / "plots" / "probe.py"
    probe.write_text("def f():\n    from sgdscope.train import run\n"
                     "from .. import sweep\nfrom sgdscope import measure\nimport sgdscope.sweepview\n")
    hits = _forbidden(probe, root)
    assert sorted(h.split(" imports ")[1] for h in hits) == ["sgdscope.measure", "sgdscope.sweep", "sgdscope.train",
                                                             "sgdscope.train.run"]


def test_no_read_side_module_imports_the_executor_trainer_or_measurement_layer():
    assert len(READ_SIDE) >= 12, READ_SIDE  # plots (6), claims (4), tables, report, sweepview
    hits = [h for p in READ_SIDE for h in _forbidden(p)]
    assert hits == []


def test_no_read_side_module_is_over_400_lines():
    assert {p.name: n for p in READ_SIDE if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400} == {}


# ------------------------------------------------------------------------- stores with any subset

SCOPE_CONFIG = {"seed": 0, "source": "scope", "measure": {"bn_policy": "train-restore", "subset_size": 500},
                "probes": {"eigen": {"every": 5, "k": 2}, "interpolation": {"every": 1}, "alignment": None},
                "versions": {"sgdscope": "0.1.0", "torch": "2"}, "resolved": {}}
_TRAIN = {"step": lambda t: t, "epoch": lambda t: (t - 1) // 10 + 1, "lr": lambda t: 0.1,
          "batch_loss": lambda t: 2 / (1 + t), "param_distance": lambda t: t ** 0.5, "grad_cosine_prev": lambda t: -0.3}


def _train(*cols: str, n: int = 30) -> list[dict]:
    return [{c: _TRAIN[c](t) for c in cols} for t in range(1, n + 1)]


def _interp(steps=range(5)) -> list[dict]:
    return [{"step": s, "alpha": a, "loss": 1 + (a - 0.5) ** 2} for s in steps for a in (0, 0.25, 0.5, 0.75, 1)]


EIGEN = [{"step": s, "index": i, "value": 10.0 / i} for s in (0, 5, 10, 15) for i in (1, 2)]
# name -> (tables, the run figures that must be drawn, {figure: texts its PNG must carry})
SUBSETS = {
    "train-minimal": ({"train": _train("step", "batch_loss")}, {"learning_curves"},
                      {"learning_curves": ["no train.batch_acc rows", "no train.lr rows"]}),
    "user-epoch-rows": ({"train": _train("step", "batch_loss", "lr"),
                         "epoch": [{"epoch": e, "step": 10 * e, "train_loss": 1 / e} for e in (1, 2, 3)]},
                        {"learning_curves"}, {}),
    "epoch-only": ({"epoch": [{"epoch": e, "train_loss": 1 / e} for e in (1, 2, 3)]}, set(), {}),
    "eigen-without-epoch": ({"eigen": EIGEN}, {"eigenvalues"}, {"eigenvalues": ["η·λ₁: no train.lr rows"]}),
    "eigen-and-curvature": ({"eigen": EIGEN, "train": _train("step", "lr"),
                             "curvature": [{"step": s, "frobenius_topk": 11.2} for s in (0, 5, 10, 15)]},
                            {"eigenvalues", "learning_curves"}, {}),
    "interpolation-without-valley": ({"interpolation": _interp()}, {"walk"},
                                     {"walk": ["no train.grad_cosine_prev rows (enable probe 'gradient')",
                                               "no train.param_distance rows (enable probe 'distance')",
                                               "no valley.floor rows"]}),
    "valley-without-epoch": ({"interpolation": _interp(), "train": _train("step", "grad_cosine_prev"),
                              "valley": [{"step": s, "floor": 1.0, "height": 0.25, "barrier": int(s == 3)}
                                         for s in range(5)]},
                             {"walk", "learning_curves"}, {"walk": ["no train.param_distance rows"]}),
    "direction-without-eigenvalue": ({"direction": [{"step": s, "eigen_index": 1, "k": k, "loss": 1 + k * k}
                                                    for s in (0, 5) for k in (-1, 0, 1)]}, {"bowl"}, {}),
    "alpha-step-without-direction-names": ({"alpha_step": [{"step": s, "eigen_index": i, "alpha": a,
                                                            "relative_change": (a - 1) * i}
                                                           for s in (0, 5) for i in (0, 1) for a in (0.5, 2)]},
                                           {"alpha_step"}, {}),
    "alignment-full-gradient-only": ({"alignment": [{"step": s, "eigen_index": 1, "cos_full": -0.1} for s in (0, 5)]},
                                     {"alignment"}, {"alignment": ["no alignment.cos_minibatch rows"]}),
    "k_min": ({"k_min": [{"step": s, "eigen_index": 1, "threshold": 0.1, "k_min": 2.0} for s in (0, 5)]},
              {"k_min"}, {}),
    "gradient-noise-without-traces": ({"gradient_noise": [{"step": s, "eigen_index": i, "eigenvalue": 2.0 / i,
                                                           "variance": 0.02 / i, "ratio": 0.01}
                                                          for s in (0, 5) for i in (1, 2)],
                                       "gradient_noise_step": [{"step": s} for s in (0, 5)]},
                                      {"gradient_noise"}, {"gradient_noise": ["no gradient_noise_step.overlap rows",
                                                                              "no gradient_noise_step.trace_ratio rows"]}),
    "batch-sharpness": ({"batch_sharpness": [{"step": s, "lr": 0.1, "batch_sharpness": 12.0, "batch_sharpness_min": 10.0,
                                              "batch_sharpness_max": 14.0, "lr_batch_sharpness": 1.2,
                                              "lr_lambda_max": 1.0, "threshold": 20.0} for s in (0, 5)]},
                        {"batch_sharpness"}, {}),
    "preconditioned-without-optimizer": ({"preconditioned_sharpness": [{"step": s, "preconditioned_sharpness": 300.0,
                                                                        "lambda_max": 5.0, "threshold": 380.0,
                                                                        "ratio": 300 / 380} for s in (0, 5)]},
                                         {"preconditioned_sharpness"}, {}),
    "k_min-never-closed": ({"k_min": [{"step": s, "eigen_index": 1, "threshold": 0.1, "k_min": math.nan} for s in (0, 5)]},
                           {"k_min"}, {"k_min": ["k_min.k_min is NaN at every logged step"]}),
    "slice2d-without-path": ({"slice2d": [{"step": s, "a": a, "b": b, "loss": 1 + a * a + b * b}
                                          for s in (0, 5) for a in (-1, 0, 1) for b in (-1, 0, 1)]}, {"slice2d"}, {}),
    "rotation-without-overlaps": ({"rotation": [{"step": s, "index": i, "angle_prev_deg": 3.0 * i, "angle_ref_deg": 5.0 * i}
                                                 for s in (0, 5, 10) for i in (1, 2)]},
                                  {"rotation"}, {"rotation": ["no rotation.overlap_prev rows"]}),
    "step-classes-without-lambda1": ({"step_classes": [{"epoch": e, "n_steps": 10, "n_descend": 2, "n_cross": 7,
                                                        "n_climb": 1} for e in (1, 2)]},
                                     {"step_classes"}, {"step_classes": ["no λ₁ beside the steps"]}),
    "eigen-without-index": ({"eigen": [{"step": 0, "value": 1.0}]}, set(), {}),
    "train-without-step": ({"train": [{"batch_loss": 1.0}]}, set(), {}),
    "nothing": ({}, set(), {}),
}
RUN_FIGS = [n for n, f in FIGURES.items() if f.sweep_keys is None]
SWEEP_FIGS = [n for n, f in FIGURES.items() if f.sweep_keys is not None]


def _make(path: Path, tabs: dict) -> RunStore:
    store = RunStore.create(path, SCOPE_CONFIG)
    store.append_many(tabs)
    store.set_status("done", step=30)
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, RunStore]:
    root = tmp_path_factory.mktemp("subsets")
    return {name: _make(root / name, tabs) for name, (tabs, _, _) in SUBSETS.items()}


def _notes(png: Path) -> str:
    return Image.open(png).text.get(NOTES_KEY, "")


def _is_png(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_subsets_cover_every_run_figure():
    assert set().union(*(drawn for _, drawn, _ in SUBSETS.values())) == set(RUN_FIGS)


@pytest.mark.parametrize("name", RUN_FIGS)
def test_every_run_figure_draws_what_a_store_has_or_names_what_to_enable(stores, name):
    table = FIGURES[name].tables[0]
    for subset, store in stores.items():
        _, drawn, texts = SUBSETS[subset]
        if name in drawn:
            paths = plot(store.path, name)
            assert paths and all(_is_png(p) for p in paths), subset
            notes = "\n".join(_notes(p) for p in paths)
            for text in texts.get(name, []):
                assert text in notes, (subset, notes)
        else:
            with pytest.raises(RunStoreError, match=f"figure {name!r} needs") as err:
                plot(store.path, name)
            msg = str(err.value)
            assert f"table {table!r}" in msg and ("enable probe" in msg or "written by" in msg), (subset, msg)


def test_a_missing_column_is_named_with_its_probe(stores):
    assert missing("eigenvalues", stores["eigen-without-index"]) == (
        "needs column 'index' of table 'eigen', which the run's rows do not have (enable probe 'eigen')")
    assert missing("walk", stores["k_min"]) == "needs rows in table 'interpolation', which has none (enable probe 'interpolation')"
    assert missing("learning_curves", stores["train-without-step"]).startswith("needs column 'step' of table 'train'")
    assert missing("walk", stores["interpolation-without-valley"]) is None


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_report_and_summary_of_any_subset(stores, subset):
    store = stores[subset]
    _, drawn, _ = SUBSETS[subset]
    assert set(run_figures(store)) == drawn
    summary = tables.run_summary(store)
    assert list(summary.columns) == ["section", "quantity", "value", "detail"]
    page = write_report(store.path).read_text(encoding="utf-8")
    assert "your own training loop, measured by sgdscope.Scope" in page
    assert "<dt>probes</dt><dd>eigen, interpolation</dd>" in page  # the enabled ones (alignment is None)
    assert "could not be drawn" not in page  # no figure raised inside the report
    for name in drawn:
        assert f'id="fig-{name}"' in page
    for name in set(RUN_FIGS) - drawn:
        assert f"<code>{name}</code>): needs" in page  # listed as not drawn, with what it needs
    n_images = page.count("data:image/png;base64,")
    assert n_images >= len(drawn)


def test_summary_numbers_of_own_loop_rows(stores):
    s = tables.run_summary(stores["user-epoch-rows"]).set_index("quantity")
    assert s.loc["final train loss", "value"] == pytest.approx(1 / 3)
    assert "best val accuracy" not in s.index and "mean cos(g_t−1, g_t)" not in s.index
    s = tables.run_summary(stores["eigen-without-epoch"]).set_index("quantity")
    assert s.loc["final λ₁", "value"] == 10.0 and "final η·λ₁" not in s.index  # no lr anywhere: no η·λ₁
    s = tables.run_summary(stores["valley-without-epoch"]).set_index("quantity")
    assert s.loc["barriers crossed", "value"] == 1 and s.loc["barriers crossed", "detail"] == "of 5 interpolated steps"
    s = tables.run_summary(stores["alpha-step-without-direction-names"]).set_index("quantity")
    assert s.loc["α = 2 along e1: loss change", "value"] == pytest.approx(100.0)
    assert s.loc["α = 0.5 along random: loss change", "value"] == pytest.approx(-0.0)


def test_tables_of_any_subset(stores):
    t1 = tables.jastrzebski_table1({k: v for k, v in stores.items()})
    assert set(t1.index) == {"user-epoch-rows", "epoch-only"}  # the runs with epoch rows
    assert math.isnan(t1.loc["user-epoch-rows", "test acc"])
    assert t1.loc["user-epoch-rows", "loss last-10"] == pytest.approx(np.mean([1, 1 / 2, 1 / 3]))
    assert not [c for c in t1.columns if c.startswith("val acc")]  # no val_acc logged: no such column
    assert len(tables.barriers_per_epoch(stores)) == 0  # valley rows without an epoch cannot be per epoch
    assert len(tables.heights_per_epoch(stores)) == 0


# -------------------------------------------------------------------------------------- sweeps


def _sweep(path: Path, runs: dict[str, tuple[dict, dict]], grid: dict, seeds: int = 1) -> Path:
    """A sweep directory over hand-built stores: ``{name: (overrides, tables)}``."""
    spec = []
    for name, (overrides, tabs) in runs.items():
        _make(path / "runs" / name, tabs)
        spec.append({"name": name, "dir": f"runs/{name}", "overrides": overrides})
    (path / "sweep.yaml").write_text(yaml.safe_dump({"format": 1, "base": {}, "grid": grid, "seeds": seeds,
                                                     "runs": spec}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def own_loop_sweep(tmp_path_factory) -> Path:
    tabs = {"train": _train("step", "batch_loss"), "epoch": [{"epoch": e, "step": 10 * e, "train_loss": 1 / e}
                                                            for e in (1, 2, 3)], "eigen": EIGEN}
    runs = {f"lr={lr}": ({"optimizer.lr": lr}, tabs) for lr in (0.1, 0.2)}
    return _sweep(tmp_path_factory.mktemp("sweep") / "s", runs, {"optimizer.lr": [0.1, 0.2]})


@pytest.mark.parametrize("name", SWEEP_FIGS)
def test_every_sweep_figure_on_runs_with_few_columns(own_loop_sweep, name):
    paths = plot(own_loop_sweep, name)
    assert paths and all(_is_png(p) for p in paths)
    notes = "\n".join(_notes(p) for p in paths)
    lacking = {"sweep_curves": ["no epoch.val_acc rows", "no train.param_distance rows\n(enable probe 'distance')",
                                    "log it: scope.log('epoch', {..., 'val_acc': ...})"],
               "cosine_distance": ["no run has mean cos(g_t−1, g_t)"],
               "cosine_curves": ["no train.grad_cosine_prev rows\n(enable probe 'gradient')"],
               "nsgd": ["no epoch.train_acc rows", "no curvature.frobenius_topk rows"],
               "gd_vs_noise": ["no epoch.param_norm rows\n(enable probe 'weights')"],
               "schedules": ["no train.lr rows"]}
    for text in lacking.get(name, []):
        assert text in notes, notes


def test_a_sweep_figure_without_its_table_in_any_run_names_the_probe(tmp_path):
    runs = {f"lr={lr}": ({"optimizer.lr": lr}, {"train": _train("step", "batch_loss")}) for lr in (0.1, 0.2)}
    path = _sweep(tmp_path / "s", runs, {"optimizer.lr": [0.1, 0.2]})
    with pytest.raises(RunStoreError, match=r"needs rows in table 'eigen', which has none \(enable probe 'eigen'\)"):
        plot(path, "peak_lambda")
    assert "peak_lambda" not in sweep_figures(open_sweep(path))


def test_sweep_report_of_own_loop_runs(own_loop_sweep):
    page = write_report(own_loop_sweep).read_text(encoding="utf-8")
    assert "could not be drawn" not in page and 'id="fig-peak_lambda"' in page
    assert (own_loop_sweep / "runs" / "lr=0.1" / "report.html").is_file()
    assert set(sweep_figures(open_sweep(own_loop_sweep))) >= {"peak_lambda", "sweep_curves"}


# -------------------------------------------------------- issue 11 §5: figures that do not mislead


def test_two_single_seed_points_say_so(own_loop_sweep):
    notes = _notes(plot(own_loop_sweep, "peak_lambda")[0])
    assert "only 2 values of η: no trend can be read" in notes and "1 seed: no spread shown" in notes
    assert "one seed per grid point" in _notes(plot(own_loop_sweep, "sweep_curves")[0])


@pytest.fixture(scope="module")
def seeded_sweep(tmp_path_factory) -> Path:
    """3 lrs × 3 seeds; λ₁ is constant along each run at 10(1 + η) + seed, so its peak is that value."""
    runs = {}
    for lr in (0.05, 0.1, 0.2):
        for seed in range(3):
            value = 10 * (1 + lr) + seed
            eig = [{"step": s, "index": 1, "value": value} for s in (0, 5, 10)]
            runs[f"lr={lr}_seed={seed}"] = ({"optimizer.lr": lr, "seed": seed},
                                            {"eigen": eig, "train": _train("step", "param_distance", "lr")})
    return _sweep(tmp_path_factory.mktemp("seeds") / "s", runs, {"optimizer.lr": [0.05, 0.1, 0.2]}, seeds=3)


def test_several_seeds_show_their_spread(seeded_sweep):
    view = open_sweep(seeded_sweep)
    assert view.n_seeds == 3 and view.varying == ["optimizer.lr"]
    fig = MplFigure()
    ax = fig.subplots()
    _against(ax, view, "optimizer.lr", "peak", lambda s: tables.peak_lambda(s)["peak"])
    bars = ax.containers[0]
    _, ys = bars.lines[0].get_data()
    assert np.allclose(ys, [10 * (1 + lr) + 1 for lr in (0.05, 0.1, 0.2)])  # the mean over seeds 0, 1, 2
    segs = bars.lines[2][0].get_segments()  # one vertical bar per η: from the min seed to the max seed
    assert [(round(s[0][1], 6), round(s[1][1], 6)) for s in segs] == [
        (round(10 * (1 + lr), 6), round(10 * (1 + lr) + 2, 6)) for lr in (0.05, 0.1, 0.2)]
    assert ax.get_ylim()[0] == 0  # positive values: the axis starts at 0, not at the smallest point
    notes = "\n".join(t.get_text() for t in ax.texts)
    assert "mean of 3 seeds; bars: min–max" in notes and "no trend" not in notes
    curves = _notes(plot(seeded_sweep, "cosine_curves")[0])
    assert "shaded: their min–max range" in curves and "one seed" not in curves


def test_table1_labels_follow_the_run(tmp_path):
    def run(name: str, epochs: int) -> RunStore:
        eps = [{"epoch": e, "step": 10 * e, "train_loss": 1 / e, "val_acc": 0.5 + e / 100, "test_acc": 0.5}
               for e in range(1, epochs + 1)]
        return _make(tmp_path / name, {"epoch": eps})

    t = tables.jastrzebski_table1({"short": run("short", 15), "other": run("other", 15)})
    assert [c for c in t.columns if c.startswith("val acc")] == ["val acc @ epoch 15"]  # not "@50": never got there
    assert t.loc["short", "val acc @ epoch 15"] == pytest.approx(0.65)
    # runs read at different epochs (early stopping, a failed run): one column, and which epoch each was read at
    t = tables.jastrzebski_table1({"short": run("short2", 15), "shorter": run("shorter", 12)})
    assert [c for c in t.columns if c.startswith("val acc")] == ["val acc @ epoch 50 or the last", "val acc epoch"]
    assert t.loc["short", "val acc @ epoch 50 or the last"] == pytest.approx(0.65)
    assert t.loc["shorter", "val acc @ epoch 50 or the last"] == pytest.approx(0.62)
    assert t["val acc epoch"].tolist() == [15, 12]


def test_cli_plot_of_a_figure_without_its_data_is_one_line_naming_the_probe(stores):
    res = subprocess.run([sys.executable, "-m", "sgdscope.cli", "plot", str(stores["train-minimal"].path), "walk"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"sgdscope: error: {stores['train-minimal'].path}: figure 'walk' needs rows in table 'interpolation', "
        "which has none (enable probe 'interpolation')"]
