"""PyTorch Lightning: measure a LightningModule's trajectory with a Scope, from a callback.

    from sgdscope.integrations.lightning import ScopeCallback
    callback = ScopeCallback((x_measure, y_measure), out="runs/lit", probes={"eigen": {"every": 10}})
    Trainer(callbacks=[callback]).fit(module, train_loader)
    callback.scope.table("eigen")

Needs the ``[lightning]`` extra. One Scope step is one optimizer update, placed on Lightning's hooks
(checked against the loop of lightning 2.6):

- ``on_train_batch_start`` comes before ``training_step``, ``zero_grad``, ``backward`` and the step: the
  parameters are θ_t and the lr is the one the step uses (step-interval lr schedulers run after the
  step). The callback enters ``scope.step(optimizer)`` here, unless a block is already open because the
  previous batches accumulated gradients without stepping.
- ``on_before_optimizer_step`` comes after ``backward``: it tells the callback that this batch steps.
- ``on_train_batch_end`` comes after the step. ``.grad`` still holds the gradient the step used
  (Lightning zeroes it in the next batch) and the parameters are θ_{t+1}: the block is left here, on
  the batch that stepped. With ``accumulate_grad_batches`` one block therefore spans the whole window.

At each training epoch's end the callback calls ``scope.end_epoch`` with the epoch's logged metrics
(``trainer.callback_metrics``, which by then hold that epoch's validation), so a module that logs
``val_acc`` gets it in the ``epoch`` table the report reads; at the end of ``fit`` it closes the Scope.
Lightning checkpoints carry the Scope's state (``state_dict``); with ``resume=True`` a fit resumed from
a checkpoint drops the rows logged after it and recomputes them once.

Only single-process training is measured: one Scope writes one run directory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from torch import Tensor, nn

from sgdscope.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lightning.pytorch import LightningModule, Trainer

# Without Lightning the module still imports (so that collecting the package's doctests needs no
# extra), and making a ScopeCallback says what to install.
try:
    from lightning.pytorch import Callback as _Base
except ImportError:  # the same class under the older package name
    try:
        from pytorch_lightning import Callback as _Base
    except ImportError:
        _Base = None

# Columns of the epoch row that the Scope writes itself; a logged metric of that name is not copied.
_EPOCH_OWN = ("epoch", "step", "logged_at")


class _Abandoned(Exception):
    """Thrown into a Scope step block that saw no update, so that it measures nothing."""


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-number entries of ``trainer.callback_metrics``, as floats."""
    out = {}
    for name, v in metrics.items():
        if name in _EPOCH_OWN:
            continue
        if isinstance(v, Tensor) and v.numel() == 1:
            out[name] = float(v.detach())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def _loss(outputs: Any) -> Optional[float]:
    """The loss ``training_step`` returned (a tensor, or a dict's ``loss``), if it returned one."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return float(loss.detach()) if isinstance(loss, Tensor) and loss.numel() == 1 else None


class ScopeCallback(_Base or object):
    """Drives a :class:`sgdscope.Scope` from a LightningModule's training loop.

    Either give a ready :class:`sgdscope.Scope` built on the module (``ScopeCallback(scope=Scope(module,
    ...))``), or let the callback build one when training starts, on the module as Lightning has placed it:

    Arguments:
      measure_data: the Scope's fixed measurement set (an ``(x, y)`` pair or a list of batches).
      loss_fn: ``loss_fn(model(x), y)``, the mean loss over a batch; default: the module's ``loss_fn``
        attribute (a ConfigError when it has none).
      model_attr: the attribute of the module that holds the network to measure, when the module's own
        ``forward`` is not ``model(x)``; default: the module itself.
      epoch_metrics: copy the epoch's one-number logged metrics into its ``epoch`` row.
      **scope_kwargs: the rest of :class:`sgdscope.Scope`'s arguments (``out``, ``probes``, ``seed``,
        ``bn_policy``, ``resume``, ``sinks``, ...). ``steps_per_epoch`` is not one: Lightning says when
        an epoch ends.

    The ``train`` table gets the batch loss of each step (the mean over an accumulation window).
    """

    def __init__(
        self,
        measure_data: Any = None,
        *,
        scope: Any = None,
        loss_fn: Optional[Callable[..., Tensor]] = None,
        model_attr: Optional[str] = None,
        epoch_metrics: bool = True,
        **scope_kwargs: Any,
    ) -> None:
        if _Base is None:
            raise ConfigError("ScopeCallback: needs PyTorch Lightning: pip install 'sgdscope[lightning]'")
        if scope is not None and (measure_data is not None or loss_fn is not None or model_attr or scope_kwargs):
            raise ConfigError("ScopeCallback: give either a built scope or what to build one from, not both")
        if scope is None and measure_data is None:
            raise ConfigError("ScopeCallback: needs measure_data (an (x, y) pair or a list of batches) or a scope")
        if "steps_per_epoch" in scope_kwargs:
            raise ConfigError("ScopeCallback: steps_per_epoch is not an option here; Lightning ends the epochs")
        self.scope = scope
        self.measure_data, self.loss_fn, self.model_attr = measure_data, loss_fn, model_attr
        self.epoch_metrics, self.scope_kwargs = epoch_metrics, scope_kwargs
        self._pending: Optional[dict[str, Any]] = None  # a checkpoint's Scope state, until the Scope exists
        self._block: Any = None  # the open scope.step(...) context
        self._rec: Any = None
        self._stepped = False
        self._losses: list[float] = []

    # ---------------------------------------------------------------------------------- building
    def _build(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        from sgdscope import Scope  # the package imports no framework; this module needs the package

        model: nn.Module = pl_module
        if self.model_attr is not None:
            model = getattr(pl_module, self.model_attr, None)
            if not isinstance(model, nn.Module):
                raise ConfigError(f"ScopeCallback: model_attr={self.model_attr!r} is not a module of {type(pl_module).__name__}")
        loss_fn = self.loss_fn if self.loss_fn is not None else getattr(pl_module, "loss_fn", None)
        if not callable(loss_fn):
            raise ConfigError(
                f"ScopeCallback: {type(pl_module).__name__} has no loss_fn attribute; pass loss_fn=, "
                "a function with loss_fn(model(x), y) the mean loss over the batch"
            )
        return Scope(model, loss_fn, self.measure_data, **self.scope_kwargs)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            raise ConfigError(f"ScopeCallback: measures single-process training; this run has {trainer.world_size} processes")
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"ScopeCallback: measures a module with one optimizer; this one has {len(trainer.optimizers)}")
        if self.scope is None:
            self.scope = self._build(trainer, pl_module)
        if self._pending is not None:
            self.scope.load_state_dict(self._pending)
            self._pending = None

    # --------------------------------------------------------------------------------- one update
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._block is None:
            self._block = self.scope.step(trainer.optimizers[0])
            self._rec = self._block.__enter__()
            self._stepped, self._losses = False, []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._stepped:
            raise ConfigError("ScopeCallback: measures one optimizer step per training batch; this batch stepped twice")
        self._stepped = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = _loss(outputs)
        if loss is not None:
            # automatic optimization hands back the loss divided by the accumulation count it backpropagated
            self._losses.append(loss * (trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1))
        if not self._stepped:
            return  # gradients accumulate: the block goes on to the batch that steps
        if self._losses:
            self._rec.record(batch_loss=math.fsum(self._losses) / len(self._losses))
        block, self._block = self._block, None
        block.__exit__(None, None, None)

    def _abandon(self) -> None:
        """Leave an open block that saw no update without measuring it (θ is unchanged, so the next block
        starts from the same θ_t)."""
        if self._block is not None:
            block, self._block = self._block, None
            block.__exit__(_Abandoned, _Abandoned(), None)

    # ----------------------------------------------------------------------------- epochs and end
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._abandon()  # batches that accumulated but never stepped (e.g. a module that stopped the epoch)
        cols = _scalar_metrics(trainer.callback_metrics) if self.epoch_metrics else {}
        self.scope.end_epoch(**cols)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._abandon()
        if self.scope is not None:
            self.scope.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # the rows committed so far stay; closing records how the run ended and releases its directory
        self._abandon()
        if self.scope is not None:
            self.scope.close("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed")

    # ---------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"scope": self.scope.state_dict()} if self.scope is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before training starts: the state waits for on_train_start
        self._pending = state_dict.get("scope")
