"""Gradient noise against curvature (Xing et al. 2018, Appendix D, future work): how the covariance of
minibatch gradients lines up with the Hessian's top eigenvectors. The estimators and the covariance they
estimate are in :mod:`sgdscope.curvature.noise`."""

from __future__ import annotations

import math

from sgdscope.curvature import hutchinson_trace
from sgdscope.curvature.noise import gradient_noise, overlap_chance
from sgdscope.measure.probes.base import Probe, Rows, StepInfo
from sgdscope.measure.probes.sharpest import eigen_and_grads


class GradientNoiseProbe(Probe):
    """``gradient_noise``: per tracked eigenpair i ≤ k, σ_i² = Var_j⟨g_j, e_i⟩ over ``n_grads`` gradients of
    minibatches of the training batch size B (each drawn without replacement from the measurement set of
    M examples, from the probe's own generator), λ_i and σ_i²/λ_i. ``gradient_noise_step``: the overlap
    ‖U_CᵀV_H‖_F²/m of the top-m noise directions with the top-k Hessian subspace and its chance level k/p;
    tr(C) (unbiased), tr(H) by Hutchinson with its standard error, and tr(C)/tr(H).

    C is the covariance of a size-B minibatch gradient, (M − B)/(B(M − 1))·Σ with Σ the per-example
    covariance (where a batch's loss is a mean of per-example terms); B and M are in each row."""

    name = "gradient_noise"
    tables = ("gradient_noise", "gradient_noise_step")

    def measure(self, info: StepInfo) -> Rows:
        env, o = self.env, self.opts
        res, grads = eigen_and_grads(self, "gradient-noise", info, o.n_grads)
        stats = gradient_noise(grads, res.vectors[: o.k], o.m)
        tr_h = hutchinson_trace(env.tracker.operator(info.step), n=o.trace_samples,
                                generator=env.generator("gradient-noise-trace", info.step))
        base = {"step": info.step, "epoch": info.epoch}
        rows = []
        for i in range(o.k):
            lam, var = float(res.values[i]), float(stats.variance[i])
            rows.append({**base, "eigen_index": i + 1, "eigenvalue": lam, "variance": var,
                         "ratio": var / lam if lam != 0 else math.nan})
        step = {
            **base, "overlap": stats.overlap, "overlap_chance": overlap_chance(o.k, env.tracker.n_params),
            "m": o.m, "k": o.k, "trace_c": stats.trace, "trace_h": tr_h.value, "trace_h_stderr": tr_h.stderr,
            "trace_ratio": stats.trace / tr_h.value if tr_h.value != 0 else math.nan,
            "noise_top": float(stats.top[0]), "n_grads": o.n_grads, "batch_size": env.minibatch_size,
            "measure_size": env.measure_size, "n_params": env.tracker.n_params,
        }
        return {"gradient_noise": rows, "gradient_noise_step": [step]}
