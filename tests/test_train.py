"""The trainer: determinism, non-perturbation by probes, resume, divergence and clean input errors."""

import json

import pytest
import torch

from sgdscope.config import set_dotted, validate
from sgdscope.errors import ConfigError, DivergenceError, RunStoreError
from sgdscope.store import RunStore
from sgdscope.train import run


def tiny(**over):
    cfg = {
        "seed": 3,
        "device": "cpu",
        "data": {"name": "synthetic", "n_samples": 300, "input_shape": [6], "num_classes": 3},
        "model": {"name": "mlp", "widths": [8]},
        "optimizer": {"name": "sgd", "lr": 0.2, "batch_size": 32},
        "train": {"epochs": 2},
        "measure": {"subset": 0.5, "min_subset": 50, "batch_size": 64},
    }
    for k, v in over.items():
        set_dotted(cfg, k, v)
    return cfg


ALL_PROBES = {
    "eigen": {"every": 4, "k": 2, "tol": 1e-2},
    "direction": {"every": "epoch", "eigen_indices": [1, 2], "n_grads": 3},
    "alpha_step": {"every": "epoch", "eigen_indices": [1], "n_grads": 3},
    "alignment": {"every": "epoch"},
    "interpolation": {"every": 2, "epochs": [1], "alphas": 4},
}


def final_params(path):
    return torch.load(path / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_tables_filled_and_config_resolved(tmp_path):
    out = run(tiny(probes=ALL_PROBES), tmp_path / "r", progress=False)
    s = RunStore(out)
    assert s.status()["state"] == "done"
    spe = s.config()["resolved"]["steps_per_epoch"]
    assert spe == 7  # 300 examples: 60 test, 24 validation, 216 train → ceil(216 / 32) batches
    n_steps = 2 * spe
    train = s.table("train")
    assert train["step"].tolist() == list(range(1, n_steps + 1))
    assert train["grad_cosine_prev"].isna().sum() == 1  # only the first step has no predecessor
    assert len(s.table("epoch")) == 2
    eig = s.table("eigen")
    assert sorted(eig["step"].unique()) == [0, 4, 8, 12]
    assert set(s.tables()) >= {"train", "epoch", "eigen", "curvature", "direction", "k_min", "alpha_step",
                               "alignment", "interpolation", "valley"}
    assert s.table("valley")["step"].tolist() == [0, 2, 4, 6]  # every 2nd segment of epoch 1
    cfg = s.config()
    assert cfg["resolved"]["bn_policy"] == "train-restore" and cfg["versions"]["torch"] == torch.__version__
    assert validate({k: v for k, v in cfg.items() if k not in ("versions", "resolved")}).seed == 3


def test_probes_do_not_perturb_training(tmp_path):
    a = run(tiny(), tmp_path / "a", progress=False)
    b = run(tiny(probes=ALL_PROBES), tmp_path / "b", progress=False)
    pa, pb = final_params(a), final_params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert RunStore(a).table("train")["batch_loss"].equals(RunStore(b).table("train")["batch_loss"])


def test_probes_do_not_perturb_bn_dropout_augmented_training(tmp_path):
    over = {"model.batchnorm": True, "model.dropout": 0.2}
    a = run(tiny(**over), tmp_path / "a", progress=False)
    b = run(tiny(probes=ALL_PROBES, **over), tmp_path / "b", progress=False)
    pa, pb = final_params(a), final_params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)  # includes BN running statistics


def test_same_seed_same_tables(tmp_path):
    a = run(tiny(probes=ALL_PROBES), tmp_path / "a", progress=False)
    b = run(tiny(probes=ALL_PROBES), tmp_path / "b", progress=False)
    for t in RunStore(a).tables():
        da, db = RunStore(a).table(t), RunStore(b).table(t)
        assert da.equals(db), t


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, monkeypatch):
    ref = run(tiny(probes=ALL_PROBES, **{"train.epochs": 3}), tmp_path / "ref", progress=False)
    from sgdscope import train as train_mod

    calls = {"n": 0}
    orig = train_mod.Trainer.train_step

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 11:  # mid-epoch 2, after the epoch-1 checkpoint
            raise KeyboardInterrupt
        return orig(self)

    monkeypatch.setattr(train_mod.Trainer, "train_step", flaky)
    cfg = tiny(probes=ALL_PROBES, **{"train.epochs": 3})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "status.json").read_text())["state"] == "interrupted"
    assert len(RunStore(tmp_path / "r").table("train")) == 10  # committed rows kept
    monkeypatch.setattr(train_mod.Trainer, "train_step", orig)
    run(cfg, tmp_path / "r", resume=True, progress=False)
    for t in RunStore(ref).tables():
        da = RunStore(ref).table(t)
        db = RunStore(tmp_path / "r").table(t)
        assert da.equals(db), t
    pa, pb = final_params(ref), final_params(tmp_path / "r")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_with_other_config_is_refused(tmp_path):
    run(tiny(), tmp_path / "r", progress=False)
    with pytest.raises(RunStoreError, match="optimizer.lr"):
        run(tiny(**{"optimizer.lr": 0.5}), tmp_path / "r", resume=True, progress=False)


def test_existing_dir_without_resume_is_refused(tmp_path):
    run(tiny(), tmp_path / "r", progress=False)
    with pytest.raises(RunStoreError, match="--resume"):
        run(tiny(), tmp_path / "r", progress=False)


def test_finite_divergence_fails_like_nan(tmp_path):
    """A loss that explodes without overflowing (issue: lr 1e6 once ended 'done' at a loss of 5.8e24) fails
    once it passes train.divergence_factor × the first loss; turning the bound off lets it run to the end."""
    cfg = tiny(**{"optimizer.lr": 50.0, "train.epochs": 3, "optimizer.batch_size": 216})
    with pytest.raises(DivergenceError, match=r"past the divergence bound .*1000 × the first loss.*at step \d+, lr 50"):
        run(cfg, tmp_path / "a", progress=False)
    st = RunStore(tmp_path / "a").status()
    assert st["state"] == "failed" and "divergence bound" in st["error"]
    losses = RunStore(tmp_path / "a").table("train")["batch_loss"]
    assert losses.max() <= 1000 * max(losses.iloc[0], 1.0)  # no committed row is past the bound
    free = run(tiny(**{"optimizer.lr": 50.0, "train.epochs": 3, "optimizer.batch_size": 216,
                       "train.divergence_factor": None}), tmp_path / "b", progress=False)
    b = RunStore(free).table("train")["batch_loss"]
    assert RunStore(free).status()["state"] == "done" and b.max() > 1000 * max(b.iloc[0], 1.0)


def test_divergence_stops_cleanly(tmp_path):
    with pytest.raises(DivergenceError, match=r"became .* at step \d+, lr 1e\+06"):
        run(tiny(**{"optimizer.lr": 1e6, "train.epochs": 3}), tmp_path / "r", progress=False)
    s = RunStore(tmp_path / "r")
    st = s.status()
    assert st["state"] == "failed" and "lr 1e+06" in st["error"]
    assert len(s.table("train")) >= 1


@pytest.mark.parametrize(
    "over, match",
    [
        ({"optimizer.batch_size": 10_000}, "optimizer.batch_size"),
        ({"probes": {"eigen": {"k": 90}}}, "probes.eigen.k"),
        ({"data": {"name": "cifar10"}}, "data.root"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, over, match):
    with pytest.raises((ConfigError, Exception)) as e:
        run(tiny(**over), tmp_path / "r", progress=False)
    assert match in str(e.value)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_full_batch_gd_is_exact_mean_gradient(tmp_path):
    """GD over chunks of 7 equals GD with one chunk (exact weighting of the short last chunk)."""
    a = run(tiny(**{"optimizer.name": "gd", "optimizer.gd_chunk": 7, "train.epochs": 3}), tmp_path / "a", progress=False)
    b = run(tiny(**{"optimizer.name": "gd", "optimizer.gd_chunk": 300, "train.epochs": 3}), tmp_path / "b", progress=False)
    pa, pb = final_params(a), final_params(b)
    assert all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)
    assert RunStore(a).table("train")["step"].tolist() == [1, 2, 3]


def test_sigint_leaves_interrupted_and_resume_completes(tmp_path):
    """A real SIGINT to `sgdscope run`: exit 130, one line on stderr, status interrupted, committed rows
    kept; `--resume` finishes the run with every step exactly once."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    # 280 steps, interrupted once 30 are in: the ~250 left take over a second, far longer than a poll and the
    # signal's delivery take, and the resume has no more steps to run than it needs to show they all run once
    epochs = 40
    cfg = tiny(**{"train.epochs": epochs, "probes": {"eigen": {"every": 5, "k": 2, "tol": 1e-2}}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "sgdscope.cli", "run", str(tmp_path / "c.yaml"), "--out", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "metrics.db").exists() and len(RunStore(out).table("train")) >= 30:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "step/s" not in ln and "train:" not in ln]
    assert lines == ["sgdscope: interrupted; measured rows are kept, continue with --resume"], lines
    s = RunStore(out)
    assert s.status()["state"] == "interrupted"
    kept = len(s.table("train"))
    assert kept >= 30
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    s = RunStore(out)
    assert s.status()["state"] == "done"
    steps = s.table("train")["step"].tolist()
    assert steps == list(range(1, epochs * 7 + 1))  # every step once: nothing lost, nothing duplicated


def test_mse_loss_is_used_and_recorded(tmp_path):
    """train.loss: mse trains on ½‖f(x) − onehot(y)‖² (edge-of-stability studies); the first batch loss
    equals that loss of the initial model on the first minibatch, computed by hand."""
    from sgdscope.train import BatchStream, Trainer

    cfg = validate(tiny(**{"train.loss": "mse", "train.epochs": 1}))
    init = Trainer(cfg, torch.device("cpu"), progress=False)
    idx = BatchStream(len(init.data.train.x), 32, cfg.seed, torch.device("cpu")).indices(0)
    with torch.no_grad():
        out = init.model(init.data.train.x[idx])
        onehot = torch.nn.functional.one_hot(init.data.train.y[idx], out.shape[-1]).to(out.dtype)
        by_hand = float(0.5 * ((out - onehot) ** 2).sum(-1).mean())
    path = run(cfg, tmp_path / "m", progress=False)
    s = RunStore(path)
    assert s.config()["train"]["loss"] == "mse" and s.config()["resolved"]["loss"] == "mse"
    assert s.table("train")["batch_loss"].iloc[0] == pytest.approx(by_hand, rel=1e-6)
