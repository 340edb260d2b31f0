"""Figures of the walk's geometry beyond the two papers (issue 13): how fast the top-K eigenspace turns
(table ``rotation``) and how the interpolated steps descend, cross the valley floor or climb a wall
(tables ``step_classes`` and ``valley``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sgdscope.plots._common import caveat, color, missing_column, no_data, save, subplots, title
from sgdscope.store import RunStore
from sgdscope.tables import has

CLASS_COLORS = {"descend": 0, "cross": 1, "climb": 3, "flat": 7}


def rotation(store: RunStore, out_dir: Path) -> list[Path]:
    """Principal angles (degrees) between the top-K subspace and the previous measurement's, and against
    the reference measurement's, one line per angle index, with the overlaps ‖V_prevᵀV‖_F²/K below."""
    rot = store.table("rotation").sort_values(["step", "index"])
    fig, axes = subplots(1, 3, panel=(4.4, 3.2))
    ax_prev, ax_ref, ax_ov = axes[0]
    for i, g in rot.groupby("index"):
        kw = {"color": color(int(i) - 1), "lw": 1.2, "label": f"θ{int(i)}"}
        ax_prev.plot(g["step"], g["angle_prev_deg"], marker="o", ms=2.5, **kw)
        ax_ref.plot(g["step"], g["angle_ref_deg"], **kw)
    ax_prev.set_title("angles to the previous measurement")
    ax_ref.set_title("angles to the reference" + (f" (step {int(rot['ref_step'].max())})" if "ref_step" in rot else ""))
    for ax in (ax_prev, ax_ref):
        ax.set_ylabel("principal angle (°)")
        ax.set_xlabel("step")
        ax.set_ylim(0, 92)
        ax.axhline(90, color="#9ca3af", lw=0.8, ls=":")
    ax_prev.legend(loc="upper right", ncol=2, fontsize=7.5)
    first = rot.drop_duplicates("step")
    if has(first, "overlap_prev"):
        ax_ov.plot(first["step"], first["overlap_prev"], color=color(0), lw=1.3, label="with the previous")
        if "overlap_ref" in first:
            ax_ov.plot(first["step"], first["overlap_ref"], color=color(2), lw=1.3, label="with the reference")
        ax_ov.set_ylim(0, 1.02)
        ax_ov.legend(loc="center right", fontsize=7.5)
    else:
        no_data(ax_ov, missing_column("rotation", "overlap_prev").replace("\n", " "))
    ax_ov.set_title("subspace overlap ‖V_prevᵀV‖²_F / K")
    ax_ov.set_xlabel("step")
    if rot["step"].nunique() < 3:
        caveat(fig, "fewer than 3 measurements: no rotation to speak of")
    k = int(rot["index"].max())
    title(fig, f"Rotation of the top-{k} Hessian subspace", store.path.name)
    return [save(fig, out_dir / "rotation.png")]


def step_classes(store: RunStore, out_dir: Path) -> list[Path]:
    """Per epoch, the share of interpolated steps that descend, cross the valley floor or climb a wall
    (stacked bars), and the mean η·λ₁ of each class against the quadratic's boundaries 1 and 2."""
    sc = store.table("step_classes").sort_values("epoch")
    fig, axes = subplots(1, 2, panel=(5.2, 3.3))
    ax_n, ax_el = axes[0]
    x = np.arange(len(sc))
    bottom = np.zeros(len(sc))
    for cls, ci in CLASS_COLORS.items():
        col = f"n_{cls}"
        if col not in sc:
            continue
        share = sc[col].to_numpy(float) / sc["n_steps"].to_numpy(float)
        ax_n.bar(x, share, bottom=bottom, color=color(ci), label=cls, width=0.7)
        bottom += share
    ax_n.set_xticks(x, [str(int(e)) for e in sc["epoch"]])
    ax_n.set_xlabel("epoch")
    ax_n.set_ylabel("share of measured steps")
    ax_n.set_ylim(0, 1)
    ax_n.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7.5)  # beside the bars, never on them
    drawn = False
    for cls in ("descend", "cross", "climb"):
        col = f"eta_lambda1_{cls}"
        if col in sc and sc[col].notna().any():
            ax_el.plot(sc["epoch"], sc[col], marker="o", ms=4, color=color(CLASS_COLORS[cls]), label=cls)
            drawn = True
    if drawn:
        for level in (1, 2):
            ax_el.axhline(level, color="#6b7280", lw=0.8, ls="--")
        ax_el.set_ylabel("mean η·λ₁ of the class")
        ax_el.set_xlabel("epoch")
        ax_el.legend(loc="best", fontsize=7.5)
        src = sc["lambda1_source"].iloc[-1] if "lambda1_source" in sc else "last"
        ax_el.set_title(f"η·λ₁ (λ₁: {'solved per step' if src == 'solve' else 'last tracked solve'})")
    else:
        no_data(ax_el, "no λ₁ beside the steps: enable probe 'eigen' (or interpolation.lambda1: solve)")
    title(fig, "Step classes: descend, cross the valley floor, climb a wall", store.path.name)
    return [save(fig, out_dir / "step_classes.png")]
