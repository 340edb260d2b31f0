"""Rows of ``eigen`` (one per eigenpair) and ``curvature`` (‖H‖_F ≈ √Σλ_i² over the top K)."""

from __future__ import annotations

import math

from sgdscope.curvature import frobenius_topk
from sgdscope.measure.probes.base import Probe, Rows, StepInfo


class EigenProbe(Probe):
    """The tracked top-K eigenpairs at each due step, with their diagnostics (residual, error bound, HVPs)
    and the operator they belong to (``curvature``: hessian, ggn or fisher)."""

    name = "eigen"
    tables = ("eigen", "curvature")

    def measure(self, info: StepInfo) -> Rows:
        env, k = self.env, self.opts.k
        res = env.tracker.get(info.step, k)
        bounds = getattr(res, "error_bounds", None)
        base = {"step": info.step, "epoch": info.epoch}
        rows = [
            {
                **base, "index": i + 1, "value": float(res.values[i]), "residual": float(res.residuals[i]),
                "error_bound": float(bounds[i]) if bounds is not None else math.nan,
                "n_hvps": res.n_hvps, "converged": int(res.converged), "which": res.which,
                "subset_size": env.measure_size, "bn_policy": env.bn_policy, "includes_l2": int(env.l2 > 0),
                "curvature": env.tracker.curvature,
            }
            for i in range(k)
        ]
        curv = {**base, "frobenius_topk": frobenius_topk(res.values[:k]), "lambda_max": float(res.values[0]), "k": k,
                "curvature": env.tracker.curvature}
        if self.opts.save_vectors and env.save_tensors is not None:
            env.save_tensors(f"eigen_step{info.step:08d}", {"values": res.values[:k], "vectors": res.vectors[:k]})
        return {"eigen": rows, "curvature": [curv]}
