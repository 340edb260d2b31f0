"""The top eigenvalue of the Hessian, the Gauss–Newton matrix and the empirical Fisher over training, on one
axis: across the runs of a sweep over ``probes.eigen.curvature`` (one operator per run, all on one
trajectory, since no probe perturbs training), or of any runs whose eigen table has a ``curvature`` column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sgdscope.plots._common import caveat, color, no_data, save, subplots, title
from sgdscope.sweepview import SweepView, label_for
from sgdscope.summaries.curvature_ops import NAMES, lambda1_by_curvature

ORDER = ("hessian", "ggn", "fisher")


def curvature_kinds(view: SweepView, out_dir: Path) -> list[Path]:
    """Left: λ₁ of each operator over training (log scale), one line per run and operator. Right: λ₁(G)/λ₁(H)
    and λ₁(F)/λ₁(H) at the steps both were measured, for runs that differ only in the operator."""
    fig, axes = subplots(1, 2, panel=(5.0, 3.4))
    ax, ax_r = axes[0]
    others = [k for k in view.varying if k != "probes.eigen.curvature"]
    groups: dict[str, dict[str, pd.Series]] = {}
    for m in view.started():
        for curv, lam in lambda1_by_curvature(m.store.table("eigen")).items():
            groups.setdefault(label_for(m.params, others), {})[curv] = lam
    if not groups:
        no_data(ax, "no eigen rows in any run (enable probe 'eigen')")
        no_data(ax_r, "")
        title(fig, "Top eigenvalue of H, G and F", view.path.name)
        return [save(fig, out_dir / "curvature_kinds.png")]
    styles = ["-", "--", ":", "-."]
    for gi, (label, lams) in enumerate(groups.items()):
        for curv in sorted(lams, key=lambda c: ORDER.index(c) if c in ORDER else 9):
            lam = lams[curv]
            ci = ORDER.index(curv) if curv in ORDER else 3
            name = NAMES.get(curv, curv) + (f", {label}" if label else "")
            wide = curv == "hessian"  # under G where they coincide: drawn wider so both stay visible
            ax.plot(lam.index, lam.to_numpy(), color=color(ci), ls=styles[gi % 4], marker="o", ms=3.5 if wide else 2.2,
                    lw=3.2 if wide else 1.5, alpha=0.55 if wide else 1.0, label=name)
            if curv != "hessian" and "hessian" in lams:
                h = lams["hessian"]
                both = lam.index.intersection(h.index)
                ax_r.plot(both, lam.loc[both].to_numpy() / h.loc[both].to_numpy(), color=color(ci), ls=styles[gi % 4],
                          marker="o", ms=2.2, label=f"λ₁({curv.upper() if curv == 'ggn' else 'F'}) / λ₁(H)"
                          + (f", {label}" if label else ""))
    v = np.concatenate([s.to_numpy() for g in groups.values() for s in g.values()])
    if (v > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("λ₁")
    ax.legend(fontsize=7.5)
    if ax_r.lines:
        ax_r.axhline(1.0, color="#111827", lw=0.9)
        for b in (0.9, 1.1):
            ax_r.axhline(b, color="#9ca3af", lw=0.8, ls="--")
        ax_r.set_xlabel("step")
        ax_r.set_ylabel("ratio to λ₁(H)")
        ax_r.legend(fontsize=7.5)
        caveat(ax_r, "dashed: ±10%")
    else:
        no_data(ax_r, "no run pair measures H and another operator at the same settings")
    title(fig, "Top eigenvalue of H, G and F along one trajectory", view.path.name)
    return [save(fig, out_dir / "curvature_kinds.png")]
