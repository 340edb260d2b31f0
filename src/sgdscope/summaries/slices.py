"""Report lines of the ``slice2d`` probe: whether θ_t sits in a closed basin of its last 2-D slice, and how much
of the trajectory's displacement the slice's plane holds."""

from __future__ import annotations

import math

import pandas as pd

from sgdscope.tables import has

Row = tuple[str, str, float, str]


def slice_basin(sl: pd.DataFrame, step: int | None = None) -> dict[str, float]:
    """The 2-D slice of ``step`` (the last measured one by default) read as a basin: ``step``, ``centre``
    L(θ_t) (a = b = 0), ``min`` (the slice's lowest loss), ``boundary_min`` (the lowest loss on the grid's
    edge, |a| or |b| = span), ``depth`` = boundary_min − centre (> 0: every path out of the slice climbs
    above L(θ_t): θ_t sits in a closed basin of the slice) and ``span``. Empty when there are no rows."""
    if not has(sl, "step", "a", "b", "loss") or not len(sl):
        return {}
    step = int(sl["step"].max()) if step is None else int(step)
    g = sl[sl["step"] == step]
    span = float(g["a"].abs().max())
    edge = (g["a"].abs() >= span * (1 - 1e-9)) | (g["b"].abs() >= span * (1 - 1e-9))
    centre = g.loc[(g["a"] == 0) & (g["b"] == 0), "loss"]
    c = float(centre.mean()) if len(centre) else math.nan
    return {"step": step, "centre": c, "min": float(g["loss"].min()), "boundary_min": float(g.loc[edge, "loss"].min()),
            "depth": float(g.loc[edge, "loss"].min()) - c, "span": span}


def rows(store) -> list[Row]:
    """The basin depth of the last slice, its centre and floor, and the median off-plane share of θ_s − θ_t."""
    sl = store.table("slice2d")
    b = slice_basin(sl)
    if not b:
        return []
    which = ", ".join(sorted(set(sl["directions"]))) if "directions" in sl else "?"
    out: list[Row] = [
        ("2-D slice", "basin depth (edge min − L(θ_t))", b["depth"],
         f"step {b['step']}, directions {which}, span ±{b['span']:g}; > 0: θ_t in a closed basin of the slice"),
        ("2-D slice", "L(θ_t) − slice min", b["centre"] - b["min"], f"L(θ_t) = {b['centre']:.4g}"),
    ]
    path = store.table("slice2d_path")
    if has(path, "step", "residual", "distance"):
        p = path[(path["step"] == b["step"]) & (path["distance"] > 0)]
        if len(p):
            share = (p["residual"] / p["distance"]).median()
            out.append(("2-D slice", "off-plane share of θ_s − θ_t (median)", float(share),
                        f"{len(p)} earlier iterates; 0: the plane holds the whole displacement"))
    return [r for r in out if not (isinstance(r[2], float) and math.isnan(r[2]))]
