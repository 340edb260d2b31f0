"""Learning-rate schedules: constant, step, triangular cyclic (CLR), trapezoid and reduce-on-plateau.

``step`` counts optimizer steps from 0 (the step about to be taken) and ``epoch`` counts epochs from 0;
``steps_per_epoch`` converts between them, so milestones given in (possibly fractional) epochs also work
with the papers' redefined, shorter "epochs". Every schedule but plateau is a pure function of the step.
State for checkpoints is plain Python numbers, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Any

from sgdscope.config import ScheduleConfig
from sgdscope.errors import ConfigError

_EPS = 1e-9  # milestone·steps_per_epoch may land a rounding error away from an integer step


class LRSchedule:
    """Base schedule: ``lr_at(step, epoch)``; ``observe`` after each epoch's evaluation; ``apply`` to an optimizer."""

    def __init__(self, base_lr: float) -> None:
        self.base_lr = base_lr

    def lr_at(self, step: int, epoch: int) -> float:
        """The learning rate for the step ``step`` in epoch ``epoch``."""
        return self.base_lr

    def observe(self, epoch: int, metrics: dict[str, float]) -> None:
        """Called after each epoch's evaluation with that epoch's metrics; only plateau listens."""

    def apply(self, optimizer: Any, step: int, epoch: int) -> float:
        """Set every param group's ``lr`` to ``lr_at(step, epoch)`` and return it."""
        lr = self.lr_at(step, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, float | int]:
        """Mutable state (none for the pure schedules)."""
        return {}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Inverse of :meth:`state_dict`."""


class StepSchedule(LRSchedule):
    """lr = base·factor^(number of milestones passed); a milestone M (in epochs) counts as passed from
    step ⌈M·steps_per_epoch⌉ on.

    >>> s = StepSchedule(1.0, milestones=[1, 2.5], factor=0.1, steps_per_epoch=10)
    >>> [s.lr_at(k, k // 10) for k in (0, 9, 10, 24, 25)]
    [1.0, 1.0, 0.1, 0.1, 0.010000000000000002]
    """

    def __init__(self, base_lr: float, milestones: list[float], factor: float, steps_per_epoch: int) -> None:
        super().__init__(base_lr)
        self.milestone_steps = [m * steps_per_epoch for m in milestones]
        self.factor = factor

    def lr_at(self, step: int, epoch: int) -> float:
        passed = sum(step + _EPS >= m for m in self.milestone_steps)
        return self.base_lr * self.factor**passed


class CyclicSchedule(LRSchedule):
    """Triangular CLR (Smith 2017): base → max linearly over ``step_size`` steps, back over ``step_size``,
    repeated: lr = base + (max − base)·max(0, 1 − |step/step_size − 2c + 1|), c = ⌊1 + step/(2·step_size)⌋.

    >>> s = CyclicSchedule(0.1, max_lr=0.5, step_size=4)
    >>> [round(s.lr_at(k, 0), 6) for k in (0, 2, 4, 6, 8, 12)]
    [0.1, 0.3, 0.5, 0.3, 0.1, 0.5]
    """

    def __init__(self, base_lr: float, max_lr: float, step_size: int) -> None:
        super().__init__(base_lr)
        self.max_lr, self.step_size = max_lr, step_size

    def lr_at(self, step: int, epoch: int) -> float:
        cycle = math.floor(1 + step / (2 * self.step_size))
        x = abs(step / self.step_size - 2 * cycle + 1)
        return self.base_lr + (self.max_lr - self.base_lr) * max(0.0, 1.0 - x)


class TrapezoidSchedule(LRSchedule):
    """Rise base → max over ``t_up`` steps, stay at max for ``t_flat``, fall linearly to ``min_lr`` over
    ``t_down``, then stay at ``min_lr``.

    >>> s = TrapezoidSchedule(0.1, max_lr=0.5, t_up=4, t_flat=2, t_down=4, min_lr=0.0)
    >>> [round(s.lr_at(k, 0), 6) for k in (0, 2, 4, 5, 6, 8, 10, 99)]
    [0.1, 0.3, 0.5, 0.5, 0.5, 0.25, 0.0, 0.0]
    """

    def __init__(self, base_lr: float, max_lr: float, t_up: int, t_flat: int, t_down: int, min_lr: float) -> None:
        super().__init__(base_lr)
        self.max_lr, self.t_up, self.t_flat, self.t_down, self.min_lr = max_lr, t_up, t_flat, t_down, min_lr

    def lr_at(self, step: int, epoch: int) -> float:
        if step < self.t_up:
            return self.base_lr + (self.max_lr - self.base_lr) * step / self.t_up
        down = step - self.t_up - self.t_flat
        if down <= 0:
            return self.max_lr
        return self.max_lr + (self.min_lr - self.max_lr) * min(1.0, down / self.t_down)


class PlateauSchedule(LRSchedule):
    """ReduceLROnPlateau as in the Keras callback the NSGD experiments used.

    After each epoch, ``observe`` compares the monitored metric with the best so far: it improves when it
    is below best − threshold (losses) or above best + threshold (accuracies), or with
    ``threshold_mode="rel"`` below best·(1 − threshold) / above best·(1 + threshold). After ``patience``
    consecutive epochs without improvement the lr becomes max(lr·factor, min_lr) and the count restarts.
    A NaN metric is never an improvement.

    >>> s = PlateauSchedule(1.0, "val_loss", factor=0.5, patience=2, threshold=0.0, threshold_mode="abs", min_lr=0.2)
    >>> for v in [3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1]:
    ...     s.observe(0, {"val_loss": v})
    >>> s.lr_at(0, 0), s.reductions
    (0.2, 3)
    """

    def __init__(
        self,
        base_lr: float,
        monitor: str,
        factor: float,
        patience: int,
        threshold: float,
        threshold_mode: str,
        min_lr: float,
    ) -> None:
        super().__init__(base_lr)
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.threshold, self.threshold_mode, self.min_lr = threshold, threshold_mode, min_lr
        self.sign = 1.0 if monitor.endswith("loss") else -1.0  # compare sign·metric, lower is better
        self.lr, self.best, self.wait, self.reductions = base_lr, math.inf, 0, 0

    def lr_at(self, step: int, epoch: int) -> float:
        return self.lr

    def _improves(self, value: float) -> bool:
        if self.best == math.inf:
            return not math.isnan(value)
        if self.threshold_mode == "rel":
            return value < self.best - self.threshold * abs(self.best)
        return value < self.best - self.threshold

    def observe(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ConfigError(f"schedule.monitor: {self.monitor!r} is not measured (have {', '.join(sorted(metrics))})")
        value = self.sign * float(metrics[self.monitor])
        if self._improves(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.wait = 0
            if self.lr > self.min_lr:
                self.lr = max(self.lr * self.factor, self.min_lr)
                self.reductions += 1

    def state_dict(self) -> dict[str, float | int]:
        return {"lr": self.lr, "best": self.best, "wait": self.wait, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.lr, self.best = float(state["lr"]), float(state["best"])
        self.wait, self.reductions = int(state["wait"]), int(state["reductions"])


def build_schedule(cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int) -> LRSchedule:
    """The schedule named by ``cfg`` starting from ``base_lr`` (the optimizer's lr; ``cfg.base_lr``, where
    set, overrides it for cyclic and trapezoid)."""
    if steps_per_epoch <= 0:
        raise ConfigError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if cfg.name == "constant":
        return LRSchedule(base_lr)
    if cfg.name == "step":
        return StepSchedule(base_lr, cfg.milestones, cfg.factor, steps_per_epoch)
    if cfg.name == "plateau":
        return PlateauSchedule(
            base_lr, cfg.monitor, cfg.factor, cfg.patience, cfg.threshold, cfg.threshold_mode, cfg.min_lr
        )
    if cfg.max_lr is None:
        raise ConfigError(f"schedule.max_lr: required by the {cfg.name} schedule")
    low = cfg.base_lr if cfg.base_lr is not None else base_lr
    if cfg.name == "cyclic":
        return CyclicSchedule(low, cfg.max_lr, cfg.step_size)
    return TrapezoidSchedule(low, cfg.max_lr, cfg.t_up, cfg.t_flat, cfg.t_down, cfg.min_lr)
