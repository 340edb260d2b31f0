"""What one Hessian-vector product, a block of 5 and the eigensolver's basis cost, against a gradient
(issue 12, "Kernels"); run through ``bench/curvature.py --kernels``.

Per setting, in a fresh process with one torch thread, on the setting's model and measurement batches:

* the gradient two ways: ``loss.backward()`` of the same weighted loss over the same batches (the
  reference a user has in mind) and ``HessianOperator.gradient()``;
* one HVP by each single-product method (``HVP_METHODS``) and a block of 5 by each block method
  (``BLOCK_METHODS``), every case a fixed-method operator;
* what ``method="auto"`` picks on a fresh operator (its own wall-clock timings), and the ratios of the
  methods it picked, which are what a user gets.

Time is the calling thread's CPU time (``time.thread_time``; the CPU autograd engine runs there), the cases
interleaved round by round, min over rounds after a warm-up round (the first call of a method pays
one-off set-up); the median is stored too. Each call's system time and minor page faults
(``getrusage(RUSAGE_THREAD)``) are stored beside it: glibc maps every allocation above its mmap threshold
(at most 32 MiB by default) afresh, so on the 500-example SimpleCNN, whose activations are 33-66 MB
each, the kernel zeroes pages it just released; the workers run once with glibc's defaults and once with
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised (freed blocks are kept and reused), to
separate the kernel's cost from the allocator's.

Peak memory: the most bytes live in torch's CPU allocator during one call, above what was live before it,
read from the profiler's memory events (``torch.profiler.profile(profile_memory=True)``: each event
carries the bytes allocated or freed; the peak of their running sum). This counts tensors only (not the
Python heap or oneDNN's own scratch) and is exact and deterministic, unlike RSS, which the allocator's
retained pages blur.

Basis memory: the solver keeps V and HV (each max_basis × n floats, taken at once) with ``max_basis``
defaulting to max(4(k + 3), 40) = 40 for k = 5, plus the Ritz vectors and residuals of one iteration
(2(k + 3 + 1) × n); a cold top-5 solve is run with the buffers observed, and its peak profiled, where a
solve fits the budget.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from sgdscope.curvature import BLOCK_METHODS, HVP_METHODS, HessianOperator, top_eigenpairs
from sgdscope.losses import cross_entropy

TARGETS = {
    "hvp_over_gradient": {"digits": 2.5, "mlp": 2.5, "cnn": 3.0},  # against loss.backward()
    "block5_over_one_hvp": 3.0,
    "peak_memory_over_gradient": 2.5,
}
# glibc keeps freed blocks up to these sizes in the heap instead of unmapping them
KEEP_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
# measurement examples, rounds after the warm-up, whether to run a cold solve for the basis
PLAN = {"tiny": (1000, 30, True), "digits": (1000, 30, True), "mlp": (2500, 5, True), "cnn": (500, 2, False)}
QUICK = {"tiny": (1000, 3, True), "digits": (1000, 3, True), "mlp": (1000, 2, True), "cnn": (500, 1, False)}


def thread_cost(fn: Callable) -> tuple[float, float, int]:
    """CPU seconds of ``fn()`` in this thread, the system part of them, and its minor page faults."""
    r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time()
    fn()
    t1, r1 = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD)
    return t1 - t0, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt


def peak_bytes(fn: Callable) -> int:
    """The most bytes live in torch's CPU allocator during ``fn()`` above those live before it."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    finally:
        os.remove(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"]["Ev Idx"]))
    live = peak = 0
    for e in mem:
        live += e["args"]["Bytes"]
        peak = max(peak, live)
    return peak


def backward_gradient(model: torch.nn.Module, batches: list) -> Callable[[], None]:
    """``loss.backward()`` of Σ_b (n_b / N) L_b, batch by batch, into ``.grad``: the plain gradient."""
    total = sum(len(y) for _, y in batches)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            (len(y) / total * cross_entropy(model(x), y)).backward()
    return run


def measure(model: torch.nn.Module, batches: list, rounds: int, solve: bool) -> dict:
    """Costs, ratios and peaks of one setting (see the module docstring)."""
    import sgdscope.curvature.hessian as hess  # noqa: PLC0415

    torch.set_num_threads(1)
    single = {m: HessianOperator(model, cross_entropy, batches, method=m) for m in HVP_METHODS}
    blocks = {m: HessianOperator(model, cross_entropy, batches, method="double-backward", block_method=m)
              for m in BLOCK_METHODS}
    n = single[HVP_METHODS[0]].n_params
    gen = torch.Generator().manual_seed(0)
    v, V = torch.randn(n, generator=gen), torch.randn(5, n, generator=gen)
    cases = {"gradient_backward": backward_gradient(model, batches), "gradient_operator": single["jvp"].gradient}
    cases |= {f"hvp_{m}": (lambda op=op: op.matvec(v)) for m, op in single.items()}
    cases |= {f"block5_{m}": (lambda op=op: op.matmat(V)) for m, op in blocks.items()}

    hess.AUTO_CHOICES.clear()
    auto = HessianOperator(model, cross_entropy, batches)
    auto.matvec(v), auto.matmat(V)
    out: dict = {"n_params": n, "n_examples": sum(len(y) for _, y in batches), "batches": len(batches),
                 "threads": torch.get_num_threads(), "rounds": rounds,
                 "allocator": {k: os.environ.get(k) for k in KEEP_ALLOCATOR},
                 "auto": {"method": auto.method, "block_method": auto.block_method,
                          "wall_s": auto.method_timings, "timing_hvps": auto.n_timing_hvps}}

    runs: dict[str, list] = {k: [] for k in cases}
    for r in range(rounds + 1):
        for k, fn in cases.items():
            cost = thread_cost(fn)
            if r:  # round 0 is the warm-up
                runs[k].append(cost)
    cpu = {k: min(c for c, _, _ in rs) for k, rs in runs.items()}
    out["cpu_s"] = cpu
    out["cpu_median_s"] = {k: statistics.median(c for c, _, _ in rs) for k, rs in runs.items()}
    out["sys_s"] = {k: min(rs)[1] for k, rs in runs.items()}
    out["minor_faults"] = {k: min(rs)[2] for k, rs in runs.items()}
    out["peak_bytes"] = {k: peak_bytes(fn) for k, fn in cases.items()}

    grad, grad_op = cpu["gradient_backward"], cpu["gradient_operator"]
    mem = out["peak_bytes"]
    ratios: dict = {"gradient_operator_over_backward": cpu["gradient_operator"] / grad}
    for m in HVP_METHODS:
        ratios[f"hvp_{m}_over_gradient"] = cpu[f"hvp_{m}"] / grad
        ratios[f"hvp_{m}_over_operator_gradient"] = cpu[f"hvp_{m}"] / grad_op
        ratios[f"hvp_{m}_peak_memory_over_gradient"] = mem[f"hvp_{m}"] / mem["gradient_backward"]
        ratios[f"hvp_{m}_peak_memory_over_operator_gradient"] = mem[f"hvp_{m}"] / mem["gradient_operator"]
    best = min(cpu[f"hvp_{m}"] for m in HVP_METHODS)
    for m in BLOCK_METHODS:
        ratios[f"block5_{m}_over_one_hvp"] = cpu[f"block5_{m}"] / best  # against the cheapest single HVP
        ratios[f"block5_{m}_peak_memory_over_gradient"] = mem[f"block5_{m}"] / mem["gradient_backward"]
    out["ratios"] = ratios
    out["fastest"] = {"single": min(HVP_METHODS, key=lambda m: cpu[f"hvp_{m}"]),
                      "block": min(BLOCK_METHODS, key=lambda m: cpu[f"block5_{m}"])}
    out["basis"] = basis_memory(single[out["fastest"]["single"]], solve)
    return out


def basis_memory(op: HessianOperator, solve: bool, k: int = 5) -> dict:
    """The eigensolver's basis buffers for a cold top-k: the formula, and (``solve``) what one solve held."""
    bytes_per = torch.finfo(op.dtype).bits // 8
    max_basis = min(op.n_params, max(4 * (k + 3), 40))
    # KrylovBasis takes its stated bound at once (curvature/krylov.py): V and HV, then one iteration's
    # Ritz vectors and residuals of the k + guard + 1 kept pairs
    out = {"formula": "2 x max_basis x n x bytes (V and HV) + 2 x (k + 3 + 1) x n x bytes (Ritz vectors, residuals)",
           "max_basis": max_basis, "capacity": max_basis,
           "bytes": 2 * (max_basis + k + 4) * op.n_params * bytes_per}
    if solve:
        from sgdscope.curvature import krylov  # noqa: PLC0415

        seen = [0]
        extend = krylov.KrylovBasis.extend

        def observed(self, *a, **kw):
            got = extend(self, *a, **kw)
            seen[0] = max(seen[0], len(self._V))
            return got

        krylov.KrylovBasis.extend = observed
        try:
            res: list = []
            out["solve_peak_bytes"] = peak_bytes(lambda: res.append(top_eigenpairs(op, k=k)))
        finally:
            krylov.KrylovBasis.extend = extend
        out["solve_capacity"], out["solve_hvps"] = seen[0], res[0].n_hvps
        out["solve_buffer_bytes"] = 2 * seen[0] * op.n_params * bytes_per
    return out


def verdicts(kernels: dict) -> dict:
    """Pass/fail of the issue's kernel targets for what ``auto`` picked (what a user gets)."""
    out = {}
    for name, runs in kernels.items():
        for alloc, s in runs.items():
            if "error" in s:
                continue
            r, m, bm = s["ratios"], s["auto"]["method"], s["auto"]["block_method"]
            v: dict = {"auto": [m, bm], "fastest": [s["fastest"]["single"], s["fastest"]["block"]]}
            hvp = r[f"hvp_{m}_over_gradient"]
            limit = TARGETS["hvp_over_gradient"].get(name)
            v["hvp_over_gradient"] = {"value": round(hvp, 2), "target": limit,
                                      "pass": None if limit is None else hvp <= limit}
            block = s["cpu_s"][f"block5_{bm}"] / s["cpu_s"][f"hvp_{m}"]
            v["block5_over_one_hvp"] = {"value": round(block, 2), "pass": block <= TARGETS["block5_over_one_hvp"]}
            peak = r[f"hvp_{m}_peak_memory_over_gradient"]
            v["peak_memory_over_gradient"] = {"value": round(peak, 2),
                                              "pass": peak <= TARGETS["peak_memory_over_gradient"]}
            out[f"{name}/{alloc}"] = v
    return out


def run_all(names: list[str], quick: bool, script: Path) -> dict:
    """Every setting in a fresh worker process, with glibc's default allocator and with freed blocks kept."""
    results: dict = {}
    for name in names:
        results[name] = {}
        for alloc, extra in (("glibc-default", {}), ("glibc-keep-freed", KEEP_ALLOCATOR)):
            env = {k: v for k, v in os.environ.items() if k not in KEEP_ALLOCATOR} | extra
            env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            cmd = [sys.executable, str(script), "--kernel-worker", name] + (["--quick"] if quick else [])
            print(f"[kernels {name}, {alloc}]", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                results[name][alloc] = {"error": proc.stderr[-2000:]}
                print(proc.stderr[-2000:], flush=True)
                continue
            results[name][alloc] = json.loads(proc.stdout.strip().splitlines()[-1])
            show(name, results[name][alloc])
    return results


def show(name: str, s: dict) -> None:
    r = s["ratios"]
    print(f"  {name}: n={s['n_params']}, {s['n_examples']} examples, auto {s['auto']['method']}/{s['auto']['block_method']}")
    for k, val in r.items():
        print(f"    {k:52s} {val:6.2f}")
    print(f"    faults {s['minor_faults']}", flush=True)


def worker(name: str, quick: bool, trained: Callable) -> None:
    n_measure, rounds, solve = (QUICK if quick else PLAN)[name]
    start = time.perf_counter()
    if name == "digits":
        model, batches = digits_setting(n_measure)
    else:
        model, batches, _ = trained(name, n_measure)
    out = measure(model, batches, rounds, solve)
    out["measured"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "worker_s": round(time.perf_counter() - start, 1),
                       "torch": torch.__version__, "quick": quick}
    print(json.dumps(out))


def digits_setting(n_measure: int):
    """sgdscope's default ``mlp`` (64-100-100-10) on the digits training split, at initialisation."""
    from sgdscope.config import DataConfig, ModelConfig  # noqa: PLC0415
    from sgdscope.data import load_dataset  # noqa: PLC0415
    from sgdscope.losses import split_batches  # noqa: PLC0415
    from sgdscope.models import build_model  # noqa: PLC0415

    torch.manual_seed(0)
    data = load_dataset(DataConfig(name="digits"), seed=0)
    model = build_model(ModelConfig(name="mlp"), data.input_shape, data.num_classes)
    return model, split_batches(data.train.x[:n_measure], data.train.y[:n_measure], 500)

