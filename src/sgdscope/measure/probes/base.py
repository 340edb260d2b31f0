"""The probe protocol: a measurement with a schedule that turns the state at a step into table rows.

A probe never changes the training trajectory: it measures inside
:func:`sgdscope.policy.measurement_mode`, draws random numbers only from its own generators (seeded from
the Scope's seed, the probe's tag and the step), uses one fixed set of dropout masks per measurement, and
restores any parameter it moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import Tensor

from sgdscope.measure.env import Env
from sgdscope.measure.sinks import Rows


@dataclass
class StepInfo:
    """The state right after an update (or at step 0, before any)."""

    step: int  # updates done so far
    epoch: int  # 1-based epoch the last update belongs to (0 before training)
    epoch_end: bool
    lr: float  # the learning rate of the last update (of the first one, at step 0)
    theta_prev: Optional[Tensor] = None  # flat θ before the last update, when a probe asked for it
    grad: Optional[Tensor] = None  # flat gradient the last update used (what the backward left in .grad)
    skipped: bool = False  # the update was skipped (on_nan: skip): θ unchanged
    # the optimizer passed to ``Scope.step`` (None when none was): for probes that read its state, such as
    # Adam's preconditioner; probes only read it, never step it or write its state
    optimizer: Optional[Any] = None


class Probe:
    """Base class. Subclasses set ``name`` and ``tables`` and implement :meth:`measure`.

    ``tables`` names the tables the probe writes; for ``train`` and ``epoch`` (one row per step / epoch,
    shared with the caller's columns) the probe's single row is merged into that step's row.
    """

    name: ClassVar[str] = "probe"
    tables: ClassVar[tuple[str, ...]] = ()
    wants_theta_prev: bool = False  # θ_t is kept around every update for this probe

    def __init__(self, opts: Any, env: Env) -> None:
        self.opts = opts
        self.env = env

    def due(self, step: int, epoch_end: bool) -> bool:
        """``every: epoch`` → step 0 and each epoch end; ``every: N`` → every N-th step (step 0 too);
        ``first_steps: M`` → also every step up to M (the papers' zoom into early training)."""
        every = getattr(self.opts, "every", "epoch")
        if step <= getattr(self.opts, "first_steps", 0):
            return True
        if every == "epoch":
            return epoch_end or step == 0
        return step % every == 0

    def tracker_k(self) -> int:
        """How many eigenpairs this probe reads from the shared tracker with its options (0: none). The
        probes named in ``EIGEN_CONSUMERS`` get a tracker whatever this says."""
        return 0

    def wants_segment(self, t: int, epoch: int) -> bool:
        """Whether the update θ_t → θ_{t+1} (of 1-based ``epoch``) is measured as a segment (interpolation)."""
        return False

    def measure(self, info: StepInfo) -> Rows:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
