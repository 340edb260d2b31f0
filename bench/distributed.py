"""Wall time of one fixed ``sgdscope run`` on 1 process against 2 gloo ranks (launched as torchrun launches
them), 1 thread per rank; writes bench/results/distributed.json.

    .venv/bin/python bench/distributed.py [--repeats 2]

On a 2-core CPU two ranks share the cores with nothing to gain: the ratio measures the all-reduce and
process overhead of the data-parallel path, not a speed-up. Process start-up (importing torch) is
included in both, as a user of ``sgdscope run`` pays it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "seed": 0, "device": "cpu",
    "data": {"name": "synthetic", "n_samples": 2000, "input_shape": [32], "num_classes": 10},
    "model": {"name": "mlp", "widths": [128, 128]},
    "optimizer": {"name": "sgd", "lr": 0.05, "batch_size": 128},
    "train": {"epochs": 2},
    "measure": {"subset": 0.25, "min_subset": 500, "batch_size": 125},
    "probes": {"eigen": {"every": 8, "k": 3, "tol": 1e-3}, "interpolation": {"every": 4, "alphas": 6}},
}
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_run(cfg: Path, out: Path, world: int) -> float:
    port = _port()
    env = {**os.environ, **THREADS, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "sgdscope.cli", "run", str(cfg), "--out", str(out)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for r in range(world)
    ]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a {world}-process run failed")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(CONFIG))
        walls = {1: [], 2: []}
        for i in range(args.repeats):  # interleaved, so drifting load hits both alike
            for world in (1, 2):
                walls[world].append(timed_run(cfg, Path(tmp) / f"w{world}-{i}", world))
    best = {w: min(v) for w, v in walls.items()}
    result = {
        "command": "python bench/distributed.py --repeats %d" % args.repeats,
        "config": CONFIG, "cpus": os.cpu_count(), "threads_per_rank": 1,
        "wall_s": {str(w): v for w, v in walls.items()},
        "ratio_2proc_over_1proc": best[2] / best[1],
        "note": "best of the repeats; on 2 CPU cores the ratio is the all-reduce and process overhead, not a speed-up",
    }
    path = ROOT / "bench" / "results" / "distributed.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "ratio_2proc_over_1proc")}))


if __name__ == "__main__":
    main()
