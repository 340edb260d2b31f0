"""Verdicts on the measurements of issue 13 that look at other operators than the Hessian and at the
landscape around an iterate: Gauss–Newton and empirical Fisher against the Hessian (``ggn-fisher``) and the
2-D loss slice with the projected trajectory (``loss-slice``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sgdscope.claims._common import ClaimResult, Runs, load_runs
from sgdscope.summaries.curvature_ops import lambda1_by_curvature
from sgdscope.summaries.slices import slice_basin
from sgdscope.tables import has


def late_half(lam: pd.Series) -> pd.Series:
    """The measurements of the last half of the measured steps (the later ⌈n/2⌉)."""
    return lam.iloc[len(lam) // 2 :]


def ggn_fisher(runs: Runs, tol: float = 0.10) -> ClaimResult:
    """Held iff (1) every run followed the same trajectory (identical per-step batch losses: a probe never
    perturbs training, so the runs differ only in the measured operator) and (2) λ₁(G) is within ``tol`` of
    λ₁(H) at every measured step of the last half of training. Soft: λ₁(F) within ``tol`` of λ₁(H) there too
    (the empirical Fisher is not expected to track the Hessian; Kunstner et al. 2019).

    Numbers per run: its operator, λ₁ at the last step, its max, its mean over the late half, and the late
    half's mean and largest deviation of λ₁/λ₁(H) from 1 (the Hessian run of the sweep as reference)."""
    loaded = load_runs(runs)
    lams, losses, rows = {}, {}, []
    for r in loaded:
        for curv, lam in lambda1_by_curvature(r.store.table("eigen")).items():
            lams[curv] = lam
        tr = r.store.table("train")
        losses[r.label] = tr["batch_loss"].to_numpy() if has(tr, "batch_loss") else np.array([])
    h = lams.get("hessian")
    for curv, lam in lams.items():
        late = late_half(lam)
        ratio = late / h.reindex(late.index) if h is not None else pd.Series(dtype=float)
        rows.append({"curvature": curv, "λ₁ final": float(lam.iloc[-1]), "λ₁ max": float(lam.max()),
                     "λ₁ late mean": float(late.mean()),
                     "late ratio to H (mean)": float(ratio.mean()) if len(ratio) else math.nan,
                     "late max |ratio − 1|": float((ratio - 1).abs().max()) if len(ratio) else math.nan,
                     "late steps": len(late)})
    df = pd.DataFrame(rows).set_index("curvature") if rows else pd.DataFrame()
    ref = next(iter(losses.values()), np.array([]))
    same = len(losses) > 1 and len(ref) > 0 and all(np.array_equal(ref, v) for v in losses.values())
    checks = {"every run followed the same trajectory (identical batch losses)": bool(same)}
    for curv in ("ggn", "fisher"):
        if curv in df.index and h is not None:
            worst = df.loc[curv, "late max |ratio − 1|"]
            checks[f"λ₁({curv}) within {tol:.0%} of λ₁(H) over the late half"] = bool(worst <= tol)
    soft = {k for k in checks if "fisher" in k}
    notes = [] if h is not None else ["no run measured the Hessian: the ratios are undefined"]
    claim = f"λ₁ of the Gauss–Newton matrix tracks λ₁ of the Hessian within {tol:.0%} late in training"
    return ClaimResult("ggn-fisher", claim, df, checks, soft, notes)


def loss_slice(runs: Runs, late: float = 0.5) -> ClaimResult:
    """Held iff, in every run, at the last measured step (1) θ_t sits in a closed basin of its 2-D slice (the
    loss on the whole edge of the grid is above L(θ_t): :func:`sgdscope.tables.slice_basin` depth > 0) and
    (2) the late iterates (kept snapshots from the last ``late`` share of the steps) project inside the slice
    (|a|, |b| ≤ span), so the basin drawn is the one they travelled in. Soft: the plane holds most of their
    displacement (median off-plane share ‖residual‖/‖θ_s − θ_t‖ < 0.5), which random planes in a
    high-dimensional space are not expected to do.

    Numbers per run: its directions, the step, L(θ_t), the slice's floor, the edge's minimum, the depth, the
    share of late iterates inside the span and their median off-plane share."""
    rows = []
    for r in load_runs(runs):
        sl, path = r.store.table("slice2d"), r.store.table("slice2d_path")
        b = slice_basin(sl)
        if not b:
            continue
        p = path[path["step"] == b["step"]] if has(path, "step", "snapshot_step", "a", "b") else path.iloc[:0]
        last_step = int(r.store.table("train")["step"].max()) if len(r.store.table("train")) else b["step"]
        lp = p[(p["snapshot_step"] >= (1 - late) * last_step) & (p["distance"] > 0)]
        inside = ((lp["a"].abs() <= b["span"]) & (lp["b"].abs() <= b["span"])).mean() if len(lp) else math.nan
        off = (lp["residual"] / lp["distance"]).median() if len(lp) else math.nan
        rows.append({"directions": ", ".join(sorted(set(sl["directions"]))) if "directions" in sl else "?",
                     "step": b["step"], "L(θ_t)": b["centre"], "slice min": b["min"], "edge min": b["boundary_min"],
                     "depth": b["depth"], "late iterates": len(lp), "late inside span": float(inside),
                     "late off-plane share (median)": float(off)})
    df = pd.DataFrame(rows).set_index("directions") if rows else pd.DataFrame()
    ok = bool(len(df))
    col = (lambda c: df[c]) if ok else (lambda c: pd.Series(dtype=float))
    checks = {
        "θ_t in a closed basin of the last slice (edge min > L(θ_t)) in every run":
            ok and bool((col("depth") > 0).all()),
        "the late iterates project inside the slice in every run": ok and bool((col("late inside span") == 1).all()),
        "the plane holds most of the late displacement (off-plane share < 0.5)":
            ok and bool((col("late off-plane share (median)") < 0.5).all()),
    }
    soft = {"the plane holds most of the late displacement (off-plane share < 0.5)"}
    return ClaimResult("loss-slice", "the trajectory's late iterates lie in a basin of the 2-D slice around the last "
                       "iterate", df, checks, soft)
