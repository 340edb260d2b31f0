"""Report rows of the ``step_classes`` table: the share of interpolated steps in each class, with η·λ₁."""

from __future__ import annotations

import math

from sgdscope.summaries import Row
from sgdscope.tables import has

CLASSES = ("descend", "cross", "climb")


def rows(store) -> list[Row]:
    """Per class: its share of every classified step, and the class's mean η·λ₁ (steps with a λ₁)."""
    sc = store.table("step_classes")
    if not has(sc, "epoch", "n_steps"):
        return []
    total = float(sc["n_steps"].sum())
    out: list[Row] = []
    for cls in CLASSES:
        n = f"n_{cls}"
        if n not in sc or not total:
            continue
        el = f"eta_lambda1_{cls}"
        weights = sc[n].to_numpy(float)
        detail = f"{int(weights.sum())} of {int(total)} steps in {len(sc)} epochs"
        if el in sc:
            vals = sc[el].to_numpy(float)
            ok = ~(vals != vals) & (weights > 0)
            if ok.any():
                mean = float((vals[ok] * weights[ok]).sum() / weights[ok].sum())
                detail += f"; mean η·λ₁ {mean:.3g}" if not math.isnan(mean) else ""
        out.append(("step classes", f"share of steps that {cls}" + (" the floor" if cls == "cross" else ""),
                    float(weights.sum() / total), detail))
    return out
