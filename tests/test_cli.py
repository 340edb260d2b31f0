"""Bad input through the command line: each case gets exactly one line on stderr, exit code 2 and nothing
written (issue 7, part 4). Most cases go through typer's CliRunner (in-process, fast); two real
subprocesses check the exit code and the stderr of the installed entry point, warnings included."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from sgdscope.cli import app
from sgdscope.store import LOCK_FILE

BASE = {
    "seed": 3,
    "device": "cpu",
    "data": {"name": "synthetic", "n_samples": 120, "input_shape": [6], "num_classes": 3},
    "model": {"name": "mlp", "widths": [4]},  # 6*4+4 + 4*3+3 = 43 parameters
    "optimizer": {"name": "sgd", "lr": 0.2, "batch_size": 16},
    "train": {"epochs": 1},
    "measure": {"subset": 0.5, "min_subset": 20, "batch_size": 64},
}
N_PARAMS = 43


def _write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (to prove that nothing was written).

    The writer lock's file is left out: it says who writes (a PID, or nothing), it holds no run data, and
    the flock on it, not its text, decides who may write, so a refused writer may leave its PID there.
    """
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*")) if p.name != LOCK_FILE
    }


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("sgdscope: error: "), lines[0]
    return lines[0]


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_bad_input(args: list[str], match: str | list[str], out: Path | None, watch: Path | None = None) -> str:
    """Run the CLI; expect exit 2, one line naming ``match`` on stderr, nothing on stdout, nothing written."""
    before = _snapshot(watch) if watch is not None else None
    res = invoke(args)
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    line = _one_error_line(res.stderr)
    for m in [match] if isinstance(match, str) else match:
        assert m in line, line
    assert res.stdout == ""
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"{out} was written: {list(out.rglob('*'))}"
    if watch is not None:
        assert _snapshot(watch) == before, "the run directory changed"
    return line


# ------------------------------------------------------------------------------------------------ config

# (--set overrides, what the one line must name); the base config is valid.
BAD_OVERRIDES = [
    # unknown keys
    (["foo=1"], ["foo", "unknown key"]),
    (["optimizer.lrr=0.1"], ["optimizer.lrr", "unknown key"]),
    (["probes.hessian={}"], ["probes.hessian", "unknown key"]),
    (["probes.eigen.kk=2"], ["probes.eigen.kk", "unknown key"]),
    # wrong types
    (["optimizer.lr=abc"], ["optimizer.lr", "'abc'"]),
    (["train.epochs=1.5"], ["train.epochs", "integer"]),
    (["model.widths=[a, b]"], ["model.widths"]),
    (["data=5"], ["data"]),
    (["seed=[1, 2]"], ["seed"]),
    (["measure.subset=lots"], ["measure.subset"]),
    (["probes.eigen=7"], ["probes.eigen"]),
    # values outside the allowed sets
    (["optimizer.name=rmsprop"], ["optimizer.name", "must be one of"]),
    (["measure.bn_policy=batch"], ["measure.bn_policy", "must be one of"]),
    (["schedule.name=cosine"], ["schedule.name", "must be one of"]),
    (["device=tpu"], ["device", "must be one of"]),
    (["on_nan=maybe"], ["on_nan", "must be one of"]),
    # out-of-range values
    (["optimizer.lr=-0.1"], ["optimizer.lr", "greater than 0"]),
    (["optimizer.lr=0"], ["optimizer.lr", "greater than 0"]),
    (["optimizer.batch_size=0"], ["optimizer.batch_size", "greater than 0"]),
    (["optimizer.batch_size=-5"], ["optimizer.batch_size"]),
    (["optimizer.batch_size=100000"], ["optimizer.batch_size", "larger than the training set"]),
    (["optimizer.momentum=1.5"], ["optimizer.momentum"]),
    (["optimizer.weight_decay=-1"], ["optimizer.weight_decay"]),
    (["train.epochs=0"], ["train.epochs"]),
    (["measure.subset=0"], ["measure.subset"]),
    (["measure.subset=1.5"], ["measure.subset"]),
    (["data.train_size=0"], ["data.train_size"]),
    (["data.train_size=100000"], ["data.train_size", "exceeds"]),
    (["data.input_shape=[]"], ["data.input_shape"]),
    (["probes.eigen.k=0"], ["probes.eigen.k"]),
    (["probes.eigen.k=101"], ["probes.eigen.k"]),
    ([f"probes.eigen.k={N_PARAMS + 1}"], ["probes.eigen.k", f"number of parameters ({N_PARAMS})"]),
    (["probes.direction.eigen_indices=[0]"], ["probes.direction.eigen_indices"]),
    (["probes.direction.eigen_indices=[]"], ["probes.direction.eigen_indices"]),
    (["probes.direction.eigen_indices=[50]"], ["eigen", f"number of parameters ({N_PARAMS})"]),
    (["optimizer.name=nsgd", "optimizer.k=4", "probes.eigen.k=2"], ["optimizer.k", "probes.eigen.k"]),
    # α grids empty, unsorted, too short, repeated, or not spanning the two iterates
    (["probes.interpolation.alphas=[]"], ["probes.interpolation.alphas"]),
    (["probes.interpolation.alphas=[0, 0.6, 0.3, 1]"], ["probes.interpolation.alphas", "sorted"]),
    (["probes.interpolation.alphas=[0, 0.5, 0.5, 1]"], ["probes.interpolation.alphas", "sorted"]),
    (["probes.interpolation.alphas=1"], ["probes.interpolation.alphas", "at least 2"]),
    (["probes.interpolation.alphas=[0, 0.5]"], ["probes.interpolation.alphas", "from 0 to 1"]),
    (["probes.interpolation.alphas=[-0.5, 0.5, 1]"], ["probes.interpolation.alphas"]),
    (["probes.alpha_step.alphas=[]"], ["probes.alpha_step.alphas", "non-empty"]),
    (["probes.alpha_step.alphas=[2, 1]"], ["probes.alpha_step.alphas", "increasing"]),
    # seeds torch cannot take (issue 11)
    ([f"seed={2**70}"], ["seed", f"less than or equal to {2**64 - 1}"]),
    (["seed=-1"], ["seed", "greater than or equal to 0"]),
    # schedule milestones negative, unsorted or repeated
    (["schedule.name=step", "schedule.milestones=[2, 1]"], ["schedule.milestones", "increasing"]),
    (["schedule.name=step", "schedule.milestones=[-1, 2]"], ["schedule.milestones", "non-negative"]),
    (["schedule.name=step", "schedule.milestones=[1, 1]"], ["schedule.milestones", "increasing"]),
    # NaN and infinite numbers, in any float field, however they are spelled
    (["optimizer.lr=.nan"], ["optimizer.lr", "finite"]),
    (["optimizer.lr=.inf"], ["optimizer.lr", "finite"]),
    (["optimizer.lr=1e400"], ["optimizer.lr", "finite"]),
    (["optimizer.weight_decay=nan"], ["optimizer.weight_decay", "finite"]),
    (["optimizer.noise_factor=inf"], ["optimizer.noise_factor", "finite"]),
    (["measure.subset=-.inf"], ["measure.subset", "finite"]),
    (["model.width_factor=.inf"], ["model.width_factor", "finite"]),
    (["schedule.name=cyclic", "schedule.max_lr=.inf"], ["schedule.max_lr", "finite"]),
    (["schedule.name=step", "schedule.milestones=[1, .nan]"], ["schedule.milestones", "finite"]),
    (["schedule.threshold=.nan"], ["schedule.threshold", "finite"]),
    # malformed --set
    (["optimizer.lr"], ["--set", "key=value"]),
    (["optimizer.lr.x=1"], ["optimizer", "not a section"]),
]


@pytest.mark.parametrize("sets, match", BAD_OVERRIDES, ids=[" ".join(s) for s, _ in BAD_OVERRIDES])
def test_bad_config_value(tmp_path, sets, match):
    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    out = tmp_path / "out"
    args = ["run", cfg, "--out", out]
    for s in sets:
        args += ["--set", s]
    assert_bad_input(args, match, out)


def test_bad_on_nan_option(tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    assert_bad_input(["run", cfg, "--out", tmp_path / "out", "--on-nan", "ignore"], ["on_nan", "must be one of"],
                     tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    assert_bad_input(["run", cfg, "--out", tmp_path / "out", "--device", "cuda"], ["device", "cuda"], tmp_path / "out")


BAD_FILES = {
    "missing": (None, ["no such file"]),
    "not-yaml": (b"seed: [1, 2\nmodel: {", ["not valid YAML"]),
    "a-list": (b"- 1\n- 2\n", ["mapping"]),
    "not-utf8": (b"seed: \xff\xfe\x00\x81", ["not valid YAML"]),
    "unknown-key-in-file": (yaml.safe_dump({**BASE, "model": {"name": "mlp", "widthz": [4]}}).encode(),
                            ["model.widthz", "unknown key"]),
    "wrong-type-in-file": (yaml.safe_dump({**BASE, "train": {"epochs": "many"}}).encode(), ["train.epochs"]),
    "nan-in-file": (yaml.safe_dump({**BASE, "optimizer": {"lr": float("nan")}}).encode(), ["optimizer.lr", "finite"]),
    "inf-in-file": (b"optimizer:\n  momentum: -.inf\n", ["optimizer.momentum", "finite"]),
    "duplicate-key": (b"seed: 1\noptimizer:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.5\n",
                      ["duplicate key 'lr'", "at line 5", "first at line 3"]),
    "duplicate-section": (b"optimizer: {lr: 0.1}\ntrain: {epochs: 1}\noptimizer: {lr: 0.5}\n",
                          ["duplicate key 'optimizer'", "at line 3", "first at line 1"]),
    "duplicate-key-one-line": (b"optimizer: {lr: 0.1, lr: 0.5}\n", ["duplicate key 'lr'", "at line 1"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_config_file(tmp_path, case):
    content, match = BAD_FILES[case]
    cfg = tmp_path / "c.yaml"
    if content is not None:
        cfg.write_bytes(content)
    assert_bad_input(["run", cfg, "--out", tmp_path / "out"], match, tmp_path / "out")


def test_resume_needs_out(tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    assert_bad_input(["run", cfg, "--resume"], ["--resume", "--out"], None)


# -------------------------------------------------------------------------------------------------- data


def _cifar_batch(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [int(v) for v in rng.integers(0, 10, n)]}


def write_cifar10(root: Path, damaged: dict[str, bytes] | None = None) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        (d / name).write_bytes(pickle.dumps(_cifar_batch(seed=i), protocol=3))
    for name, raw in (damaged or {}).items():
        (d / name).write_bytes(raw)
    return d


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, damaged: dict[str, bytes] | None = None, gz: bool = False) -> None:
    rng = np.random.default_rng(1)
    files = {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 256, (30, 28, 28))),
        "train-labels-idx1-ubyte": _idx(rng.integers(0, 10, 30)),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (6, 28, 28))),
        "t10k-labels-idx1-ubyte": _idx(np.arange(6) % 10),
    }
    files.update(damaged or {})
    root.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        if raw is None:
            continue
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)


class _Evil:
    """Unpickling this would create a marker file: proves a reader never runs foreign code."""

    marker: str = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_bytes(marker: Path, wrap=lambda o: o) -> bytes:
    e = _Evil()
    e.marker = str(marker)
    _Evil.marker = str(marker)
    return pickle.dumps(wrap(e))


def _truncated_pickle() -> bytes:
    raw = pickle.dumps(_cifar_batch(), protocol=3)
    return raw[: len(raw) // 2]


def _bad_magic() -> bytes:
    raw = bytearray(_idx(np.zeros((30, 28, 28))))
    raw[2] = 0x0D  # type code: not ubyte
    return bytes(raw)


def _prep_data(case: str, root: Path, marker: Path) -> tuple[list[str], list[str]]:
    """Build the damaged dataset of ``case`` under ``root``: (--set overrides, words of the error line)."""
    r = f"data.root={root}"
    mn = ["data.name=mnist", r, "data.flatten=true"]
    cif = ["data.name=cifar10", r, "data.flatten=true"]
    if case == "cifar-no-root":
        return ["data.name=cifar10"], ["data.root"]
    if case == "cifar-root-absent":
        return ["data.name=cifar10", f"data.root={root / 'nowhere'}"], ["data_batch_1", "missing"]
    if case == "cifar-empty-dir":
        root.mkdir()
        return cif, ["data_batch_1", "missing", "cifar-10-python.tar.gz"]
    if case == "cifar-missing-test-batch":
        d = write_cifar10(root)
        (d / "test_batch").unlink()
        return cif, ["test_batch", "missing"]
    if case == "cifar-truncated-pickle":
        write_cifar10(root, {"data_batch_3": _truncated_pickle()})
        return cif, ["data_batch_3", "not a valid CIFAR python pickle batch"]
    if case == "cifar-empty-file":
        write_cifar10(root, {"data_batch_1": b""})
        return cif, ["data_batch_1", "not a valid CIFAR"]
    if case == "cifar-random-bytes":
        write_cifar10(root, {"data_batch_2": np.random.default_rng(5).bytes(5000)})
        return cif, ["data_batch_2", "not a valid CIFAR"]
    if case == "cifar-foreign-global":
        write_cifar10(root, {"data_batch_1": _evil_bytes(marker, lambda e: {b"data": e, b"labels": [0]})})
        return cif, ["data_batch_1", "refused"]
    if case == "cifar-not-a-dict":
        write_cifar10(root, {"data_batch_1": pickle.dumps([1, 2, 3])})
        return cif, ["data_batch_1", "list"]
    if case == "cifar-wrong-shape":
        b = _cifar_batch()
        b[b"data"] = b[b"data"][:, :100]
        write_cifar10(root, {"data_batch_4": pickle.dumps(b)})
        return cif, ["data_batch_4", "(N, 3072)"]
    if case == "cifar-labels-out-of-range":
        b = _cifar_batch()
        b[b"labels"] = [10, 0, 1, 2]
        write_cifar10(root, {"test_batch": pickle.dumps(b)})
        return cif, ["test_batch", "labels outside 0..9"]
    if case == "cifar-no-labels":
        write_cifar10(root, {"data_batch_5": pickle.dumps({b"data": _cifar_batch()[b"data"]})})
        return cif, ["data_batch_5", "'labels'"]
    if case == "mnist-bad-magic":
        write_mnist(root, {"train-images-idx3-ubyte": _bad_magic()})
        return mn, ["train-images-idx3-ubyte", "magic number"]
    if case == "mnist-truncated":
        write_mnist(root, {"t10k-images-idx3-ubyte": _idx(np.zeros((6, 28, 28)))[:-100]})
        return mn, ["t10k-images-idx3-ubyte", "truncated"]
    if case == "mnist-shorter-than-header":
        write_mnist(root, {"train-labels-idx1-ubyte": b"\x00\x00"})
        return mn, ["train-labels-idx1-ubyte", "header"]
    if case == "mnist-truncated-gzip":
        write_mnist(root, gz=True)
        p = root / "train-images-idx3-ubyte.gz"
        p.write_bytes(p.read_bytes()[:200])
        return mn, ["train-images-idx3-ubyte.gz", "not a valid idx3"]
    if case == "mnist-gzip-garbage":
        write_mnist(root, gz=True)
        (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip at all")
        return mn, ["t10k-labels-idx1-ubyte.gz", "not a valid idx1"]
    if case == "mnist-missing-labels":
        write_mnist(root, {"train-labels-idx1-ubyte": None})
        return mn, ["train-labels-idx1-ubyte", "missing"]
    if case == "mnist-count-mismatch":
        write_mnist(root, {"train-labels-idx1-ubyte": _idx(np.zeros(7))})
        return mn, ["30 images", "7 labels"]
    if case == "mnist-labels-over-9":
        write_mnist(root, {"t10k-labels-idx1-ubyte": _idx(np.array([0, 1, 2, 3, 4, 12]))})
        return mn, ["t10k-labels-idx1-ubyte", "outside 0..9"]
    if case == "ptb-missing-file":
        root.mkdir()
        (root / "ptb.train.txt").write_text("a b c\n" * 20)
        (root / "ptb.valid.txt").write_text("a b c\n" * 20)
        return ["data.name=ptb", r, "model.name=lstm"], ["ptb.test.txt", "missing"]
    if case == "ptb-not-utf8":
        root.mkdir()
        for n in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
            (root / n).write_text("a b c\n" * 20)
        (root / "ptb.valid.txt").write_bytes(b"a b \xff\xfe c\n" * 20)
        return ["data.name=ptb", r, "model.name=lstm"], ["ptb.valid.txt", "UTF-8"]
    if case == "tiny-imagenet-corrupt-jpeg":
        from PIL import Image

        base = root / "tiny-imagenet-200"
        (base / "val" / "images").mkdir(parents=True)
        (base / "wnids.txt").write_text("n01\n")
        (base / "train" / "n01" / "images").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(base / "train" / "n01" / "images" / "a.JPEG")
        (base / "train" / "n01" / "images" / "b.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(base / "val" / "images" / "v.JPEG")
        (base / "val" / "val_annotations.txt").write_text("v.JPEG\tn01\t0\t0\t8\t8\n")
        return ["data.name=tiny_imagenet", r, "data.flatten=true"], ["b.JPEG", "not a readable JPEG"]
    raise AssertionError(case)


DATA_CASES = [
    "cifar-no-root", "cifar-root-absent", "cifar-empty-dir", "cifar-missing-test-batch", "cifar-truncated-pickle",
    "cifar-empty-file", "cifar-random-bytes", "cifar-foreign-global", "cifar-not-a-dict", "cifar-wrong-shape",
    "cifar-labels-out-of-range", "cifar-no-labels", "mnist-bad-magic", "mnist-truncated", "mnist-shorter-than-header",
    "mnist-truncated-gzip", "mnist-gzip-garbage", "mnist-missing-labels", "mnist-count-mismatch",
    "mnist-labels-over-9", "ptb-missing-file", "ptb-not-utf8", "tiny-imagenet-corrupt-jpeg",
]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_dataset_files(tmp_path, case):
    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    marker = tmp_path / "PWNED"
    sets, words = _prep_data(case, tmp_path / "data", marker)
    args = ["run", cfg, "--out", tmp_path / "out"]
    for s in sets:
        args += ["--set", s]
    assert_bad_input(args, words, tmp_path / "out")
    assert not marker.exists(), "a foreign pickle global was executed"


# -------------------------------------------------------------------------------------------- run dirs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small finished run, made once; tests copy it."""
    from sgdscope.train import run

    root = tmp_path_factory.mktemp("finished")
    cfg = _write_cfg(root / "c.yaml", BASE)
    run(yaml.safe_load(cfg.read_text()), root / "run", progress=False)
    return root / "run", cfg


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _other_version(run_dir: Path) -> Path:
    st = json.loads((run_dir / "status.json").read_text())
    st["format"] = 99
    (run_dir / "status.json").write_text(json.dumps(st))
    return run_dir


def _not_a_run(d: Path) -> Path:
    d.mkdir()
    (d / "notes.txt").write_text("my thesis")
    return d


def _corrupt_status(run_dir: Path) -> Path:
    (run_dir / "status.json").write_text("{not json")
    return run_dir


def _damage_db(run_dir: Path, damage: str) -> Path:
    """``run_dir`` with a damaged metrics.db and the status 'interrupted' (so that --resume goes on to its
    rows, where a finished run would return before reading them)."""
    st = json.loads((run_dir / "status.json").read_text())
    st["state"] = "interrupted"
    (run_dir / "status.json").write_text(json.dumps(st))
    db = run_dir / "metrics.db"
    raw = db.read_bytes()
    if damage == "zero-length":
        db.write_bytes(b"")
    elif damage == "random-bytes":
        db.write_bytes(np.random.default_rng(7).bytes(8192))
    elif damage == "truncated":
        db.write_bytes(raw[: len(raw) // 2])
    else:  # the header page whole, the table pages garbage: only SQLite itself can tell
        db.write_bytes(raw[:4096] + np.random.default_rng(8).bytes(len(raw) - 4096))
    return run_dir


RUNDIR_CASES = {
    "not-a-run": (lambda tmp, fin: _not_a_run(tmp / "d"), "not a sgdscope run directory"),
    "other-version": (lambda tmp, fin: _other_version(_copy_run(fin, tmp / "d")), "format 99"),
    "corrupt-status": (lambda tmp, fin: _corrupt_status(_copy_run(fin, tmp / "d")), "status.json"),
    **{f"db-{k}": ((lambda tmp, fin, k=k: _damage_db(_copy_run(fin, tmp / "d"), k)),
                   ["metrics.db: the store is damaged (", "run `sgdscope check"])
       for k in ("zero-length", "random-bytes", "truncated", "scribbled")},
}


@pytest.mark.parametrize("case", list(RUNDIR_CASES))
@pytest.mark.parametrize("command", ["export", "resume", "plot", "report"])
def test_run_dir_not_a_run_or_other_version(tmp_path, finished_run, case, command):
    fin, cfg = finished_run
    make, match = RUNDIR_CASES[case]
    d = make(tmp_path, fin)
    if command == "export":
        args = ["export", d, "--format", "csv"]
    elif command == "resume":
        args = ["run", cfg, "--out", d, "--resume"]
    elif command == "plot":
        args = ["plot", d, "loss"]
    else:
        pytest.importorskip("sgdscope.report")
        args = ["report", d]
    if command == "plot":
        from sgdscope.plots import FIGURES

        args[-1] = next(iter(FIGURES))
    assert_bad_input(args, match, None, watch=d)


def test_export_of_a_missing_dir(tmp_path):
    assert_bad_input(["export", tmp_path / "nope"], "not a sgdscope run directory", None)
    assert not (tmp_path / "nope").exists()


def test_export_unknown_format(tmp_path, finished_run):
    d = _copy_run(finished_run[0], tmp_path / "d")
    assert_bad_input(["export", d, "--format", "xml"], ["--format", "xml"], None, watch=d)


def test_resume_with_a_different_config_shows_the_keys(tmp_path, finished_run):
    fin, cfg = finished_run
    d = _copy_run(fin, tmp_path / "d")
    st = json.loads((d / "status.json").read_text())
    st["state"] = "interrupted"  # so that resume would continue it
    (d / "status.json").write_text(json.dumps(st))
    line = assert_bad_input(
        ["run", cfg, "--out", d, "--resume", "--set", "optimizer.lr=0.5", "--set", "train.epochs=3"],
        ["different config", "optimizer.lr (0.2 -> 0.5)", "train.epochs (1 -> 3)"], None, watch=d,
    )
    assert "seed" not in line  # only the keys that differ


def test_run_into_an_existing_run_without_resume(tmp_path, finished_run):
    fin, cfg = finished_run
    d = _copy_run(fin, tmp_path / "d")
    assert_bad_input(["run", cfg, "--out", d], ["already exists", "--resume"], None, watch=d)


def test_resume_of_a_directory_that_does_not_exist(tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    out = tmp_path / "nope"
    assert_bad_input(["run", cfg, "--out", out, "--resume"], [str(out), "cannot resume"], out)
    assert not out.exists()


def test_second_writer_exits_2_naming_the_pid(tmp_path, finished_run):
    """A run directory being written (here by this process) refuses a second writer, --resume included."""
    from sgdscope.store import RunStore

    fin, cfg = finished_run
    d = _copy_run(fin, tmp_path / "d")
    st = json.loads((d / "status.json").read_text())
    st["state"] = "interrupted"
    (d / "status.json").write_text(json.dumps(st))
    holder = RunStore(d)
    holder.acquire_writer()
    try:
        assert_bad_input(["run", cfg, "--out", d, "--resume"],
                         [f"{d}: another sgdscope process (PID {os.getpid()}) is writing to it"], None, watch=d)
    finally:
        holder.close()


def test_second_sweep_writer_exits_2_naming_the_pid(tmp_path):
    from sgdscope.store import writer_lock

    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    d = tmp_path / "sweep"
    with writer_lock(d):
        assert_bad_input(["sweep", cfg, "--grid", "optimizer.lr=0.1,0.2", "--out", d, "--workers", "1"],
                         [f"{d}: another sgdscope process (PID {os.getpid()}) is writing to it"], None, watch=d)


# --------------------------------------------------------------------------------------------- --out


def _bad_out(case: str, tmp: Path) -> tuple[Path, list[str]]:
    """An --out that cannot be a directory, and the words its error line must hold."""
    f = tmp / "a-file"
    f.write_text("not a directory")
    if case == "existing-file":
        return f, [f"--out {f}: is an existing file"]
    if case == "under-a-file":
        return f / "sub" / "run", [f"--out {f / 'sub' / 'run'}: lies under the file {f}"]
    # /proc refuses new entries even to root, who passes every permission-bit check
    return Path("/proc/sgdscope-out"), ["--out /proc/sgdscope-out: cannot be written"]


OUT_CASES = ["existing-file", "under-a-file", "not-writable"]


@pytest.mark.parametrize("case", OUT_CASES)
@pytest.mark.parametrize("command", ["run", "sweep", "demo", "export"])
def test_out_that_cannot_be_a_directory(tmp_path, finished_run, case, command):
    fin, _ = finished_run
    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    d = _copy_run(fin, tmp_path / "d")
    out, match = _bad_out(case, tmp_path)
    args = {"run": ["run", cfg], "sweep": ["sweep", cfg, "--grid", "optimizer.lr=0.1,0.2"], "demo": ["demo"],
            "export": ["export", d]}[command]
    assert_bad_input([*args, "--out", out], match, None, watch=tmp_path)


def test_out_in_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root, whom permission bits do not stop (the /proc case covers this)")
        cfg = _write_cfg(tmp_path / "c.yaml", BASE)
        assert_bad_input(["run", cfg, "--out", ro / "run"], [f"--out {ro / 'run'}: cannot be written"], None,
                         watch=tmp_path)
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------------------------- check


def test_check_a_healthy_run(tmp_path, finished_run):
    d = _copy_run(finished_run[0], tmp_path / "d")
    before = _snapshot(d)
    res = invoke(["check", d])
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    assert "sqlite integrity: ok" in res.stdout and "verdict: healthy" in res.stdout
    assert "resume: no (the run is done)" in res.stdout
    assert _snapshot(d) == before


@pytest.mark.parametrize("damage", ["zero-length", "random-bytes", "truncated", "scribbled"])
def test_check_a_damaged_run(tmp_path, finished_run, damage):
    d = _damage_db(_copy_run(finished_run[0], tmp_path / "d"), damage)
    before = _snapshot(d)
    res = invoke(["check", d])
    assert res.exit_code == 2
    assert f"{d}: the store is damaged: metrics.db: " in _one_error_line(res.stderr)
    assert "verdict: damaged" in res.stdout and "resume: no" in res.stdout
    assert _snapshot(d) == before


def test_check_finds_a_step_written_twice(tmp_path, finished_run):
    from sgdscope.store import RunStore

    d = _copy_run(finished_run[0], tmp_path / "d")
    s = RunStore(d)
    s.append("train", s.table("train").iloc[[2]].to_dict("records"))  # what a second writer did before the lock
    s.close()
    res = invoke(["check", d])
    assert res.exit_code == 2
    assert "train: 1 step value(s) appear more than once" in _one_error_line(res.stderr)
    assert "PROBLEM: train" in res.stdout


def test_check_of_a_missing_dir(tmp_path):
    assert_bad_input(["check", tmp_path / "nope"], "not a sgdscope run directory", None)


# ------------------------------------------------------------------------------------------ checkpoints


def _foreign_checkpoints(tmp: Path, marker: Path) -> dict[str, tuple[Path, list[str]]]:
    evil = tmp / "evil.pt"
    evil.write_bytes(_evil_bytes(marker, lambda e: {"model": e}))
    evil_torch = tmp / "evil_torch.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _make_evil(marker)}, evil_torch)
    tensor = tmp / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    other = tmp / "other_model.pt"
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, other)
    wrong_shape = tmp / "wrong_shape.pt"
    torch.save({"model": {"net.1.weight": torch.zeros(5, 5)}}, wrong_shape)
    text = tmp / "text.pt"
    text.write_text("hello")
    return {
        "arbitrary-object-pickle": (evil, ["not a sgdscope checkpoint", "weights_only=True"]),
        "torch-save-with-object": (evil_torch, ["not a sgdscope checkpoint", "weights_only=True"]),
        "plain-tensor": (tensor, ["not a sgdscope checkpoint", "'model'"]),
        "other-architecture": (other, ["does not fit this model"]),
        "wrong-shapes": (wrong_shape, ["does not fit this model"]),
        "text-file": (text, ["not a sgdscope checkpoint"]),
        "missing": (tmp / "absent.pt", ["no file"]),
    }


def _make_evil(marker: Path):
    e = _Evil()
    e.marker = str(marker)
    _Evil.marker = str(marker)
    return e


START_CASES = ["arbitrary-object-pickle", "torch-save-with-object", "plain-tensor", "other-architecture",
               "wrong-shapes", "text-file", "missing"]


@pytest.mark.parametrize("case", START_CASES)
def test_start_from_a_checkpoint_that_is_not_ours(tmp_path, case):
    marker = tmp_path / "PWNED"
    path, match = _foreign_checkpoints(tmp_path, marker)[case]
    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    assert_bad_input(["run", cfg, "--out", tmp_path / "out", "--set", f"start_from={path}"], match, tmp_path / "out")
    assert not marker.exists(), "unpickling ran foreign code"


RESUME_CKPT_CASES = ["arbitrary-object-pickle", "plain-tensor", "truncated", "other-architecture", "no-format"]


@pytest.mark.parametrize("case", RESUME_CKPT_CASES)
def test_resume_from_a_checkpoint_that_is_not_ours(tmp_path, finished_run, case):
    fin, cfg = finished_run
    d = _copy_run(fin, tmp_path / "d")
    st = json.loads((d / "status.json").read_text())
    st["state"] = "interrupted"
    (d / "status.json").write_text(json.dumps(st))
    last = d / "checkpoints" / "last.pt"
    marker = tmp_path / "PWNED"
    if case == "truncated":
        last.write_bytes(last.read_bytes()[:300])
        match = ["last.pt", "not a sgdscope checkpoint"]
    elif case == "no-format":
        torch.save({"model": torch.load(last, weights_only=True)["model"]}, last)
        match = ["last.pt", "format"]
    else:
        src, match = _foreign_checkpoints(tmp_path, marker)[case]
        shutil.copy(src, last)
        match = ["last.pt", *[m for m in match if m != "does not fit this model"]]
        if case == "other-architecture":
            match = ["last.pt"]
    assert_bad_input(["run", cfg, "--out", d, "--resume"], match, None, watch=d)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- real subprocesses


def _cli(args: list, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SGDSCOPE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sgdscope.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_subprocess_bad_inputs_exit_2_with_one_line(tmp_path):
    """The real entry point: exit code 2, one stderr line (no warning, no traceback) and nothing written —
    for a config error and for a foreign pickle given as a checkpoint (torch warns on those, and the
    warning must not reach the user)."""
    cfg = _write_cfg(tmp_path / "c.yaml", BASE)
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_evil_bytes(marker, lambda e: {"model": e}))
    p = _cli(["run", cfg, "--out", tmp_path / "out", "--set", "optimizer.lr=-1", "--set", f"start_from={evil}"])
    assert p.returncode == 2, p.stderr
    assert "optimizer.lr" in _one_error_line(p.stderr) and p.stdout == ""
    p = _cli(["run", cfg, "--out", tmp_path / "out", "--set", f"start_from={evil}"])
    assert p.returncode == 2, p.stderr
    assert "weights_only=True" in _one_error_line(p.stderr) and p.stdout == ""
    assert not (tmp_path / "out").exists() and not marker.exists()


def test_subprocess_second_writer_and_check_exit_2(tmp_path, finished_run):
    """The real entry point, with the lock held by another process (this one): --resume exits 2 naming our
    PID and writes nothing; `check` of a damaged store exits 2 with one stderr line, its findings on stdout."""
    from sgdscope.store import RunStore

    fin, cfg = finished_run
    d = _copy_run(fin, tmp_path / "d")
    st = json.loads((d / "status.json").read_text())
    st["state"] = "interrupted"
    (d / "status.json").write_text(json.dumps(st))
    before = _snapshot(d)
    holder = RunStore(d)
    holder.acquire_writer()
    try:
        p = _cli(["run", cfg, "--out", d, "--resume"])
    finally:
        holder.close()
    assert p.returncode == 2, p.stderr
    assert f"another sgdscope process (PID {os.getpid()})" in _one_error_line(p.stderr) and p.stdout == ""
    assert _snapshot(d) == before
    _damage_db(d, "truncated")
    p = _cli(["check", d])
    assert p.returncode == 2 and "the store is damaged: metrics.db: truncated" in _one_error_line(p.stderr)
    assert "verdict: damaged" in p.stdout
