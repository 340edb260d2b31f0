"""Probe of Xing et al. (2018): the loss interpolated between consecutive iterates and its valley profile.

For the update θ_t → θ_{t+1} it evaluates L((1−α)θ_t + αθ_{t+1}) on the α grid (default 0, 0.1, …, 0.9
and the end point 1) over the whole training data (or the measurement set) with one fixed set of dropout
masks for every point, then summarises the curve: the valley floor min_α L, the height of the iterate
above it, and whether a barrier was crossed (an interior point higher than both end points by more than
the recorded relative tolerance, the paper's footnote 1).
"""

from __future__ import annotations

import torch

from sgdscope.curvature.flat import get_flat
from sgdscope.landscape import BARRIER_REL_TOL, interpolate, valley_profile  # the tolerance is recorded per row
from sgdscope.measure.probes.base import Probe, Rows, StepInfo


class InterpolationProbe(Probe):
    """Rows of ``interpolation`` (step, alpha, loss) and ``valley`` (one per segment), labelled with the
    segment's start t and committed at t + 1."""

    name = "interpolation"
    tables = ("interpolation", "valley")

    def __init__(self, opts, env) -> None:
        super().__init__(opts, env)
        a = opts.alphas
        self.alphas = torch.linspace(0, 1, a + 1).tolist() if isinstance(a, int) else list(a)

    def due(self, step: int, epoch_end: bool) -> bool:
        return False  # runs on segments only (wants_segment)

    def wants_segment(self, t: int, epoch: int) -> bool:
        epochs = self.opts.epochs
        every = 1 if self.opts.every == "epoch" else self.opts.every
        return (epochs is None or epoch in epochs) and t % every == 0

    def measure(self, info: StepInfo) -> Rows:
        env = self.env
        batches = env.train_batches if self.opts.subset == "full" else env.measure_batches
        t = info.step - 1  # the segment θ_t → θ_{t+1}
        losses = interpolate(env.model, info.theta_prev, get_flat(env.model), self.alphas, batches,
                             **env.kernel_kw("interpolation", t))
        prof = valley_profile(losses, self.alphas, height=self.opts.height, rel_tol=BARRIER_REL_TOL)
        interp = [{"step": t, "epoch": info.epoch, "alpha": a, "loss": float(l)} for a, l in zip(self.alphas, losses.tolist())]
        valley = {
            "step": t, "epoch": info.epoch, "floor": prof.floor, "height": prof.height, "barrier": int(prof.barrier),
            "barrier_height": prof.barrier_height, "left_loss": prof.left_loss, "right_loss": prof.right_loss,
            "argmin_alpha": prof.argmin_alpha, "interior_min": int(prof.interior_min),
            "barrier_rel_tol": BARRIER_REL_TOL,
        }
        return {"interpolation": interp, "valley": [valley]}
