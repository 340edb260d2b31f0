"""How fast the sharpest directions turn: principal angles between top-K eigenspaces along the trajectory.

Both papers lean on the top-K Hessian subspace changing slowly (Jastrzebski et al. nudge SGD in it; the
warm-started tracker relies on it). At each due step this probe takes the tracker's top-K eigenvectors
V_t (the shared solve: no extra Hessian products) and writes, per i = 1..K, the i-th principal angle
between span(V_t) and the previous measurement's span(V_prev), and between span(V_t) and the reference
measurement's, with the overlaps ‖V_prevᵀV_t‖_F²/K (= Σ cos²θ_i / K). See
:func:`sgdscope.curvature.subspace.principal_angles`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import Tensor

from sgdscope.curvature.subspace import principal_angles, subspace_overlap
from sgdscope.measure.probes.base import Probe, Rows, StepInfo


class RotationProbe(Probe):
    """Rows of ``rotation``: one per step and angle index (1..K, smallest angle first)."""

    name = "rotation"
    tables = ("rotation",)

    def __init__(self, opts, env) -> None:
        super().__init__(opts, env)
        self.prev: Optional[Tensor] = None  # (K, n) basis of the previous measurement
        self.prev_step = -1
        self.ref: Optional[Tensor] = None  # (K, n) basis of the reference measurement
        self.ref_step = -1

    def _compare(self, old: Optional[Tensor], new: Tensor) -> tuple[list[float], float]:
        k = self.opts.k
        if old is None:
            return [math.nan] * k, math.nan
        return [math.degrees(a) for a in principal_angles(old, new).tolist()], subspace_overlap(old, new)

    def measure(self, info: StepInfo) -> Rows:
        k = self.opts.k
        v = self.env.tracker.get(info.step, k).vectors[:k].detach().clone()
        if self.ref is None and info.step >= self.opts.reference_step:
            self.ref, self.ref_step = v, info.step
        prev, prev_ov = self._compare(self.prev, v)
        ref, ref_ov = self._compare(self.ref, v)
        rows = [
            {"step": info.step, "epoch": info.epoch, "index": i + 1, "angle_prev_deg": prev[i],
             "angle_ref_deg": ref[i], "overlap_prev": prev_ov, "overlap_ref": ref_ov,
             "prev_step": self.prev_step, "ref_step": self.ref_step, "k": k}
            for i in range(k)
        ]
        self.prev, self.prev_step = v, info.step
        return {"rotation": rows}

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self.prev, "prev_step": self.prev_step, "ref": self.ref, "ref_step": self.ref_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.env.device
        self.prev = state["prev"].to(dev) if state.get("prev") is not None else None
        self.ref = state["ref"].to(dev) if state.get("ref") is not None else None
        self.prev_step, self.ref_step = int(state.get("prev_step", -1)), int(state.get("ref_step", -1))
