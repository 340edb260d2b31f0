"""Figures of issue 13's noise and stability measurements: gradient noise against curvature, batch
sharpness, and preconditioned sharpness against its threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import cm, colors
from matplotlib.ticker import NullFormatter

from sgdscope.plots._common import color, missing_column, no_data, save, subplots, title
from sgdscope.store import RunStore
from sgdscope.tables import has, time_axis


def gradient_noise(store: RunStore, out_dir: Path) -> list[Path]:
    """σ_i² against λ_i (log-log, coloured by time, with lines of constant σ²/λ), σ_i²/λ_i over training
    per i, the overlap of the top-m noise directions with the top-K Hessian subspace against its chance
    level K/p, and tr(C)/tr(H) (bars: the Hutchinson standard error of tr(H), propagated)."""
    gn, st, t = store.table("gradient_noise"), store.table("gradient_noise_step"), time_axis(store)
    fig, axes = subplots(1, 4, panel=(3.6, 3.1))
    ax = axes[0, 0]
    ok = gn[(gn["eigenvalue"] > 0) & (gn["variance"] > 0)]
    if len(ok):
        norm = colors.Normalize(float(ok["step"].min()), float(max(ok["step"].max(), ok["step"].min() + 1)))
        ax.scatter(ok["eigenvalue"], ok["variance"], c=ok["step"], cmap="viridis", norm=norm, s=14)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short decade
        lo, hi = float(ok["eigenvalue"].min()), float(ok["eigenvalue"].max())
        grid = np.geomspace(lo, hi if hi > lo else lo * 10, 20)
        med = float(np.median(ok["ratio"]))
        ax.plot(grid, med * grid, color="#6b7280", ls="--", lw=1.0, label=f"σ² = {med:.3g}·λ (median ratio)")
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="step")
        ax.legend(fontsize=7)
    else:
        no_data(ax, "no positive (λᵢ, σᵢ²) pairs")
    ax.set_xlabel("λᵢ (Hessian)")
    ax.set_ylabel("σᵢ² = Var⟨g, eᵢ⟩")
    ax.set_title("noise against curvature")
    ax = axes[0, 1]
    for j, (i, g) in enumerate(gn.groupby("eigen_index")):
        ax.plot(t(g["step"]), g["ratio"], color=color(j), marker="o", ms=2.5, lw=1.2, label=f"e{int(i)}")
    ax.set_yscale("log") if (gn["ratio"] > 0).all() else None
    ax.set_title("σᵢ²/λᵢ")
    ax.set_xlabel(t.label)
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    if has(st, "overlap"):
        ax.plot(t(st["step"]), st["overlap"], color=color(0), marker="o", ms=2.5, label="‖U_CᵀV_H‖²_F / m")
        ax.plot(t(st["step"]), st["overlap_chance"], color="#dc2626", ls="--", lw=1.0, label="random subspace (K/p)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        no_data(ax, missing_column("gradient_noise_step", "overlap"))
    ax.set_title("noise directions in the top-K subspace")
    ax.set_xlabel(t.label)
    ax = axes[0, 3]
    if has(st, "trace_ratio", "trace_h_stderr", "trace_h"):
        err = (st["trace_ratio"] * st["trace_h_stderr"] / st["trace_h"].abs()).to_numpy(dtype=float)
        ax.errorbar(t(st["step"]), st["trace_ratio"], yerr=err, color=color(2), marker="o", ms=2.5, capsize=2)
    else:
        no_data(ax, missing_column("gradient_noise_step", "trace_ratio"))
    ax.set_title("tr(C) / tr(H)")
    ax.set_xlabel(t.label)
    title(fig, "Gradient noise against curvature (C: covariance of a training-size minibatch gradient)", store.path.name)
    return [save(fig, out_dir / "gradient_noise.png")]


def batch_sharpness(store: RunStore, out_dir: Path) -> list[Path]:
    """η·(batch sharpness) with its min-max band over the drawn batches, η·λ₁ of the full measurement set,
    and the threshold η·(2 + 2β)/η = 2 + 2β of SGD with momentum β."""
    bs, t = store.table("batch_sharpness"), time_axis(store)
    fig, axes = subplots(1, 1, panel=(8.0, 3.4))
    ax, x = axes[0, 0], t(bs["step"])
    ax.fill_between(x, bs["lr"] * bs["batch_sharpness_min"], bs["lr"] * bs["batch_sharpness_max"], color=color(0),
                    alpha=0.15, lw=0, label="min–max over batches")
    ax.plot(x, bs["lr_batch_sharpness"], color=color(0), marker="o", ms=2.5, label="η·(batch sharpness)")
    ax.plot(x, bs["lr_lambda_max"], color=color(1), marker="s", ms=2.5, label="η·λ₁ (full measurement set)")
    ax.plot(x, bs["lr"] * bs["threshold"], color="#dc2626", ls="--", lw=1.1, label="2 + 2β (SGD stability limit)")
    ax.set_xlabel(t.label)
    ax.set_ylabel("η × curvature")
    ax.legend(fontsize=7.5)
    title(fig, "Batch sharpness (mean λ_max of minibatch Hessians)", store.path.name)
    return [save(fig, out_dir / "batch_sharpness.png")]


def preconditioned_sharpness(store: RunStore, out_dir: Path) -> list[Path]:
    """λ_max(P⁻¹H) and H's own λ₁ over training against the optimizer's stability threshold, and their ratio."""
    ps, t = store.table("preconditioned_sharpness"), time_axis(store)
    fig, axes = subplots(1, 2, panel=(4.8, 3.2))
    ax, x = axes[0, 0], t(ps["step"])
    kind = str(ps["optimizer"].iloc[-1]) if "optimizer" in ps and len(ps) else "?"
    ax.plot(x, ps["preconditioned_sharpness"], color=color(0), marker="o", ms=2.5, label="λ_max(P⁻¹H)")
    ax.plot(x, ps["lambda_max"], color=color(1), marker="s", ms=2.5, label="λ₁(H)")
    thr = "(2+2β₁)/((1−β₁)η)" if kind == "adam" else "(2+2β)/η"
    ax.plot(x, ps["threshold"], color="#dc2626", ls="--", lw=1.1, label=f"threshold {thr}")
    if (ps[["preconditioned_sharpness", "lambda_max", "threshold"]] > 0).all().all():
        ax.set_yscale("log")
    ax.set_xlabel(t.label)
    ax.legend(fontsize=7.5)
    ax.set_title(f"{kind}: preconditioned sharpness")
    ax = axes[0, 1]
    ax.plot(x, ps["ratio"], color=color(0), marker="o", ms=2.5)
    ax.axhline(1.0, color="#dc2626", ls="--", lw=1.1)
    ax.set_xlabel(t.label)
    ax.set_title("λ_max(P⁻¹H) / threshold")
    title(fig, "λ_max(P⁻¹H) against its threshold (Cohen et al. 2022)", store.path.name)
    return [save(fig, out_dir / "preconditioned_sharpness.png")]
