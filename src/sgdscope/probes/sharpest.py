"""Probes of Jastrzebski et al. (2019): the loss along the top eigenvectors, k_min, α-scaled steps and
the alignment of gradients with the sharpest directions.

Every probe here takes its eigenvectors from the shared :class:`~sgdscope.probes.eigen.EigenTracker`,
evaluates on the run's fixed measurement subset under the run's BN policy, and draws its minibatch
gradients from its own generator, so it never perturbs training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sgdscope.curvature.flat import get_flat
from sgdscope.curvature import EigenResult
from sgdscope.landscape import alpha_step_changes, k_min, loss_along, minibatch_grads, random_direction, typical_step
from sgdscope.probes.base import Probe, Rows, StepInfo


def _eigen_and_grads(probe: Probe, tag: str, info: StepInfo, n: int) -> tuple[EigenResult, Tensor]:
    """The tracker's eigenpairs at this step, and ``n`` minibatch gradients of the run's batch size drawn
    from the measurement subset with the probe's own generator: (n, n_params).

    The tracker always holds at least max(eigen_indices) pairs (see ``probes._tracker_k``)."""
    ctx = probe.ctx
    grads = minibatch_grads(
        ctx.model, ctx.loss_fn, ctx.measure_x, ctx.measure_y, min(ctx.cfg.optimizer.batch_size, len(ctx.measure_y)),
        n, ctx.generator(tag, info.step), bn_policy=ctx.cfg.measure.bn_policy, weight_decay=ctx.l2_in_measurements,
    )
    return ctx.tracker.get(info.step), grads


class DirectionProbe(Probe):
    """``direction``: L(θ + k·Δθ̄_i·e_i) on the k grid, with Δθ̄_i = η·mean_j |⟨g_j, e_i⟩| over
    ``n_grads`` minibatch gradients (the typical SGD step along e_i); ``k_min``: the smallest grid k > 0
    at which the loss has risen by the threshold on both sides."""

    name = "direction"

    def measure(self, info: StepInfo) -> Rows:
        ctx, pc = self.ctx, self.pcfg
        res, grads = _eigen_and_grads(self, "direction", info, pc.n_grads)
        theta = get_flat(ctx.model)
        ks = sorted(set(float(k) for k in pc.ks) | {0.0})
        kw = dict(loss_fn=ctx.loss_fn, bn_policy=ctx.cfg.measure.bn_policy, weight_decay=ctx.l2_in_measurements)
        direction, kmin = [], []
        for i in pc.eigen_indices:
            e = res.vectors[i - 1]
            scale = typical_step(ctx.model, e, info.lr, grads)
            curve = loss_along(ctx.model, theta, e * scale, ks, ctx.measure_batches, **kw)
            l0 = float(curve[ks.index(0.0)])
            base = {"step": info.step, "epoch": info.epoch, "eigen_index": i}
            direction += [
                {**base, "k": k, "loss": float(l), "step_scale": float(scale), "eigenvalue": float(res.values[i - 1])}
                for k, l in zip(ks, curve.tolist())
            ]
            kmin += [{**base, "threshold": t, "k_min": k_min(ks, curve, l0, t)} for t in pc.thresholds]
        return {"direction": direction, "k_min": kmin}


class AlphaStepProbe(Probe):
    """``alpha_step``: E_j[L(θ − α·η·⟨g_j, e_i⟩e_i)] − L(θ) and its ratio to L(θ), for each α, each
    requested e_i and a random unit direction (``eigen_index`` 0) as the control."""

    name = "alpha_step"

    def measure(self, info: StepInfo) -> Rows:
        ctx, pc = self.ctx, self.pcfg
        res, grads = _eigen_and_grads(self, "alpha-step", info, pc.n_grads)
        rand = random_direction(ctx.model, ctx.generator("alpha-random", info.step))
        dirs = [(i, res.vectors[i - 1]) for i in pc.eigen_indices] + [(0, rand)]
        rows = []
        for i, e in dirs:
            change, rel = alpha_step_changes(
                ctx.model, e, info.lr, grads, pc.alphas, ctx.measure_batches, loss_fn=ctx.loss_fn,
                bn_policy=ctx.cfg.measure.bn_policy, weight_decay=ctx.l2_in_measurements,
            )
            rows += [
                {"step": info.step, "epoch": info.epoch, "eigen_index": i, "direction": f"e{i}" if i else "random",
                 "alpha": float(a), "loss_change": float(c), "relative_change": float(r)}
                for a, c, r in zip(pc.alphas, change.tolist(), rel.tolist())
            ]
        return {"alpha_step": rows}


class AlignmentProbe(Probe):
    """``alignment``: cos(g, e_i) for the minibatch gradient of this step and for the full gradient on
    the measurement subset, for each tracked eigenvector."""

    name = "alignment"

    def measure(self, info: StepInfo) -> Rows:
        ctx = self.ctx
        res = ctx.tracker.get(info.step)
        full = ctx.tracker.operator().gradient()
        mini = info.grad if info.grad is not None else _eigen_and_grads(self, "alignment", info, 1)[1][0]
        rows = []
        for i in range(res.vectors.shape[0]):
            e = res.vectors[i]
            rows.append({
                "step": info.step, "epoch": info.epoch, "eigen_index": i + 1, "eigenvalue": float(res.values[i]),
                "cos_minibatch": float(torch.dot(mini, e) / mini.norm().clamp_min(1e-30)),
                "cos_full": float(torch.dot(full, e) / full.norm().clamp_min(1e-30)),
            })
        return {"alignment": rows}
