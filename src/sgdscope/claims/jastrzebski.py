"""Verdicts on the claims of Jastrzebski et al. (2019), the sharpest directions: the peak of λ₁ against η
and S (Figs. 2/3), the bowl and α-steps along e₁ (Fig. 4), the subspace variants and γ (Fig. 5) and
Nudged-SGD's Table 1."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from sgdscope.claims._common import ClaimResult, Runs, _monotone, _Run, load_runs
from sgdscope.sweepview import is_sweep, open_sweep
from sgdscope.tables import LAST_POINTS, has, jastrzebski_table1, lambda1, last_points, peak_lambda

# ------------------------------------------------------------------------------ Jastrzebski: Figs. 2/3


def _peak_sweep(runs: Runs, key: str, symbol: str, smaller_earlier_when: str, experiment: str,
                claim: str) -> ClaimResult:
    rows = []
    for r in load_runs(runs):
        pk = peak_lambda(r.store)
        rows.append({symbol: r.get(key), "peak λ₁": pk["peak"], "t90 epoch": pk["t90_epoch"],
                     "t90 step": pk["t90_step"], "peak epoch": pk["peak_epoch"], "raw max λ₁": pk["raw_max"],
                     "final λ₁": pk["final"], "state": r.state})
    df = pd.DataFrame(rows).sort_values(symbol).reset_index(drop=True)
    # the claim: along the growing axis the peak is smaller and earlier ("increasing": along growing S it is larger, later)
    up = smaller_earlier_when == "decreasing"
    checks = {
        f"peak λ₁ {'increases' if up else 'decreases'} with {symbol}": _monotone(df["peak λ₁"], increasing=up),
        f"time to 90% of peak {'grows' if up else 'shrinks'} with {symbol}": _monotone(df["t90 epoch"], increasing=up, strict=False),
    }
    return ClaimResult(experiment, claim, df, checks, notes=[
        "peak = max of the 5-point smoothed λ₁ trace; time = first epoch the smoothed trace reaches 90% of it "
        "(epochs of the run's epoch_size, i.e. examples seen)"])


def sharpest_lr_sweep(runs: Runs) -> ClaimResult:
    """Fig. 2/3, lr sweep: held iff the smoothed peak of λ₁ strictly decreases with η and the time to 90% of
    the peak does not increase with η."""
    return _peak_sweep(runs, "optimizer.lr", "η", "increasing", "sharpest-lr-sweep",
                       "a larger η gives a smaller, earlier peak of λ₁")


def sharpest_batch_sweep(runs: Runs) -> ClaimResult:
    """Fig. 2/3, batch sweep: held iff the smoothed peak of λ₁ strictly increases with S and the time to 90%
    of the peak (in epochs, i.e. examples seen) does not decrease with S."""
    return _peak_sweep(runs, "optimizer.batch_size", "S", "decreasing", "sharpest-batch-sweep",
                       "a smaller S gives a smaller, earlier peak of λ₁")


# ----------------------------------------------------------------------------------- Jastrzebski: Fig. 4


def bowl_alpha_step(runs: Runs, last: int = LAST_POINTS, kmin_range: tuple[float, float] = (0.5, 8.0),
                    random_fraction: float = 0.25) -> ClaimResult:
    """Fig. 4, from the last ``last`` logged points of one run (several runs: the first).

    Checks: the bowl — along e_1 L(θ ± k·Δθ̄·e_1) > L(θ) for |k| ≥ 2 at ≥ 90% of the points; k_min —
    ``kmin_range[0] ≤ k_min(1%) < k_min(10%) ≤ kmin_range[1]`` (means of the points where the bowl closed,
    the paper's "of order 1-6"); α-steps along e_1 — mean relative change > 0 for every α > 1 and < 0 for every
    α < 1; the random direction — its largest |change| is below ``random_fraction`` × the largest along e_1.
    Soft: e_3/e_5 flatter than e_1 (larger k_min(10%)).
    """
    run = load_runs(runs)[0]
    checks: dict[str, bool] = {}
    rows: list[dict[str, Any]] = []
    d = run.store.table("direction")
    if has(d, "step", "eigen_index", "k", "loss"):
        d = last_points(d, last)
        e1 = d[d["eigen_index"] == 1]
        l0 = e1[e1["k"] == 0].set_index("step")["loss"]
        far = e1[e1["k"].abs() >= 2]
        above = (far["loss"].to_numpy() > l0.reindex(far["step"]).to_numpy())
        frac = float(above.mean()) if len(above) else math.nan
        rows.append({"quantity": "bowl: share of |k|≥2 points above L(θ), e1", "value": frac})
        checks["bowl along e1 (L(±k) > L(0) for |k| ≥ 2 at ≥ 90% of points)"] = frac >= 0.9
    km = run.store.table("k_min")
    kmean: dict[tuple[int, float], float] = {}
    if has(km, "step", "eigen_index", "threshold", "k_min"):
        km = last_points(km, last)
        for (i, th), g in km.groupby(["eigen_index", "threshold"]):
            kmean[(int(i), float(th))] = float(g["k_min"].mean())
            rows.append({"quantity": f"k_min e{int(i)} {th:.0%}", "value": float(g["k_min"].mean()),
                         "detail": f"closed at {int(g['k_min'].notna().sum())}/{len(g)} points"})
        k1, k10 = kmean.get((1, 0.01), math.nan), kmean.get((1, 0.1), math.nan)
        lo, hi = kmin_range
        checks[f"{lo:g} ≤ k_min(1%) < k_min(10%) ≤ {hi:g} along e1"] = bool(lo <= k1 < k10 <= hi)
        others = [kmean[(i, 0.1)] for (i, th) in kmean if i > 1 and th == 0.1]
        if others and not math.isnan(k10):
            checks["e3/e5 flatter than e1 (larger k_min(10%) or bowl not closed)"] = all(
                math.isnan(o) or o > k10 for o in others)
    al = run.store.table("alpha_step")
    if has(al, "step", "direction", "alpha", "relative_change"):
        al = last_points(al, last)
        rel = al.groupby(["direction", "alpha"])["relative_change"].mean()
        for (dname, a), v in rel.items():
            rows.append({"quantity": f"α-step {dname} α={a:g} (% of L)", "value": 100 * float(v)})
        e1 = rel.get("e1", pd.Series(dtype=float))
        if len(e1):
            checks["α > 1 raises the loss along e1"] = bool((e1[e1.index > 1] > 0).all()) and bool((e1.index > 1).any())
            checks["α < 1 lowers the loss along e1"] = bool((e1[e1.index < 1] < 0).all()) and bool((e1.index < 1).any())
        if "random" in rel.index.get_level_values(0) and len(e1):
            rnd = rel["random"]
            checks[f"random direction ≈ 0 (max |Δ| < {random_fraction:g} × max along e1)"] = bool(
                rnd.abs().max() < random_fraction * e1.abs().max())
    soft = {k for k in checks if k.startswith("e3/e5")}
    return ClaimResult("bowl-alpha-step", "bowl along e1 with k_min(1%) < k_min(10%) of order 1-6; α>1 raises, "
                       "α<1 lowers the loss; random direction ≈ 0", pd.DataFrame(rows), checks, soft,
                       notes=[f"means over the last {last} logged points of {run.label}"])


# ----------------------------------------------------------------------------------- Jastrzebski: Fig. 5


def _variant_numbers(run: _Run, tail: int = 5) -> dict[str, float]:
    """λ₁ and training loss where the variant starts (``optimizer.nudge_from``) and at the end (mean of
    the last ``tail`` measurements)."""
    start = int(run.get("optimizer.nudge_from", 0) or 0)
    lam = lambda1(run.store)
    ep = run.store.table("epoch")
    out = {"λ₁ start": math.nan, "λ₁ end": math.nan, "loss start": math.nan, "loss end": math.nan}
    if len(lam):
        before = lam[lam["step"] <= start]
        out["λ₁ start"] = float(before["value"].iloc[-1]) if len(before) else float(lam["value"].iloc[0])
        out["λ₁ end"] = float(lam["value"].tail(tail).mean())
    if has(ep, "step", "train_loss"):
        before = ep[ep["step"] <= start]
        out["loss start"] = float(before["train_loss"].iloc[-1]) if len(before) else math.nan
        out["loss end"] = float(ep["train_loss"].tail(tail).mean())
    out["steps"] = float(lam["step"].max() - start) if len(lam) else math.nan
    return out


def _variant_name(run: _Run) -> str:
    if run.get("optimizer.name") != "nsgd":
        return "SGD"
    mode, frozen, gamma = run.get("optimizer.mode"), bool(run.get("optimizer.freeze_subspace")), run.get("optimizer.gamma")
    if mode == "fixed":
        mode, frozen = "scale", True
    if mode == "scale":
        return "SGD" if gamma == 1 else f"γ={gamma:g}" + (" (constant e1)" if frozen else "")
    name = {"only": "SGD top", "remove": "SGD no top"}[mode]
    return name.replace(" top", " constant top") if frozen else name


def subspace_variants(runs: Runs) -> ClaimResult:
    """Fig. 5 left. From the shared start point (``nudge_from``) to the end (mean of the last 5 λ₁ and loss
    measurements): held iff SGD top ends with λ₁ below its start and below SGD's end, and SGD no top ends
    with λ₁ above its start and above SGD's end. Soft: SGD no top lowers the loss; SGD constant top moves
    λ₁ by less than 25% (the paper: neither loss nor λ₁ changes much)."""
    rows = []
    for r in load_runs(runs):
        rows.append({"variant": _variant_name(r), **_variant_numbers(r), "state": r.state})
    df = pd.DataFrame(rows).drop_duplicates("variant").set_index("variant")
    checks: dict[str, bool] = {}
    sgd = df.loc["SGD"] if "SGD" in df.index else None
    if "SGD top" in df.index and sgd is not None:
        t = df.loc["SGD top"]
        checks["SGD top lowers λ₁ (below its start and below SGD's end)"] = bool(t["λ₁ end"] < t["λ₁ start"] and t["λ₁ end"] < sgd["λ₁ end"])
    if "SGD no top" in df.index and sgd is not None:
        t = df.loc["SGD no top"]
        checks["SGD no top raises λ₁ (above its start and above SGD's end)"] = bool(t["λ₁ end"] > t["λ₁ start"] and t["λ₁ end"] > sgd["λ₁ end"])
        checks["SGD no top lowers the loss"] = bool(t["loss end"] < t["loss start"])
    if "SGD constant top" in df.index:
        t = df.loc["SGD constant top"]
        checks["SGD constant top changes λ₁ by < 25%"] = bool(abs(t["λ₁ end"] / t["λ₁ start"] - 1) < 0.25)
    soft = {"SGD no top lowers the loss", "SGD constant top changes λ₁ by < 25%"}
    return ClaimResult("subspace-variants", "SGD top lowers λ₁, SGD no top raises it", df, checks, soft)


def subspace_gamma(runs: Runs) -> ClaimResult:
    """Fig. 5 right. Held iff every γ < 1 ends with λ₁ above SGD's (γ=1) end and every γ > 1 below it.
    Soft: λ₁ at the end decreases monotonically with γ; every γ lowers the loss from the start point."""
    rows = []
    for r in load_runs(runs):
        rows.append({"γ": float(r.get("optimizer.gamma")), **_variant_numbers(r), "state": r.state})
    df = pd.DataFrame(rows).sort_values("γ").set_index("γ")
    checks: dict[str, bool] = {}
    if 1.0 in df.index:
        base = df.loc[1.0, "λ₁ end"]
        lo, hi = df[df.index < 1], df[df.index > 1]
        if len(lo):
            checks["γ < 1 ends sharper than SGD (λ₁)"] = bool((lo["λ₁ end"] > base).all())
        if len(hi):
            checks["γ > 1 ends flatter than SGD (λ₁)"] = bool((hi["λ₁ end"] < base).all())
    checks["λ₁ at the end decreases with γ"] = _monotone(df["λ₁ end"], increasing=False)
    checks["every γ lowers the loss"] = bool((df["loss end"] < df["loss start"]).all())
    soft = {"λ₁ at the end decreases with γ", "every γ lowers the loss"}
    return ClaimResult("subspace-gamma", "γ<1 raises λ₁, γ>1 lowers it, all reduce the loss", df, checks, soft)


# ------------------------------------------------------------------------------ Jastrzebski: Table 1


def _table_lr(runs: Runs, meta: pd.DataFrame) -> float:
    """The η of the table: a sweep's base config lr where it is among the runs' η, else the η shared by
    most γ≠1 runs (ties: the first seen)."""
    if isinstance(runs, (str, Path)) and is_sweep(runs):
        base = (open_sweep(runs).base.get("optimizer") or {}).get("lr")
        if base is not None and float(base) in set(meta["η"]):
            return float(base)
    nudged = meta[meta["γ"] != 1.0]
    pool = nudged if len(nudged) else meta
    return float(Counter(pool["η"]).most_common(1)[0][0])


def nsgd_table1(runs: Runs, lr: float | None = None, acc_tolerance: float = 0.02) -> ClaimResult:
    """Table 1 (from :func:`sgdscope.tables.jastrzebski_table1`), one row per (γ, η).

    At the table's η (``lr``; default: the η shared by most γ≠1 runs): held iff every γ < 1 run ends sharper
    than the γ=1 run (‖H‖_F, mean over the last 10 epochs) with test accuracy (at best validation) no more
    than ``acc_tolerance`` below it. Soft: γ > 1 ends flatter; the same holds at every other η of the grid.
    A run that diverged (state failed) keeps its row with the state shown and fails its checks.
    """
    loaded = load_runs(runs)
    table = jastrzebski_table1({r.label: r.store for r in loaded})
    meta = pd.DataFrame([{"run": r.label, "γ": float(r.get("optimizer.gamma", 1.0)) if r.get("optimizer.name") == "nsgd" else 1.0,
                          "η": float(r.get("optimizer.lr")), "state": r.state} for r in loaded]).set_index("run")
    df = meta.join(table, how="left").reset_index().sort_values(["η", "γ"]).set_index(["η", "γ"])
    if lr is None:
        lr = _table_lr(runs, meta)
    col_h, col_acc = "‖H‖_F last-10", "test acc"
    checks: dict[str, bool] = {}
    soft: set[str] = set()
    for eta in sorted(set(df.index.get_level_values(0))):
        sub = df.loc[eta]
        if 1.0 not in sub.index or col_h not in sub:
            continue
        base = sub.loc[1.0]
        tag = f" (η={eta:g})"
        lo, hi = sub[sub.index < 1], sub[sub.index > 1]
        if len(lo):
            k = "γ<1 ends sharper than γ=1 at similar test accuracy" + tag
            checks[k] = bool(((lo[col_h] > base[col_h]) & (lo[col_acc] >= base[col_acc] - acc_tolerance)).all())
            if not math.isclose(eta, lr):
                soft.add(k)
        if len(hi):
            k = "γ>1 ends flatter than γ=1" + tag
            checks[k] = bool((hi[col_h] < base[col_h]).all())
            soft.add(k)
    return ClaimResult("nsgd-table1", f"NSGD γ<1 reaches a sharper end point at similar accuracy (η={lr:g})",
                       df, checks, soft, notes=[f"similar accuracy: test acc at best val ≥ γ=1's − {acc_tolerance:g}"])

