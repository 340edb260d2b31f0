"""Figures of Xing et al. (2018): the walk plot of a run (Figs. 1-2), and across the runs of a sweep the
consecutive-gradient cosine per batch size and lr (Fig. 4), GD against GD with isotropic noise (Fig. 5)
and the learning-rate schedules (Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sgdscope.plots._common import color, missing_column, no_data, save, subplots, title
from sgdscope.plots.curves import Curve, compare
from sgdscope.store import RunStore
from sgdscope.sweepview import SweepView
from sgdscope.tables import has

MARKERS_UP_TO = 120  # steps per walk plot above which floor markers would merge into a smear


def _blocks(steps: np.ndarray) -> list[np.ndarray]:
    """Split the interpolated steps into walks: runs of steps at the usual spacing (an epoch of SGD, or
    every step of GD); a larger gap (the next configured epoch) starts a new walk."""
    if len(steps) < 2:
        return [steps]
    gaps = np.diff(steps)
    usual = np.bincount(gaps.astype(int)).argmax()
    cuts = np.nonzero(gaps > usual)[0] + 1
    return np.split(steps, cuts)


def _walk(store: RunStore, interp: pd.DataFrame, valley: pd.DataFrame, steps: np.ndarray, path: Path) -> Path:
    tr = store.table("train")
    fig, axes = subplots(3, 1, panel=(10.0, 1.9), sharex=True, gridspec_kw={"height_ratios": [1, 1, 2.6]})
    ax_cos, ax_dist, ax = axes[:, 0]
    xs, ys = [], []
    for s in steps:
        seg = interp[interp["step"] == s].sort_values("alpha")
        xs += [*(s + seg["alpha"]), np.nan]  # NaN: no line across a gap between non-adjacent steps
        ys += [*seg["loss"], np.nan]
    ax.plot(xs, ys, color=color(0), lw=1.2, label="loss between θ_t and θ_t+1")
    marker = "o" if len(steps) <= MARKERS_UP_TO else None
    # The valley rows are optional (a user may log the interpolation alone): floors and barriers then go.
    v = valley[valley["step"].isin(steps)].sort_values("step") if has(valley, "step") else valley
    if has(v, "floor"):
        ax.plot(v["step"] + v.get("argmin_alpha", 0.0), v["floor"], color=color(1), ls="--", lw=1.1, marker=marker,
                ms=3, label="valley floor")
    else:
        ax.text(0.01, 0.02, "valley floors and barriers not drawn: " + missing_column("valley", "floor").replace("\n", " "),
                transform=ax.transAxes, ha="left", va="bottom", fontsize=7.5, color="#6b7280")
    crossed = v[v["barrier"] == 1] if has(v, "barrier") else v.iloc[0:0]
    if len(crossed):
        tops = interp[interp["step"].isin(crossed["step"])].sort_values("loss").groupby("step").tail(1)
        ax.scatter(tops["step"] + tops["alpha"], tops["loss"], marker="^", color=color(3), s=28, zorder=3,
                   label=f"barrier crossed ({len(crossed)})")
    ax.set_ylabel("training loss")
    ax.set_xlabel("iteration t  (segment θ_t → θ_t+1)")
    ax.legend(loc="upper right")
    # The train row of step t+1 holds g_t (the gradient that moved θ_t) and ‖θ_t+1 − θ₀‖.
    if has(tr, "step", "grad_cosine_prev"):
        grads = tr[(tr["step"] > steps[0]) & (tr["step"] <= steps[-1] + 1)]
        ax_cos.plot(grads["step"] - 1, grads["grad_cosine_prev"], color=color(2), lw=1.1, marker=marker, ms=2.5)
        ax_cos.axhline(0, color="#6b7280", lw=0.8)
    else:
        no_data(ax_cos, missing_column("train", "grad_cosine_prev").replace("\n", " "), clear=False)
    if has(tr, "step", "param_distance"):
        iterates = tr[(tr["step"] >= steps[0]) & (tr["step"] <= steps[-1] + 1)]
        ax_dist.plot(iterates["step"], iterates["param_distance"], color=color(4), lw=1.3)
    else:
        no_data(ax_dist, missing_column("train", "param_distance").replace("\n", " "), clear=False)
    ax_cos.set_ylabel("cos(g_t−1, g_t)")
    ax_dist.set_ylabel("‖θ_t − θ₀‖")
    epochs = sorted(v["epoch"].unique()) if "epoch" in v else []
    where = f"epoch {int(epochs[0])}" if len(epochs) == 1 else f"steps {int(steps[0])}–{int(steps[-1])}"
    title(fig, f"The walk: loss interpolated between consecutive iterates ({where})", store.path.name)
    return save(fig, path)


def walk(store: RunStore, out_dir: Path) -> list[Path]:
    """One walk plot per block of consecutive interpolated steps: the interpolated loss with the valley
    floors joined by a dashed line and barrier crossings marked, under the consecutive-gradient cosine
    and the distance from initialisation."""
    interp, valley = store.table("interpolation"), store.table("valley")
    steps = np.sort(interp["step"].unique())
    blocks = _blocks(steps)
    return [_walk(store, interp, valley, b, out_dir / (f"walk_{i + 1}.png" if len(blocks) > 1 else "walk.png"))
            for i, b in enumerate(blocks)]


# ------------------------------------------------------------------------------- across runs of a sweep

_COSINE = "cos(g_t−1, g_t)"


def cosine_curves(view: SweepView, out_dir: Path) -> list[Path]:
    """Consecutive-gradient cosine and distance from init over training, for several batch sizes at fixed
    lr and for several lrs at fixed batch size (Fig. 4)."""
    curves = [Curve("train", "grad_cosine_prev", f"{_COSINE} vs S", smooth=True, vary="optimizer.batch_size"),
              Curve("train", "grad_cosine_prev", f"{_COSINE} vs η", smooth=True, vary="optimizer.lr"),
              Curve("train", "param_distance", "‖θ − θ₀‖ vs S", vary="optimizer.batch_size"),
              Curve("train", "param_distance", "‖θ − θ₀‖ vs η", vary="optimizer.lr")]
    return [compare(view, curves, out_dir / "cosine_curves.png", "Consecutive-gradient cosine and distance", ncols=2)]


def gd_vs_noise(view: SweepView, out_dir: Path) -> list[Path]:
    """GD, GD with isotropic noise and SGD: training loss, validation accuracy, cosine, distance and the
    final parameter norm (Fig. 5)."""
    curves = [Curve("epoch", "train_loss", "training loss", logy=True), Curve("epoch", "val_acc", "validation accuracy"),
              Curve("train", "grad_cosine_prev", _COSINE, smooth=True),
              Curve("train", "param_distance", "‖θ − θ₀‖"),
              Curve("epoch", "param_norm", "final ‖θ‖", final=True)]
    return [compare(view, curves, out_dir / "gd_vs_noise.png", "GD, GD + isotropic noise and SGD")]


def schedules(view: SweepView, out_dir: Path) -> list[Path]:
    """Learning-rate schedules: the lr, training loss and validation accuracy per schedule (Fig. 6)."""
    curves = [Curve("train", "lr", "learning rate"), Curve("epoch", "train_loss", "training loss", logy=True),
              Curve("epoch", "val_acc", "validation accuracy")]
    return [compare(view, curves, out_dir / "schedules.png", "Learning-rate schedules")]
