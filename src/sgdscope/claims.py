"""Verdicts on the papers' claims, one function per bundled experiment (recipe), read from run stores.

Each function takes the runs of one recipe — a sweep directory (``sgdscope sweep``), a single run
directory, a list of ``(overrides, run_dir)`` pairs or a mapping ``{label: run_dir}`` — and returns a
:class:`ClaimResult`: the numbers that test the claim (a DataFrame, one row per run or per grid value),
the individual checks, and the verdict. A run's settings are read from its own resolved ``config.yaml``,
so the overrides only label it.

The numbers reuse :mod:`sgdscope.tables` (peak λ₁, Table 1, barrier and height tables, cosine, distance);
the thresholds that turn them into a verdict are stated in each function's docstring. Checks listed in
``ClaimResult.soft`` are reported but do not decide the verdict (parts of a claim that DEFINITIONS.md
records as not reproducing at toy scale, or secondary observations).

>>> # r = sharpest_lr_sweep("/tmp/recipes/sharpest-lr-sweep-cpu"); print(r.verdict); print(r.numbers)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from sgdscope.store import RunStore
from sgdscope.tables import (
    LAST_POINTS,
    Runs,
    as_runs,
    barriers_per_epoch,
    best_val_row,
    final_distance,
    heights_per_epoch,
    jastrzebski_table1,
    lambda1,
    last_points,
    mean_cosine,
    peak_lambda,
)



# ------------------------------------------------------------------------------------------ results


@dataclass
class ClaimResult:
    """The outcome of testing one claim: ``numbers`` (DataFrame), ``checks`` ({name: passed}), and ``held``
    (every check not in ``soft`` passed and there was something to check)."""

    experiment: str
    claim: str
    numbers: pd.DataFrame
    checks: dict[str, bool]
    soft: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        hard = [v for k, v in self.checks.items() if k not in self.soft]
        return bool(hard) and all(hard)

    @property
    def verdict(self) -> str:
        return "held" if self.held else "did not hold"

    def summary(self) -> str:
        """A few lines: the verdict, each check, the notes."""
        lines = [f"{self.experiment}: {self.verdict} — {self.claim}"]
        for k, v in self.checks.items():
            lines.append(f"  [{'x' if v else ' '}] {k}{' (soft)' if k in self.soft else ''}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _Run:
    label: str
    store: RunStore
    config: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def state(self) -> str:
        return str(self.store.status().get("state", "?"))


def load_runs(runs: Runs) -> list[_Run]:
    """The runs of a recipe from any form :func:`sgdscope.tables.as_runs` accepts (runs never started are
    skipped)."""
    return [_Run(label, store, store.config()) for label, store in as_runs(runs).items()]


def _monotone(values: Sequence[float], increasing: bool, strict: bool = True) -> bool:
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or np.isnan(v).any():
        return False
    d = np.diff(v) if increasing else -np.diff(v)
    return bool((d > 0).all() if strict else (d >= 0).all())


def _final_epoch(run: _Run) -> pd.Series | None:
    ep = run.store.table("epoch")
    return ep.iloc[-1] if len(ep) else None


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
    if len(d):
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
    if len(km):
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
    if len(al):
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
    if len(ep):
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
    from collections import Counter

    from sgdscope.sweepview import is_sweep, open_sweep

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


# ------------------------------------------------------------------------------------- Xing: Figs. 1/2


def _walk_numbers(run: _Run, last: int = 50) -> dict[str, float]:
    tr = run.store.table("train")
    va = run.store.table("valley")
    cos = tr["grad_cosine_prev"] if len(tr) else pd.Series(dtype=float)
    return {
        "cos mean": mean_cosine(run.store),
        f"cos last {last}": float(cos.tail(last).mean()) if len(cos) else math.nan,
        "distance": final_distance(run.store),
        "mean height": float(va["height"].mean()) if len(va) else math.nan,
        "barriers": int(va["barrier"].sum()) if len(va) else 0,
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
    total = {r.label: int(r.store.table("valley")["barrier"].sum()) if n[r.label] else 0 for r in loaded}
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
                     "train loss": float(last["train_loss"]) if last is not None else math.nan,
                     "val acc": float(last["val_acc"]) if last is not None else math.nan,
                     "param norm": float(last["param_norm"]) if last is not None else math.nan,
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
        best = best_val_row(ep)
        rows.append({"schedule": r.get("schedule.name"), "final train loss": float(ep["train_loss"].iloc[-1]),
                     "final val acc": float(ep["val_acc"].iloc[-1]), "best val acc": float(best["val_acc"]),
                     "test acc @ best val": float(best["test_acc"]), "final test acc": float(ep["test_acc"].iloc[-1])})
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


# ------------------------------------------------------------------------------------------ registry

CLAIMS: dict[str, Callable[..., ClaimResult]] = {
    "sharpest-lr-sweep": sharpest_lr_sweep,
    "sharpest-batch-sweep": sharpest_batch_sweep,
    "bowl-alpha-step": bowl_alpha_step,
    "subspace-variants": subspace_variants,
    "subspace-gamma": subspace_gamma,
    "nsgd-table1": nsgd_table1,
    "walk-gd-vs-sgd": walk_gd_vs_sgd,
    "valley-height-vs-lr": valley_height_vs_lr,
    "barriers-per-epoch": barriers_per_epoch_claim,
    "cosine-vs-batch-and-lr": cosine_vs_batch_and_lr,
    "isotropic-noise": isotropic_noise,
    "lr-schedules": lr_schedules,
}


def experiment_of(recipe: str) -> str:
    """``sharpest-lr-sweep-cpu`` → ``sharpest-lr-sweep``."""
    for suffix in ("-cpu", "-paper"):
        if recipe.endswith(suffix):
            return recipe[: -len(suffix)]
    return recipe


def check(recipe: str, runs: Runs, **kw: Any) -> ClaimResult:
    """The claim of ``recipe`` (a bundled recipe or experiment name) tested on ``runs``."""
    from sgdscope.errors import ConfigError

    name = experiment_of(recipe)
    if name not in CLAIMS:
        raise ConfigError(f"claims: no claim for {recipe!r}; known: {', '.join(CLAIMS)}")
    return CLAIMS[name](runs, **kw)
