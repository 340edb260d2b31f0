"""Report line of the eigen probe's ``curvature`` option: which operator's λ₁ the run tracked, and its last
value (the Hessian's own lines are in the papers' ``curvature`` section)."""

from __future__ import annotations

import pandas as pd

from sgdscope.tables import has

Row = tuple[str, str, float, str]

NAMES = {"hessian": "H (Hessian)", "ggn": "G (Gauss–Newton)", "fisher": "F (empirical Fisher)"}


def lambda1_by_curvature(eig: pd.DataFrame) -> dict[str, pd.Series]:
    """λ₁ per step (a Series indexed by step) for each operator of an eigen table (``probes.eigen.curvature``;
    a table without that column holds the Hessian's)."""
    if not has(eig, "step", "index", "value"):
        return {}
    eig = eig if "curvature" in eig else eig.assign(curvature="hessian")
    top = eig[eig["index"] == 1]
    return {str(c): g.groupby("step")["value"].mean().sort_index() for c, g in top.groupby("curvature")}


def rows(store) -> list[Row]:
    """One row per non-Hessian operator in the run's eigen table: λ₁ at the last measured step."""
    eig = store.table("eigen")
    if "curvature" not in eig:
        return []
    out: list[Row] = []
    for curv, lam in lambda1_by_curvature(eig).items():
        if curv == "hessian" or not len(lam):
            continue
        out.append(("curvature operator", f"final λ₁ of {NAMES.get(curv, curv)}", float(lam.iloc[-1]),
                    f"step {int(lam.index[-1])}; max {float(lam.max()):.4g} (probes.eigen.curvature: {curv})"))
    return out
