"""The probe protocol: a measurement with a schedule that turns the training state into table rows.

A probe never changes the training trajectory: it measures inside
:func:`sgdscope.policy.measurement_mode`, draws random numbers only from its own generators (seeded from
the run seed, the probe's name and the step) and restores any parameter it moves.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from sgdscope.config import RunConfig
    from sgdscope.data import Dataset
    from sgdscope.probes.eigen import EigenTracker

Rows = dict[str, list[dict[str, Any]]]


@dataclass
class Context:
    """What every probe may read. Built once per run by the Trainer."""

    cfg: "RunConfig"
    model: nn.Module
    loss_fn: Any
    dataset: "Dataset"
    device: torch.device
    measure_x: Tensor  # the fixed, seeded measurement subset
    measure_y: Tensor
    measure_batches: list[tuple[Tensor, Tensor]]  # views of (measure_x, measure_y)
    train_batches: list[tuple[Tensor, Tensor]]  # the whole training set, in eval-sized chunks
    theta0: Tensor
    steps_per_epoch: int
    tracker: Optional["EigenTracker"] = None
    save_tensors: Optional[Callable[[str, dict[str, Tensor]], Any]] = None  # the run store's, once attached
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_decay(self) -> float:
        return self.cfg.optimizer.weight_decay

    @property
    def l2_in_measurements(self) -> float:
        """λ used by measurements: the run's L2 when ``measure.include_l2`` is on, else 0."""
        return self.cfg.optimizer.weight_decay if self.cfg.measure.include_l2 else 0.0

    def generator(self, tag: str, step: int) -> torch.Generator:
        """A fresh generator on the run's device, seeded by (run seed, tag, step): reproducible, isolated."""
        g = torch.Generator(device=self.device)
        g.manual_seed((self.cfg.seed * 1_000_003 + zlib.crc32(tag.encode()) * 7919 + step) % (2**63 - 1))
        return g


@dataclass
class StepInfo:
    """The state right after an update (or at step 0, before any)."""

    step: int  # updates done so far
    epoch: int  # 1-based epoch the step belongs to (0 before training)
    epoch_end: bool
    lr: float
    theta_prev: Optional[Tensor] = None  # flat θ before this update, when a probe asked for it
    grad: Optional[Tensor] = None  # flat minibatch gradient used by this update


class Probe:
    """Base class. Subclasses set ``name`` and implement :meth:`measure`."""

    name = "probe"

    def __init__(self, pcfg: Any, ctx: Context) -> None:
        self.pcfg = pcfg
        self.ctx = ctx

    def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
        """``every: epoch`` → step 0 and each epoch end; ``every: N`` → every N-th step (step 0 too);
        ``first_steps: M`` → also every step up to M (the papers' zoom into early training)."""
        every = getattr(self.pcfg, "every", "epoch")
        first = getattr(self.pcfg, "first_steps", 0)
        if step <= first:
            return True
        if every == "epoch":
            return epoch_end or step == 0
        return step % every == 0

    def wants_prev(self, next_step: int, epoch: int, epoch_end: bool) -> bool:
        """Whether θ before the update that leads to ``next_step`` must be kept (interpolation)."""
        return False

    def measure(self, info: StepInfo) -> Rows:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
