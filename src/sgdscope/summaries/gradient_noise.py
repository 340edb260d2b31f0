"""Report lines of the ``gradient_noise`` probe: how far σᵢ²/λᵢ varies across the top eigendirections,
how much of the gradient noise lies in the top-K Hessian subspace (against a random subspace), and
tr(C)/tr(H); each a mean over the late half of the measured steps."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sgdscope.tables import has


def late(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the last half of the measured steps (the last ⌈n/2⌉ of n)."""
    steps = sorted(df["step"].unique())
    return df[df["step"].isin(steps[len(steps) // 2:])]


def ratio_spread(gn: pd.DataFrame) -> pd.Series:
    """Per step: max_i(σᵢ²/λᵢ) / min_i(σᵢ²/λᵢ) over the eigenpairs with a positive ratio (1 = constant in i)."""
    pos = gn[gn["ratio"] > 0]
    g = pos.groupby("step")["ratio"]
    return (g.max() / g.min())[g.count() > 1]


def noise_numbers(store) -> dict[str, float] | None:
    """The late-half numbers: median ratio spread, median σᵢ²/λᵢ, mean overlap, its chance level and the
    mean tr(C)/tr(H); None when the run lacks the probe's tables."""
    gn, st = store.table("gradient_noise"), store.table("gradient_noise_step")
    if not has(gn, "step", "ratio") or not has(st, "step", "overlap", "overlap_chance", "trace_ratio"):
        return None
    gn, st = late(gn), late(st)
    spread = ratio_spread(gn)
    return {
        "spread": float(spread.median()) if len(spread) else float("nan"),
        "ratio": float(gn["ratio"].median()),
        "overlap": float(st["overlap"].mean()),
        "chance": float(st["overlap_chance"].mean()),
        "trace_ratio": float(st["trace_ratio"].mean()),
        "steps": float(st["step"].nunique()),
    }


def rows(store) -> list[tuple[str, str, float, str]]:
    n = noise_numbers(store)
    if n is None:
        return []
    k = "over the late half ({:.0f} measured steps)".format(n["steps"])
    return [
        ("gradient noise", "σᵢ²/λᵢ spread (max/min over i, median)", n["spread"], f"1 = constant in i; {k}"),
        ("gradient noise", "median σᵢ²/λᵢ", n["ratio"], k),
        ("gradient noise", "overlap of top noise directions with top-K", n["overlap"],
         f"a random subspace gives {n['chance']:.3g} (K/p); {k}"),
        ("gradient noise", "tr(C)/tr(H)", n["trace_ratio"], f"C of a training-size minibatch; {k}"),
    ]


__all__ = ["late", "noise_numbers", "ratio_spread", "rows"]
