"""ScopeCallback: a Scope driven from a LightningModule's loop, on CPU with a tiny module."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from sgdscope.errors import ConfigError  # noqa: E402
from sgdscope.integrations.lightning import ScopeCallback  # noqa: E402

# every probe that reads θ_t, the gradient and θ_t+1 around a step, at a cost a CPU test affords
PROBES = {
    "eigen": {"every": 2, "k": 2, "tol": 1e-2},
    "interpolation": {"every": 1, "alphas": 4},
    "direction": {"every": 4, "eigen_indices": [1], "ks": [-1, 0, 1], "n_grads": 2},
    "alpha_step": {"every": 4, "eigen_indices": [1], "alphas": [0.5, 1], "n_grads": 2},
}


class TinyModule(pl.LightningModule):
    """BatchNorm, dropout and Adam: every state a measurement could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 3))
        self.loss_fn = nn.CrossEntropyLoss()
        self.losses: list[float] = []  # each training_step's loss, to check the train table against

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def dataset(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def fit(callbacks=(), *, accumulate: int = 1, module: type = TinyModule, epochs: int = 1, ckpt=None, save=None) -> TinyModule:
    """Train a fresh module (``ckpt``: resumed from that checkpoint; ``save``: checkpointed there after)."""
    torch.manual_seed(0)  # the same init, shuffling and dropout streams for every fit
    m = module()
    trainer = pl.Trainer(
        max_epochs=epochs, limit_train_batches=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=list(callbacks),
        accumulate_grad_batches=accumulate,
    )
    # shuffling draws from torch's global generator, so a measurement that touched it would show
    trainer.fit(m, DataLoader(dataset(), batch_size=8, shuffle=True), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return m


def measure_set():
    return dataset(32).tensors


def params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()] + [b.clone() for b in m.buffers()]


def test_callback_measures_each_update_and_leaves_training_bit_identical():
    plain = fit()
    cb = ScopeCallback(measure_set(), probes=PROBES, seed=3)
    measured = fit([cb])
    assert all(torch.equal(a, b) for a, b in zip(params(plain), params(measured)))

    scope = cb.scope
    train = scope.table("train")
    assert train["step"].tolist() == [1, 2, 3, 4, 5]
    assert train["batch_loss"].tolist() == pytest.approx(measured.losses)
    assert train["lr"].tolist() == [1e-2] * 5
    assert sorted(set(scope.table("eigen")["step"])) == [0, 2, 4]
    assert sorted(set(scope.table("interpolation")["step"])) == [0, 1, 2, 3, 4]  # θ_t → θ_t+1 for t < 5
    assert sorted(set(scope.table("direction")["step"])) == [0, 4]
    assert sorted(set(scope.table("alpha_step")["step"])) == [0, 4]
    epoch = scope.table("epoch")
    assert epoch["step"].tolist() == [5] and epoch["epoch"].tolist() == [1]
    assert epoch["train_loss"].iloc[0] == pytest.approx(sum(measured.losses) / 5, rel=1e-5)


def test_gradient_accumulation_makes_one_step_of_each_window():
    plain = fit(accumulate=2)
    cb = ScopeCallback(measure_set(), probes={"interpolation": {"every": 1, "alphas": 3}})
    measured = fit([cb], accumulate=2)
    assert all(torch.equal(a, b) for a, b in zip(params(plain), params(measured)))
    # 5 batches in windows of 2: Lightning steps after batches 2 and 4 and on the epoch's last one
    train = cb.scope.table("train")
    assert train["step"].tolist() == [1, 2, 3]
    l = measured.losses
    assert train["batch_loss"].tolist() == pytest.approx([(l[0] + l[1]) / 2, (l[2] + l[3]) / 2, l[4]])
    assert sorted(set(cb.scope.table("interpolation")["step"])) == [0, 1, 2]


def test_a_given_loss_and_submodule_and_a_module_without_loss_fn():
    class NoLoss(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            del self.loss_fn
            self.criterion = nn.CrossEntropyLoss()

        def forward(self, x, temperature):  # not model(x): the Scope has to measure self.net
            return self.net(x) / temperature

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.criterion(self(x, 1.0), y)

    with pytest.raises(ConfigError, match="loss_fn"):
        fit([ScopeCallback(measure_set())], module=NoLoss)
    cb = ScopeCallback(measure_set(), loss_fn=nn.CrossEntropyLoss(), model_attr="net", probes={"eigen": {"every": 5, "k": 1}})
    fit([cb], module=NoLoss)
    assert sorted(set(cb.scope.table("eigen")["step"])) == [0, 5]


def test_without_lightning_the_module_imports_and_the_callback_says_what_to_install():
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('lightning', 'lightning.pytorch', 'pytorch_lightning'): sys.modules[m] = None\n"
            "from sgdscope.errors import ConfigError\n"
            "from sgdscope.integrations.lightning import ScopeCallback\n"
            "try:\n    ScopeCallback(([0], [0]))\nexcept ConfigError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "pip install 'sgdscope[lightning]'" in res.stdout


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="measure_data"):
        ScopeCallback()
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        ScopeCallback(measure_set(), steps_per_epoch=5)
    with pytest.raises(ConfigError, match="model_attr"):
        fit([ScopeCallback(measure_set(), model_attr="nothing")])


def test_a_fit_resumed_from_a_lightning_checkpoint_goes_on_measuring_where_it_stopped(tmp_path):
    from sgdscope.store import RunStore

    out, probes = tmp_path / "lit", {"eigen": {"every": 2, "k": 1}}
    first = ScopeCallback(measure_set(), out=out, probes=probes)
    fit([first], save=tmp_path / "epoch1.ckpt")
    assert first.scope.table("train")["step"].tolist() == [1, 2, 3, 4, 5]
    again = ScopeCallback(measure_set(), out=out, probes=probes, resume=True)
    fit([again], epochs=2, ckpt=tmp_path / "epoch1.ckpt")
    # the step count, the epoch count and the schedule came through the checkpoint: the run directory
    # holds each step once, numbered on, and the second epoch's row
    store = RunStore(out)
    assert store.status()["state"] == "done"
    assert store.table("train")["step"].tolist() == list(range(1, 11))
    assert sorted(set(store.table("eigen")["step"])) == [0, 2, 4, 6, 8, 10]
    assert store.table("epoch")[["epoch", "step"]].values.tolist() == [[1, 5], [2, 10]]
    store.close()


def test_a_fit_that_fails_leaves_a_failed_run_with_the_steps_done(tmp_path):
    from sgdscope.store import RunStore

    class Breaks(TinyModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("diverged on purpose")
            return super().training_step(batch, batch_idx)

    cb = ScopeCallback(measure_set(), out=tmp_path / "lit", probes={"interpolation": {"every": 1, "alphas": 2}})
    with pytest.raises(RuntimeError, match="on purpose"):
        fit([cb], module=Breaks)
    store = RunStore(tmp_path / "lit")
    assert store.status()["state"] == "failed"
    assert store.table("train")["step"].tolist() == [1, 2, 3]  # the broken step measured nothing
    assert sorted(set(store.table("interpolation")["step"])) == [0, 1, 2]
    store.close()
