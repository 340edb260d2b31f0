"""2-D loss slices around θ_t with the trajectory projected onto them (Li et al. 2018).

At each due step the probe evaluates S(a, b) = L(θ_t + a·d₁ + b·d₂) on a ``grid × grid`` lattice of
[−span, span]² (table ``slice2d``) and projects the iterates it kept, θ_s − θ_t, onto the plane by least
squares (table ``slice2d_path``; see :mod:`sgdscope.landscape.slices`).

* ``directions: eigen``: d₁, d₂ = e₁, e₂ of the shared eigen tracker (unit vectors; a, b are distances in
  parameter space). Only then does the probe use the tracker.
* ``directions: random``: two filter-normalised Gaussian directions drawn from the probe's own generator
  (seeded by the Scope's seed and the step), biases and BN parameters not perturbed.

Every grid point of one slice uses the same dropout masks (one mask seed per slice), under the Scope's BN
policy, and the model's parameters are restored: the probe never perturbs training.

Memory: the iterates are snapshots of θ at this probe's own due steps, kept on the CPU in the model's dtype:
at most ``max_snapshots`` of them, i.e. ``max_snapshots × n_params × 4`` bytes in float32 (64 snapshots of a
1M-parameter model: 256 MB). When the budget is full every other snapshot is dropped and from then on only
every second due step is kept (the stride doubles), so the path always covers the whole run at a coarser
resolution. The snapshots and the stride are in :meth:`state_dict`, so a resumed run projects the same path.
"""

from __future__ import annotations

from typing import Any

import torch

from sgdscope.curvature.flat import get_flat
from sgdscope.landscape import filter_normalized_direction, loss_slice, plane_coordinates, slice_axis
from sgdscope.measure.probes.base import Probe, Rows, StepInfo


class Slice2DProbe(Probe):
    """Rows of ``slice2d`` (step, epoch, a, b, loss, directions) and ``slice2d_path`` (step, snapshot_step, a,
    b, residual, distance, directions)."""

    name = "slice2d"
    tables = ("slice2d", "slice2d_path")

    def __init__(self, opts, env) -> None:
        super().__init__(opts, env)
        self.snapshots: list[tuple[int, torch.Tensor]] = []
        self.stride, self.n_due = 1, 0

    def tracker_k(self) -> int:
        """Eigenpairs this probe needs from the shared tracker: two for eigen directions, none otherwise."""
        return 2 if self.opts.directions == "eigen" else 0

    def _directions(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        env = self.env
        if self.opts.directions == "eigen":
            vec = env.tracker.get(step, 2).vectors
            return vec[0], vec[1]
        gen = env.generator("slice2d", step)
        return filter_normalized_direction(env.model, gen), filter_normalized_direction(env.model, gen)

    def _keep(self, step: int, theta: torch.Tensor) -> None:
        if self.n_due % self.stride == 0:
            self.snapshots.append((step, theta.detach().to("cpu", copy=True)))
            if len(self.snapshots) > self.opts.max_snapshots:
                self.snapshots = self.snapshots[::2]
                self.stride *= 2
        self.n_due += 1

    def measure(self, info: StepInfo) -> Rows:
        env, o = self.env, self.opts
        theta = get_flat(env.model)
        d1, d2 = self._directions(info.step)
        axis = slice_axis(o.span, o.grid, theta)
        batches = env.train_batches if o.subset == "full" else env.measure_batches
        kw = env.kernel_kw("slice2d", info.step)
        grid = loss_slice(env.model, theta, d1, d2, axis, axis, batches, method=o.method, **kw)
        base = {"step": info.step, "epoch": info.epoch, "directions": o.directions}
        a_list = axis.tolist()
        rows = [{**base, "a": a, "b": b, "loss": float(l)}
                for a, line in zip(a_list, grid.tolist()) for b, l in zip(a_list, line)]
        self._keep(info.step, theta)
        disp = torch.stack([s.to(theta.device, theta.dtype) for _, s in self.snapshots]) - theta
        coords, resid = plane_coordinates(d1, d2, disp)
        path = [{**base, "snapshot_step": s, "a": float(c[0]), "b": float(c[1]), "residual": float(r),
                 "distance": float(n)}
                for (s, _), c, r, n in zip(self.snapshots, coords.tolist(), resid.tolist(), disp.norm(dim=1).tolist())]
        return {"slice2d": rows, "slice2d_path": path}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": [s for s, _ in self.snapshots], "stride": self.stride, "n_due": self.n_due,
                "thetas": torch.stack([t for _, t in self.snapshots]) if self.snapshots else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        thetas = state.get("thetas")
        self.snapshots = list(zip(state.get("steps", []), thetas.cpu())) if thetas is not None else []
        self.stride, self.n_due = int(state.get("stride", 1)), int(state.get("n_due", 0))
