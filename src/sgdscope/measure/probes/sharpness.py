"""Batch sharpness and preconditioned sharpness: the stability quantities of stochastic and of adaptive
training, beside the full-batch λ₁ of the shared tracker.

* ``batch_sharpness``: the mean over minibatches B (of the training batch size, drawn as
  :func:`~sgdscope.landscape.minibatch_indices` draws them, from the probe's own generator) of λ_max(H_B),
  H_B the Hessian of the mean loss of B alone: the stochastic counterpart of GD's η·λ₁ < 2.
* ``preconditioned_sharpness``: λ_max(P⁻¹H) on the measurement set with P the optimizer's current
  preconditioner, against its threshold (:mod:`sgdscope.curvature.preconditioned`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from sgdscope.curvature import HessianOperator, top_eigenpairs
from sgdscope.curvature.preconditioned import PreconditionedOperator, read_preconditioner, stability_threshold
from sgdscope.errors import ConfigError
from sgdscope.landscape import minibatch_indices
from sgdscope.losses import take
from sgdscope.measure.probes.base import Probe, Rows, StepInfo
from sgdscope.measure.tracker import method_kwargs, remember_methods


def _momentum(optimizer: Any) -> float:
    """Heavy-ball momentum of a torch SGD (its threshold is (2 + 2β)/η); 0 for anything else."""
    if isinstance(optimizer, torch.optim.SGD):
        return float(optimizer.param_groups[0].get("momentum", 0.0))
    return 0.0


class BatchSharpnessProbe(Probe):
    """``batch_sharpness``: mean, std, min and max over ``n_batches`` minibatches of λ_max(H_B), with η times
    the mean, the full-batch λ₁ and η·λ₁ beside it, and SGD's threshold (2 + 2β)/η (β: the momentum of a
    torch SGD, else 0; for Adam compare ``preconditioned_sharpness`` instead).

    Each H_B is a :class:`~sgdscope.curvature.HessianOperator` over that batch alone (exactly weighted by
    its real targets, the Scope's BN policy and L2, dropout masks fixed per batch) and is solved for its
    top pair with k = 1; the first solve starts from the tracker's full-batch Ritz vectors, each next one
    from the previous batch's (H_B varies little from batch to batch)."""

    name = "batch_sharpness"
    tables = ("batch_sharpness",)

    def measure(self, info: StepInfo) -> Rows:
        env, o = self.env, self.opts
        full = env.tracker.get(info.step)
        x, y = env.measure_xy
        draws = minibatch_indices(len(y), env.minibatch_size, o.n_batches,
                                  env.generator("batch-sharpness", info.step), y.device)
        init: Optional[Tensor] = full.basis[:1] if getattr(full, "basis", None) is not None else full.vectors[:1]
        values, hvps, converged = [], 0, 0
        for j, idx in enumerate(draws):
            op = HessianOperator(
                env.model, env.loss_fn, [(take(x, idx), y[idx])], bn_policy=env.bn_policy, weight_decay=env.l2,
                include_l2=env.l2 > 0, ignore_index=env.ignore_index,
                mask_seed=env.mask_seed(f"batch-sharpness/{j}", info.step), **method_kwargs(self._methods),
            )
            res = top_eigenpairs(op, k=1, which="LA", tol=o.tol, max_hvps=o.max_hvps, init=init,
                                 generator=env.generator("batch-sharpness-init", info.step))
            remember_methods(self._methods, op)
            values.append(float(res.values[0]))
            hvps, converged, init = hvps + res.n_hvps, converged + int(res.converged), res.basis
        v = torch.tensor(values, dtype=torch.float64)
        mean, lam, lr = float(v.mean()), float(full.values[0]), info.lr
        return {"batch_sharpness": [{
            "step": info.step, "epoch": info.epoch, "batch_sharpness": mean,
            "batch_sharpness_std": float(v.std()) if len(v) > 1 else math.nan,
            "batch_sharpness_min": float(v.min()), "batch_sharpness_max": float(v.max()),
            "lambda_max": lam, "lr": lr, "lr_batch_sharpness": lr * mean, "lr_lambda_max": lr * lam,
            "threshold": stability_threshold("sgd", lr, _momentum(info.optimizer)),
            "n_batches": o.n_batches, "batch_size": env.minibatch_size, "n_hvps": hvps,
            "converged": int(converged == len(values)),
        }]}

    def __init__(self, opts: Any, env: Any) -> None:
        super().__init__(opts, env)
        self._methods: dict[str, str] = {}  # the minibatch operators' HVP methods (tracker.remember_methods)

    def state_dict(self) -> dict[str, Any]:
        return {"hvp_methods": dict(self._methods)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._methods = dict(state.get("hvp_methods", {}))


class PreconditionedSharpnessProbe(Probe):
    """``preconditioned_sharpness``: λ_max(P⁻¹H) = λ_max(P^{-1/2}HP^{-1/2}) on the measurement set, P the
    preconditioner of the optimizer's last update (Adam/AdamW: diag(√v̂ + ε); SGD: I, where it equals the
    tracker's λ₁ and costs no solve), its threshold ((2 + 2β₁)/((1 − β₁)η) for Adam, (2 + 2β)/η for SGD),
    the ratio of the two, η·λ_max(P⁻¹H), H's own λ₁ and the range of P.

    Needs the optimizer (``scope.step(optimizer)``); writes no row while Adam has no state (step 0). The
    optimizer's state is only read. Each solve starts from the previous step's vector (kept in the
    probe's state, so a resumed run solves from the same start)."""

    name = "preconditioned_sharpness"
    tables = ("preconditioned_sharpness",)

    def __init__(self, opts: Any, env: Any) -> None:
        super().__init__(opts, env)
        self._prev: Optional[Tensor] = None

    def measure(self, info: StepInfo) -> Rows:
        env, o = self.env, self.opts
        if info.optimizer is None:
            raise ConfigError("probes.preconditioned_sharpness: needs the optimizer; pass it as scope.step(optimizer)")
        pre = read_preconditioner(info.optimizer, env.model)
        if pre is None:
            return {}
        full = env.tracker.get(info.step)
        lam = float(full.values[0])
        if pre.diag is None:  # P = I: λ_max(P⁻¹H) is the tracker's λ₁
            value, residual, conv, hvps, p_min, p_max = lam, float(full.residuals[0]), int(full.converged), 0, 1.0, 1.0
        else:
            op = PreconditionedOperator(env.tracker.operator(info.step), pre.diag)
            res = top_eigenpairs(op, k=1, which="LA", tol=o.tol, max_hvps=o.max_hvps, init=self._prev,
                                 generator=env.generator("preconditioned-init", info.step))
            self._prev = res.basis
            value, residual, conv, hvps = float(res.values[0]), float(res.residuals[0]), int(res.converged), res.n_hvps
            p_min, p_max = float(pre.diag.min()), float(pre.diag.max())
        thr = pre.threshold
        return {"preconditioned_sharpness": [{
            "step": info.step, "epoch": info.epoch, "optimizer": pre.kind, "lr": pre.lr, "beta1": pre.beta1,
            "preconditioned_sharpness": value, "threshold": thr, "ratio": value / thr,
            "lr_preconditioned_sharpness": pre.lr * value, "lambda_max": lam, "residual": residual,
            "converged": conv, "n_hvps": hvps, "p_min": p_min, "p_max": p_max,
        }]}

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": self._prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        v = state.get("vectors")
        self._prev = v.to(self.env.device) if v is not None else None
