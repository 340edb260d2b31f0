"""Sweeps: grid expansion, a local process pool, failures, resume after SIGKILL, and Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sgdscope.errors import ConfigError, RunStoreError
from sgdscope.plots import run_figures
from sgdscope.report import write_report
from sgdscope.store import RunStore
from sgdscope.sweep import SweepFailed, expand_grid, open_sweep, parse_grid, run_name, run_sweep

from browser import CHROMIUM, check_in_browser  # noqa: E402

TINY = {
    "device": "cpu",
    "data": {"name": "synthetic", "n_samples": 200, "input_shape": [8]},
    "model": {"name": "mlp", "widths": [8]},
    "optimizer": {"lr": 0.1, "batch_size": 32},
    "train": {"epochs": 1},
}


def _states(sweep: Path) -> dict[str, str]:
    return {m.name: (m.store.status()["state"] if m.store else "pending") for m in open_sweep(sweep).members}


# ----------------------------------------------------------------------------------------------- grid


def test_expand_grid():
    points = expand_grid({"optimizer.lr": [0.1, 0.01], "optimizer.batch_size": [32, 128]})
    assert points == [{"optimizer.lr": lr, "optimizer.batch_size": bs} for lr in (0.1, 0.01) for bs in (32, 128)]
    seeded = expand_grid({"optimizer.lr": [0.1]}, seeds=3)
    assert [p["seed"] for p in seeded] == [0, 1, 2]
    assert expand_grid({}, seeds=1) == [{}]
    with pytest.raises(ConfigError, match="already has a 'seed' axis"):
        expand_grid({"seed": [1, 2]}, seeds=2)
    with pytest.raises(ConfigError, match="needs at least one value"):
        expand_grid({"optimizer.lr": []})
    with pytest.raises(ConfigError, match="repeated values"):
        expand_grid({"optimizer.lr": [0.1, 0.1]})


def test_parse_grid_and_run_names():
    grid = parse_grid(["optimizer.lr=0.1,1e-3", "model.widths=[8],[8, 8]", "optimizer.name=sgd,gd"])
    assert grid == {"optimizer.lr": [0.1, 0.001], "model.widths": [[8], [8, 8]], "optimizer.name": ["sgd", "gd"]}
    assert run_name({"optimizer.lr": 0.1, "optimizer.batch_size": 64, "seed": 0}) == "lr=0.1_bs=64_seed=0"
    assert run_name({"model.widths": [8, 8], "optimizer.gamma": 0.01}) == "widths=8-8_gamma=0.01"
    for bad in ("optimizer.lr", "=1,2", "optimizer.lr="):
        with pytest.raises(ConfigError, match="expected key=v1,v2"):
            parse_grid([bad])


def test_bad_grid_is_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"grid point lr=-1: optimizer.lr"):
        run_sweep(TINY, {"optimizer.lr": [0.1, -1]}, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="--backend"):
        run_sweep(TINY, {}, tmp_path / "s", backend="slurm", progress=False)


# ---------------------------------------------------------------------------------------------- local


def test_local_2x2_sweep_then_rerun_skips_done_runs(tmp_path):
    base = {**TINY, "probes": {"eigen": {"k": 2}}}
    grid = {"optimizer.lr": [0.05, 0.1], "optimizer.batch_size": [16, 32]}
    out = run_sweep(base, grid, tmp_path / "s", workers=2, progress=False)
    assert _states(out) == dict.fromkeys(["lr=0.05_bs=16", "lr=0.05_bs=32", "lr=0.1_bs=16", "lr=0.1_bs=32"], "done")
    spec = yaml.safe_load((out / "sweep.yaml").read_text())
    assert spec["base"] == base and spec["grid"]["optimizer.batch_size"] == [16, 32]
    assert spec["runs"][1] == {"name": "lr=0.05_bs=32", "dir": "runs/lr=0.05_bs=32",
                               "overrides": {"optimizer.lr": 0.05, "optimizer.batch_size": 32}}
    cfg = RunStore(out / "runs" / "lr=0.1_bs=16").config()
    assert (cfg["optimizer"]["lr"], cfg["optimizer"]["batch_size"]) == (0.1, 16)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/status.json")}
    assert run_sweep(base, grid, out, progress=False) == out
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/status.json")} == stamps
    with pytest.raises(RunStoreError, match="holds a different sweep"):
        run_sweep(base, {"optimizer.lr": [0.2]}, out, progress=False)
    # the report of a real sweep, and of its runs, in a browser
    write_report(out)
    assert run_figures(RunStore(out / "runs" / "lr=0.1_bs=16")) == ["learning_curves", "eigenvalues"]
    if CHROMIUM:
        check_in_browser(out / "report.html", tmp_path)
        check_in_browser(out / "runs" / "lr=0.1_bs=16" / "report.html", tmp_path)


def test_one_failing_run_does_not_stop_the_others(tmp_path, capsys):
    with pytest.raises(SweepFailed) as err:
        run_sweep(TINY, {"data.name": ["synthetic", "cifar10"]}, tmp_path / "s", workers=1, progress=False)
    assert list(err.value.failures) == ["name=cifar10"]
    assert "data.root is not set" in err.value.failures["name=cifar10"]
    assert _states(tmp_path / "s") == {"name=synthetic": "done", "name=cifar10": "pending"}
    assert "sgdscope: run name=cifar10 failed: cifar10: data.root is not set" in capsys.readouterr().err


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(map(int, out[::2]), map(int, out[1::2])):
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child that its (dead) parent never reaped is a zombie: gone for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().split(") ")[-1][:1] != "Z"


def test_cli_sweep_resumes_after_sigkill(tmp_path):
    """Kill the sweep process (and so its worker) mid-run, rerun: done runs are kept, the killed run
    resumes from its checkpoint, and every run ends complete. The grid comes from the file's recipe."""
    cfg = {**TINY, "data": {**TINY["data"], "n_samples": 1000}, "optimizer": {"batch_size": 8},
           "train": {"epochs": 2, "checkpoint_every": 20},
           "recipe": {"reproduces": "test", "size": "cpu", "claim": "-", "grid": {"optimizer.lr": [0.01, 0.02]}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "sgdscope.cli", "sweep", str(path), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        states = _states(out) if (out / "sweep.yaml").is_file() else {}
        if "done" in states.values() and "running" in states.values():
            steps = [RunStore(m.path).status().get("step", 0) for m in open_sweep(out).members if m.store]
            if max(steps) >= 40:  # past a checkpoint, so the resume has something to resume from
                break
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)  # a poll opens every member's store: more often would take the sweep's CPU
    else:
        pytest.fail("the sweep never had a done and a running run at once")
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    deadline = time.time() + 30
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "a pool worker outlived the killed sweep"
    before = _states(out)
    done = [n for n, s in before.items() if s == "done"]
    interrupted = [n for n, s in before.items() if s == "running"]
    assert done and interrupted
    stamps = {n: (out / "runs" / n / "status.json").stat().st_mtime_ns for n in done}
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == str(out)
    assert set(_states(out).values()) == {"done"}
    assert {n: (out / "runs" / n / "status.json").stat().st_mtime_ns for n in done} == stamps
    for name in interrupted:  # resumed, not duplicated: every step exactly once
        store = RunStore(out / "runs" / name)
        assert store.table("train")["step"].tolist() == list(range(1, 2 * store.config()["resolved"]["steps_per_epoch"] + 1))


def test_cli_sweep_bad_input(tmp_path):
    # typer's runner, in this process: the command line's own checks and exit codes, without three fresh
    # interpreters (the real entry point runs in the SIGKILL test above)
    from typer.testing import CliRunner

    from sgdscope.cli import app

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    cli = ["sweep", str(path), "--out", str(tmp_path / "s")]
    for extra, message in (([], "give at least one --grid"), (["--grid", "optimizer.lr"], "expected key=v1,v2"),
                           (["--grid", "optimizer.lr=1", "--backend", "slurm"], "--backend")):
        res = CliRunner().invoke(app, [*cli, *extra], catch_exceptions=False)
        assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ Ray


def test_ray_two_point_sweep(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = run_sweep(TINY, {"optimizer.lr": [0.05, 0.1]}, tmp_path / "s", backend="ray", progress=False)
    finally:
        ray.shutdown()
    assert _states(out) == {"lr=0.05": "done", "lr=0.1": "done"}


def test_the_reader_is_sgdscope_sweepview_and_sweep_re_exports_it():
    # the read side imports sgdscope.sweepview; old callers of sgdscope.sweep get the same objects
    from sgdscope import sweep, sweepview

    for name in ("open_sweep", "is_sweep", "run_name", "label_for", "symbol", "SweepView", "Member", "SWEEP_FILE"):
        assert getattr(sweep, name) is getattr(sweepview, name), name
    assert run_name({"optimizer.lr": 0.1, "optimizer.batch_size": 64, "seed": 2}) == "lr=0.1_bs=64_seed=2"
