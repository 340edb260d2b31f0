"""``sgdscope.Scope``: the measurement driver of :mod:`sgdscope.measure` with a run directory behind it.

``out=None`` keeps the rows in memory; a path makes (or, with ``resume=True``, reopens) a run directory
with the layout of ``sgdscope run``'s, so ``sgdscope report``, ``plot``, ``export`` and ``check`` work on
it; any other object with ``append_many``/``close`` is used as the row sink itself. One writer per
directory: the directory is locked for the Scope's life.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Optional

import torch

import sgdscope
from sgdscope import distributed
from sgdscope.measure.scope import Scope as _MeasureScope
from sgdscope.measure.scope import StepRecord
from sgdscope.store import RunStore

__all__ = ["Scope", "StepRecord"]


def _open_directory(out: Path, resume: bool, config: dict[str, Any]) -> RunStore:
    RunStore.check_target(out, resume, resume_hint="resume=True", out_hint="out")
    if resume:
        store = RunStore(out)
        store.acquire_writer()
        store.set_status("running")
        return store
    return RunStore.create(out, config, writer=True)


class Scope(_MeasureScope):
    """See :class:`sgdscope.measure.scope.Scope` for the measuring; here ``out`` and ``resume`` too.

    Over a process group (``process_group``, default: an initialised default group) every rank passes the
    same ``out``; rank 0 alone creates, locks and writes the directory.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(3, 1)
    >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
    >>> mse = nn.functional.mse_loss
    >>> scope = Scope(model, mse, (x, y), probes={"eigen": {"every": 2, "k": 2}})
    >>> opt = torch.optim.Adam(model.parameters(), lr=0.01)
    >>> for _ in range(4):
    ...     with scope.step(opt) as rec:
    ...         opt.zero_grad(); loss = mse(model(x), y); loss.backward(); opt.step()
    ...         rec.record(batch_loss=loss.item())
    >>> sorted(scope.table("eigen")["step"].unique().tolist()), len(scope.table("train"))
    ([0, 2, 4], 4)
    >>> scope.close()
    """

    def __init__(self, model, loss_fn, measure_data, out=None, probes=None, train_data=None,
                 bn_policy: str = "train-restore", seed: int = 0, *, resume: bool = False,
                 config: Optional[dict[str, Any]] = None, **kw: Any) -> None:
        self.path: Optional[Path] = None
        self.store: Optional[RunStore] = None
        sink = None
        if out is not None and hasattr(out, "append_many"):
            sink = out
        super().__init__(model, loss_fn, measure_data, probes=probes, train_data=train_data, bn_policy=bn_policy,
                         seed=seed, sink=sink, resume=resume, **kw)
        if out is not None and sink is None and (not self.sharded or distributed.is_main(self.group)):
            # every argument validated above, before anything is written; over a process group, only rank
            # 0 opens (and locks) the directory
            self.path = Path(out)
            self.store = _open_directory(self.path, resume, config or self._config())
            self.attach(self.store, *self.sinks[1:])
            self.env.save_tensors = self.env.save_tensors or self.store.save_tensors

    def _config(self) -> dict[str, Any]:
        """What ``config.yaml`` records for a Scope's directory: the measurement settings and versions."""
        env = self.env
        return {
            "source": "scope",
            "seed": env.seed,
            "measure": {"bn_policy": env.bn_policy, "subset_size": env.measure_size, "include_l2": env.include_l2},
            "probes": self.options.model_dump(mode="json"),
            "versions": {"sgdscope": str(sgdscope.__version__), "torch": str(torch.__version__),
                         "python": platform.python_version(), "device": str(env.device)},
            "resolved": {
                "n_params": int(env.theta0.numel()), "measure_subset_size": env.measure_size,
                "steps_per_epoch": self.steps_per_epoch, "bn_policy": env.bn_policy,
                "model": type(env.model).__name__, "loss": getattr(env.loss_fn, "__name__", type(env.loss_fn).__name__),
                "l2_in_measurements": env.l2 > 0, "ignore_index": env.ignore_index,
                "batch_size": env.batch_size,
            },
        }

    def close(self, state: str = "done") -> None:
        """Close the sinks; a run directory gets status ``state`` (done, interrupted or failed) and its lock
        released."""
        if not self._closed and self.store is not None:
            self.store.set_status(state, step=self.t, epoch=self.epoch)
        super().close()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.close("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")
