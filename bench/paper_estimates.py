"""Estimated wall time of every ``*-paper`` recipe, measurements included: a timed sample, extrapolated.

Nothing here runs a recipe to its end. For each distinct (model, batch size, probe settings) of a recipe's
grid points it builds the real :class:`~sgdscope.train.loop.Trainer` on the CIFAR-10 stand-in
(``data.synthetic: true``: the paper's image shape and classes, no files) with a small training and
measurement set, and times, once each:

* ``step``: ``trainer.train_step()`` at batch b = min(B, CAP_BATCH) (1 warm-up, ``STEPS`` timed; per example);
* ``forward``: an eval-mode forward pass per example (epoch evaluation, interpolation, loss along lines);
* ``hvp``: one Hessian-vector product of the measurement operator, per example;
* ``solve``: the tracker's cold eigensolve at step 0 and a warm one after one update, at the recipe's
  k, which, tol and max_hvps: HVPs spent, and the seconds beyond them (Ritz steps on n-vectors);
* ``weights``: the per-epoch ρ(W) statistic; ``checkpoint``: one ``last.pt`` write.

and counts, from the probes' own schedules (``Probe.due`` / ``wants_segment``) over the recipe's full
length, how often each measurement is due. The extrapolation, per run (grid point), with N/V/T the
training / validation / test sizes, M the measurement subset, S the steps and E the epochs:

    train         = S · step_per_example · B                       (full-batch GD: B = N)
    epochs        = E · (forward · (N + V + T) + weights + checkpoint)
    eigen         = cold + (solves − 1) · warm,  a solve = HVPs · hvp · M + its overhead
    direction     = due · (n_grads · step_per_example · B + |indices| · |ks| · forward · M)
    alpha_step    = due · (n_grads · step_per_example · B + (|indices| + 1) · (1 + |alphas| · n_grads) · forward · M)
    interpolation = segments · |alphas| · forward · (N for subset=full, else M)
    noise         = step_per_example · N   (noisy_gd: the one-off gradient-variance estimate)

``solves`` is the union of the steps where an eigen consumer is due and where Nudged-SGD refreshes its
subspace (one tracker solve serves them all). Early stopping is ignored (an upper bound for nsgd-table1).
Per-example scaling is linear, which holds once batches are large enough to fill the cores; the timed
sizes are in the JSON. A recipe's total is the sum over its grid points.

    .venv/bin/python bench/paper_estimates.py [--threads 1] [--device cpu] [--write] [--only NAME ...]

Writes bench/results/paper_estimates.json (``--device cuda``: paper_estimates_cuda.json); ``--write`` also
puts each total into its recipe's ``recipe.estimate_cpu`` (``estimate_gpu`` with CUDA), which
``sgdscope recipes`` shows.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CAP_BATCH = 128  # the step is timed at min(B, CAP_BATCH) examples and scaled per example
STEPS = 2
TIMED_N = {"simplecnn": 32, "simplecnn-medium": 8, "vgg11": 8, "resnet56": 8}
TIMED_MAX_HVPS = 60  # a timed solve stops here (then flagged "capped": its HVP count is a lower bound)  # examples for the forward / HVP / solve timings
RESULTS = Path(__file__).parent / "results"
FORMULAS = {  # seconds of one run (grid point); N, V, T: train / val / test sizes, M: measurement set, S steps, E epochs
    "train": "S * step_per_example * B   (full-batch GD: B = N)",
    "epochs": "E * (forward_per_example * (N + V + T) + weights + checkpoint)",
    "eigen": "cold + (eigen_solves - 1) * warm;  solve = hvps * hvp_per_example * M + overhead",
    "direction": "due * (n_grads * step_per_example * B + |eigen_indices| * |ks u {0}| * forward_per_example * M)",
    "alpha_step": "due * (n_grads * step_per_example * B + (|eigen_indices| + 1) * (1 + |alphas| * n_grads) "
                  "* forward_per_example * M)",
    "interpolation": "segments * |alphas| * forward_per_example * (N if subset == full else M)",
    "noise": "step_per_example * N   (noisy_gd's one-off gradient-variance estimate)",
    "recipe": "sum over the grid's points",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CPU_CLOCK = {"clock": time.process_time}  # main() switches to wall time for more than one thread


def _now(device: torch.device) -> float:
    """On CPU with one thread, this process's CPU seconds: an idle core's wall time, whatever else the shared box
    runs; with more threads, and on CUDA (after a synchronize), wall seconds."""
    _sync(device)
    return CPU_CLOCK["clock"]() if device.type == "cpu" else time.perf_counter()


def _clock(fn, device: torch.device) -> float:
    t = _now(device)
    fn()
    return _now(device) - t


def _timing_config(raw: dict[str, Any], batch: int, m: int, device: str) -> dict[str, Any]:
    """The recipe point, shrunk to what is timed: a training set of a few batches, M = m, the stand-in."""
    cfg = copy.deepcopy(raw)
    cfg["device"] = device
    b = min(batch, CAP_BATCH)
    cfg["data"].update(synthetic=True, train_size=max(4 * b, m) + 1, val_size=8, test_size=8)
    cfg["optimizer"].update(name="sgd" if cfg["optimizer"]["name"] in ("gd", "noisy_gd") else cfg["optimizer"]["name"],
                            batch_size=b)
    cfg["optimizer"].update(nudge_from=0, refresh="epoch")  # no eigensolve inside the timed steps
    cfg["train"].update(epoch_size=None, epochs=1)
    cfg["measure"].update(subset=1e-6, min_subset=m)
    probes = cfg.get("probes") or {}
    cfg["probes"] = {"eigen": probes["eigen"]} if "eigen" in probes else {}
    if "eigen" not in probes and any(p in probes for p in ("direction", "alpha_step")):
        cfg["probes"] = {"eigen": {"k": 5}}
    return cfg


def time_point(raw: dict[str, Any], device: str) -> dict[str, Any]:
    """The primitive timings of one recipe point (see the module docstring)."""
    from sgdscope.config import validate
    from sgdscope.curvature.flat import get_flat, set_flat
    from sgdscope.losses import evaluate, split_batches
    from sgdscope.measure.probes import weight_spectral_norm_mean
    from sgdscope.policy import measurement_mode
    from sgdscope.train.build import resolve_device
    from sgdscope.train.checkpoint import save_checkpoint
    from sgdscope.train.loop import Trainer

    batch, model = int(raw["optimizer"]["batch_size"]), raw["model"]["name"]
    variant = raw["model"].get("variant", "standard")
    m = TIMED_N.get(f"{model}-{variant}", TIMED_N.get(model, 32))
    cfg = validate(_timing_config(raw, batch, m, device))
    dev = resolve_device(cfg.device)
    tr = Trainer(cfg, dev, progress=False)
    b = cfg.optimizer.batch_size
    out: dict[str, Any] = {"timed": {"step_batch": b, "steps": STEPS, "examples": m}}
    # eigen first, at θ0, as a run does (a cold solve at step 0, a warm one after one update)
    if cfg.probes.eigen is not None:
        tracker = tr.scope.track(cfg.probes.eigen.k)
        tracker.max_hvps = min(tracker.max_hvps, TIMED_MAX_HVPS)
        op = tracker.operator(0)
        v = torch.randn(op.n_params, generator=torch.Generator().manual_seed(0)).to(dev)
        op.matvec(v)  # warm-up
        out["hvp_per_example"] = _clock(lambda: op.matvec(v), dev) / m
        t = _now(dev)
        cold = tracker.get(0)
        out["solve_cold"] = {"hvps": cold.n_hvps, "seconds": _now(dev) - t, "capped": not cold.converged}
        theta = get_flat(tr.model)
        g = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1)).to(dev)
        set_flat(tr.model, theta - cfg.optimizer.lr * 1e-2 * g / g.norm() * theta.norm())
        t = _now(dev)
        warm = tracker.get(1)
        out["solve_warm"] = {"hvps": warm.n_hvps, "seconds": _now(dev) - t, "capped": not warm.converged}
        set_flat(tr.model, theta)
        for s in ("solve_cold", "solve_warm"):
            d = out[s]
            d["overhead"] = max(0.0, d["seconds"] - d["hvps"] * out["hvp_per_example"] * m)
    # training steps (probes: the per-step statistics only, as in every run)
    tr.scope.probes = [p for p in tr.scope.probes if p.name in ("gradient", "distance")]
    tr.store = None
    tr.train_step()
    out["step_per_example"] = sum(_clock(tr.train_step, dev) for _ in range(STEPS)) / (STEPS * b)
    batches = split_batches(tr.data.train.x[:m], tr.data.train.y[:m], m)
    with measurement_mode(tr.model, "eval"):
        evaluate(tr.model, tr.loss_fn, batches)
        out["forward_per_example"] = _clock(lambda: evaluate(tr.model, tr.loss_fn, batches), dev) / m
    out["weights"] = _clock(lambda: weight_spectral_norm_mean(tr.model), dev)
    with tempfile.TemporaryDirectory() as d:
        out["checkpoint"] = _clock(lambda: save_checkpoint(Path(d) / "last.pt", tr.checkpoint_state()), dev)
    out["n_params"] = sum(p.numel() for p in tr.params)
    return out


def counts(cfg) -> dict[str, Any]:
    """Sizes and how often each measurement is due over the run's full length (the probes' own schedules)."""
    from sgdscope.data.standin import IMAGES
    from sgdscope.measure.probes import EIGEN_CONSUMERS, PROBES
    from sgdscope.train.build import BatchStream, measure_subset, steps_per_epoch

    lay = IMAGES[cfg.data.name]
    pool = lay.n_train
    n_val = cfg.data.val_size if cfg.data.val_size is not None else round(0.1 * pool)
    n_train = min(pool - n_val, cfg.data.train_size or pool)
    n_test = cfg.data.test_size if cfg.data.test_size is not None else lay.n_test
    spe = steps_per_epoch(cfg, BatchStream(n_train, cfg.optimizer.batch_size, cfg.seed, torch.device("cpu")))
    steps = spe * cfg.train.epochs
    m = len(measure_subset(cfg, n_train, torch.device("cpu")))
    probes = {name: PROBES[name](getattr(cfg.probes, name), None) for name in ("eigen", "direction", "alpha_step",
              "interpolation") if getattr(cfg.probes, name) is not None}
    due = {name: 0 for name in probes}
    solves = 0
    o = cfg.optimizer
    refresh = spe if o.refresh == "epoch" else o.refresh
    for t in range(steps + 1):
        end = t > 0 and t % spe == 0
        solve = False
        for name, p in probes.items():
            if name == "interpolation":
                if t < steps and p.wants_segment(t, t // spe + 1):
                    due[name] += 1
            elif p.due(t, end):
                due[name] += 1
                solve |= name in EIGEN_CONSUMERS
        if o.name == "nsgd" and t < steps and t >= o.nudge_from:
            solve |= (t - o.nudge_from) % refresh == 0 and not (o.freeze_subspace and t > o.nudge_from)
        solves += solve
    return {"n_train": n_train, "n_val": n_val, "n_test": n_test, "measure": m, "steps_per_epoch": spe,
            "steps": steps, "epochs": cfg.train.epochs, "due": due, "eigen_solves": solves}


def extrapolate(cfg, c: dict[str, Any], t: dict[str, Any]) -> dict[str, float]:
    """Seconds of one run by the formulas of the module docstring."""
    full = cfg.optimizer.name in ("gd", "noisy_gd")
    B = c["n_train"] if full else min(cfg.optimizer.batch_size, c["n_train"])
    fwd, M = t["forward_per_example"], c["measure"]
    s = {
        "train": c["steps"] * t["step_per_example"] * B,
        "epochs": c["epochs"] * (fwd * (c["n_train"] + c["n_val"] + c["n_test"]) + t["weights"] + t["checkpoint"]),
    }
    if cfg.optimizer.name == "noisy_gd":
        s["noise"] = t["step_per_example"] * c["n_train"]
    if c["eigen_solves"]:
        def solve(which: str) -> float:
            d = t[which]
            return d["hvps"] * t["hvp_per_example"] * M + d["overhead"]
        s["eigen"] = solve("solve_cold") + (c["eigen_solves"] - 1) * solve("solve_warm")
    grad = t["step_per_example"] * min(cfg.optimizer.batch_size, c["n_train"])
    if cfg.probes.direction is not None:
        d = cfg.probes.direction
        ks = len(set(float(k) for k in d.ks) | {0.0})
        s["direction"] = c["due"]["direction"] * (d.n_grads * grad + len(d.eigen_indices) * ks * fwd * M)
    if cfg.probes.alpha_step is not None:
        a = cfg.probes.alpha_step
        evals = (len(a.eigen_indices) + 1) * (1 + len(a.alphas) * a.n_grads)
        s["alpha_step"] = c["due"]["alpha_step"] * (a.n_grads * grad + evals * fwd * M)
    if cfg.probes.interpolation is not None:
        p = cfg.probes.interpolation
        pts = p.alphas + 1 if isinstance(p.alphas, int) else len(p.alphas)
        s["interpolation"] = c["due"]["interpolation"] * pts * fwd * (c["n_train"] if p.subset == "full" else M)
    return s


def _key(raw: dict[str, Any]) -> str:
    """What the timings depend on: the model, the timed batch, the BN policy and the eigensolver's settings."""
    eigen = {k: v for k, v in ((raw.get("probes") or {}).get("eigen") or {}).items() if k not in ("every", "first_steps")}
    return json.dumps({"model": raw["model"], "batch": min(int(raw["optimizer"]["batch_size"]), CAP_BATCH),
                       "bn": (raw.get("measure") or {}).get("bn_policy"), "eigen": eigen,
                       "needs_eigen": any(p in (raw.get("probes") or {}) for p in ("eigen", "direction", "alpha_step"))},
                      sort_keys=True)


def _human(seconds: float) -> str:
    h = seconds / 3600
    return f"{h / 24:.1f} d" if h >= 48 else f"{h:.1f} h" if h >= 1 else f"{seconds / 60:.0f} min"


def write_estimate(path: Path, key: str, value: dict[str, Any] | None, keep: bool = False) -> None:
    """Set ``recipe.<key>`` to a one-line flow mapping (or null) in the YAML text, keeping its comments and
    layout; ``keep``: leave an existing value alone (to add an empty slot)."""
    flow = "null" if value is None else "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in value.items()) + "}"
    line = f"  {key}: {flow}"
    text = path.read_text(encoding="utf-8").splitlines()
    start = text.index("recipe:")
    end = next((i for i in range(start + 1, len(text)) if text[i] and not text[i].startswith(" ")), len(text))
    hit = [i for i in range(start + 1, end) if re.match(rf"  {key}:", text[i])]
    if hit and keep:
        return
    if hit:
        text[hit[0]] = line
    else:
        text.insert(end, line)
    path.write_text("\n".join(text) + "\n", encoding="utf-8")


# Issue 14's reference: one 45k-example epoch at batch 128 on 2 cores, in minutes (models with BN where named)
ISSUE_EPOCH_MIN = {"simplecnn": 0.7, "resnet32": 3.2, "vgg11": 4.4}


def sanity(device: str) -> dict[str, Any]:
    """One 45,000-example epoch at batch 128 from the timed step, per model, against issue 14's 2-core figures."""
    out = {}
    for name in ISSUE_EPOCH_MIN:
        model = {"name": name, **({"batchnorm": True} if name != "simplecnn" else {"padding": "valid"})}
        raw = {"data": {"name": "cifar10", "augment": True}, "model": model,
               "optimizer": {"name": "sgd", "lr": 0.01, "batch_size": 128}, "measure": {}, "train": {}, "probes": {}}
        t = time_point(raw, device)
        minutes = t["step_per_example"] * 45_000 / 60
        out[name] = {"epoch_minutes": minutes, "issue_minutes_2_cores": ISSUE_EPOCH_MIN[name],
                     "ratio_ours_over_issue": minutes / ISSUE_EPOCH_MIN[name]}
        print(f"  {name}: {minutes:.2f} min per epoch, {minutes / ISSUE_EPOCH_MIN[name]:.2f}x issue 14's", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", action="store_true", help="put the totals into the recipes' metadata")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--sanity-only", action="store_true",
                    help="only time one epoch of SimpleCNN / ResNet-32 / VGG-11 and add it to the existing JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads > 1:
        CPU_CLOCK["clock"] = time.perf_counter
    from sgdscope.config import validate
    from sgdscope.recipes import list_recipes, resolve
    from sgdscope.sweep import _with_overrides, expand_grid

    started = time.perf_counter()
    if args.sanity_only:
        path = RESULTS / ("paper_estimates.json" if args.device == "cpu" else f"paper_estimates_{args.device}.json")
        result = json.loads(path.read_text())
        result["sanity"] = sanity(args.device)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        return
    timings: dict[str, dict[str, Any]] = {}
    counted: dict[str, dict[str, Any]] = {}
    recipes = {}
    for r in list_recipes():
        if r.size != "paper" or (args.only and r.name not in args.only):
            continue
        raw, meta = resolve(r.name)
        points = []
        for overrides in expand_grid(meta.grid) if meta.grid else [{}]:
            point = _with_overrides(raw, overrides)
            cfg = validate(point)
            point["optimizer"]["batch_size"] = cfg.optimizer.batch_size  # the default where GD leaves it unset
            key = _key(point)
            if key not in timings:
                t0 = time.perf_counter()
                timings[key] = {**time_point(point, args.device), "model": point["model"]}
                timings[key]["timing_seconds"] = time.perf_counter() - t0
                print(f"  timed {point['model']['name']} b={timings[key]['timed']['step_batch']} "
                      f"({timings[key]['timing_seconds']:.0f} s)", flush=True)
            ckey = json.dumps([point.get(k) for k in ("train", "probes", "data")] + [
                {k: v for k, v in point["optimizer"].items() if k in ("name", "batch_size", "refresh", "nudge_from",
                                                                      "freeze_subspace")}], sort_keys=True)
            if ckey not in counted:
                counted[ckey] = counts(cfg)
            c = counted[ckey]
            secs = extrapolate(cfg, c, timings[key])
            points.append({"overrides": overrides, "counts": c, "seconds": secs, "total_seconds": sum(secs.values()),
                           "timing": timings[key]})
        total = sum(p["total_seconds"] for p in points)
        recipes[r.name] = {"runs": len(points), "total_seconds": total, "total": _human(total), "points": points}
        print(f"{r.name:34s} {len(points):3d} runs  {_human(total):>9s}", flush=True)
    device = torch.device(args.device)
    result = {
        "what": "estimated wall time of each *-paper recipe, measurements included, extrapolated from timed samples",
        "formula": FORMULAS,
        "clock": "process CPU seconds (1 thread: an idle core's wall time)" if device.type == "cpu" and
                 args.threads == 1 else "wall seconds",
        "device": str(device), "threads": args.threads, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cap_batch": CAP_BATCH, "steps_timed": STEPS,
        "timed_examples": TIMED_N, "timed_max_hvps": TIMED_MAX_HVPS, "recipes": recipes,
    }
    result["script_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    name = "paper_estimates.json" if device.type == "cpu" else f"paper_estimates_{device.type}.json"
    if args.only and (RESULTS / name).is_file():  # a partial rerun updates those recipes in the existing file
        old = json.loads((RESULTS / name).read_text())
        result["recipes"] = {**old["recipes"], **recipes}
        result["script_seconds"] += old.get("script_seconds", 0.0)
        result["sanity"] = old.get("sanity")
    if result.get("sanity") is None:
        t = time.perf_counter()
        result["sanity"] = sanity(args.device)
        result["script_seconds"] += time.perf_counter() - t
    (RESULTS / name).write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.write:
        from sgdscope.recipes import HERE

        key = "estimate_cpu" if device.type == "cpu" else "estimate_gpu"
        for rname, rec in recipes.items():
            write_estimate(HERE / f"{rname}.yaml", key, {
                "hours": round(rec["total_seconds"] / 3600, 1), "runs": rec["runs"], "threads": args.threads,
                "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
                "by": f"bench/paper_estimates.py, extrapolated ({time.strftime('%Y-%m-%d')})",
            })
            if key == "estimate_cpu":  # the GPU's slot, filled by a run with --device cuda
                write_estimate(HERE / f"{rname}.yaml", "estimate_gpu", None, keep=True)
    print(f"wrote bench/results/{name} in {result['script_seconds']:.0f} s")


if __name__ == "__main__":
    main()
