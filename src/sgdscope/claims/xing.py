"""Verdicts on the claims of Xing et al. (2018), the walk: the consecutive-gradient cosine of GD against SGD
(Figs. 1/2), heights and barriers (Tables 1, 2), cosine and distance against S and η (Fig. 4), isotropic
noise (Fig. 5) and learning-rate schedules (Fig. 6)."""

from __future__ import annotations

import math

import pandas as pd

from sgdscope.claims._common import ClaimResult, Runs, _final_epoch, _monotone, _Run, load_runs
from sgdscope.tables import (
    barriers_per_epoch,
    best_val_row,
    cell,
    final_distance,
    has,
    heights_per_epoch,
    mean_cosine,
)

# ------------------------------------------------------------------------------------- Xing: Figs. 1/2


def _walk_numbers(run: _Run, last: int = 50) -> dict[str, float]:
    tr = run.store.table("train")
    va = run.store.table("valley")
    cos = tr["grad_cosine_prev"] if has(tr, "grad_cosine_prev") else pd.Series(dtype=float)
    return {
        "cos mean": mean_cosine(run.store),
        f"cos last {last}": float(cos.tail(last).mean()) if len(cos) else math.nan,
        "distance": final_distance(run.store),
        "mean height": float(va["height"].mean()) if has(va, "height") else math.nan,
        "barriers": int(va["barrier"].sum()) if has(va, "barrier") else 0,
        "interpolated steps": len(va),
        "interior min share": float(va["interior_min"].mean()) if len(va) and "interior_min" in va else math.nan,
    }


def walk_gd_vs_sgd(runs: Runs, gd_max: float = -0.7, gap: float = 0.3, last: int = 50) -> ClaimResult:
    """Figs. 1/2. Held iff GD's mean consecutive-gradient cosine over the last ``last`` steps is ≤ ``gd_max``
    ("approaches −1") and SGD's is at least ``gap`` higher ("much less negative"). Soft: SGD travels farther
    from init than GD; most interpolations have an interior minimum (both)."""
    rows = []
    for r in load_runs(runs):
        rows.append({"optimizer": r.get("optimizer.name"), "η": r.get("optimizer.lr"), **_walk_numbers(r, last)})
    df = pd.DataFrame(rows).set_index("optimizer")
    c = f"cos last {last}"
    checks: dict[str, bool] = {}
    if "gd" in df.index:
        checks[f"GD cosine → −1 (last {last} ≤ {gd_max:g})"] = bool(df.loc["gd", c] <= gd_max)
    if "gd" in df.index and "sgd" in df.index:
        checks[f"SGD cosine much less negative (≥ GD + {gap:g})"] = bool(df.loc["sgd", c] >= df.loc["gd", c] + gap)
        checks["SGD travels farther than GD"] = bool(df.loc["sgd", "distance"] > df.loc["gd", "distance"])
    checks["interior minimum in most interpolations (> 50%)"] = bool((df["interior min share"] > 0.5).all())
    soft = {"SGD travels farther than GD", "interior minimum in most interpolations (> 50%)"}
    return ClaimResult("walk-gd-vs-sgd", "GD's consecutive cosine → −1 while SGD's is much less negative", df, checks, soft)


# ------------------------------------------------------------------------------------- Xing: Tables 1, 2


def valley_height_vs_lr(runs: Runs, share: float = 0.75) -> ClaimResult:
    """Table 2 (from :func:`sgdscope.tables.heights_per_epoch`): held iff the mean height increases with η
    (strictly, across every η of the grid) in at least ``share`` of the interpolated epochs. Soft: the height
    decreases from the first to the last interpolated epoch at every η."""
    loaded = load_runs(runs)
    h = heights_per_epoch({r.label: r.store for r in loaded})
    lrs = {r.label: float(r.get("optimizer.lr")) for r in loaded}
    h.index = [lrs[i] for i in h.index]
    h.index.name = "η"
    h = h.sort_index()
    mono = [_monotone(h[c], increasing=True) for c in h.columns]
    checks = {f"height increases with η in ≥ {share:.0%} of epochs ({sum(mono)}/{len(mono)})":
              bool(mono) and sum(mono) >= share * len(mono),
              "height decreases over training (first vs last epoch)": bool(len(h.columns) > 1 and (h.iloc[:, -1] < h.iloc[:, 0]).all())}
    soft = {"height decreases over training (first vs last epoch)"}
    return ClaimResult("valley-height-vs-lr", "a larger lr gives a larger height above the valley floor", h, checks, soft)


def barriers_per_epoch_claim(runs: Runs, late_share: float = 0.1) -> ClaimResult:
    """Table 1 (from :func:`sgdscope.tables.barriers_per_epoch`): held iff no barrier is crossed in the first
    interpolated epoch of any run, and at most ``late_share`` of all interpolated steps cross one."""
    loaded = load_runs(runs)
    b = barriers_per_epoch({r.label: r.store for r in loaded})
    n = {r.label: len(r.store.table("valley")) for r in loaded}
    total = {r.label: int(v["barrier"].sum()) if has(v := r.store.table("valley"), "barrier") else 0 for r in loaded}
    df = b.copy()
    df["interpolated steps"] = [n[i] for i in df.index]
    df["share crossed"] = [total[i] / n[i] if n[i] else math.nan for i in df.index]
    first = b.columns[0] if len(b.columns) else None
    checks = {
        f"no barrier crossed in {first}": bool(first is not None and (b[first].fillna(0) == 0).all()),
        f"≤ {late_share:.0%} of steps cross a barrier overall": bool(len(df) and (df["share crossed"] <= late_share).all()),
    }
    return ClaimResult("barriers-per-epoch", "barriers are almost never crossed early in training", df, checks)


# ------------------------------------------------------------------------------------------ Xing: Fig. 4


def cosine_vs_batch_and_lr(runs: Runs, lr_spread: float = 0.15) -> ClaimResult:
    """Fig. 4. Mean consecutive-gradient cosine and final distance per (S, η). Held iff at every η the
    cosine strictly decreases with S and the distance strictly decreases with S, and at every S the spread
    of the cosine over η is ≤ ``lr_spread`` and smaller than its spread over S at every η ("nearly
    unchanged"). DEFINITIONS.md §6 records that the lr part did not reproduce at toy scale; it still counts."""
    rows = []
    for r in load_runs(runs):
        rows.append({"S": int(r.get("optimizer.batch_size")), "η": float(r.get("optimizer.lr")),
                     "cos mean": mean_cosine(r.store), "distance": final_distance(r.store)})
    df = pd.DataFrame(rows).sort_values(["η", "S"]).set_index(["η", "S"])
    cos = df["cos mean"].unstack("S")   # rows η, columns S
    dist = df["distance"].unstack("S")
    checks: dict[str, bool] = {}
    if cos.shape[1] > 1:
        checks["larger S → more negative cosine (at every η)"] = all(_monotone(row, increasing=False) for _, row in cos.iterrows())
        checks["larger S → smaller distance (at every η)"] = all(_monotone(row, increasing=False) for _, row in dist.iterrows())
    if cos.shape[0] > 1:
        spread_lr = (cos.max(axis=0) - cos.min(axis=0))
        spread_s = (cos.max(axis=1) - cos.min(axis=1))
        checks[f"η leaves the cosine nearly unchanged (spread over η ≤ {lr_spread:g} and < spread over S)"] = bool(
            (spread_lr <= lr_spread).all() and (cos.shape[1] < 2 or spread_lr.max() < spread_s.min()))
    return ClaimResult("cosine-vs-batch-and-lr", "larger batch → more negative cosine and smaller distance; "
                       "lr leaves the cosine nearly unchanged", df, checks)


# ------------------------------------------------------------------------------------------ Xing: Fig. 5


def isotropic_noise(runs: Runs) -> ClaimResult:
    """Fig. 5. Against the noiseless GD run (noise_factor 0, or optimizer gd): held iff every noisy run ends
    with a higher training loss, a validation accuracy no higher, and a larger parameter norm. Soft: it
    also ends farther from init; an SGD run, if present, ends with the smallest norm."""
    rows = []
    for r in load_runs(runs):
        last = _final_epoch(r)
        name = r.get("optimizer.name")
        factor = float(r.get("optimizer.noise_factor", 0.0)) if name == "noisy_gd" else 0.0
        rows.append({"run": "SGD" if name == "sgd" else f"GD noise={factor:g}", "optimizer": name, "noise": factor,
                     "train loss": cell(last, "train_loss"), "val acc": cell(last, "val_acc"),
                     "param norm": cell(last, "param_norm"),
                     "distance": final_distance(r.store), "state": r.state})
    df = pd.DataFrame(rows).sort_values(["optimizer", "noise"]).set_index("run")
    gd = df[(df["optimizer"] != "sgd") & (df["noise"] == 0)]
    noisy = df[(df["optimizer"] != "sgd") & (df["noise"] > 0)]
    checks: dict[str, bool] = {}
    if len(gd) and len(noisy):
        g = gd.iloc[0]
        checks["noise raises the final training loss"] = bool((noisy["train loss"] > g["train loss"]).all())
        checks["noise does not raise validation accuracy"] = bool((noisy["val acc"] <= g["val acc"]).all())
        checks["noise ends at a larger parameter norm"] = bool((noisy["param norm"] > g["param norm"]).all())
        checks["noise ends farther from init"] = bool((noisy["distance"] > g["distance"]).all())
    sgd = df[df["optimizer"] == "sgd"]
    if len(sgd):
        checks["SGD ends with the smallest norm"] = bool(sgd["param norm"].min() <= df["param norm"].min())
    soft = {"noise ends farther from init", "SGD ends with the smallest norm"}
    return ClaimResult("isotropic-noise", "isotropic noise hurts GD and ends at larger parameter norms", df, checks, soft)


# ------------------------------------------------------------------------------------------ Xing: Fig. 6


def lr_schedules(runs: Runs, tolerance: float = 0.01) -> ClaimResult:
    """Fig. 6. Final and best validation accuracy per schedule. Held iff the better of CLR and trapezoid
    ends (final val acc) no more than ``tolerance`` below step annealing. Soft: trapezoid and CLR end within
    2·``tolerance`` of each other."""
    rows = []
    for r in load_runs(runs):
        ep = r.store.table("epoch")
        if not len(ep):
            continue
        best, final = best_val_row(ep), ep.iloc[-1]
        rows.append({"schedule": r.get("schedule.name"), "final train loss": cell(final, "train_loss"),
                     "final val acc": cell(final, "val_acc"), "best val acc": cell(best, "val_acc"),
                     "test acc @ best val": cell(best, "test_acc"), "final test acc": cell(final, "test_acc")})
    df = pd.DataFrame(rows).set_index("schedule")
    checks: dict[str, bool] = {}
    rising = [s for s in ("cyclic", "trapezoid") if s in df.index]
    if "step" in df.index and rising:
        checks[f"CLR/trapezoid ≥ step − {tolerance:g} (final val acc)"] = bool(
            df.loc[rising, "final val acc"].max() >= df.loc["step", "final val acc"] - tolerance)
    if len(rising) == 2:
        checks[f"trapezoid ≈ CLR (within {2 * tolerance:g})"] = bool(
            abs(df.loc["cyclic", "final val acc"] - df.loc["trapezoid", "final val acc"]) <= 2 * tolerance)
    return ClaimResult("lr-schedules", "CLR / trapezoid end at least as well as step annealing", df, checks,
                       {f"trapezoid ≈ CLR (within {2 * tolerance:g})"})

