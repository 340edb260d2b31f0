"""Nudged SGD (Jastrzebski et al. 2019, sec. 4): SGD whose step is rescaled inside a K-dimensional subspace.

With U ∈ R^{n×K} orthonormal columns (the top-K Hessian eigenvectors, set by the trainer) and P = UUᵀ, the
paper's update ("correct_v") is  v = μ·m − η·g,  m ← v,  Δθ = (I − P)v + γ·Pv. The momentum buffer keeps
the *un-nudged* v, so the nudge never feeds back into the momentum.

Here the buffer follows torch.optim.SGD instead: b ← μ·b + g (b = g when μ = 0), and the step is

    Δθ = −η·[a·b + s·Pb]

with (a, s) = (1, γ−1) for ``"scale"`` and ``"fixed"``, (0, 1) for ``"only"`` and (1, −1) for
``"remove"``. Since v = −η·b while η is constant, this is the paper's update; under a changing η it
differs only in the way torch's SGD differs from Keras's (the buffer holds gradients, not steps). The
plain term −η·a·b is computed with exactly torch SGD's operations and the subspace correction is a
separate addition skipped when s = 0, so γ = 1 (or no subspace) is bit-identical to torch.optim.SGD.

Modes:

* ``"scale"``: γ on the subspace, 1 elsewhere (γ < 1 slows SGD along the sharpest directions).
* ``"only"``: keep Pb only (the paper's variant "SGD top"). With ``set_subspace(U, freeze=True)`` and
  K = 1 it is variant 2, "SGD constant top".
* ``"remove"``: keep (I − P)b only (variant "SGD no top").
* ``"fixed"``: ``"scale"`` with U frozen at the first subspace given: later ``set_subspace`` calls are
  ignored. Equivalent to ``"scale"`` plus ``freeze=True`` on the first call.

Without a subspace (before the first ``set_subspace`` or after ``set_subspace(None)``) every mode is
plain SGD.

Weight decay: ``weight_decay`` = λ adds the gradient 2λw of the explicit penalty λ·Σw² to g (torch's SGD
adds λw, the gradient of λ/2·Σw²). Its default is 0 because the trainer puts λ·Σw² in the loss, so that
the same loss is differentiated for training and for the Hessian.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from sgdscope.errors import ConfigError

MODES = ("scale", "only", "remove", "fixed")


class NudgedSGD(torch.optim.Optimizer):
    """SGD with momentum whose step is rescaled in a subspace; see the module docstring for the math.

    ``params`` are flattened in the order given (group by group), which must be the order of the rows of
    the subspace vectors, i.e. :func:`~sgdscope.curvature.flat.named_trainable` order for
    ``model.parameters()``. Parameters whose ``.grad`` is None are skipped, as torch's SGD does: they
    neither contribute to the projection nor move.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        gamma: float = 0.1,
        mode: str = "scale",
        weight_decay: float = 0.0,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"NudgedSGD mode: {mode!r} is not one of {', '.join(MODES)}")
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ConfigError("NudgedSGD: lr, momentum and weight_decay must be non-negative")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.gamma = gamma
        self.mode = mode
        self.frozen = False
        self._basis: Tensor | None = None

    @property
    def subspace(self) -> Tensor | None:
        """The current ``(K, n_params)`` basis U, or None."""
        return self._basis

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def set_subspace(self, vectors: Tensor | None, freeze: bool = False) -> bool:
        """Use the orthonormal rows of ``vectors`` (K, n_params) as U; None clears it (plain SGD).

        ``freeze=True`` (implied by mode ``"fixed"``) keeps this U for the rest of training: later calls
        are ignored. Returns whether the call changed the subspace.
        """
        if self.frozen:
            return False
        if vectors is None:
            self._basis = None
            return True
        n = sum(p.numel() for p in self._params())
        if vectors.dim() != 2 or vectors.shape[1] != n:
            raise ValueError(f"subspace must be (K, {n}), got {tuple(vectors.shape)}")
        first = self._params()[0]
        self._basis = vectors.detach().to(device=first.device, dtype=first.dtype).clone()
        self.frozen = freeze or self.mode == "fixed"
        return True

    def _coefficients(self) -> tuple[float, float]:
        """(a, s) of Δθ = −η·[a·b + s·Pb]."""
        if self._basis is None:
            return 1.0, 0.0
        if self.mode == "only":
            return 0.0, 1.0
        if self.mode == "remove":
            return 1.0, -1.0
        return 1.0, self.gamma - 1.0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update; ``closure`` (optional) re-evaluates the loss with gradients, as in torch's SGD."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        a, s = self._coefficients()
        offset, moves = 0, []  # (param, direction b, lr, slice of the flat vector)
        for group in self.param_groups:
            for p in group["params"]:
                size = p.numel()
                if p.grad is not None:
                    moves.append((p, self._direction(p, group), group["lr"], slice(offset, offset + size)))
                offset += size
        if s != 0.0:
            coeff = sum(self._basis[:, sl] @ b.reshape(-1) for _, b, _, sl in moves)  # Uᵀb, (K,)
        for p, b, lr, sl in moves:
            if a != 0.0:
                p.add_(b, alpha=-lr * a)
            if s != 0.0:
                p.add_((coeff @ self._basis[:, sl]).view_as(p), alpha=-lr * s)
        return loss

    def _direction(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """b for one parameter, updating its momentum buffer with torch SGD's exact operations."""
        g = p.grad
        if group["weight_decay"] != 0:
            g = g.add(p, alpha=2 * group["weight_decay"])
        if group["momentum"] == 0:
            return g
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = g.detach().clone()
        else:
            buf.mul_(group["momentum"]).add_(g, alpha=1)
        return buf

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus the subspace and its frozen flag (loadable with weights_only=True)."""
        out = super().state_dict()
        out["nsgd"] = {"basis": self._basis, "frozen": self.frozen}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("nsgd", {"basis": None, "frozen": False})
        super().load_state_dict(state_dict)
        first = self._params()[0]
        basis = extra["basis"]
        self._basis = None if basis is None else basis.to(device=first.device, dtype=first.dtype)
        self.frozen = bool(extra["frozen"])
