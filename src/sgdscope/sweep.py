"""Sweeps: a grid of runs under one directory, run in a local process pool or as Ray tasks.

The layout of a sweep directory, and reading one back, are in :mod:`sgdscope.sweepview`; this module
expands the grid, writes ``sweep.yaml``, plans what is left to do and runs it.

Running a sweep again on the same folder resumes it: runs whose status is ``done`` are skipped, the
others (interrupted, failed, or left ``running`` by a killed process) continue from their checkpoints.
One failing run never stops the others; the failures are listed at the end and :class:`SweepFailed`
is raised, so the command line exits with 1.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import yaml

from sgdscope.config import parse_value, set_dotted
from sgdscope.errors import ConfigError, RunStoreError
from sgdscope.store import LOCK_FILE, RunStore, atomic_write_bytes, writer_lock
# The reader lives in sgdscope.sweepview (the read side imports it without the executor); its names are
# re-exported here for callers that import them from sgdscope.sweep.
from sgdscope.sweepview import (
    SWEEP_FILE,
    SWEEP_FORMAT,
    Member,
    SweepView,
    _read_spec,
    is_sweep,
    label_for,
    open_sweep,
    run_name,
    symbol,
)


class SweepFailed(Exception):
    """Raised at the end of a sweep in which some runs failed; the others completed."""

    def __init__(self, path: Path, failures: dict[str, str]) -> None:
        self.path, self.failures = path, failures
        super().__init__(f"{len(failures)} run(s) of {path} failed: {', '.join(failures)}")


# ------------------------------------------------------------------------------------------------ grid


def expand_grid(grid: Mapping[str, list[Any]], seeds: int = 1) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as a list of ``{dotted.key: value}`` overrides.

    ``seeds > 1`` adds a ``seed`` axis 0..seeds-1 (last, so the seeds of one point are neighbours).

    >>> expand_grid({"optimizer.lr": [0.1, 0.01], "optimizer.batch_size": [64]}, seeds=2)  # doctest: +NORMALIZE_WHITESPACE
    [{'optimizer.lr': 0.1, 'optimizer.batch_size': 64, 'seed': 0},
     {'optimizer.lr': 0.1, 'optimizer.batch_size': 64, 'seed': 1},
     {'optimizer.lr': 0.01, 'optimizer.batch_size': 64, 'seed': 0},
     {'optimizer.lr': 0.01, 'optimizer.batch_size': 64, 'seed': 1}]
    """
    if seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {seeds}")
    axes = {str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in grid.items()}
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"--grid {key}: needs at least one value")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"--grid {key}: repeated values {values}")
    if seeds > 1:
        if "seed" in axes:
            raise ConfigError("--seeds: the grid already has a 'seed' axis; give one or the other")
        axes["seed"] = list(range(seeds))
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["optimizer.lr=0.1,0.01", "model.widths=[64],[128]"]`` → ``{"optimizer.lr": [0.1, 0.01], ...}``.

    Values are YAML (numbers, booleans, lists); commas inside brackets do not split.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,..., for example optimizer.lr=0.1,0.05")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        grid[key] = [parse_value(v) for v in _split_top_level(text)]
    return grid


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def _with_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each dotted key set to its (already parsed) value."""
    out = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        set_dotted(out, key, value, option="--grid")
    return out


# -------------------------------------------------------------------------------------------- running


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init_worker(threads: int, parent: int) -> None:
    """Pool worker set-up: share the cores fairly, and die with the sweep process.

    Without the parent-death signal a worker outlives a killed sweep and keeps writing its run while
    the resumed sweep starts the same run again.
    """
    import torch

    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:  # the sweep died before the signal was armed
        os._exit(1)


def _run_one(config: dict[str, Any], out: str, resume: bool, threads: Optional[int] = None) -> Optional[str]:
    """Train one grid point; returns None on success or the error as one line (never raises an Exception,
    so one failing run cannot take the pool down)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from sgdscope.errors import SgdscopeError
    from sgdscope.train import run

    try:
        run(config, out, resume=resume, progress=False)
    except SgdscopeError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - reported per run; the sweep goes on
        return f"{type(err).__name__}: {err}"
    return None


@dataclass
class _Job:
    name: str
    out: Path
    config: dict[str, Any]
    resume: bool


def _plan(spec_runs: list[dict[str, Any]], base: dict[str, Any], root: Path) -> tuple[list[_Job], int]:
    """What is left to do: (jobs, number of runs already done)."""
    jobs, done = [], 0
    for r in spec_runs:
        out = root / r["dir"]
        status = out / "status.json"
        if status.is_file():
            if RunStore(out).status().get("state") == "done":
                done += 1
                continue
            resume = True
        else:
            # A folder without status.json was killed inside RunStore.create: nothing was measured yet.
            if out.exists():
                shutil.rmtree(out)
            resume = False
        jobs.append(_Job(r["name"], out, _with_overrides(base, r["overrides"]), resume))
    return jobs, done


def _local(jobs: list[_Job], workers: int, report: Callable[[_Job, Optional[str]], None]) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, _cores() // workers)
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and locks
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, os.getpid())) as pool:
        futures = {pool.submit(_run_one, j.config, str(j.out), j.resume): j for j in jobs}
        try:
            for fut in as_completed(futures):
                try:
                    err = fut.result()
                except BrokenProcessPool:
                    err = "its worker process died (out of memory or killed)"
                report(futures[fut], err)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _ray(jobs: list[_Job], workers: Optional[int], address: Optional[str],
         report: Callable[[_Job, Optional[str]], None]) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'sgdscope[ray]'") from None
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers or _cores(), include_dashboard=False, log_to_driver=False)
        except ConnectionError as err:
            raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({err})") from None
        started = True
    try:
        total = int(ray.cluster_resources().get("CPU", 1))
        per_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
        n_parallel = max(1, min(workers or total, len(jobs)))
        threads = max(1, min(per_node, total // n_parallel))
        task = ray.remote(num_cpus=threads, max_retries=0)(_run_one)
        pending = {task.remote(j.config, str(j.out.resolve()), j.resume, threads): j for j in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    err = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    err = f"Ray task failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                report(job, err)
    finally:
        if started:
            ray.shutdown()


def _write_spec(out: Path, config_raw: dict[str, Any], grid: dict[str, list[Any]], seeds: int,
                points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    runs = []
    for overrides in points:
        name = run_name(overrides)
        runs.append({"name": name, "dir": f"runs/{name}", "overrides": overrides})
    if len({r["name"] for r in runs}) != len(runs):
        raise ConfigError("--grid: two grid points give the same run folder name; make the values distinct")
    spec = {"format": SWEEP_FORMAT, "base": config_raw, "grid": grid, "seeds": seeds, "runs": runs}
    path = out / SWEEP_FILE
    if path.is_file():
        old = _read_spec(out)
        if (old.get("base"), old.get("grid"), old.get("seeds")) != (config_raw, grid, seeds):
            raise RunStoreError(f"{out}: holds a different sweep (its config, grid or seeds differ); choose another --out")
    elif out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):  # the lock is this writer's own
        raise RunStoreError(f"{out}: already exists, is not empty and holds no {SWEEP_FILE}; choose another --out")
    else:
        atomic_write_bytes(path, yaml.safe_dump(spec, sort_keys=False, allow_unicode=True).encode())
    return runs


def run_sweep(config_raw: Mapping[str, Any], grid: Mapping[str, list[Any]], out: str | Path, *,
              backend: str = "local", workers: Optional[int] = None, seeds: int = 1,
              address: Optional[str] = None, progress: bool = True) -> Path:
    """Run every grid point of ``config_raw`` under ``out`` and return ``out``.

    ``backend="local"`` uses a process pool of ``workers`` (default: one per core, at most one per run);
    ``backend="ray"`` runs each point as a Ray task on the cluster at ``address`` or on a local Ray
    started for the sweep. Calling it again on the same ``out`` resumes (see the module docstring).
    Every grid point's config is validated before anything is written. Raises :class:`SweepFailed`
    at the end if some runs failed.
    """
    from tqdm.auto import tqdm

    from sgdscope.config import validate

    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend: {backend!r} is not one of local, ray")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    if address and backend != "ray":
        raise ConfigError("--address is for --backend ray")
    config_raw = copy.deepcopy(dict(config_raw))
    grid = {k: list(v) for k, v in grid.items()}
    points = expand_grid(grid, seeds)
    for overrides in points:
        try:
            validate(_with_overrides(config_raw, overrides))
        except ConfigError as err:
            raise ConfigError(f"grid point {run_name(overrides)}: {err}") from None
    out = Path(out)
    with writer_lock(out):  # one writer per sweep directory, as per run directory
        runs = _write_spec(out, config_raw, grid, seeds, points)
        jobs, n_done = _plan(runs, config_raw, out)
        failures: dict[str, str] = {}
        bar = tqdm(total=len(runs), initial=n_done, desc="sweep", unit="run", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)

        def report(job: _Job, err: Optional[str]) -> None:
            if err is not None:
                failures[job.name] = err
            if progress:
                bar.write(f"  {'done' if err is None else 'FAILED':6s}  {job.name}" + (f": {err}" if err else ""),
                          file=sys.stderr)
            bar.update(1)
            if failures:
                bar.set_postfix(failed=len(failures))

        try:
            if jobs and backend == "local":
                _local(jobs, max(1, min(workers or _cores(), len(jobs))), report)
            elif jobs:
                _ray(jobs, workers, address, report)
        finally:
            bar.close()
    if failures:
        for name, err in failures.items():
            print(f"sgdscope: run {name} failed: {err}", file=sys.stderr)
        raise SweepFailed(out, failures)
    return out


__all__ = ["SWEEP_FILE", "SWEEP_FORMAT", "Member", "SweepFailed", "SweepView", "expand_grid", "is_sweep", "label_for",
           "open_sweep", "parse_grid", "run_name", "run_sweep", "symbol"]
