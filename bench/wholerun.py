"""What measuring costs a whole run: `sgdscope.train.run` of the mnist1d recipe setting with a probe
against the same run without it, CPU seconds in one process (start-up removed by a warm-up run).

Setting: sharpest-lr-sweep-cpu's model and data (MNIST-1D, MLP 40-256-256-10, SGD η = 0.3, batch 128,
epochs of 1,000 examples, measurement subset 25% / at least 1,000 examples), for ``--epochs`` epochs:

* ``bare``: no trajectory probe (the per-step statistics stay on in every variant: they are the trainer's
  default);
* ``eigen``: the eigen probe every epoch, K = 5, at the probe's default settings (the issue's target:
  ≤ 1.5× bare);
* ``interpolation``: the 11-point interpolation between consecutive iterates after every step, on the
  measurement set.

Each variant runs ``--repeats`` times, interleaved, and the median CPU time counts (the box is shared).
Every run generates its MNIST-1D data (a fixed cost of seconds, not training): the ratios are given with
it and without it (``*_excluding_data``, the data generation timed on its own and subtracted). The eigen
probe's cost per HVP (its extra CPU time over all its products, solver work included) also gives the
floor: what the probe would cost at k products per solve, the limit of any Krylov method. Writes
bench/results/wholerun.json with the eigen solves' HVP counts and convergence read back from the run's
own eigen table.

    .venv/bin/python bench/wholerun.py [--epochs 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sgdscope.config import RunConfig
from sgdscope.data import load_dataset
from sgdscope.recipes import resolve
from sgdscope.store import RunStore
from sgdscope.train import run

PROBES = {
    "bare": {},
    "eigen": {"eigen": {"every": "epoch", "k": 5}},
    "interpolation": {"interpolation": {"every": 1, "epochs": None, "alphas": 10, "subset": "measure"}},
}
TARGETS = {"eigen_over_bare": 1.5}


def config(epochs: int, probes: dict) -> dict:
    raw, _ = resolve("sharpest-lr-sweep-cpu")
    raw = copy.deepcopy(raw)
    raw["device"] = "cpu"
    raw["train"] = {**raw["train"], "epochs": epochs}
    raw["probes"] = copy.deepcopy(probes)
    return raw


def timed_run(cfg: dict, out: Path) -> float:
    t0 = time.process_time()
    run(cfg, out, progress=False)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=list(PROBES), choices=list(PROBES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "wholerun.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = ["bare"] + [n for n in args.only if n != "bare"]
    times: dict[str, list[float]] = {n: [] for n in names}
    eigen_stats: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        timed_run(config(1, PROBES["eigen"]), Path(tmp) / "warmup")  # imports, allocator, torch.func set-up
        for r in range(args.repeats):
            for n in names:
                path = Path(tmp) / f"{n}-{r}"
                times[n].append(timed_run(config(args.epochs, PROBES[n]), path))
                print(f"  {n:14s} repeat {r}: {times[n][-1]:.2f} CPU s", flush=True)
                if n == "eigen" and r == 0:
                    eig = RunStore(path).table("eigen")
                    per = eig.groupby("step").first()
                    eigen_stats = {
                        "solves": len(per), "median_hvps": float(per["n_hvps"].median()),
                        "total_hvps": int(per["n_hvps"].sum()),
                        "hvps_first_solve": int(per["n_hvps"].iloc[0]), "all_converged": bool(per["converged"].all()),
                        "subset_size": int(per["subset_size"].iloc[0]),
                    }
        data_cfg = RunConfig.model_validate(config(1, {})).data
        load_s = []
        for _ in range(3):
            t0 = time.process_time()
            load_dataset(data_cfg, seed=0)
            load_s.append(time.process_time() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    data_s = statistics.median(load_s)
    ratios = {f"{n}_over_bare": med[n] / med["bare"] for n in names if n != "bare"}
    ratios.update({f"{n}_over_bare_excluding_data": (med[n] - data_s) / (med["bare"] - data_s)
                   for n in names if n != "bare"})
    if eigen_stats:
        per_hvp = (med["eigen"] - med["bare"]) / eigen_stats["total_hvps"]
        k = PROBES["eigen"]["eigen"]["k"]
        eigen_stats["cpu_s_per_hvp_incl_solver"] = per_hvp
        eigen_stats["bare_epoch_cpu_s_excluding_data"] = (med["bare"] - data_s) / args.epochs
        ratios["eigen_floor_at_k_hvps_per_solve_excluding_data"] = (
            1 + eigen_stats["solves"] * k * per_hvp / (med["bare"] - data_s))
    verdicts = {k: {"value": ratios[k], "target": v, "pass": ratios[k] <= v} for k, v in TARGETS.items() if k in ratios}
    out = {
        "setting": {"recipe": "sharpest-lr-sweep-cpu (lr 0.3)", "epochs": args.epochs, "epoch_size": 1000,
                    "repeats": args.repeats, "threads": 1, "torch": torch.__version__, "machine": platform.machine(),
                    "probes": {n: PROBES[n] for n in names}},
        "cpu_s": times, "median_cpu_s": med, "data_generation_cpu_s": data_s, "ratios": ratios, "eigen": eigen_stats, "targets": TARGETS,
        "verdicts": verdicts,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()}, "| eigen solves:", eigen_stats)


if __name__ == "__main__":
    main()
