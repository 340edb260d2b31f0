"""The Hessian seen through an optimizer's preconditioner, and the step size that keeps it stable.

An update θ ← θ − η·P⁻¹·(momentum of g) with a diagonal, positive preconditioner P is stable on a
quadratic with Hessian H only while the largest eigenvalue of P⁻¹H stays below a threshold that depends
on the momentum (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability", sec. 2):

* plain SGD / GD: P = I, threshold 2/η; heavy-ball momentum β (torch's b ← βb + g, θ ← θ − ηb):
  (2 + 2β)/η;
* Adam / AdamW with β₁, β₂, ε: P = diag(√v̂ + ε), v̂ = v/(1 − β₂ᵗ) the bias-corrected second moment after
  t steps, and (frozen P) the EMA momentum m ← β₁m + (1 − β₁)g gives (2 + 2β₁)/((1 − β₁)·η), which is
  38/η for β₁ = 0.9.

P⁻¹H is not symmetric, but it is similar to the symmetric S = P^{-1/2} H P^{-1/2} (P^{1/2}·P⁻¹H·P^{-1/2} = S),
so λ_max(P⁻¹H) = λ_max(S): :class:`PreconditionedOperator` applies S with one HVP per vector and is solved
with :func:`~sgdscope.curvature.top_eigenpairs` like H itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from sgdscope.curvature.flat import named_trainable
from sgdscope.errors import ConfigError


@dataclass
class Preconditioner:
    """An optimizer's current diagonal preconditioner, read without touching its state.

    ``kind``: "sgd" or "adam"; ``diag``: P's diagonal, flat in :func:`named_trainable` order (None for
    P = I); ``lr`` η; ``beta1`` the momentum (SGD's ``momentum``, Adam's β₁); ``threshold``: the stability
    threshold on λ_max(P⁻¹H) (see the module docstring)."""

    kind: str
    diag: Optional[Tensor]
    lr: float
    beta1: float

    @property
    def threshold(self) -> float:
        return stability_threshold(self.kind, self.lr, self.beta1)


def stability_threshold(kind: str, lr: float, beta1: float = 0.0) -> float:
    """(2 + 2β)/η for SGD with heavy-ball momentum β (2/η without), (2 + 2β₁)/((1 − β₁)·η) for Adam.

    >>> [round(stability_threshold(*a), 9) for a in (("sgd", 0.1), ("sgd", 0.1, 0.9), ("adam", 0.01, 0.9))]
    [20.0, 38.0, 3800.0]
    """
    if kind == "sgd":
        return (2 + 2 * beta1) / lr
    if kind == "adam":
        return (2 + 2 * beta1) / ((1 - beta1) * lr)
    raise ValueError(f"stability_threshold: unknown kind {kind!r} (sgd, adam)")


def _one(groups: Sequence[dict], key: str, what: str) -> float:
    # betas is a pair (β₁ is what the threshold needs); a state dict loaded from disk may hold it as a list
    values = {float(g[key][0]) if isinstance(g[key], (tuple, list)) else float(g[key]) for g in groups}
    if len(values) != 1:
        raise ConfigError(f"probes.preconditioned_sharpness: the optimizer's param groups have different {what} "
                          f"({sorted(values)}); one threshold needs one value")
    return values.pop()


def read_preconditioner(optimizer: torch.optim.Optimizer, model: nn.Module) -> Optional[Preconditioner]:
    """The preconditioner of ``optimizer``'s last update, for ``model``'s trainable parameters.

    ``torch.optim.SGD`` (not Nesterov): P = I. ``torch.optim.Adam`` / ``AdamW``: P = √v̂ + ε per entry, with
    v̂ = v/(1 − β₂ᵗ) (AMSGrad: the running max of v), exactly the denominator torch divided by in its last step. AdamW's
    decoupled weight decay acts outside the preconditioner and is left out of H (an Adam whose own
    weight_decay is an L2 term: pass it to the Scope as ``weight_decay`` to have it in H). Returns None
    while Adam has no state yet (before its first step, where v̂ = 0/0 is undefined). A trainable
    parameter the optimizer does not hold is refused (no preconditioner applies to it). The state is only
    read (every tensor made here is new), never written. Any other optimizer (Nudged-SGD, whose γ acts in
    a subspace, is not diagonal) raises a one-line ConfigError.
    """
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):
        if any(g.get("nesterov") for g in groups):
            raise ConfigError("probes.preconditioned_sharpness: Nesterov SGD has another stability threshold; "
                              "supported: SGD (heavy ball), Adam, AdamW")
        return Preconditioner("sgd", None, _one(groups, "lr", "lr"), _one(groups, "momentum", "momentum"))
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ConfigError(f"probes.preconditioned_sharpness: no known preconditioner for {type(optimizer).__name__}; "
                          "supported: torch.optim.SGD (P = I), Adam and AdamW (P = √v̂ + ε)")
    lr, beta1 = _one(groups, "lr", "lr"), _one(groups, "betas", "β₁")
    where = {id(p): g for g in groups for p in g["params"]}
    parts = []
    for name, p in named_trainable(model):
        if id(p) not in where:
            raise ConfigError(f"probes.preconditioned_sharpness: parameter {name!r} is not in the optimizer")
        st, g = optimizer.state.get(p, {}), where[id(p)]
        if "exp_avg_sq" not in st:
            return None  # not stepped yet: no preconditioner to speak of
        t = float(st["step"])
        v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
        # torch: denom = (√v / √(1 − β₂ᵗ)) + ε; the same arithmetic, out of place
        parts.append((v.sqrt() / (1 - g["betas"][1] ** t) ** 0.5 + g["eps"]).reshape(-1))
    return Preconditioner("adam", torch.cat(parts), lr, beta1)


class PreconditionedOperator:
    """S = D H D with D = P^{-1/2} = diag(d): the symmetric form of P⁻¹H (same eigenvalues).

    Wraps any operator with ``matvec``/``matmat``/``n_params``/``device``/``dtype``/``n_hvps`` (a
    :class:`~sgdscope.curvature.HessianOperator`), so the eigensolver runs on it unchanged; one product
    of S is one HVP. An eigenvector u of S maps to the eigenvector D·u of P⁻¹H.

    >>> from sgdscope.curvature import HessianOperator
    >>> from sgdscope.models.quadratic import Quadratic, output_mean
    >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> op = HessianOperator(Quadratic(A), output_mean, [(torch.zeros(1), torch.zeros(1))])
    >>> PreconditionedOperator(op, torch.tensor([1.0, 4.0], dtype=torch.float64)).matvec(torch.tensor([1.0, 0.0], dtype=torch.float64))
    tensor([2.0000, 0.5000], dtype=torch.float64)
    """

    def __init__(self, op, p_diag: Tensor) -> None:
        if p_diag.shape != (op.n_params,) or not bool((p_diag > 0).all()):
            raise ValueError(f"PreconditionedOperator: P's diagonal must be ({op.n_params},) and positive")
        self.op = op
        self.d = p_diag.to(device=op.device, dtype=op.dtype).rsqrt()
        self.n_params, self.device, self.dtype = op.n_params, op.device, op.dtype

    @property
    def n_hvps(self) -> int:
        return self.op.n_hvps

    def matvec(self, v: Tensor) -> Tensor:
        return self.d * self.op.matvec(self.d * v)

    def matmat(self, V: Tensor) -> Tensor:
        return self.d * self.op.matmat(V * self.d)
