"""Full-batch GD plus isotropic Gaussian noise (Xing et al. 2018, sec. 4).

The noise is calibrated once, at initialisation, from the gradient noise SGD would see. With the training
set cut into chunks b of m_b examples, chunk gradients g_b and their example-weighted mean ḡ,

    var_j = (1/B)·Σ_b m_b·(g_bj − ḡ_j)²,

which for equal chunks of m examples is the authors' m·(mean_b g_bj² − (mean_b g_bj)²): the variance of a
mean of m examples is 1/m of the per-example variance, so multiplying by m estimates the per-example
variance of coordinate j. max_var = max_j var_j. Every step then adds i.i.d. N(0, σ²) noise to each
gradient coordinate, with

* ``scales="std"``: σ = factor·max_var (the authors' code, which passes it to ``torch.normal`` as std);
* ``scales="variance"``: σ² = factor·max_var (the paper's wording).

The authors also multiplied the noise by 9 because their GD summed nine chunk-mean gradients; our GD
follows the mean loss, so no such factor appears. The L2 term's gradient is the same for every chunk, so
it cancels from var_j and is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from sgdscope.curvature.flat import flatten, named_trainable
from sgdscope.errors import ConfigError
from sgdscope.losses import LossFn, n_targets, split_batches
from sgdscope.policy import measurement_mode, rng_preserved

SCALES = ("std", "variance")


def gradient_variance(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, chunk: int, bn_policy: str = "train-restore"
) -> Tensor:
    """Per-coordinate per-example gradient variance var_j = (1/B)·Σ_b m_b·(g_bj − ḡ_j)² from chunks of
    ``chunk`` examples (the last may be shorter): a flat tensor of shape ``(n_params,)``.

    ``.grad`` is not touched, the global RNG is restored, and BN follows ``bn_policy``.
    """
    batches = split_batches(x, y, chunk)
    if len(batches) < 2:
        raise ConfigError(f"gradient_variance: {len(x)} examples in chunks of {chunk} give fewer than 2 chunks")
    params = [p for _, p in named_trainable(model)]
    with rng_preserved(), measurement_mode(model, bn_policy):
        grads = torch.stack([flatten(torch.autograd.grad(loss_fn(model(xb), yb), params)) for xb, yb in batches])
    sizes = torch.tensor([float(n_targets(yb)) for _, yb in batches], dtype=grads.dtype, device=grads.device)
    mean = (sizes[:, None] * grads).sum(0) / sizes.sum()
    return (sizes[:, None] * (grads - mean) ** 2).mean(0)


@dataclass(frozen=True)
class IsotropicNoise:
    """i.i.d. Gaussian gradient noise of standard deviation ``sigma`` (see the module docstring)."""

    max_var: float
    factor: float
    scales: str = "std"

    def __post_init__(self) -> None:
        if self.scales not in SCALES:
            raise ConfigError(f"noise scales: {self.scales!r} is not one of {', '.join(SCALES)}")

    @property
    def sigma(self) -> float:
        """σ = factor·max_var (``"std"``) or √(factor·max_var) (``"variance"``).

        >>> IsotropicNoise(max_var=4.0, factor=0.5).sigma
        2.0
        >>> IsotropicNoise(max_var=4.0, factor=0.25, scales="variance").sigma
        1.0
        """
        return self.factor * self.max_var if self.scales == "std" else math.sqrt(self.factor * self.max_var)

    @classmethod
    def estimate(
        cls,
        model: nn.Module,
        loss_fn: LossFn,
        x: Tensor,
        y: Tensor,
        chunk: int,
        factor: float,
        scales: str = "std",
        bn_policy: str = "train-restore",
    ) -> "IsotropicNoise":
        """Calibrate on ``(x, y)`` at the model's current parameters: max_var = max_j var_j from
        :func:`gradient_variance`."""
        return cls(float(gradient_variance(model, loss_fn, x, y, chunk, bn_policy).max()), factor, scales)

    def add_(self, target: Tensor | Iterable[nn.Parameter], generator: torch.Generator) -> None:
        """Add N(0, σ²) noise in place to a flat gradient tensor, or to the ``.grad`` of each parameter
        (a missing ``.grad`` counts as zero). Draws only from ``generator``, on its device."""
        tensors = [target] if isinstance(target, Tensor) else list(self._grads(target))
        for t in tensors:
            noise = torch.randn(t.shape, generator=generator, device=generator.device, dtype=t.dtype)
            t.add_(noise.to(t.device), alpha=self.sigma)

    def state_dict(self) -> dict[str, float | str]:
        """For checkpoints (plain numbers): the calibration made at initialisation must survive a resume,
        where re-estimating it at the resumed parameters would give another σ."""
        return {"max_var": self.max_var, "factor": self.factor, "scales": self.scales}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        """Inverse of :meth:`state_dict` (in place, although the dataclass is otherwise frozen)."""
        object.__setattr__(self, "max_var", float(state["max_var"]))
        object.__setattr__(self, "factor", float(state["factor"]))
        object.__setattr__(self, "scales", str(state["scales"]))

    @staticmethod
    def _grads(params: Iterable[nn.Parameter]) -> Iterable[Tensor]:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            yield p.grad
