"""Sweeps: a grid of runs under one directory, run in a local process pool or as Ray tasks.

Layout::

    SWEEP_DIR/
      sweep.yaml            the base config, the grid, the seeds and every run's overrides and folder
      runs/lr=0.1_bs=64/    an ordinary run directory (DESIGN.md) per grid point
      report.html           written by ``sgdscope report SWEEP_DIR``

Running a sweep again on the same folder resumes it: runs whose status is ``done`` are skipped, the
others (interrupted, failed, or left ``running`` by a killed process) continue from their checkpoints.
One failing run never stops the others; the failures are listed at the end and :class:`SweepFailed`
is raised, so the command line exits with 1.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import yaml

from sgdscope.config import parse_value, set_dotted
from sgdscope.errors import ConfigError, RunStoreError
from sgdscope.store import RunStore, atomic_write_bytes

SWEEP_FORMAT = 1
SWEEP_FILE = "sweep.yaml"

# Short names for folder names (ASCII) and for legends (the papers' symbols).
_FOLDER_NAMES = {"batch_size": "bs", "noise_factor": "noise", "weight_decay": "wd"}
_SYMBOLS = {"optimizer.lr": "η", "optimizer.batch_size": "S", "optimizer.gamma": "γ", "optimizer.momentum": "μ",
            "optimizer.noise_factor": "noise", "optimizer.weight_decay": "λ", "optimizer.name": "optimizer",
            "optimizer.mode": "mode", "schedule.name": "schedule"}


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


def _short(key: str, keys: Iterable[str], names: Mapping[str, str]) -> str:
    """The name of ``key`` in ``names`` (by full key, then by last part), else its last part, or the whole
    key where the last part would be ambiguous among ``keys``."""
    leaf = key.rsplit(".", 1)[-1]
    clash = sum(1 for k in keys if k.rsplit(".", 1)[-1] == leaf) > 1
    return names.get(key) or (key if clash else names.get(leaf, leaf))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def run_name(overrides: Mapping[str, Any]) -> str:
    """The folder name of a grid point, e.g. ``lr=0.1_bs=64_seed=0``."""
    if not overrides:
        return "run"
    parts = [f"{_short(k, overrides, _FOLDER_NAMES)}={_fmt(v)}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9.+=_-]", "-", "_".join(parts))


# --------------------------------------------------------------------------------------- reading back


@dataclass
class Member:
    """One run of a sweep: its folder name, its grid values, a legend label and its store (None until
    the run has started)."""

    name: str
    params: dict[str, Any]
    label: str
    path: Path
    store: Optional[RunStore]


@dataclass
class SweepView:
    """A sweep directory read back: ``grid`` (with the seed axis when there is one) and its members."""

    path: Path
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    members: list[Member]

    @property
    def varying(self) -> list[str]:
        """The grid keys with more than one value, the seed aside: what tells the runs apart."""
        return _varying(self.grid)

    def started(self) -> list[Member]:
        """The members that have a run directory to read."""
        return [m for m in self.members if m.store is not None]


def _varying(grid: Mapping[str, list[Any]]) -> list[str]:
    return [k for k, v in grid.items() if len(v) > 1 and k != "seed"]


def is_sweep(path: str | Path) -> bool:
    """Whether ``path`` is a sweep directory (holds ``sweep.yaml``)."""
    return (Path(path) / SWEEP_FILE).is_file()


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load((path / SWEEP_FILE).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RunStoreError(f"{path}/{SWEEP_FILE}: unreadable ({type(err).__name__})") from None
    if not isinstance(spec, dict) or spec.get("format") != SWEEP_FORMAT or not isinstance(spec.get("runs"), list):
        raise RunStoreError(f"{path}/{SWEEP_FILE}: not a sweep file of this sgdscope version")
    return spec


def symbol(key: str) -> str:
    """The papers' symbol for a grid key (``optimizer.lr`` → ``η``), else its last part."""
    return _short(key, [key], _SYMBOLS)


def label_for(params: Mapping[str, Any], varying: list[str]) -> str:
    """A legend label from the grid values that vary, in the papers' symbols (``η=0.1, S=64``)."""
    parts = [f"{_short(k, varying, _SYMBOLS)}={_fmt(params[k])}" for k in varying if k in params]
    return ", ".join(parts)


def open_sweep(path: str | Path) -> SweepView:
    """Read a sweep directory; runs not yet started have ``store=None``."""
    path = Path(path)
    if not is_sweep(path):
        raise RunStoreError(f"{path}: not a sweep directory (no {SWEEP_FILE})")
    spec = _read_spec(path)
    grid = dict(spec.get("grid") or {})
    if (spec.get("seeds") or 1) > 1:
        grid["seed"] = list(range(spec["seeds"]))
    varying = _varying(grid)
    members = []
    for r in spec["runs"]:
        run_dir = path / r["dir"]
        store = RunStore(run_dir) if (run_dir / "status.json").is_file() else None
        params = dict(r.get("overrides") or {})
        members.append(Member(r["name"], params, label_for(params, varying) or r["name"], run_dir, store))
    return SweepView(path, dict(spec.get("base") or {}), grid, members)


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
    elif out.exists() and any(out.iterdir()):
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
