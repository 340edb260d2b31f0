"""Figures of Jastrzebski et al. (2019): eigenvalue evolution (Figs. 1-2), the bowl along e₁ (Fig. 4 left,
Figs. 9-12), the α-step analysis (Fig. 4 right), k_min and gradient alignment of a run; the subspace
variants (Fig. 5) and Nudged-SGD per γ (Fig. 6) across the runs of a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from matplotlib import cm, colors

from sgdscope.plots._common import color, missing_column, no_data, save, subplots, title
from sgdscope.plots.curves import Curve, compare
from sgdscope.store import RunStore
from sgdscope.sweepview import SweepView
from sgdscope.tables import has, time_axis

# ---------------------------------------------------------------------------------------- eigenvalues


def _value_scale(ax, values: np.ndarray) -> None:
    """Log scale, as in the paper; symmetric-log when early negative eigenvalues would vanish from it."""
    v = values[np.isfinite(values)]
    if len(v) and (v > 0).all():
        ax.set_yscale("log")
    elif len(v):
        ax.set_yscale("symlog", linthresh=max(float(np.abs(v).max()) * 1e-3, 1e-8))


def _lr_at(store: RunStore, steps: pd.Series) -> np.ndarray:
    """The learning rate in force at each step (the config's η before the first update)."""
    tr = store.table("train")
    if has(tr, "step", "lr"):
        return np.interp(steps.to_numpy(dtype=float), tr["step"].to_numpy(dtype=float), tr["lr"].to_numpy(dtype=float))
    return np.full(len(steps), float((store.config().get("optimizer") or {}).get("lr", np.nan)))


def _eigen_panels(ax_top, ax_bottom, store: RunStore, eig: pd.DataFrame, x: Callable, xlabel: str) -> None:
    ks = sorted(eig["index"].unique())
    for i in ks:
        d = eig[eig["index"] == i]
        ax_top.plot(x(d["step"]), d["value"], color=color(i - 1), lw=1.7 if i == 1 else 1.1, marker="o", ms=2.5,
                    label=f"λ{i}" if len(ks) <= 10 else None)
    curv = store.table("curvature")
    if has(curv, "step", "frobenius_topk") and len(ks) > 1:
        curv = curv[curv["step"].isin(eig["step"])]
        ax_top.plot(x(curv["step"]), curv["frobenius_topk"], color="#111827", ls=":", lw=1.2, label="‖H‖_F (top-K)")
    _value_scale(ax_top, eig["value"].to_numpy(dtype=float))
    ax_top.set_ylabel("eigenvalue")
    l1 = eig[eig["index"] == 1]
    eta = _lr_at(store, l1["step"])
    if len(l1) and np.isfinite(eta).any():
        ax_bottom.plot(x(l1["step"]), eta * l1["value"].to_numpy(), color=color(0), marker="o", ms=2.5, label="η·λ₁")
        ax_bottom.axhline(2.0, color="#dc2626", ls="--", lw=1.1, label="2 (GD stability limit)")
        ax_bottom.set_ylabel("η·λ₁")
        ax_bottom.set_xlabel(xlabel)
    else:  # η unknown: neither a train.lr column nor a config optimizer.lr
        no_data(ax_bottom, "η·λ₁: " + missing_column("train", "lr") if len(l1) else "no λ₁ rows (index 1)", clear=False)


OPERATOR_NAMES = {"hessian": "Hessian", "ggn": "Gauss–Newton", "fisher": "Empirical Fisher"}


def eigenvalues(store: RunStore, out_dir: Path) -> list[Path]:
    """Top-K Hessian (or Gauss–Newton, or empirical Fisher: the run's ``curvature`` column) eigenvalues over training (log scale), ‖H‖_F, and η·λ₁ against 2.

    With a zoom schedule (``probes.eigen.first_steps``) a narrow left column shows the first steps at
    iteration resolution, as left of the bar in the paper's Fig. 2.
    """
    eig = store.table("eigen")
    zoom = int(((store.config().get("probes") or {}).get("eigen") or {}).get("first_steps") or 0)
    t = time_axis(store)
    early = eig[eig["step"] <= zoom] if zoom else eig.iloc[0:0]
    ncols = 2 if early["step"].nunique() > 1 else 1
    fig, axes = subplots(2, ncols, panel=(4.0 if ncols == 2 else 7.5, 2.7), sharey="row",
                         gridspec_kw={"width_ratios": [1, 2.4] if ncols == 2 else [1], "height_ratios": [1.6, 1]})
    if ncols == 2:
        _eigen_panels(axes[0, 0], axes[1, 0], store, early, lambda s: np.asarray(s, dtype=float), "step (zoom)")
        axes[0, 0].set_title(f"first {zoom} steps")
        axes[0, 1].set_title("whole run")
    _eigen_panels(axes[0, -1], axes[1, -1], store, eig, t, t.label)
    axes[0, -1].legend(ncols=2 if eig["index"].nunique() > 4 else 1)
    if axes[1, -1].get_legend_handles_labels()[0]:
        axes[1, -1].legend()
    which = eig["which"].iloc[0] if "which" in eig else "LA"
    # the eigen probe can track the Gauss–Newton matrix or the empirical Fisher instead (probes.eigen.curvature)
    operator = OPERATOR_NAMES.get(str(eig["curvature"].iloc[0]) if "curvature" in eig else "hessian", "Hessian")
    title(fig, f"{operator} eigenvalues along the trajectory (top-{eig['index'].max()}, {which})", store.path.name)
    return [save(fig, out_dir / "eigenvalues.png")]


# ------------------------------------------------------------------------------------------------ bowl


def _kpos(k: np.ndarray) -> np.ndarray:
    """Position of grid value k on a symmetric log axis, so that |k| ≤ 1 and |k| = 16 both stay visible."""
    return np.sign(k) * np.log2(1 + np.abs(k))


def _k_ticks(ax, ks: np.ndarray, axis: str = "x") -> None:
    shown = [k for k in ks if k == 0 or abs(k) in (1, 4, 16) or len(ks) <= 7]
    getattr(ax, f"set_{axis}ticks")(_kpos(np.asarray(shown, dtype=float)))
    getattr(ax, f"set_{axis}ticklabels")([f"{k:g}" for k in shown])


def _bowl(store: RunStore, d: pd.DataFrame, index: int, out_dir: Path) -> Path:
    t = time_axis(store)
    grid = d.pivot_table(index="step", columns="k", values="loss", aggfunc="mean").sort_index()
    ks = grid.columns.to_numpy(dtype=float)
    steps = grid.index.to_numpy(dtype=float)
    # A user's direction rows need not carry the eigenvalue: the surface is then one colour, no colour bar.
    coloured = "eigenvalue" in d and d["eigenvalue"].notna().any()
    lam = (d.groupby("step")["eigenvalue"].first().reindex(grid.index).to_numpy(dtype=float) if coloured
           else np.zeros(len(grid)))
    loss = grid.to_numpy(dtype=float)
    base = loss[:, [int(np.argmin(np.abs(ks)))]]
    fig, axes = subplots(1, 2, panel=(5.2, 4.0))
    axes[0, 0].remove()
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    X, Y = np.meshgrid(_kpos(ks), t(steps))
    logz = np.nanmax(loss) / max(np.nanmin(loss), 1e-12) > 30
    Z = np.log10(np.clip(loss, 1e-12, None)) if logz else loss
    norm = colors.Normalize(np.nanmin(lam), np.nanmax(lam) if np.nanmax(lam) > np.nanmin(lam) else np.nanmin(lam) + 1)
    cmap = cm.viridis
    if len(steps) > 1:
        ax3.plot_surface(X, Y, Z, facecolors=cmap(norm(np.repeat(lam[:, None], len(ks), axis=1))), shade=False,
                         linewidth=0.2, edgecolor="#ffffff55", antialiased=True)
    else:
        ax3.plot(X[0], Y[0], Z[0], color=cmap(norm(lam[0])))
    _k_ticks(ax3, ks)
    ax3.set_xlabel("k (typical steps)")
    ax3.set_ylabel(t.label)
    ax3.set_zlabel("log₁₀ loss" if logz else "loss", labelpad=8)
    ax3.view_init(elev=28, azim=-60)
    if coloured:
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax3, shrink=0.6, pad=0.16, label=f"λ{index}")
    ax3.set_title(f"loss along e{index}, coloured by λ{index}" if coloured else f"loss along e{index}")
    ax = axes[0, 1]
    ratio = loss / base
    mesh = ax.pcolormesh(_kpos(ks), t(steps), ratio, shading="nearest", cmap="magma",
                         norm=colors.LogNorm(vmin=max(np.nanmin(ratio), 1e-3), vmax=max(np.nanmax(ratio), 1.0001)))
    if len(steps) > 1:
        ax.contour(_kpos(ks), t(steps), ratio, levels=[1.01, 1.1], colors=["#e5e7eb", "#93c5fd"], linewidths=1.0)
    ax.grid(False)
    fig.colorbar(mesh, ax=ax, label="L(θ + k·Δθ̄·e) / L(θ)   (contours: +1%, +10%)")
    _k_ticks(ax, ks)
    ax.set_xlabel("k (typical steps)")
    ax.set_ylabel(t.label)
    ax.set_title("relative loss (heat map)")
    title(fig, f"The bowl along e{index}, in units of the typical SGD step", store.path.name)
    return save(fig, out_dir / f"bowl_e{index}.png")


def bowl(store: RunStore, out_dir: Path) -> list[Path]:
    """The loss along each measured eigenvector against k and time: a 3-D surface coloured by the
    eigenvalue, and a heat map of L(k)/L(0) with the 1% and 10% contours that define k_min."""
    d = store.table("direction")
    return [_bowl(store, d[d["eigen_index"] == i], int(i), out_dir) for i in sorted(d["eigen_index"].unique())]


# ------------------------------------------------------------------------- per-run grouped line figures


def _grouped_lines(store: RunStore, table: str, panels: list[tuple[str, pd.DataFrame, str]], line_col: str,
                   line_label: Callable, ylabel: str, heading: str, path: Path, scale: float = 1.0,
                   zero_line: bool = False) -> Path:
    """Panels of a run's long table: one panel per (title, rows, y column), one line per ``line_col`` value."""
    t = time_axis(store)
    fig, axes = subplots(1, len(panels), panel=(max(4.3, 7.5 / len(panels)), 3.1), sharey=True)
    for ax, (name, rows, y) in zip(axes.flat, panels):
        if not has(rows, y) or not rows[y].notna().any():
            # k_min, for one, is NaN wherever the loss never rose past the threshold on both sides
            no_data(ax, "no rows" if not len(rows) else missing_column(table, y) if y not in rows
                    else f"{table}.{y} is NaN at every logged step")
            ax.set_title(name)
            continue
        for j, (v, g) in enumerate(rows.groupby(line_col, sort=True)):
            g = g.groupby("step", as_index=False)[y].mean()
            ax.plot(t(g["step"]), scale * g[y], color=color(j), marker="o", ms=2.5, lw=1.3, label=line_label(v))
        if zero_line:
            ax.axhline(0, color="#6b7280", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel(t.label)
        ax.legend(fontsize=7.5)
    axes[0, 0].set_ylabel(ylabel)
    title(fig, heading, store.path.name)
    return save(fig, path)


def alpha_step(store: RunStore, out_dir: Path) -> list[Path]:
    """Relative loss change of a step of α·η along e_i alone, over training, per α; a random direction
    as the control panel (Fig. 4 right)."""
    al = store.table("alpha_step")
    order = sorted(al["eigen_index"].unique(), key=lambda i: (i == 0, i))
    panels = [(f"along e{i}" if i else "random direction (control)", al[al["eigen_index"] == i], "relative_change")
              for i in order]
    return [_grouped_lines(store, "alpha_step", panels, "alpha", lambda a: f"α = {a:g}", "loss change (% of L(θ))",
                           "Step length along the sharpest directions: E[L(θ − α·η·g̃ᵢ)] − L(θ)",
                           out_dir / "alpha_step.png", scale=100.0, zero_line=True)]


def k_min(store: RunStore, out_dir: Path) -> list[Path]:
    """k_min (bowl half-width in typical steps) over training, per threshold, per eigenvector."""
    km = store.table("k_min")
    panels = [(f"e{int(i)}", km[km["eigen_index"] == i], "k_min") for i in sorted(km["eigen_index"].unique())]
    return [_grouped_lines(store, "k_min", panels, "threshold", lambda th: f"+{th:.0%}", "k_min (typical steps)",
                           "k_min: smallest k at which the loss rises by the threshold on both sides",
                           out_dir / "k_min.png")]


def alignment(store: RunStore, out_dir: Path) -> list[Path]:
    """Cosine of the minibatch and of the full gradient with each top eigenvector, over training."""
    a = store.table("alignment")
    a = a.assign(**{c: a[c].abs() for c in ("cos_minibatch", "cos_full") if c in a})  # |cos|: the sign of e_i is arbitrary
    panels = [("minibatch gradient", a, "cos_minibatch"), ("full gradient", a, "cos_full")]
    return [_grouped_lines(store, "alignment", panels, "eigen_index", lambda i: f"e{int(i)}", "|cos(g, eᵢ)|",
                           "Alignment of the gradient with the sharpest directions", out_dir / "alignment.png")]


# ------------------------------------------------------------------------------- across runs of a sweep

_LAMBDA1 = Curve("eigen", "value", "λ₁", where={"index": 1}, logy=True)


def variants(view: SweepView, out_dir: Path) -> list[Path]:
    """Loss and λ₁ for each subspace variant / γ started from one checkpoint (Fig. 5 left and right)."""
    curves = [Curve("train", "batch_loss", "training loss (minibatch)", smooth=True), _LAMBDA1]
    return [compare(view, curves, out_dir / "variants.png", "SGD restricted to or away from the sharpest directions")]


def nsgd(view: SweepView, out_dir: Path) -> list[Path]:
    """Nudged-SGD per γ: training and validation accuracy, λ₁ and ‖H‖_F (Fig. 6)."""
    curves = [Curve("epoch", "train_acc", "training accuracy"), Curve("epoch", "val_acc", "validation accuracy"),
              _LAMBDA1, Curve("curvature", "frobenius_topk", "‖H‖_F (top-K)", logy=True)]
    return [compare(view, curves, out_dir / "nsgd.png", "Nudged-SGD: accuracy and sharpness per γ", ncols=2)]
