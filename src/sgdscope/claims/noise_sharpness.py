"""Verdicts on two hypotheses of issue 13 that neither paper tested: gradient noise against curvature
(Xing et al. 2018, Appendix D, future work) and the stability thresholds of SGD and Adam (Cohen et al.
2022). The numbers are those of the report lines (:mod:`sgdscope.summaries.gradient_noise`,
:mod:`sgdscope.summaries.sharpness`): late-half means or medians over the measured steps."""

from __future__ import annotations

import math

import pandas as pd

from sgdscope.claims._common import ClaimResult, Runs, load_runs
from sgdscope.summaries.gradient_noise import noise_numbers
from sgdscope.summaries.sharpness import sharpness_numbers


def gradient_noise_claim(runs: Runs, spread_max: float = 3.0, above_chance: float = 10.0) -> ClaimResult:
    """Hypothesis: the minibatch-gradient noise along the top Hessian eigenvectors is proportional to their
    curvature (σᵢ² ∝ λᵢ, as for a Fisher ≈ Hessian near a minimum), and it is concentrated in the top
    subspace. Held iff, in every run, over the late half of the measured steps: the median over steps of
    max_i(σᵢ²/λᵢ)/min_i(σᵢ²/λᵢ) is ≤ ``spread_max`` ("roughly constant across i") and the mean overlap of the
    top-m noise directions with the top-K Hessian subspace is ≥ ``above_chance`` × its chance level K/p.
    Soft: tr(C)/tr(H) < 1 (the noise is smaller than the curvature on the whole)."""
    rows = []
    for r in load_runs(runs):
        n = noise_numbers(r.store)
        if n is not None:
            rows.append({"run": r.label, "η": r.get("optimizer.lr"), "S": r.get("optimizer.batch_size"),
                         "ratio spread": n["spread"], "median ratio": n["ratio"], "overlap": n["overlap"],
                         "chance": n["chance"], "tr(C)/tr(H)": n["trace_ratio"]})
    df = pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()
    checks: dict[str, bool] = {}
    if len(df):
        checks[f"σᵢ²/λᵢ within a factor {spread_max:g} across i"] = bool((df["ratio spread"] <= spread_max).all())
        checks[f"overlap ≥ {above_chance:g}× chance"] = bool((df["overlap"] >= above_chance * df["chance"]).all())
        checks["tr(C)/tr(H) < 1"] = bool((df["tr(C)/tr(H)"] < 1).all())
    return ClaimResult("gradient-noise", "σᵢ²/λᵢ is roughly constant across the top eigendirections, and the noise "
                       "lies in the top-K Hessian subspace far above chance", df, checks, {"tr(C)/tr(H) < 1"})


def adaptive_sharpness(runs: Runs, band: tuple[float, float] = (0.8, 1.2)) -> ClaimResult:
    """Hypothesis (Cohen et al. 2022; for SGD, its stochastic form): training settles at the edge of
    stability of its own optimizer. Held iff, over the late half of the measured steps, every Adam run's mean
    λ_max(P⁻¹H)/((2+2β₁)/((1−β₁)η)) and every SGD run's mean batch sharpness/((2+2β)/η) lie in ``band``
    ("hovers at the threshold"). Soft: SGD's full-batch λ₁ stays below its threshold (η·λ₁ < 2 without
    momentum) while the batch sharpness is at it."""
    rows = []
    for r in load_runs(runs):
        n = sharpness_numbers(r.store)
        rows.append({"run": r.label, "optimizer": r.get("optimizer.name"), "η": r.get("optimizer.lr"),
                     "precond / threshold": n.get("pre_ratio", math.nan), "precond max": n.get("pre_max", math.nan),
                     "batch / threshold": n.get("batch_ratio", math.nan),
                     "λ₁ / threshold": n.get("full_ratio", math.nan)})
    df = pd.DataFrame(rows).set_index("run")
    lo, hi = band
    checks: dict[str, bool] = {}
    adam, sgd = df[df["optimizer"] == "adam"], df[df["optimizer"] != "adam"]
    if len(adam):
        v = adam["precond / threshold"]
        checks[f"Adam: λ_max(P⁻¹H) within [{lo:g}, {hi:g}] × 38/η"] = bool(((v >= lo) & (v <= hi)).all())
    if len(sgd):
        v = sgd["batch / threshold"]
        checks[f"SGD: batch sharpness within [{lo:g}, {hi:g}] × 2/η"] = bool(((v >= lo) & (v <= hi)).all())
        checks["SGD: full-batch λ₁ below its threshold"] = bool((sgd["λ₁ / threshold"] < 1).all())
    return ClaimResult("adaptive-sharpness", "each optimizer hovers at its own stability threshold: Adam's "
                       "preconditioned sharpness at 38/η, SGD's batch sharpness at 2/η", df, checks,
                       {"SGD: full-batch λ₁ below its threshold"})


__all__ = ["adaptive_sharpness", "gradient_noise_claim"]
