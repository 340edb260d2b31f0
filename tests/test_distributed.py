"""Measurement and training over 2 gloo processes on CPU (1 thread each), launched as torchrun launches
them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port).

Oracles: the one-process kernels on the whole batch list (computed by every rank beside the sharded ones),
the dense autograd Hessian, and a 1-process ``sgdscope run`` of the same config for the trainer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sgdscope.store import RunStore
from sgdscope.train import run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo on a POSIX system")
HERE = Path(__file__).parent
SRC = HERE.parent / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int = 2, **popen) -> list[subprocess.Popen]:
    """``world`` ranks of ``python ARGS``, each told its rank the way torchrun tells it."""
    port = free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "SGDSCOPE_DIST_TIMEOUT": "60",
               "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, **popen))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    return [(p.wait(timeout), p.communicate()[1]) for p in procs]


# ------------------------------------------------------------------------------------------ kernels
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    results = finish(launch([str(HERE / "distworker.py"), str(out)]))
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for _, err in results]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case_id", ["mlp", "dropout", "cnn_bn"])
def test_sharded_kernels_equal_one_process(ranks, case_id):
    """HVPs (single and block), the gradient, the losses at points and the minibatch gradients over two
    ranks equal the one-process kernels on the whole batch list; dropout masks and BN batch statistics
    included (batches are dealt out whole, under their own mask streams); the L2 term counted once."""
    for res in ranks:
        got = res[case_id]
        for key in ("matvec", "matmat", "gradient", "losses"):
            par, one = got[key]
            torch.testing.assert_close(par, one, rtol=1e-12, atol=1e-12, msg=key)
        par, one = got["grads"]
        assert torch.equal(par, one)  # each gradient computed whole by one rank, zeros added elsewhere
        assert got["n_hvps"][0] == got["n_hvps"][1]
    for key in ("matvec", "matmat", "gradient", "losses"):
        assert torch.equal(ranks[0][case_id][key][0], ranks[1][case_id][key][0])  # all-reduce: same bits


def test_sharded_hessian_matches_dense_autograd(ranks):
    par, dense = ranks[0]["mlp"]["dense"]
    torch.testing.assert_close(par, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case_id", ["mlp", "dropout", "cnn_bn"])
def test_eigenpairs_identical_on_ranks_and_equal_to_one_process(ranks, case_id):
    """The replicated eigensolver: bit-identical on both ranks; equal to the one-process solve to round-off
    (the products differ only in the order of the float additions)."""
    v0, v1 = ranks[0][case_id]["eig_vectors"][0], ranks[1][case_id]["eig_vectors"][0]
    assert torch.equal(ranks[0][case_id]["eig_values"][0], ranks[1][case_id]["eig_values"][0])
    assert torch.equal(v0, v1)
    par, one = ranks[0][case_id]["eig_values"]
    torch.testing.assert_close(par, one, rtol=1e-10, atol=1e-12)
    cos = (ranks[0][case_id]["eig_vectors"][0] * ranks[0][case_id]["eig_vectors"][1]).sum(1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-8)


SIGNED = {"alignment": ("cos_minibatch", "cos_full")}  # a solver's eigenvector sign is arbitrary


def test_scope_in_a_ddp_loop_equals_one_process(ranks):
    """A researcher's DDP loop with one Scope per rank (default process group detected): rank 0's tables
    equal a one-process Scope's, and rank 1 holds the same rows in memory. Eigenvectors agree up to sign
    (a round-off difference can flip the solver's arbitrary sign), so signed columns compare in
    magnitude and the direction cross-sections as a set of curves either way round."""
    loop, loop1, one = ranks[0]["loop"], ranks[1]["loop"], ranks[0]["loop_one"]
    assert RunStore(ranks[0]["scope_dir"]).status()["state"] == "done"  # rank 0's directory, closed
    torch.testing.assert_close(loop["theta"], one["theta"], rtol=0, atol=1e-12)
    for name, a in loop["tables"].items():  # a: rank 0's store (NaN read back as None), b, c: in memory
        b, c = loop1["tables"][name], one["tables"][name]
        assert len(a) > 0 and a.shape == c.shape == b.shape, name
        num = [col for col in b.select_dtypes("number").columns if col not in SIGNED.get(name, ())]
        A, B, C = (t[num].to_numpy(float) for t in (a, b, c))
        assert np.array_equal(A, B, equal_nan=True), name  # same bits on both ranks
        if name == "direction":  # the curve along -e is the curve along e with k mirrored
            key = ["step", "eigen_index"]
            for (_, ga), (_, gc) in zip(a.groupby(key), c.groupby(key)):
                la, lc = ga.sort_values("k")["loss"].to_numpy(float), gc.sort_values("k")["loss"].to_numpy(float)
                assert min(abs(la - lc).max(), abs(la - lc[::-1]).max()) < 1e-10
            keep = [i for i, col in enumerate(num) if col != "loss"]
            A, C = A[:, keep], C[:, keep]
        np.testing.assert_allclose(A, C, rtol=0, atol=1e-10, err_msg=name)
        for col in SIGNED.get(name, ()):
            np.testing.assert_allclose(a[col].abs().to_numpy(float), c[col].abs().to_numpy(float), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ the trainer
CONFIG = {
    "seed": 3, "device": "cpu",
    "data": {"name": "synthetic", "n_samples": 150, "input_shape": [6], "num_classes": 3},
    "model": {"name": "mlp", "widths": [8]},
    "optimizer": {"name": "sgd", "lr": 0.2, "batch_size": 25, "momentum": 0.9, "weight_decay": 0.001},
    "train": {"epochs": 3, "checkpoint_every": 2},
    "measure": {"subset": 0.5, "min_subset": 50, "batch_size": 25},
    "probes": {
        "eigen": {"every": 4, "k": 2, "tol": 1e-4},
        "alpha_step": {"every": "epoch", "eigen_indices": [1], "n_grads": 3},
        "interpolation": {"every": 2, "epochs": [1], "alphas": 4},
        "gradient": {},
    },
}


def tables(path: Path) -> dict:
    s = RunStore(path)
    return {t: s.table(t) for t in s.tables()}


def test_two_rank_run_killed_resumed_equals_one_rank_run(tmp_path):
    """``sgdscope run`` over 2 ranks (as torchrun starts it): rank 1 killed mid-run ends the job with one
    line on stderr and status 'failed'; ``--resume`` on 2 ranks finishes it, and every table equals the
    1-process run's within 1e-5 (float32)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "two"
    args = ["-m", "sgdscope.cli", "run", str(cfg), "--out", str(out)]
    procs = launch(args)
    status = out / "status.json"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and procs[0].poll() is None:
        try:
            if json.loads(status.read_text()).get("step", 0) >= 4:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    (rc0, err0), _ = finish(procs)
    assert rc0 == 1, err0[-2000:]
    lines = [ln for ln in err0.replace("\r", "\n").splitlines() if ln.startswith("sgdscope:")]
    assert len(lines) == 1 and "peer rank stopped" in lines[0] and "--resume" in lines[0], err0[-2000:]
    state = json.loads(status.read_text())
    assert state["state"] == "failed" and 4 <= state["step"] < 18
    # --resume on two ranks continues from rank 0's last checkpoint
    results = finish(launch([*args, "--resume"]))
    assert all(rc == 0 for rc, _ in results), [e[-2000:] for _, e in results]
    assert json.loads(status.read_text())["state"] == "done"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    ref = run(CONFIG, tmp_path / "one", progress=False)
    want, got = tables(ref), tables(out)
    assert set(got) == set(want) and {"eigen", "alpha_step", "interpolation", "train", "epoch"} <= set(got)
    for name, a in want.items():
        b = got[name]
        assert a.shape == b.shape, name
        num = list(a.select_dtypes("number").columns)
        assert list(b[num].columns) == num
        assert float((a[num] - b[num]).abs().max().max()) < 1e-5, name


# ------------------------------------------------------------------------------------------ in-process
def test_parts_of_a_global_batch_cover_it_once(monkeypatch):
    """The ranks' contiguous parts tile the batch in order, sizes as torch.tensor_split's (a plain oracle)."""
    from sgdscope import distributed

    for n, w in [(25, 2), (7, 3), (2, 4), (128, 8)]:
        parts = []
        for r in range(w):
            monkeypatch.setattr(distributed, "rank", lambda group=None, r=r: r)
            monkeypatch.setattr(distributed, "world_size", lambda group=None, w=w: w)
            parts.append(distributed.part(n))
        idx = torch.arange(n)
        assert [idx[s].tolist() for s in parts] == [t.tolist() for t in torch.tensor_split(idx, w)]


def test_minibatch_grads_only_keeps_the_draws(make_case):
    """``only``: the rows it names are the full call's rows bit for bit (the same minibatches drawn), the
    others zero; without a process group the distributed wrappers are the plain kernels."""
    from sgdscope import distributed
    from sgdscope.landscape import minibatch_grads

    case = make_case("dropout")
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    full = minibatch_grads(case.model, case.loss_fn, x, y, 4, 5, torch.Generator().manual_seed(1), mask_seed=3)
    some = minibatch_grads(case.model, case.loss_fn, x, y, 4, 5, torch.Generator().manual_seed(1), mask_seed=3,
                           only=[1, 4])
    assert torch.equal(some[[1, 4]], full[[1, 4]]) and not some[[0, 2, 3]].any()
    assert distributed.shard(case.batches) is case.batches and not distributed.active()
    plain = distributed.minibatch_grads(case.batches, case.model, case.loss_fn, x, y, 4, 5,
                                        torch.Generator().manual_seed(1), mask_seed=3)
    assert torch.equal(plain, full)
