"""Report line of the eigen probe's ``curvature`` option: which operator's λ₁ the run tracked, and its last
value (the Hessian's own lines are in the papers' ``curvature`` section)."""

from __future__ import annotations

from sgdscope.tables import CURVATURE_NAMES as NAMES
from sgdscope.tables import lambda1_by_curvature

Row = tuple[str, str, float, str]


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
