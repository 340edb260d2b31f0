"""Verdicts on the walk's geometry beyond the two papers (issue 13): the rotation of the top-K Hessian
subspace between measurements and the classes of the interpolated steps (descend / cross / climb).

Both papers assume the sharpest directions change slowly (Jastrzebski et al. restrict SGD to them for
whole epochs; the warm-started tracker relies on it), and Xing et al. read the walk as bouncing across
the valley floor. The numbers come from the raw ``rotation`` and ``valley`` tables (each step's class),
not from the per-epoch ``step_classes`` summary, so the claim and the probe's own counting are separate.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sgdscope.claims._common import ClaimResult, Runs, _Run, load_runs
from sgdscope.tables import has


def rotation_numbers(run: _Run, after_epoch: int = 2) -> dict[str, float]:
    """Median over the rotation measurements of epochs > ``after_epoch`` of the smallest (θ₁) and the largest
    (θ_K) principal angle to the previous measurement, in degrees, and the last overlap with the reference."""
    rot = run.store.table("rotation")
    if not has(rot, "step", "epoch", "index", "angle_prev_deg"):
        return {"θ1 median (°)": math.nan, "θK median (°)": math.nan, "final overlap_ref": math.nan, "K": math.nan}
    k = int(rot["index"].max())
    late = rot[(rot["epoch"] > after_epoch) & rot["angle_prev_deg"].notna()]
    first, last = late[late["index"] == 1], late[late["index"] == k]
    final = rot[rot["step"] == rot["step"].max()]
    return {
        "θ1 median (°)": float(first["angle_prev_deg"].median()) if len(first) else math.nan,
        "θK median (°)": float(last["angle_prev_deg"].median()) if len(last) else math.nan,
        "final overlap_ref": float(final["overlap_ref"].iloc[0]) if len(final) else math.nan,
        "K": float(k),
    }


def class_numbers(run: _Run) -> dict[str, float]:
    """From the per-segment classes in ``valley``: the share of crossings in the first interpolated epoch,
    the largest excess of climbs over crossings in any interpolated epoch, and each class's mean η·λ₁ (NaN where the
    class has no step with a λ₁)."""
    va = run.store.table("valley")
    if not has(va, "epoch", "step_class"):
        return {"cross share, first epoch": math.nan, "max climbs − crosses": math.nan}
    first = va[va["epoch"] == va["epoch"].min()]
    counts = va.groupby("epoch")["step_class"].value_counts().unstack(fill_value=0)
    cross = counts.get("cross", pd.Series(0, index=counts.index)).to_numpy(float)
    climb = counts.get("climb", pd.Series(0, index=counts.index)).to_numpy(float)
    out = {
        "cross share, first epoch": float((first["step_class"] == "cross").mean()),
        "max climbs − crosses": float((climb - cross).max()),
    }
    for cls in ("descend", "cross", "climb"):
        el = va.loc[va["step_class"] == cls, "eta_lambda1"] if "eta_lambda1" in va else pd.Series(dtype=float)
        el = el[np.isfinite(el)]
        out[f"η·λ₁ {cls}"] = float(el.mean()) if len(el) else math.nan
    return out


def walk_geometry(runs: Runs, theta1_max: float = 10.0, thetak_max: float = 45.0, after_epoch: int = 2,
                  cross_share: float = 0.5) -> ClaimResult:
    """Held iff, in every run, (1) after the first ``after_epoch`` epochs the top-K subspace turns slowly:
    the median smallest principal angle between consecutive measurements is below ``theta1_max``° and the
    median largest below ``thetak_max``°; (2) crossings of the valley floor dominate the first interpolated
    epoch (share > ``cross_share``) and (3) no interpolated epoch has more climbs than crossings.
    Soft: the classes order by η·λ₁ as on a quadratic (mean η·λ₁ of descents < crossings < climbs)."""
    rows = []
    for r in load_runs(runs):
        rows.append({"run": r.label, **rotation_numbers(r, after_epoch), **class_numbers(r)})
    df = pd.DataFrame(rows).set_index("run")
    checks = {
        f"top-K turns slowly after epoch {after_epoch}: median θ1 < {theta1_max:g}°":
            bool((df["θ1 median (°)"] < theta1_max).all()),
        f"... and median θK < {thetak_max:g}°": bool((df["θK median (°)"] < thetak_max).all()),
        f"crossings dominate the first interpolated epoch (> {cross_share:.0%})":
            bool((df["cross share, first epoch"] > cross_share).all()),
        "no epoch climbs more often than it crosses": bool((df["max climbs − crosses"] <= 0).all()),
    }
    order = (df["η·λ₁ descend"] < df["η·λ₁ cross"]) & (df["η·λ₁ cross"] < df["η·λ₁ climb"])
    soft_name = "classes ordered by η·λ₁ as on a quadratic (descend < cross < climb)"
    checks[soft_name] = bool(order.all())
    notes = []
    if df[["η·λ₁ descend", "η·λ₁ cross", "η·λ₁ climb"]].isna().any().any():
        notes.append("a class without steps (or without λ₁) has NaN η·λ₁: the ordering check then fails")
    return ClaimResult("walk-geometry", "the top-K subspace turns slowly after the first epochs, and SGD's steps "
                       "mostly cross the valley floor rather than climb its walls", df, checks, {soft_name}, notes)
