"""Hand-built run stores and sweeps with known answers, shared by the read-side tests (plots, report,
sweeps): one module that test modules import, instead of importing each other."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from sgdscope.store import RunStore

SPE = 10  # steps per epoch of the synthetic runs
KS = [0, 0.25, -0.25, 0.5, -0.5, 1, -1, 2, -2, 4, -4, 8, -8, 16, -16]
ALPHAS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
BARRIER_STEPS = {52, 55}  # in epoch 6: the interpolation of these steps crosses a barrier


def lam1(step: int, lr: float) -> float:
    """A λ₁ trace that rises to a peak (earlier and lower for larger lr) and then decays."""
    peak_at = 20 / (lr * 10)
    return (1.0 / lr) * (step / peak_at) * math.exp(1 - step / peak_at) + 0.1


def synthetic_run(path: Path, *, lr: float = 0.1, epochs: int = 6, seed: int = 0, full: bool = True,
                  val_accs: list[float] | None = None) -> RunStore:
    """A run store shaped like the trainer's, with every table when ``full``."""
    cfg = {
        "seed": seed, "device": "cpu", "data": {"name": "digits", "flatten": True}, "model": {"name": "mlp", "widths": [16]},
        "optimizer": {"name": "sgd", "lr": lr, "batch_size": 32, "weight_decay": 0.0},
        "schedule": {"name": "constant"}, "train": {"epochs": epochs},
        "measure": {"subset": 0.5, "min_subset": 500, "bn_policy": "train-restore", "include_l2": True},
        "probes": {"eigen": {"every": "epoch", "k": 3, "first_steps": 5}} if full else {},
        "versions": {"sgdscope": "0.1.0", "torch": "2", "device": "cpu"},
        "resolved": {"n_params": 1234, "n_train": 320, "n_val": 80, "n_test": 100, "measure_subset_size": 160,
                     "steps_per_epoch": SPE, "bn_policy": "train-restore", "l2_in_loss": False},
    }
    s = RunStore.create(path, cfg)
    rng = np.random.default_rng(seed)
    n = epochs * SPE
    s.append("train", [{
        "step": t, "epoch": (t - 1) // SPE + 1, "lr": lr, "batch_loss": 2.3 * math.exp(-t / 25) + 0.05 * rng.random(),
        "batch_acc": 1 - math.exp(-t / 20), "grad_norm": 1.0, "param_distance": 0.1 * t ** 0.5 * (1 + lr),
        "grad_cosine_prev": (math.nan if t == 1 else -0.3 - 0.1 * rng.random()), "logged_at": t,
    } for t in range(1, n + 1)])
    accs = val_accs or [0.5 + 0.05 * e for e in range(1, epochs + 1)]
    s.append("epoch", [{
        "epoch": e, "step": e * SPE, "train_loss": 2.3 * math.exp(-e / 2), "train_acc": 0.5 + 0.08 * e,
        "val_loss": 2.4 * math.exp(-e / 2), "val_acc": accs[e - 1], "test_loss": 2.5 * math.exp(-e / 2),
        "test_acc": accs[e - 1] - 0.01 * e, "weight_spectral_norm_mean": 1.0 + e, "param_norm": 10 + e, "lr": lr,
        "logged_at": e * SPE,
    } for e in range(1, epochs + 1)])
    if not full:
        s.set_status("done", step=n, epoch=epochs)
        return s
    eigen_steps = [0, 1, 2, 3, 4, 5] + [e * SPE for e in range(1, epochs + 1)]
    eig, curv, direction, kmin, alpha, align = [], [], [], [], [], []
    for t in eigen_steps:
        ep = max(1, (t - 1) // SPE + 1) if t else 0
        vals = [lam1(t, lr) / i for i in (1, 2, 3)]
        eig += [{"step": t, "epoch": ep, "index": i + 1, "value": v, "residual": 1e-4, "n_hvps": 40, "converged": 1,
                 "which": "LA", "subset_size": 160, "bn_policy": "train-restore", "includes_l2": 0, "logged_at": t}
                for i, v in enumerate(vals)]
        curv.append({"step": t, "epoch": ep, "frobenius_topk": math.sqrt(sum(v * v for v in vals)),
                     "lambda_max": vals[0], "k": 3, "logged_at": t})
        for idx in (1, 3):
            l0 = 0.5
            direction += [{"step": t, "epoch": ep, "eigen_index": idx, "k": k, "loss": l0 * (1 + 0.02 * k * k / idx),
                           "step_scale": 0.01, "eigenvalue": vals[min(idx, 3) - 1], "logged_at": t} for k in KS]
            kmin += [{"step": t, "epoch": ep, "eigen_index": idx, "threshold": th, "k_min": 1.0 if th == 0.01 else 4.0,
                      "logged_at": t} for th in (0.01, 0.1)]
        for idx, name in ((1, "e1"), (0, "random")):
            alpha += [{"step": t, "epoch": ep, "eigen_index": idx, "direction": name, "alpha": a,
                       "loss_change": 0.0, "relative_change": (a - 1) * 0.02 if idx else 0.0, "logged_at": t}
                      for a in (0.25, 0.5, 1, 2, 4)]
        align += [{"step": t, "epoch": ep, "eigen_index": i, "eigenvalue": vals[i - 1], "cos_minibatch": 0.1 * i,
                   "cos_full": -0.2 * i, "logged_at": t} for i in (1, 2, 3)]
    s.append_many({"eigen": eig, "curvature": curv, "direction": direction, "k_min": kmin, "alpha_step": alpha,
                   "alignment": align})
    # issue 13: gradient noise against curvature, batch and preconditioned sharpness, at the eigen steps
    noise = [{"step": t, "epoch": max(1, (t - 1) // SPE + 1) if t else 0, "eigen_index": i, "eigenvalue": lam1(t, lr) / i,
              "variance": 0.01 * lam1(t, lr) / i, "ratio": 0.01, "logged_at": t} for t in eigen_steps for i in (1, 2, 3)]
    noise_step = [{"step": t, "epoch": max(1, (t - 1) // SPE + 1) if t else 0, "overlap": 0.8, "overlap_chance": 3 / 1234,
                   "m": 2, "k": 3, "trace_c": 0.1, "trace_h": 10.0, "trace_h_stderr": 0.5, "trace_ratio": 0.01,
                   "logged_at": t} for t in eigen_steps]
    sharp = [{"step": t, "epoch": max(1, (t - 1) // SPE + 1) if t else 0, "batch_sharpness": 1.2 * lam1(t, lr),
              "batch_sharpness_min": lam1(t, lr), "batch_sharpness_max": 1.5 * lam1(t, lr), "lambda_max": lam1(t, lr),
              "lr": lr, "lr_batch_sharpness": 1.2 * lr * lam1(t, lr), "lr_lambda_max": lr * lam1(t, lr),
              "threshold": 2 / lr, "logged_at": t} for t in eigen_steps]
    pre = [{"step": t, "epoch": max(1, (t - 1) // SPE + 1) if t else 0, "optimizer": "sgd",
            "preconditioned_sharpness": lam1(t, lr), "lambda_max": lam1(t, lr), "threshold": 2 / lr,
            "ratio": lam1(t, lr) * lr / 2, "logged_at": t} for t in eigen_steps]
    s.append_many({"gradient_noise": noise, "gradient_noise_step": noise_step, "batch_sharpness": sharp,
                   "preconditioned_sharpness": pre})
    interp, valley = [], []
    for ep in (1, epochs):
        for t in range((ep - 1) * SPE, ep * SPE):
            losses = [1.0 / (1 + t) + 0.3 * (a - 0.6) ** 2 for a in ALPHAS]
            if t in BARRIER_STEPS:
                losses[5] += 1.0
            interp += [{"step": t, "epoch": ep, "alpha": a, "loss": l, "logged_at": t + 1} for a, l in zip(ALPHAS, losses)]
            floor = min(losses)
            valley.append({"step": t, "epoch": ep, "floor": floor, "height": losses[0] - floor,
                           "barrier": int(t in BARRIER_STEPS), "barrier_height": 0.9 if t in BARRIER_STEPS else 0.0,
                           "left_loss": losses[0], "right_loss": losses[-1], "argmin_alpha": ALPHAS[losses.index(floor)],
                           "interior_min": 1, "logged_at": t + 1})
    # issue 13: step classes of the interpolated epochs, and the top-3 subspace turning by a known angle
    classes = [{"epoch": ep, "step": ep * SPE, "n_steps": SPE, "n_descend": 2, "n_cross": SPE - 3, "n_climb": 1,
                "n_flat": 0, "n_undefined": 0, "eta_lambda1_descend": 0.5, "eta_lambda1_cross": 1.5,
                "eta_lambda1_climb": 2.2, "eta_lambda1_mean": 1.4, "lambda1_source": "last", "logged_at": ep * SPE}
               for ep in (1, epochs)]
    rotation = [{"step": e * SPE, "epoch": e, "index": i, "angle_prev_deg": math.nan if e == 0 else 10.0 * i / (1 + e),
                 "angle_ref_deg": 5.0 * i * e, "overlap_prev": math.nan if e == 0 else 0.9, "overlap_ref": 1 - 0.1 * e,
                 "prev_step": (e - 1) * SPE if e else -1, "ref_step": 0, "k": 3, "logged_at": e * SPE}
                for e in range(epochs + 1) for i in (1, 2, 3)]
    s.append_many({"interpolation": interp, "valley": valley, "step_classes": classes, "rotation": rotation})
    grid = [-1.0, -0.5, 0.0, 0.5, 1.0]  # slice2d: a bowl 0.5 + a² + 2b² around each measured iterate
    slices, path = [], []
    for e in range(1, epochs + 1):
        t = e * SPE
        slices += [{"step": t, "epoch": e, "a": a, "b": b, "loss": 0.5 + a * a + 2 * b * b, "directions": "eigen",
                    "logged_at": t} for a in grid for b in grid]
        path += [{"step": t, "epoch": e, "snapshot_step": u * SPE, "a": 0.1 * (e - u), "b": -0.05 * (e - u),
                  "residual": 0.2 * (e - u), "distance": 0.3 * (e - u), "directions": "eigen", "logged_at": t}
                 for u in range(1, e + 1)]
    s.append_many({"slice2d": slices, "slice2d_path": path})
    s.set_status("done", step=n, epoch=epochs)
    return s


def synthetic_sweep(path: Path, grid: dict[str, list], seeds: int = 1, **kw) -> Path:
    """A sweep directory (sweep.yaml + runs) whose runs are synthetic stores (lr taken from the grid)."""
    from sgdscope.sweep import expand_grid, run_name

    runs = []
    for ov in expand_grid(grid, seeds):
        name = run_name(ov)
        synthetic_run(path / "runs" / name, lr=ov.get("optimizer.lr", 0.1), seed=ov.get("seed", 0), **kw)
        runs.append({"name": name, "dir": f"runs/{name}", "overrides": ov})
    spec = {"format": 1, "base": {"data": {"name": "digits"}}, "grid": grid, "seeds": seeds, "runs": runs}
    (path / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
