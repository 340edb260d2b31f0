"""Reliability (issue 7): crash safety under SIGKILL and injected faults, non-perturbation probe by probe,
divergence and ``on_nan: skip``, readers of a run that is still writing, and determinism across a sweep.

The crash tests run the real ``sgdscope`` command line in subprocesses, kill it at seeded random points
(and make it die inside a database transaction and inside a checkpoint write), resume it until it is
done, and compare every table and the final state with the same run left alone, bit for bit."""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from sgdscope.config import set_dotted
from sgdscope.errors import DivergenceError, RunStoreError
from sgdscope.store import RunStore
from sgdscope.train import Trainer, run

# --------------------------------------------------------------------------------------------- helpers

# A small run with every stateful part a resume must restore: momentum, L2, a plateau schedule (state from
# the observed losses), augmentation, dropout (global RNG), BatchNorm buffers and probes with warm starts.
CRASH_CFG = {
    "seed": 5,
    "device": "cpu",
    "data": {"name": "synthetic", "n_samples": 500, "input_shape": [2, 6], "num_classes": 3, "augment": True},
    "model": {"name": "mlp", "widths": [8], "batchnorm": True, "dropout": 0.1},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "batch_size": 32, "weight_decay": 1.0e-4},
    "schedule": {"name": "plateau", "monitor": "train_loss", "patience": 0, "factor": 0.5, "threshold": 0.05},
    "train": {"epochs": 10, "checkpoint_every": 4},
    "measure": {"subset": 0.5, "min_subset": 50, "batch_size": 64},
    "probes": {
        "eigen": {"every": 3, "k": 2, "tol": 1.0e-2},
        "interpolation": {"every": 2, "epochs": [1, 2, 3], "alphas": 4},
        "direction": {"every": "epoch", "eigen_indices": [1], "n_grads": 2, "ks": [0, 1, -1]},
        "alignment": {"every": "epoch"},
    },
}
CRASH_STEPS = 120  # 360 training examples / 32 → 12 steps per epoch, 10 epochs
K = 2
N_ALPHAS = 5

# Tables and the columns that identify a row: no key may appear twice.
KEYS = {
    "train": ["step"],
    "epoch": ["epoch"],
    "eigen": ["step", "index"],
    "curvature": ["step"],
    "interpolation": ["step", "alpha"],
    "valley": ["step"],
    "direction": ["step", "eigen_index", "k"],
    "k_min": ["step", "eigen_index", "threshold"],
    "alpha_step": ["step", "eigen_index", "alpha"],
    "alignment": ["step", "eigen_index"],
}


def tiny(**over) -> dict:
    cfg = {
        "seed": 3,
        "device": "cpu",
        "data": {"name": "synthetic", "n_samples": 150, "input_shape": [6], "num_classes": 3},
        "model": {"name": "mlp", "widths": [8]},
        "optimizer": {"name": "sgd", "lr": 0.2, "batch_size": 16},
        "train": {"epochs": 2},
        "measure": {"subset": 0.5, "min_subset": 40, "batch_size": 64},
    }
    for k, v in over.items():
        set_dotted(cfg, k, v)
    return cfg


def ckpt(path: Path) -> dict:
    return torch.load(path / "checkpoints" / "last.pt", weights_only=True)


def assert_state_equal(a: dict, b: dict, what: str = "") -> None:
    """Tensors equal bit for bit (NaN-aware), recursively through dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), what
    elif isinstance(a, dict):
        assert set(a) == set(b), (what, set(a) ^ set(b))
        for k in a:
            assert_state_equal(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{what}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (what, a, b)


def assert_tables_equal(a: Path, b: Path) -> None:
    sa, sb = RunStore(a), RunStore(b)
    assert sa.tables() == sb.tables()
    for t in sa.tables():
        da, db = sa.table(t), sb.table(t)
        assert list(da.columns) == list(db.columns), t
        pd.testing.assert_frame_equal(da, db, check_exact=True, obj=t)  # logged_at included
        assert da.equals(db), t


def check_consistent(store: RunStore, tables: tuple[str, ...] | None = None) -> dict[str, int]:
    """What a reader may see of a run, at any moment: only whole commits. Returns the row counts."""
    counts = {}
    for t in store.tables():
        if tables is not None and t not in tables:
            continue
        df = store.table(t)
        counts[t] = len(df)
        if not len(df):
            continue
        if t in KEYS:
            dup = df.duplicated(KEYS[t])
            assert not dup.any(), f"{t}: duplicated rows {df[dup].to_dict('records')[:3]}"
        if t == "train":
            assert df["step"].tolist() == list(range(1, len(df) + 1)), "train steps are not 1..n"
        if t == "eigen":
            per = df.groupby("step")["index"].apply(list)
            assert all(v == list(range(1, K + 1)) for v in per), f"a step with a partial eigen commit: {per.to_dict()}"
        if t == "interpolation":
            sizes = df.groupby("step").size()
            assert (sizes == N_ALPHAS).all(), f"a partial interpolation commit: {sizes.to_dict()}"
        # logged_at is the step whose commit wrote the row: commits append in step order, no row is
        # committed before the step it describes, and a train row is committed at its own step.
        assert df["logged_at"].is_monotonic_increasing, f"{t}: logged_at goes back in rowid order"
        if "step" in df:
            early = df[df["logged_at"] < df["step"]]
            assert early.empty, f"{t}: rows logged before their step {early.to_dict('records')[:3]}"
        if t == "train":
            assert (df["logged_at"] == df["step"]).all(), "train rows not logged at their own step"
    store.close()
    return counts


def read_counts(out: Path) -> dict[str, int]:
    try:
        store = RunStore(out)
    except RunStoreError:
        return {}  # not created yet
    return check_consistent(store, POLLED)


POLLED = ("train", "eigen", "interpolation")  # what the poll loop checks (all tables are checked after each crash)

_WORKER = textwrap.dedent(
    """
    # Runs the sgdscope CLI with one injected fault, chosen by SGDSCOPE_FAULT=kind:n
    #   commit:n  -> the process dies inside its n-th database transaction, after the INSERTs, before COMMIT
    #   replace:n -> the process dies in its n-th checkpoint write of last.pt: temp file written and fsynced,
    #                not yet renamed
    import os, sqlite3, sys
    kind, n = os.environ["SGDSCOPE_FAULT"].split(":")
    n = int(n)
    calls = {"k": 0}

    class DyingConnection(sqlite3.Connection):
        def execute(self, sql, *a):
            if kind == "commit" and sql == "COMMIT":
                calls["k"] += 1
                if calls["k"] == n:
                    os._exit(137)
            return super().execute(sql, *a)

    real_connect = sqlite3.connect

    def connect(*a, factory=sqlite3.Connection, **kw):  # on top of the store's own connection class
        return real_connect(*a, factory=type("Dying", (DyingConnection, factory), {}), **kw)

    sqlite3.connect = connect
    real_replace = os.replace

    def dying_replace(src, dst):
        if kind == "replace" and str(dst).endswith("last.pt"):
            calls["k"] += 1
            if calls["k"] == n:
                os._exit(137)
        return real_replace(src, dst)

    os.replace = dying_replace
    from sgdscope.cli import main
    sys.argv = ["sgdscope", *sys.argv[1:]]
    main()
    """
)


class Runner:
    """Starts ``sgdscope run`` in subprocesses on one run directory and injects faults."""

    def __init__(self, tmp: Path, cfg: dict) -> None:
        self.cfg_path = tmp / "cfg.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.worker = tmp / "worker.py"
        self.worker.write_text(_WORKER)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.env.pop("SGDSCOPE_DEBUG", None)
        self.polls = 0
        self.report: Path | None = None
        self.mid_run_reads = 0

    def start(self, out: Path, resume: bool, fault: str | None = None) -> subprocess.Popen:
        args = ["run", str(self.cfg_path), "--out", str(out), *(["--resume"] if resume else [])]
        env = dict(self.env)
        if fault:
            env["SGDSCOPE_FAULT"] = fault
            cmd = [sys.executable, str(self.worker), *args]
        else:
            cmd = [sys.executable, "-m", "sgdscope.cli", *args]
        log = open(out.parent / f"{out.name}.log", "ab")
        return subprocess.Popen(cmd, stdout=log, stderr=log, env=env)

    def watch(self, p: subprocess.Popen, out: Path, kill_at: int | None = None, rng: random.Random | None = None,
              timeout: float = 240, report_at: int | None = None) -> bool:
        """Poll the run's tables (checking every snapshot) until it ends; SIGKILL it once the train table
        reaches ``kill_at`` steps (after a random few ms); write its report once ``report_at`` steps are
        in. Returns whether it was killed."""
        end = time.monotonic() + timeout
        while p.poll() is None:
            assert time.monotonic() < end, "run did not finish"
            n = read_counts(out).get("train", 0)
            self.polls += 1
            if 0 < n < CRASH_STEPS:
                self.mid_run_reads += 1
            if report_at is not None and n >= report_at and p.poll() is None:
                from sgdscope.report import write_report

                self.report = write_report(out)  # on a run that is still writing
                report_at = None
            if kill_at is not None and n >= kill_at:
                time.sleep(rng.uniform(0, 0.05))
                p.send_signal(signal.SIGKILL)
                p.wait()
                return True
            # A poll costs ~30 ms of CPU (the pandas checks of three tables) and takes it from the run on a
            # small machine: every 0.1 s, and every 0.02 s only near a planned kill so that it lands on time.
            time.sleep(0.02 if kill_at is not None and n >= kill_at - 5 else 0.1)
        return False


# ----------------------------------------------------------------------------------------- crash safety


@pytest.mark.slow
def test_sigkill_and_injected_crashes_then_resume_equal_uninterrupted(tmp_path):
    rng = random.Random(20240607)
    runner = Runner(tmp_path, CRASH_CFG)
    ref, out = tmp_path / "ref", tmp_path / "run"

    # The reference, left alone; a reader polls it all along (concurrent reads of a writing run).
    p = runner.start(ref, resume=False)
    assert not runner.watch(p, ref, report_at=30)
    assert p.returncode == 0, (ref.parent / "ref.log").read_text()[-2000:]
    assert runner.report.is_file() and runner.report.stat().st_size > 0

    faults = []
    # 1. SIGKILL within the first steps: before the first checkpoint (resume must start over cleanly).
    p = runner.start(out, resume=False)
    faults.append(("sigkill", runner.watch(p, out, kill_at=rng.randint(1, 3), rng=rng)))
    check_consistent(RunStore(out))
    # 2. Death inside a database transaction (rows inserted, not committed).
    p = runner.start(out, resume=True, fault=f"commit:{rng.randint(3, 9)}")
    p.wait()
    faults.append(("die-in-transaction", p.returncode == 137))
    check_consistent(RunStore(out))
    # 3. SIGKILL at a random point mid-run.
    p = runner.start(out, resume=True)
    faults.append(("sigkill", runner.watch(p, out, kill_at=rng.randint(30, 60), rng=rng)))
    check_consistent(RunStore(out))
    # 4. Death in a checkpoint write (temp file fsynced, rename not done).
    p = runner.start(out, resume=True, fault=f"replace:{rng.randint(2, 4)}")
    p.wait()
    faults.append(("die-in-checkpoint-write", p.returncode == 137))
    assert list((out / "checkpoints").glob(".last.pt.*.tmp")), "the torn checkpoint write left no temp file"
    check_consistent(RunStore(out))
    # 5. SIGKILL late in the run.
    p = runner.start(out, resume=True)
    faults.append(("sigkill", runner.watch(p, out, kill_at=rng.randint(75, 95), rng=rng)))
    assert all(ok for _, ok in faults), f"a fault did not happen where planned: {faults}"
    assert RunStore(out).status()["state"] in ("running", "interrupted")  # a killed run cannot say more

    # Resume until done (once more would be allowed; it must not take more).
    p = runner.start(out, resume=True)
    assert not runner.watch(p, out)
    assert p.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert RunStore(out).status()["state"] == "done"

    # No row lost or duplicated, every table and the final state equal to the uninterrupted run.
    counts = check_consistent(RunStore(out))
    assert counts["train"] == CRASH_STEPS and counts["epoch"] == 10
    assert_tables_equal(ref, out)
    a, b = ckpt(ref), ckpt(out)
    for key in ("model", "optimizer", "schedule", "rng_cpu", "scope", "step"):
        assert_state_equal(a[key], b[key], key)
    assert RunStore(ref).load_tensors("measure_subset")["indices"].equal(RunStore(out).load_tensors("measure_subset")["indices"])

    # Resuming a finished run is a no-op.
    before = {t: RunStore(out).table(t) for t in RunStore(out).tables()}
    p = runner.start(out, resume=True)
    p.wait()
    assert p.returncode == 0
    assert all(before[t].equals(RunStore(out).table(t)) for t in before)
    # The readers saw the runs mid-write many times, and never a partial commit (check_consistent).
    assert runner.mid_run_reads >= 20, runner.mid_run_reads


def test_interrupt_at_every_kind_of_step_resumes_exactly(tmp_path, monkeypatch):
    """In-process: KeyboardInterrupt raised inside a probe, inside evaluation, and inside a checkpoint
    save, each followed by resume; tables and state equal those of the uninterrupted run."""
    from sgdscope import train as train_mod
    from sgdscope.measure.probes.walk import InterpolationProbe

    cfg = copy.deepcopy(CRASH_CFG)
    cfg["train"]["epochs"] = 3
    ref = run(cfg, tmp_path / "ref", progress=False)
    out = tmp_path / "run"

    def boom_on(cls, name, n):
        orig, calls = getattr(cls, name), {"k": 0}

        def f(self, *a, **kw):
            calls["k"] += 1
            if calls["k"] == n:
                raise KeyboardInterrupt
            return orig(self, *a, **kw)

        monkeypatch.setattr(cls, name, f)
        return orig

    faults = [(InterpolationProbe, "measure", 4), (train_mod.Trainer, "evaluate_epoch", 2),
              (train_mod.Trainer, "save_checkpoint", 3)]
    for i, (cls, name, n) in enumerate(faults):
        orig = boom_on(cls, name, n)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, out, resume=i > 0, progress=False)
        monkeypatch.setattr(cls, name, orig)
        assert RunStore(out).status()["state"] == "interrupted"
        check_consistent(RunStore(out))
    run(cfg, out, resume=True, progress=False)
    assert_tables_equal(ref, out)
    assert_state_equal(ckpt(ref)["model"], ckpt(out)["model"])
    assert_state_equal(ckpt(ref)["optimizer"], ckpt(out)["optimizer"])


def test_store_keeps_floats_exact_after_a_nan_first_value(tmp_path):
    """The first row of a column may be NaN (grad_cosine_prev at step 1): later floats must still come
    back bit for bit, as floats (a column typed by that NULL used to store them as 15-digit text)."""
    s = RunStore.create(tmp_path / "r", {})
    s.append("train", [{"step": 1, "c": float("nan")}])
    s.append("train", [{"step": 2, "c": 0.1 + 0.2}, {"step": 3, "c": 1 / 3}])
    s.append("train", [{"step": 4, "c": 2.5, "new": None}, {"step": 5, "c": -1e-300, "new": 7.125}])
    df = RunStore(tmp_path / "r").table("train")
    assert df["c"].dtype == "float64"
    assert df["c"].tolist()[1:] == [0.1 + 0.2, 1 / 3, 2.5, -1e-300]
    assert df["new"].tolist()[-1] == 7.125


# ------------------------------------------------------------------------------------ non-perturbation

PROBES = {
    "eigen": {"every": 3, "k": 2, "tol": 1e-2},
    "direction": {"every": 4, "eigen_indices": [1, 2], "n_grads": 3, "ks": [0, 0.5, -0.5, 2]},
    "alpha_step": {"every": 4, "eigen_indices": [1], "n_grads": 3},
    "alignment": {"every": 3},
    "interpolation": {"every": 2, "epochs": [1, 2], "alphas": 4},
}
BN = {"model.batchnorm": True, "model.dropout": 0.2, "optimizer.momentum": 0.9, "optimizer.weight_decay": 1e-3,
      "data.input_shape": [2, 6], "data.augment": True}


@pytest.fixture(scope="module")
def bn_baseline(tmp_path_factory):
    d = tmp_path_factory.mktemp("baseline")
    return run(tiny(**BN), d / "none", progress=False)


def _assert_same_trajectory(a: Path, b: Path) -> None:
    ca, cb = ckpt(a), ckpt(b)
    assert_state_equal(ca["model"], cb["model"], "model")  # parameters and BN running statistics
    assert_state_equal(ca["optimizer"], cb["optimizer"], "optimizer")  # momentum buffers
    assert torch.equal(ca["rng_cpu"], cb["rng_cpu"])  # the global RNG (dropout) stream
    for t in ("train", "epoch"):
        pd.testing.assert_frame_equal(RunStore(a).table(t), RunStore(b).table(t), check_exact=True)


@pytest.mark.parametrize("policy", ["eval", "train-restore"])
@pytest.mark.parametrize("probe", list(PROBES))
def test_each_probe_leaves_training_bit_identical(tmp_path, bn_baseline, probe, policy):
    """A BN + dropout + momentum + L2 + augmentation run with one probe on equals the run with none."""
    out = run(tiny(**BN, probes={probe: PROBES[probe]}, **{"measure.bn_policy": policy}), tmp_path / "p", progress=False)
    s = RunStore(out)
    measured = {"eigen": "eigen", "direction": "direction", "alpha_step": "alpha_step", "alignment": "alignment",
                "interpolation": "valley"}[probe]
    assert len(s.table(measured)) >= 3  # the probe did measure, several times
    _assert_same_trajectory(bn_baseline, out)


def test_bn_policy_train_is_the_documented_exception(tmp_path, bn_baseline):
    """Under ``train`` the loss evaluations of the probes update the BN running statistics (as the original
    scripts did; HVPs never do): the comparison above does see such a change, so its passing means something."""
    probes = {"eigen": {**PROBES["eigen"], "max_hvps": 20}, "direction": PROBES["direction"]}
    out = run(tiny(**BN, probes=probes, **{"measure.bn_policy": "train"}), tmp_path / "p", progress=False)
    a, b = ckpt(bn_baseline)["model"], ckpt(out)["model"]
    running = [k for k in a if "running_mean" in k or "running_var" in k]
    assert running and any(not torch.equal(a[k], b[k]) for k in running)


@pytest.mark.parametrize("policy", ["eval", "train-restore"])
def test_each_probe_restores_mode_buffers_rng_and_grads(policy):
    """Called directly, every probe leaves the model's modes (train or eval, per module), parameters,
    BN buffers, .grad fields and the global RNG state as it found them."""
    cfg_raw = tiny(**BN, probes=PROBES, **{"measure.bn_policy": policy})
    from sgdscope.config import validate
    from sgdscope.curvature.flat import get_flat
    from sgdscope.measure.probes import StepInfo

    tr = Trainer(validate(cfg_raw), torch.device("cpu"), progress=False)
    model = tr.model
    theta = get_flat(model)
    for mode in ("train", "eval", "mixed"):
        model.train(mode != "eval")
        if mode == "mixed":
            list(model.modules())[-1].eval()
        flags = [m.training for m in model.modules()]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
        rng = torch.get_rng_state()
        for probe in tr.scope.probes:
            info = StepInfo(step=4, epoch=1, epoch_end=False, lr=0.2, theta_prev=theta - 0.01, grad=torch.ones_like(theta))
            rows = probe.measure(info)
            assert rows and all(len(r) for r in rows.values()), probe.name
            assert [m.training for m in model.modules()] == flags, (probe.name, mode)
            assert_state_equal(state, dict(model.state_dict()), probe.name)
            assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters()), probe.name
            assert torch.equal(torch.get_rng_state(), rng), probe.name
            tr.scope.env.tracker._cache = None  # make every probe solve again


# ------------------------------------------------------------------------------------------ divergence


def _cli(args: list[str]):
    """``sgdscope ARGS`` through typer's runner, in this process: the command line's own code (its error
    handling and exit codes included) without a fresh interpreter's seconds of importing torch. The real
    entry point runs in subprocesses in the crash test above and in test_cli.py."""
    from typer.testing import CliRunner

    from sgdscope.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_divergence_through_cli_exit_1_status_failed_rows_kept(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(**{"optimizer.lr": 1e6, "train.epochs": 3}, probes={"eigen": PROBES["eigen"]})))
    p = _cli(["run", cfg, "--out", tmp_path / "r"])
    assert p.exit_code == 1, p.stderr
    last = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ln.strip()][-1]
    assert last.startswith("sgdscope: diverged: ") and "at step" in last and "lr 1e+06" in last, last
    s = RunStore(tmp_path / "r")
    st = s.status()
    failed_at = int(st["error"].split("at step ")[1].split(",")[0])
    assert st["state"] == "failed" and st["step"] == failed_at - 1
    assert st["error"].startswith(("loss became", "gradient became")) and "lr 1e+06" in st["error"]
    train = s.table("train")
    assert train["step"].tolist() == list(range(1, failed_at))  # every row before the failure is kept
    assert set(s.table("eigen")["step"]) == {st for st in (0, 3, 6, 9) if st < failed_at}
    check_consistent(s)


def _poison(monkeypatch, at: dict[int, str]):
    """Make the minibatch loss (and gradient) non-finite at the given 0-based steps; ``"params"`` also
    sets a weight to inf, as a real overflow would."""
    orig = Trainer._grad_minibatch

    def f(self, step):
        loss, acc = orig(self, step)
        if step in at:
            for p in self.params:
                p.grad.fill_(float("nan"))
            if at[step] == "params":
                with torch.no_grad():
                    self.params[0].view(-1)[0] = float("inf")
            return float("nan"), acc
        return loss, acc

    monkeypatch.setattr(Trainer, "_grad_minibatch", f)


def test_on_nan_skip_skips_the_update_and_keeps_measuring(tmp_path, monkeypatch):
    probes = {"eigen": PROBES["eigen"], "interpolation": PROBES["interpolation"]}
    clean = run(tiny(**{"optimizer.momentum": 0.9}, probes=probes), tmp_path / "clean", progress=False)
    _poison(monkeypatch, {4: "nan", 5: "nan", 13: "nan"})
    with pytest.raises(DivergenceError, match="loss became nan at step 5, lr 0.2"):
        run(tiny(**{"optimizer.momentum": 0.9}, probes=probes), tmp_path / "stop", progress=False)
    assert RunStore(tmp_path / "stop").table("train")["step"].tolist() == [1, 2, 3, 4]

    out = run(tiny(**{"optimizer.momentum": 0.9}, probes=probes, on_nan="skip"), tmp_path / "skip", progress=False)
    s = RunStore(out)
    assert s.status()["state"] == "done"
    train = s.table("train").set_index("step")
    n = len(RunStore(clean).table("train"))
    assert list(train.index) == list(range(1, n + 1))  # every step logged
    assert train.index[train["skipped"] == 1].tolist() == [5, 6, 14]
    assert train.loc[[5, 6, 14], "batch_loss"].isna().all() and train.loc[[5, 6, 14], "grad_norm"].isna().all()
    # θ did not move on a skipped step; it did on the others
    d = train["param_distance"]
    assert d[5] == d[4] and d[6] == d[4] and d[14] == d[13] and d[7] != d[6]
    # up to the first skip the run is the clean run; after it, it is not
    ref = RunStore(clean).table("train").set_index("step")
    assert train.loc[1:4, "batch_loss"].equals(ref.loc[1:4, "batch_loss"])
    assert not train.loc[7:, "batch_loss"].equals(ref.loc[7:, "batch_loss"])
    # probes kept measuring after the skips, on finite parameters
    eig = s.table("eigen")
    assert {6, 9, 12} <= set(eig["step"]) and eig["value"].notna().all()
    interp = s.table("interpolation")
    flat = interp[interp.step == 4]["loss"]  # the segment θ_4 → θ_5, and step 5 was skipped: θ_5 = θ_4
    assert len(flat) == N_ALPHAS and flat.nunique() == 1
    assert interp[interp.step == 2]["loss"].nunique() > 1
    assert torch.isfinite(torch.cat([v.flatten() for v in ckpt(out)["model"].values()])).all()


def test_on_nan_skip_resume_is_exact(tmp_path, monkeypatch):
    """A skipped step before a checkpoint and one after: the resumed run equals the uninterrupted one."""
    _poison(monkeypatch, {3: "nan", 10: "nan"})  # steps 4 and 11; checkpoints at 5, 7, 10; interrupt at 13
    cfg = tiny(on_nan="skip", probes={"eigen": PROBES["eigen"]}, **{"train.checkpoint_every": 5})
    ref = run(cfg, tmp_path / "ref", progress=False)
    orig, calls = Trainer.train_step, {"k": 0}

    def flaky(self):
        calls["k"] += 1
        if calls["k"] == 13:
            raise KeyboardInterrupt
        return orig(self)

    monkeypatch.setattr(Trainer, "train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "r", progress=False)
    monkeypatch.setattr(Trainer, "train_step", orig)
    run(cfg, tmp_path / "r", resume=True, progress=False)
    assert_tables_equal(ref, tmp_path / "r")
    assert RunStore(ref).table("train")["skipped"].sum() == 2


def test_on_nan_skip_still_stops_on_non_finite_parameters(tmp_path, monkeypatch):
    _poison(monkeypatch, {2: "nan", 6: "params"})
    with pytest.raises(DivergenceError, match=r"parameters became non-finite at step 7, lr 0.2 \(loss became nan"):
        run(tiny(on_nan="skip"), tmp_path / "r", progress=False)
    s = RunStore(tmp_path / "r")
    st = s.status()
    assert st["state"] == "failed" and st["step"] == 6 and "parameters became non-finite at step 7" in st["error"]
    assert s.table("train")["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert s.table("train")["skipped"].tolist() == [0, 0, 1, 0, 0, 0]


def test_on_nan_skip_gives_up_after_an_epoch_of_skips_cli(tmp_path):
    """lr 1e6: the weights overflow the loss on every batch while staying finite; ``--on-nan skip`` skips
    one epoch of steps, then stops: failed, exit code 1, the rows kept."""
    cfg = tmp_path / "c.yaml"
    # the divergence bound would stop this run at its first exploding loss: off, to reach the skip limit
    cfg.write_text(yaml.safe_dump(tiny(**{"optimizer.lr": 1e6, "train.epochs": 4, "train.divergence_factor": None})))
    p = _cli(["run", cfg, "--out", tmp_path / "r", "--on-nan", "skip"])
    assert p.exit_code == 1, p.stderr
    s = RunStore(tmp_path / "r")
    st = s.status()
    assert st["state"] == "failed" and "were skipped too" in st["error"]
    train = s.table("train")
    spe = s.config()["resolved"]["steps_per_epoch"]
    assert train["skipped"].tolist()[-spe:] == [1] * spe and train["step"].tolist() == list(range(1, len(train) + 1))
    assert s.config()["on_nan"] == "skip"


# ---------------------------------------------------------------------------------------- determinism


def test_configs_differing_only_in_lr_share_everything_else(tmp_path):
    """As in a sweep over lr: the same data split, measurement subset, initial parameters and batches;
    the lr column differs, and so does everything after the first update."""
    probes = {"eigen": PROBES["eigen"]}
    a = run(tiny(probes=probes), tmp_path / "a", progress=False)
    b = run(tiny(probes=probes, **{"optimizer.lr": 0.05}), tmp_path / "b", progress=False)
    sa, sb = RunStore(a), RunStore(b)
    assert torch.equal(sa.load_tensors("measure_subset")["indices"], sb.load_tensors("measure_subset")["indices"])
    assert sa.config()["resolved"]["data"] == sb.config()["resolved"]["data"]  # sizes, normalisation, split seed
    assert torch.equal(ckpt(a)["scope"]["theta0"], ckpt(b)["scope"]["theta0"])
    from sgdscope.config import validate

    ta = Trainer(validate(tiny(probes=probes)), torch.device("cpu"), progress=False)
    tb = Trainer(validate(tiny(probes=probes, **{"optimizer.lr": 0.05})), torch.device("cpu"), progress=False)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(ta.data, split).x, getattr(tb.data, split).x)
        assert torch.equal(getattr(ta.data, split).y, getattr(tb.data, split).y)
    assert all(torch.equal(ta.stream.indices(t), tb.stream.indices(t)) for t in range(25))
    tra, trb = sa.table("train"), sb.table("train")
    assert (tra["lr"] == 0.2).all() and (trb["lr"] == 0.05).all()
    assert tra["batch_loss"][0] == trb["batch_loss"][0]  # same θ0, same first batch
    assert tra["batch_loss"][1] != trb["batch_loss"][1]
    ea, eb = sa.table("eigen"), sb.table("eigen")
    assert ea[ea.step == 0]["value"].equals(eb[eb.step == 0]["value"])  # measured at the same θ0
    assert not ea[ea.step == 6]["value"].equals(eb[eb.step == 6]["value"])
    cfg_diff = {k for k in set(sa.config()) | set(sb.config()) if sa.config().get(k) != sb.config().get(k)}
    assert cfg_diff == {"optimizer"}
