"""Warm eigen-tracking along an SGD trajectory: HVPs per top-5 solve, warm against cold, at the defaults.

A digits MLP (sgdscope's default ``mlp``: 64-100-100-10, float32) is trained with plain SGD (batch 128,
lr 0.1) and the top-5 Hessian eigenpairs over a fixed measurement set are solved after every step, by

* ``warm``: ``top_eigenpairs(op, k=5, init=previous.basis)`` at the default settings (the tracker's call);
* ``warm_vectors``: the same with ``init=previous.vectors`` (only k vectors fed back, as before basis);
* ``cold``: the default settings from a random start;
* ``cold_residual_only``: the previous defaults (tol 1e-3 on the residual, no eigenvalue target), cold;
* ``reference``: a tight cold solve of a float64 copy of the model at the same parameters
  (tol 1e-6 and eigenvalue error bound 1e-9), whose convergence is recorded per step.

Also ``warm_epoch``: warm solves one epoch apart (init = the basis from the solve an epoch earlier).

Why the median cannot reach k here, measured at every step against the previous warm basis B (k + guard
rows): ``drift_sin`` = ‖(I − P_B) v_i‖ for the reference eigenvectors v_i (how far the top-5 left the old
subspace in one step), and ``warm_block_only`` = the eigenvalue error of Rayleigh–Ritz on B alone (the
solve stopped after its first block, k + guard products). Where that error exceeds 1e-3, no solve that
only re-weights the old subspace can meet the target and at least one expansion block is needed.
Errors are relative to the reference values; residuals are the true ‖Hv − λv‖/|λ| of the returned pairs,
recomputed with the float64 operator (those products are not counted). HVP counts are deterministic, so
this benchmark reads the same on a busy box. Writes bench/results/tracking.json.

    .venv/bin/python bench/tracking.py [--steps 100] [--measure 1000] [--solver '{"tol": 1e-3}']

``--solver`` (JSON) passes keyword arguments to the measured solves (not to the reference), to compare
settings against the defaults; the JSON records them.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import numpy as np
import torch

from sgdscope.config import DataConfig, ModelConfig
from sgdscope.curvature import HessianOperator, top_eigenpairs
from sgdscope.data import load_dataset
from sgdscope.losses import cross_entropy, split_batches
from sgdscope.models import build_model

K, TRAIN_BATCH, MEASURE_BATCH, SEED = 5, 128, 500, 0
TARGETS = {"warm_median_hvps": 2 * K, "max_rel_err": 1e-3, "max_residual": 5e-2}
REFERENCE = {"tol": 1e-6, "tol_eig": 1e-9, "max_hvps": 2000}


def setup(n_measure: int, lr: float = 0.1):
    """The model, its SGD optimizer, the training split and the measurement batches."""
    torch.manual_seed(SEED)
    data = load_dataset(DataConfig(name="digits"), seed=SEED)
    model = build_model(ModelConfig(name="mlp"), data.input_shape, data.num_classes)
    x, y = data.train.x, data.train.y
    batches = split_batches(x[:n_measure], y[:n_measure], MEASURE_BATCH)
    return model, torch.optim.SGD(model.parameters(), lr=lr), (x, y), batches


def reference(model, batches):
    """Tight cold top-K of the float64 copy of the model, and that operator (for true residuals)."""
    m64 = copy.deepcopy(model).double()
    op64 = HessianOperator(m64, cross_entropy, [(x.double(), y) for x, y in batches])
    return top_eigenpairs(op64, k=K, **REFERENCE), op64


def score(res, ref, op64) -> dict:
    """HVPs, max relative eigenvalue error against ``ref`` and max true relative residual of ``res``."""
    v64 = res.vectors.double()
    true_res = (op64.matmat(v64) - res.values.double()[:, None] * v64).norm(dim=1) / res.values.double().abs()
    err = ((res.values.double() - ref.values) / ref.values).abs()
    bound_ok = bool((err * ref.values.abs() <= res.error_bounds.double() * 1.01 + 1e-12).all())
    return {
        "hvps": res.n_hvps, "converged": res.converged, "max_rel_err": float(err.max()),
        "max_residual": float(true_res.max()), "bounds_hold": bound_ok,
    }


def summary(rows: list[dict]) -> dict:
    h = np.array([r["hvps"] for r in rows])
    return {
        "n": len(rows), "median_hvps": float(np.median(h)), "min_hvps": int(h.min()), "max_hvps": int(h.max()),
        "max_rel_err": max(r["max_rel_err"] for r in rows), "max_residual": max(r["max_residual"] for r in rows),
        "all_converged": all(r["converged"] for r in rows), "bounds_hold": all(r["bounds_hold"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="SGD steps (one measurement after each, and at 0)")
    ap.add_argument("--measure", type=int, default=1000, help="examples in the measurement set")
    ap.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (the config default is 0.1)")
    ap.add_argument("--solver", type=json.loads, default={}, help="JSON keyword arguments of the measured solves")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tracking.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, opt, (x, y), batches = setup(args.measure, args.lr)
    steps_per_epoch = -(-len(x) // TRAIN_BATCH)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED + 1))
    names = ("warm", "warm_vectors", "cold", "cold_residual_only", "warm_epoch")
    rows: dict[str, list[dict]] = {name: [] for name in names}
    prev = {"warm": None, "warm_vectors": None, "warm_epoch": None}
    ref_hvps, ref_converged, drift = [], [], []
    for step in range(args.steps + 1):
        op = HessianOperator(model, cross_entropy, batches)
        ref, op64 = reference(model, batches)
        ref_hvps.append(ref.n_hvps)
        ref_converged.append(ref.converged)
        # The same random start for both cold solves.
        gen = lambda: torch.Generator().manual_seed(step)  # noqa: E731
        runs = {
            "cold": top_eigenpairs(op, k=K, generator=gen(), **args.solver),
            "cold_residual_only": top_eigenpairs(op, k=K, generator=gen(), tol=1e-3, tol_eig=None),
        }
        if prev["warm"] is not None:
            B = prev["warm"].basis
            runs["warm"] = top_eigenpairs(op, k=K, init=B, **args.solver)
            only = top_eigenpairs(op, k=K, init=B, max_hvps=len(B), **args.solver)
            Q = torch.linalg.qr(B.double().T).Q
            v = ref.vectors.double()
            drift.append({"step": step, "drift_sin": (v - (v @ Q) @ Q.T).norm(dim=1).tolist(),
                          "warm_block_only_max_rel_err": float(((only.values.double() - ref.values) / ref.values)
                                                               .abs().max()), "warm_block_hvps": only.n_hvps})
            runs["warm_vectors"] = top_eigenpairs(op, k=K, init=prev["warm_vectors"].vectors, **args.solver)
        if step % steps_per_epoch == 0:
            if prev["warm_epoch"] is not None:
                runs["warm_epoch"] = top_eigenpairs(op, k=K, init=prev["warm_epoch"].basis, **args.solver)
            prev["warm_epoch"] = runs.get("warm_epoch", runs["cold"])
        for name, res in runs.items():
            rows[name].append({"step": step, **score(res, ref, op64)})
        # A chain starts from the cold solve at step 0, then follows its own results.
        prev["warm"] = runs.get("warm", runs["cold"])
        prev["warm_vectors"] = runs.get("warm_vectors", runs["cold"])
        if step < args.steps:
            idx = order[(step * TRAIN_BATCH) % len(x) :][:TRAIN_BATCH]
            opt.zero_grad()
            cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()

    sums = {name: summary(r) for name, r in rows.items() if r}
    warm, cold = sums["warm"], sums["cold"]
    verdicts = {
        "warm_median_hvps": {"value": warm["median_hvps"], "pass": warm["median_hvps"] <= TARGETS["warm_median_hvps"]},
        "max_rel_err": {"value": warm["max_rel_err"], "pass": warm["max_rel_err"] <= TARGETS["max_rel_err"]},
        "max_residual": {"value": warm["max_residual"], "pass": warm["max_residual"] <= TARGETS["max_residual"]},
    }
    out = {
        "setting": {
            "model": "mlp 64-100-100-10 (float32)", "n_params": HessianOperator(model, cross_entropy, batches).n_params,
            "data": "digits", "measurement_set": args.measure, "measure_batch": MEASURE_BATCH, "sgd_lr": args.lr,
            "train_batch": TRAIN_BATCH, "steps": args.steps, "steps_per_epoch": steps_per_epoch, "k": K,
            "solver": args.solver or "top_eigenpairs defaults", "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "reference": {
            **REFERENCE, "model": "float64 copy at the same parameters", "converged_all": all(ref_converged),
            "median_hvps": float(np.median(ref_hvps)),
        },
        "targets": TARGETS, "verdicts": verdicts, "summary": sums,
        "why": {
            "median_max_drift_sin": float(np.median([max(d["drift_sin"]) for d in drift])),
            "median_warm_block_only_max_rel_err": float(np.median([d["warm_block_only_max_rel_err"] for d in drift])),
            "share_of_steps_warm_block_only_within_1e-3": float(np.mean(
                [d["warm_block_only_max_rel_err"] <= 1e-3 for d in drift])),
            "per_step": drift,
        },
        "ratios": {
            "cold_over_warm_median_hvps": cold["median_hvps"] / warm["median_hvps"],
            "cold_residual_only_over_warm_median_hvps": sums["cold_residual_only"]["median_hvps"] / warm["median_hvps"],
            "warm_vectors_over_warm_median_hvps": sums["warm_vectors"]["median_hvps"] / warm["median_hvps"],
        },
        "per_step": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))

    print(f"{'solves':<20}{'n':>4}{'median':>8}{'min':>5}{'max':>5}{'max rel err':>13}{'max resid':>11}  bounds hold")
    for name, s in sums.items():
        print(
            f"{name:<20}{s['n']:>4}{s['median_hvps']:>8.1f}{s['min_hvps']:>5}{s['max_hvps']:>5}"
            f"{s['max_rel_err']:>13.2e}{s['max_residual']:>11.2e}  {s['bounds_hold']}"
        )
    why = out["why"]
    print(f"one step moves the top-5 out of the old basis by sin {why['median_max_drift_sin']:.3f} (median of the max);"
          f" Rayleigh-Ritz on the old basis alone: median max error {why['median_warm_block_only_max_rel_err']:.1e},"
          f" within 1e-3 at {why['share_of_steps_warm_block_only_within_1e-3']:.0%} of steps")
    print(f"reference converged at every step: {all(ref_converged)}; cold/warm median HVPs "
          f"{out['ratios']['cold_over_warm_median_hvps']:.2f}x; verdicts: "
          + ", ".join(f"{k} {'pass' if v['pass'] else 'FAIL'}" for k, v in verdicts.items()))


if __name__ == "__main__":
    main()
