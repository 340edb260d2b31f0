"""Verdicts on the measurements of issue 13 that look at other operators than the Hessian and at the
landscape around an iterate: Gauss–Newton and empirical Fisher against the Hessian (``ggn-fisher``) and the
2-D loss slice with the projected trajectory (``loss-slice``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sgdscope.claims._common import ClaimResult, Runs, load_runs
from sgdscope.tables import has, lambda1_by_curvature


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
    for curv, soft_ in (("ggn", False), ("fisher", True)):
        if curv in df.index and h is not None:
            checks[f"λ₁({curv}) within {tol:.0%} of λ₁(H) over the late half"] = bool(df.loc[curv, "late max |ratio − 1|"] <= tol)
    soft = {k for k in checks if "fisher" in k}
    notes = [] if h is not None else ["no run measured the Hessian: the ratios are undefined"]
    return ClaimResult("ggn-fisher", f"λ₁ of the Gauss–Newton matrix tracks λ₁ of the Hessian within {tol:.0%} late "
                       "in training", df, checks, soft, notes)
