"""Top-K Hessian eigenpairs along the trajectory, warm-started from the previous measurement.

The :class:`EigenTracker` owns the Hessian operator on the run's fixed measurement subset and the last
eigenvectors. Every consumer (the ``eigen`` probe, the direction and α-step probes, Nudged-SGD's subspace)
asks it for the eigenpairs at the current step, so one solve serves them all and each solve starts from
the previous vectors: along a trajectory the top eigenspace moves slowly, which is what makes the warm
start pay.
"""

from __future__ import annotations

from typing import Any, Optional

from sgdscope.curvature import EigenResult, HessianOperator, frobenius_topk, top_eigenpairs
from sgdscope.probes.base import Context, Probe, Rows, StepInfo


class EigenTracker:
    """Computes and caches the top-``k`` eigenpairs per step, warm-starting each solve."""

    def __init__(self, ctx: Context, k: int, which: str = "LA", tol: float = 1e-3, max_hvps: int = 500) -> None:
        n = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
        if k > n:
            from sgdscope.errors import ConfigError

            raise ConfigError(f"probes.eigen.k: {k} is larger than the number of parameters ({n})")
        self.ctx, self.k, self.which, self.tol, self.max_hvps = ctx, k, which, tol, max_hvps
        self.vectors = None
        self._cache: Optional[tuple[int, EigenResult]] = None

    def operator(self) -> HessianOperator:
        ctx = self.ctx
        return HessianOperator(
            ctx.model, ctx.loss_fn, ctx.measure_batches, bn_policy=ctx.cfg.measure.bn_policy,
            weight_decay=ctx.l2_in_measurements, include_l2=ctx.l2_in_measurements > 0,
        )

    def get(self, step: int, k: Optional[int] = None) -> EigenResult:
        """The top-``max(k, self.k)`` eigenpairs at ``step`` (solved once per step, then cached)."""
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        res = top_eigenpairs(
            self.operator(), k=max(k or 0, self.k), which=self.which, tol=self.tol, max_hvps=self.max_hvps,
            init=self.vectors, generator=self.ctx.generator("eigen-init", step),
        )
        self.vectors = res.vectors
        self._cache = (step, res)
        return res

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": self.vectors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        v = state.get("vectors")
        self.vectors = v.to(self.ctx.device) if v is not None else None
        self._cache = None


class EigenProbe(Probe):
    """Rows of ``eigen`` (one per eigenpair) and ``curvature`` (‖H‖_F ≈ √Σλ_i² over the top K)."""

    name = "eigen"

    def measure(self, info: StepInfo) -> Rows:
        res = self.ctx.tracker.get(info.step, self.pcfg.k)
        k = self.pcfg.k
        policy = self.ctx.cfg.measure.bn_policy
        base = {"step": info.step, "epoch": info.epoch}
        rows = [
            {
                **base, "index": i + 1, "value": float(res.values[i]), "residual": float(res.residuals[i]),
                "n_hvps": res.n_hvps, "converged": int(res.converged), "which": res.which,
                "subset_size": sum(len(y) for _, y in self.ctx.measure_batches), "bn_policy": policy,
                "includes_l2": int(self.ctx.l2_in_measurements > 0),
            }
            for i in range(k)
        ]
        curv = {**base, "frobenius_topk": frobenius_topk(res.values[:k]), "lambda_max": float(res.values[0]), "k": k}
        if self.pcfg.save_vectors and self.ctx.save_tensors is not None:
            self.ctx.save_tensors(f"eigen_step{info.step:08d}", {"values": res.values[:k], "vectors": res.vectors[:k]})
        return {"eigen": rows, "curvature": [curv]}
