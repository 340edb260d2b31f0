"""Verdicts on three hypotheses of issue 13 that neither paper tested: gradient noise against curvature
(Xing et al. 2018, Appendix D, future work), and the stability thresholds of Adam (Cohen et al. 2022)
and of SGD's minibatches. The numbers are those of the report lines (:mod:`sgdscope.summaries.gradient_noise`,
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


def _sharpness_table(runs: Runs) -> pd.DataFrame:
    """One row per run: the late-half ratios of :func:`~sgdscope.summaries.sharpness.sharpness_numbers`."""
    rows = []
    for r in load_runs(runs):
        n = sharpness_numbers(r.store)
        rows.append({"run": r.label, "optimizer": r.get("optimizer.name"), "η": r.get("optimizer.lr"),
                     "precond / threshold": n.get("pre_ratio", math.nan), "precond max": n.get("pre_max", math.nan),
                     "batch / threshold": n.get("batch_ratio", math.nan),
                     "λ₁ / threshold": n.get("full_ratio", math.nan)})
    return pd.DataFrame(rows).set_index("run")


def _within(values: pd.Series, band: tuple[float, float]) -> bool:
    return bool(len(values)) and bool(((values >= band[0]) & (values <= band[1])).all())


def adaptive_sharpness(runs: Runs, band: tuple[float, float] = (0.8, 1.2)) -> ClaimResult:
    """Hypothesis (Cohen et al. 2022): Adam trains at the edge of stability of its preconditioned dynamics.
    Held iff, in every Adam run, the mean over the late half of the measured steps of
    λ_max(P⁻¹H)/((2+2β₁)/((1−β₁)η)) lies in ``band`` ("hovers at 38/η"). Soft: its largest value reaches
    the threshold (≥ ``band[0]``) at least once late."""
    df = _sharpness_table(runs)
    adam = df[df["optimizer"] == "adam"]
    lo, hi = band
    checks = {f"Adam: late mean λ_max(P⁻¹H) within [{lo:g}, {hi:g}] × threshold": _within(adam["precond / threshold"], band),
              "Adam: λ_max(P⁻¹H) reaches the threshold late": bool(len(adam)) and bool((adam["precond max"] >= lo).all())}
    return ClaimResult("adaptive-sharpness", "Adam's preconditioned sharpness λ_max(P⁻¹H) hovers at its stability "
                       "threshold (2+2β₁)/((1−β₁)η) = 38/η", df, checks, {"Adam: λ_max(P⁻¹H) reaches the threshold late"})


def batch_sharpness_claim(runs: Runs, band: tuple[float, float] = (0.8, 1.2)) -> ClaimResult:
    """Hypothesis (the stochastic counterpart of η·λ₁ < 2): SGD trains at the edge of stability of its
    minibatches. Held iff, in every SGD run, the mean over the late half of the measured steps of the batch
    sharpness/((2+2β)/η) lies in ``band``. Soft: the full-batch λ₁ stays below that threshold meanwhile
    (late mean ratio < 1), i.e. the minibatches, not the full loss, set the limit."""
    df = _sharpness_table(runs)
    sgd = df[df["optimizer"] != "adam"]
    lo, hi = band
    checks = {f"SGD: late mean batch sharpness within [{lo:g}, {hi:g}] × (2+2β)/η": _within(sgd["batch / threshold"], band),
              "SGD: full-batch λ₁ below the threshold": bool(len(sgd)) and bool((sgd["λ₁ / threshold"] < 1).all())}
    return ClaimResult("batch-sharpness", "SGD's batch sharpness (mean λ_max of minibatch Hessians) hovers at 2/η "
                       "while the full-batch λ₁ stays below it", df, checks, {"SGD: full-batch λ₁ below the threshold"})


__all__ = ["adaptive_sharpness", "batch_sharpness_claim", "gradient_noise_claim"]
