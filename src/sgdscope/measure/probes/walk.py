"""Probe of Xing et al. (2018): the loss interpolated between consecutive iterates, its valley profile and
the class of each step.

For the update θ_t → θ_{t+1} it evaluates L((1−α)θ_t + αθ_{t+1}) on the α grid (default 0, 0.1, …, 0.9
and the end point 1) over the whole training data (or the measurement set) with one fixed set of dropout
masks for every point, then summarises the curve: the valley floor min_α L, the height of the iterate
above it, whether a barrier was crossed (an interior point higher than both end points by more than
the recorded relative tolerance, the paper's footnote 1), and the step's class (descend / cross / climb,
:func:`sgdscope.landscape.valley.step_class`) beside η·λ₁.

Consecutive segments share an end point: θ_{t+1} is α = 1 of segment t and α = 0 of segment t + 1. The
probe keeps L(θ_{t+1}) and reuses it when it measures segment t + 1 right after, so a step costs 10 points
instead of 11. That reuse is exact (the same bits as a fresh evaluation) because:

* the dropout masks are one set for the whole run (mask seed of step 0), so a point's masks depend on its
  data batch only, not on which segment evaluates it;
* BN under "train-restore" / "train" uses batch statistics, a function of θ alone; under "eval" it uses
  the running statistics, which training moves between the two segments, so there the cached value is
  used only if the BN buffers are bit-identical to when it was computed (otherwise it is recomputed);
* the cached point is checked to be θ_t of the new segment bit for bit (a loop may move the parameters
  between steps).

Per epoch it writes ``step_classes``: how many of the epoch's measured steps fell in each class, and the
mean η·λ₁ of each class. λ₁ is, by default (``lambda1: last``), the value of the shared eigen tracker's
last solve, whatever probe asked for it (its step is recorded in ``lambda1_step``; NaN when no probe reads
the tracker), so no eigen solve per step is needed; ``lambda1: solve`` solves at every segment's end
θ_{t+1} (warm-started, costly).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from sgdscope.curvature.flat import get_flat
from sgdscope.landscape import BARRIER_REL_TOL, interpolate, step_class, valley_profile
from sgdscope.landscape.valley import STEP_CLASSES, UNDEFINED
from sgdscope.measure.probes.base import Probe, Rows, StepInfo
from sgdscope.policy import norm_buffers

# The mask seed of every interpolation point of the run (see the module docstring: endpoint reuse needs a
# point's masks to depend on the point and batch only). It is the seed the step-0 segment always had.
MASK_STEP = 0


def _empty_counts() -> dict[str, float]:
    out: dict[str, float] = {"n_steps": 0, **{f"n_{c}": 0 for c in (*STEP_CLASSES, UNDEFINED)}}
    out.update({f"sum_eta_lambda1_{c}": 0.0 for c in STEP_CLASSES})
    out.update({f"n_lambda1_{c}": 0 for c in STEP_CLASSES})
    return out


class InterpolationProbe(Probe):
    """Rows of ``interpolation`` (step, alpha, loss), ``valley`` (one per segment, with its step class),
    labelled with the segment's start t and committed at t + 1, and ``step_classes`` (one per epoch end
    after measured segments)."""

    name = "interpolation"
    tables = ("interpolation", "valley", "step_classes")

    def __init__(self, opts, env) -> None:
        super().__init__(opts, env)
        a = opts.alphas
        self.alphas = torch.linspace(0, 1, a + 1).tolist() if isinstance(a, int) else list(a)
        # the cached end point of the last segment: (t + 1, θ_{t+1}, L(θ_{t+1}) as a 1-tensor, BN buffers)
        self._end: Optional[tuple[int, torch.Tensor, torch.Tensor, Optional[list[torch.Tensor]]]] = None
        self._counts: dict[str, float] = _empty_counts()
        self.points_evaluated = 0  # loss evaluations so far (what the endpoint reuse saves is visible here)

    def due(self, step: int, epoch_end: bool) -> bool:
        # segments come through wants_segment; an epoch end is due only to write the epoch's class counts
        return epoch_end and self._counts["n_steps"] > 0

    def wants_segment(self, t: int, epoch: int) -> bool:
        epochs = self.opts.epochs
        every = 1 if self.opts.every == "epoch" else self.opts.every
        return (epochs is None or epoch in epochs) and t % every == 0

    # ---------------------------------------------------------------------------------- the curve
    def _bn_state(self) -> Optional[list[torch.Tensor]]:
        """The BN buffers the loss reads, when it reads them (the "eval" policy); None otherwise."""
        if self.env.bn_policy != "eval":
            return None
        return [b.detach().clone() for b in norm_buffers(self.env.model).values()]

    def _cached_start(self, t: int, theta_t: torch.Tensor) -> Optional[torch.Tensor]:
        """L(θ_t) kept from segment t − 1 when it is valid for this segment, else None."""
        if self._end is None or self._end[0] != t or not torch.equal(self._end[1], theta_t):
            return None
        saved = self._end[3]
        if saved is not None and not all(torch.equal(a, b) for a, b in zip(saved, self._bn_state())):
            return None
        return self._end[2]

    def curve(self, t: int, theta_t: torch.Tensor) -> torch.Tensor:
        """L on the α grid between θ_t and the model's current θ_{t+1}, reusing L(θ_t) where exact."""
        env = self.env
        batches = env.train_batches if self.opts.subset == "full" else env.measure_batches
        theta_next = get_flat(env.model)
        kw = env.kernel_kw("interpolation", MASK_STEP)
        start = self._cached_start(t, theta_t)
        if start is not None:  # α grid starts at 0 (validated), so drop that point
            rest = interpolate(env.model, theta_t, theta_next, self.alphas[1:], batches, **kw)
            losses = torch.cat([start.to(rest.dtype), rest])
        else:
            losses = interpolate(env.model, theta_t, theta_next, self.alphas, batches, **kw)
        self.points_evaluated += len(self.alphas) - (start is not None)
        self._end = (t + 1, theta_next, losses[-1:].clone(), self._bn_state())
        return losses

    # ---------------------------------------------------------------------------------- λ₁
    def _lambda1(self, step: int) -> tuple[float, int]:
        tracker = self.env.tracker
        if tracker is None:
            return math.nan, -1
        if self.opts.lambda1 == "solve":
            return float(tracker.get(step).values[0]), step
        last = tracker.last
        return (float(last[1][0]), last[0]) if last is not None else (math.nan, -1)

    # ---------------------------------------------------------------------------------- rows
    def _segment(self, info: StepInfo) -> Rows:
        t = info.step - 1  # the segment θ_t → θ_{t+1}
        losses = self.curve(t, info.theta_prev)
        prof = valley_profile(losses, self.alphas, height=self.opts.height, rel_tol=BARRIER_REL_TOL)
        cls, tol = step_class(prof, rel_tol=self.opts.class_rel_tol)
        lam, lam_step = self._lambda1(info.step)
        eta_lam = info.lr * lam
        c = self._counts
        c[f"n_{cls}"] += 1
        c["n_steps"] += 1
        if cls in STEP_CLASSES and math.isfinite(eta_lam):
            c[f"sum_eta_lambda1_{cls}"] += eta_lam
            c[f"n_lambda1_{cls}"] += 1
        interp = [{"step": t, "epoch": info.epoch, "alpha": a, "loss": float(l)} for a, l in zip(self.alphas, losses.tolist())]
        valley = {
            "step": t, "epoch": info.epoch, "floor": prof.floor, "height": prof.height, "barrier": int(prof.barrier),
            "barrier_height": prof.barrier_height, "left_loss": prof.left_loss, "right_loss": prof.right_loss,
            "argmin_alpha": prof.argmin_alpha, "interior_min": int(prof.interior_min),
            "barrier_rel_tol": BARRIER_REL_TOL, "step_class": cls, "class_tol": tol,
            "class_rel_tol": self.opts.class_rel_tol, "lr": info.lr, "lambda1": lam, "lambda1_step": lam_step,
            "eta_lambda1": eta_lam,
        }
        return {"interpolation": interp, "valley": [valley]}

    def _epoch_row(self, epoch: int, step: int) -> dict[str, Any]:
        c = self._counts
        row: dict[str, Any] = {"epoch": epoch, "step": step, "n_steps": int(c["n_steps"])}
        row.update({f"n_{k}": int(c[f"n_{k}"]) for k in (*STEP_CLASSES, UNDEFINED)})
        for k in STEP_CLASSES:
            n = c[f"n_lambda1_{k}"]
            row[f"eta_lambda1_{k}"] = c[f"sum_eta_lambda1_{k}"] / n if n else math.nan
        n_all = sum(c[f"n_lambda1_{k}"] for k in STEP_CLASSES)
        row["eta_lambda1_mean"] = sum(c[f"sum_eta_lambda1_{k}"] for k in STEP_CLASSES) / n_all if n_all else math.nan
        row["lambda1_source"] = self.opts.lambda1
        self._counts = _empty_counts()
        return row

    def measure(self, info: StepInfo) -> Rows:
        rows: Rows = {}
        # A call with θ_t measures its segment, except at an epoch end that the segment schedule skips: the
        # Scope then calls only to write the epoch's class counts (and hands θ_t to every due probe).
        if info.theta_prev is not None and (self.wants_segment(info.step - 1, info.epoch) or not info.epoch_end):
            rows = self._segment(info)
        if info.epoch_end and self._counts["n_steps"] > 0:
            rows["step_classes"] = [self._epoch_row(info.epoch, info.step)]
        return rows

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        # The cached end point is not saved: after a restore the next segment evaluates L(θ_t) afresh,
        # which gives the same bits (see the module docstring), at the cost of one point.
        return {"counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._end = None
        self._counts = {**_empty_counts(), **state.get("counts", {})}
