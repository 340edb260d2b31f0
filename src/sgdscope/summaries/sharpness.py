"""Report lines of the ``batch_sharpness`` and ``preconditioned_sharpness`` probes: each stability
quantity as a fraction of its threshold, mean (and max) over the late half of the measured steps."""

from __future__ import annotations

from sgdscope.summaries.gradient_noise import late
from sgdscope.tables import has


def sharpness_numbers(store) -> dict[str, float]:
    """Late-half means of batch_sharpness/threshold and η·λ₁/(η·threshold) (table batch_sharpness) and of
    λ_max(P⁻¹H)/threshold, with its max (table preconditioned_sharpness); keys absent without the table."""
    out: dict[str, float] = {}
    bs = store.table("batch_sharpness")
    if has(bs, "step", "batch_sharpness", "lambda_max", "threshold"):
        b = late(bs)
        out["batch_ratio"] = float((b["batch_sharpness"] / b["threshold"]).mean())
        out["full_ratio"] = float((b["lambda_max"] / b["threshold"]).mean())
    ps = store.table("preconditioned_sharpness")
    if has(ps, "step", "ratio"):
        p = late(ps)
        out["pre_ratio"], out["pre_max"] = float(p["ratio"].mean()), float(p["ratio"].max())
        out["threshold"] = float(p["threshold"].iloc[-1]) if "threshold" in p else float("nan")
    return out


def rows(store) -> list[tuple[str, str, float, str]]:
    n = sharpness_numbers(store)
    out = []
    if "batch_ratio" in n:
        out += [("stability", "batch sharpness / SGD threshold (late mean)", n["batch_ratio"],
                 "threshold (2+2β)/η; 1 = at the edge of stochastic stability"),
                ("stability", "full-batch λ₁ / SGD threshold (late mean)", n["full_ratio"], "GD's η·λ₁/2")]
    if "pre_ratio" in n:
        out += [("stability", "λ_max(P⁻¹H) / threshold (late mean)", n["pre_ratio"],
                 f"threshold {n['threshold']:.4g}; max {n['pre_max']:.3g}")]
    return out


__all__ = ["rows", "sharpness_numbers"]
