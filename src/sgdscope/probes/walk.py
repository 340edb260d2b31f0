"""Probe of Xing et al. (2018): the loss interpolated between consecutive iterates and its valley profile.

For step t it evaluates L((1−α)θ_t + αθ_{t+1}) on the α grid (default 0, 0.1, …, 0.9 and the end point
1) over the whole training set (or the measurement subset), then summarises the curve: the valley floor
min_α L, the height of the iterate above it, and whether a barrier was crossed (an interior point higher
than both end points, the paper's footnote 1).
"""

from __future__ import annotations

import torch

from sgdscope.curvature.flat import get_flat
from sgdscope.landscape import interpolate, valley_profile
from sgdscope.probes.base import Probe, Rows, StepInfo


class InterpolationProbe(Probe):
    """Rows of ``interpolation`` (step, alpha, loss) and ``valley`` (one per step)."""

    name = "interpolation"

    def __init__(self, pcfg, ctx) -> None:
        super().__init__(pcfg, ctx)
        a = pcfg.alphas
        self.alphas = torch.linspace(0, 1, a + 1).tolist() if isinstance(a, int) else list(a)
        if self.alphas[0] != 0 or self.alphas[-1] != 1:
            from sgdscope.errors import ConfigError

            raise ConfigError("probes.interpolation.alphas: the grid must start at 0 and end at 1 (the two iterates)")

    def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
        return False  # runs only when the trainer kept θ_t for it (see wants_prev)

    def wants_prev(self, next_step: int, epoch: int, epoch_end: bool) -> bool:
        epochs = self.pcfg.epochs
        every = 1 if self.pcfg.every == "epoch" else self.pcfg.every
        return (epochs is None or epoch in epochs) and (next_step - 1) % every == 0

    def measure(self, info: StepInfo) -> Rows:
        ctx = self.ctx
        batches = ctx.train_batches if self.pcfg.subset == "full" else ctx.measure_batches
        losses = interpolate(
            ctx.model, info.theta_prev, get_flat(ctx.model), self.alphas, batches, loss_fn=ctx.loss_fn,
            bn_policy=ctx.cfg.measure.bn_policy, weight_decay=ctx.l2_in_measurements,
        )
        prof = valley_profile(losses, self.alphas, height=self.pcfg.height)
        t = info.step - 1  # the segment θ_t → θ_{t+1}
        interp = [{"step": t, "epoch": info.epoch, "alpha": a, "loss": float(l)} for a, l in zip(self.alphas, losses.tolist())]
        valley = {
            "step": t, "epoch": info.epoch, "floor": prof.floor, "height": prof.height, "barrier": int(prof.barrier),
            "barrier_height": prof.barrier_height, "left_loss": prof.left_loss, "right_loss": prof.right_loss,
            "argmin_alpha": prof.argmin_alpha, "interior_min": int(prof.interior_min),
        }
        return {"interpolation": interp, "valley": [valley]}
