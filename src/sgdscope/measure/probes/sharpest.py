"""Probes of Jastrzebski et al. (2019): the loss along the top eigenvectors, k_min, α-scaled steps and
the alignment of gradients with the sharpest directions.

Every probe here takes its eigenvectors from the shared :class:`~sgdscope.measure.tracker.EigenTracker`,
evaluates on the fixed measurement set under the Scope's BN policy with one set of dropout masks per
measurement, and draws its minibatch gradients from its own generator, so it never perturbs training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sgdscope.curvature import EigenResult
from sgdscope.curvature.flat import get_flat
from sgdscope import distributed
from sgdscope.landscape import alpha_step_changes, k_min, loss_along, random_direction, typical_step
from sgdscope.measure.probes.base import Probe, Rows, StepInfo


def eigen_and_grads(probe: Probe, tag: str, info: StepInfo, n: int) -> tuple[EigenResult, Tensor]:
    """The tracker's eigenpairs at this step, and ``n`` minibatch gradients of the training batch size drawn
    from the measurement set with the probe's own generator: (n, n_params).

    The tracker holds at least max(eigen_indices) pairs (the Scope sizes it from every probe's needs)."""
    env = probe.env
    x, y = env.measure_xy
    kw = env.kernel_kw(tag, info.step)
    del kw["loss_fn"]
    # dealt out over the ranks when the measurement set is sharded; the same minibatches on any world size
    grads = distributed.minibatch_grads(env.measure_batches, env.model, env.loss_fn, x, y, env.minibatch_size, n,
                                        env.generator(tag, info.step), **kw)
    return env.tracker.get(info.step), grads


class DirectionProbe(Probe):
    """``direction``: L(θ + k·Δθ̄_i·e_i) on the k grid, with Δθ̄_i = η·mean_j |⟨g_j, e_i⟩| over
    ``n_grads`` minibatch gradients (the typical SGD step along e_i); ``k_min``: the smallest grid k > 0
    at which the loss has risen by the threshold on both sides."""

    name = "direction"
    tables = ("direction", "k_min")

    def measure(self, info: StepInfo) -> Rows:
        env, o = self.env, self.opts
        res, grads = eigen_and_grads(self, "direction", info, o.n_grads)
        theta = get_flat(env.model)
        ks = sorted(set(float(k) for k in o.ks) | {0.0})
        direction, kmin = [], []
        for i in o.eigen_indices:
            e = res.vectors[i - 1]
            scale = typical_step(env.model, e, info.lr, grads)
            curve = loss_along(env.model, theta, e * scale, ks, env.measure_batches, **env.kernel_kw("direction", info.step))
            l0 = float(curve[ks.index(0.0)])
            base = {"step": info.step, "epoch": info.epoch, "eigen_index": i}
            direction += [
                {**base, "k": k, "loss": float(l), "step_scale": float(scale), "eigenvalue": float(res.values[i - 1])}
                for k, l in zip(ks, curve.tolist())
            ]
            kmin += [{**base, "threshold": t, "k_min": k_min(ks, curve, l0, t)} for t in o.thresholds]
        return {"direction": direction, "k_min": kmin}


class AlphaStepProbe(Probe):
    """``alpha_step``: E_j[L(θ − α·η·⟨g_j, e_i⟩e_i)] − L(θ) and its ratio to L(θ), for each α, each
    requested e_i and a random unit direction (``eigen_index`` 0) as the control."""

    name = "alpha_step"
    tables = ("alpha_step",)

    def measure(self, info: StepInfo) -> Rows:
        env, o = self.env, self.opts
        res, grads = eigen_and_grads(self, "alpha-step", info, o.n_grads)
        rand = random_direction(env.model, env.generator("alpha-random", info.step))
        dirs = [(i, res.vectors[i - 1]) for i in o.eigen_indices] + [(0, rand)]
        rows = []
        for i, e in dirs:
            change, rel = alpha_step_changes(
                env.model, e, info.lr, grads, o.alphas, env.measure_batches, **env.kernel_kw("alpha-step", info.step)
            )
            rows += [
                {"step": info.step, "epoch": info.epoch, "eigen_index": i, "direction": f"e{i}" if i else "random",
                 "alpha": float(a), "loss_change": float(c), "relative_change": float(r)}
                for a, c, r in zip(o.alphas, change.tolist(), rel.tolist())
            ]
        return {"alpha_step": rows}


class AlignmentProbe(Probe):
    """``alignment``: cos(g, e_i) for the minibatch gradient of this step and for the full gradient on
    the measurement set, for each tracked eigenvector."""

    name = "alignment"
    tables = ("alignment",)

    def measure(self, info: StepInfo) -> Rows:
        env = self.env
        res = env.tracker.get(info.step)
        full = env.tracker.operator(info.step).gradient()
        mini = info.grad if info.grad is not None else eigen_and_grads(self, "alignment", info, 1)[1][0]
        rows = []
        for i in range(res.vectors.shape[0]):
            e = res.vectors[i]
            rows.append({
                "step": info.step, "epoch": info.epoch, "eigen_index": i + 1, "eigenvalue": float(res.values[i]),
                "cos_minibatch": float(torch.dot(mini, e) / mini.norm().clamp_min(1e-30)),
                "cos_full": float(torch.dot(full, e) / full.norm().clamp_min(1e-30)),
            })
        return {"alignment": rows}
