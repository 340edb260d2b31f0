"""The Scope: the one driver of measurements, around any training loop.

    scope = Scope(model, loss_fn, measure_data, probes={"eigen": {"every": 5}})
    for x, y in batches:
        with scope.step(optimizer):
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()

The optimizer passed to ``step`` reaches the probes as ``StepInfo.optimizer`` (read only: the
preconditioned-sharpness probe reads Adam's second moments from it); ``end_epoch`` hands on the last one.

Step numbering: step 0 is measured when the first ``step`` block is entered (θ_0, before any update),
step t after t updates. Around block t the Scope reads θ_t (when a probe needs it) and the learning rate
``optimizer.param_groups[0]["lr"]`` on entry, and on exit the gradient the user's backward left in
``.grad`` and θ_{t+1}; then it runs the probes due at step t + 1 and commits their rows, with
``logged_at = t + 1``, to its sinks in one transaction. So any ``torch.optim.Optimizer`` works, and a
block that raises measures nothing.

Epochs: with ``steps_per_epoch`` the epoch ends are known; otherwise call :meth:`Scope.end_epoch` (or
``rec.end_epoch()`` inside the block). ``every: epoch`` probes run at step 0 and at each epoch end.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from sgdscope import distributed
from sgdscope.curvature import EigenResult
from sgdscope.curvature.flat import get_flat, grad_flat, named_trainable
from sgdscope.errors import ConfigError
from sgdscope.measure.env import Env, as_batches
from sgdscope.measure.options import ProbesOptions, probe_options
from sgdscope.measure.probes import EIGEN_CONSUMERS, PROBES, Probe, StepInfo
from sgdscope.measure.sinks import MemorySink, RowSink, Rows
from sgdscope.measure.tracker import EigenTracker
from sgdscope.policy import check_policy

MERGED = ("train", "epoch")  # one row per step / per epoch, built from the caller's and the probes' columns


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)  # no copy when already there
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


class StepRecord:
    """What ``with scope.step(optimizer) as rec:`` hands out: the caller's part of this step's rows."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self.train_cols: dict[str, Any] = {}
        self.epoch_cols: dict[str, Any] = {}
        self.skipped = False
        self.epoch_end = False

    def record(self, **cols: Any) -> None:
        """Columns of this step's ``train`` row (e.g. ``batch_loss``, ``batch_acc``)."""
        self.train_cols.update(cols)

    def record_epoch(self, **cols: Any) -> None:
        """Columns of the ``epoch`` row written when this step ends an epoch (e.g. ``val_acc``)."""
        self.epoch_cols.update(cols)

    def end_epoch(self) -> None:
        """Mark this step as the last of an epoch (without ``steps_per_epoch``)."""
        self.epoch_end = True

    def skip(self) -> None:
        """The update was skipped (θ_{t+1} = θ_t): the gradient cosine is NaN and the next one is taken
        with the last gradient used."""
        self.skipped = True

    def grad(self) -> Tensor:
        """The flat gradient now in ``.grad`` (what the Scope will read on exit)."""
        return grad_flat(self._model)


class Scope:
    """Drives probes along a trajectory and commits their rows to ``sink`` (in memory by default).

    Arguments:
      model, loss_fn: ``loss_fn(model(x), y)`` is the mean loss over the batch's real targets (any loss).
      measure_data: an ``(x, y)`` pair (cut into ``measure_batch_size`` batches) or a list of batches, the
        fixed measurement set; ``x`` a tensor, tuple (``model(*x)``) or dict (``model(**x)``).
      probes: the ``probes:`` section of a run config as a mapping (same keys, defaults and checks).
      train_data: the training data for interpolation over ``subset: full`` (default: measure_data).
      bn_policy: "train-restore" (default), "eval" or "train" (see :mod:`sgdscope.policy`).
      seed: seeds every stream of the measurements (never the training's).
      steps_per_epoch: epoch ends without calls to :meth:`end_epoch`.
      batch_size: the training minibatch size, for probes that draw minibatch gradients.
      weight_decay, include_l2: λ of an explicit λ·Σw² term in ``loss_fn``'s training loss, and whether
        measured losses and Hessians include it.
      ignore_index: targets equal to it carry no weight (padding); default: ``loss_fn.ignore_index`` if any.
      resume: rows committed after the step restored by :meth:`load_state_dict` are dropped from the sink
        (all rows if training starts without one), so a resumed loop recomputes them exactly once.
      process_group: measure data-parallel over this ``torch.distributed`` group; None (default) takes the
        default group when one of several ranks is initialised (a DDP loop), False measures on this process
        alone. Every rank passes the SAME, whole ``measure_data`` / ``train_data`` and calls every step,
        :meth:`end_epoch` and :meth:`eigenpairs` in the same order (they hold collectives); the Scope shards
        the batches over the ranks (:mod:`sgdscope.distributed`), so every rank gets the one-process
        numbers and the same eigenpairs. Only rank 0 commits to ``sink``/``sinks`` and saves tensors (open a
        store there only); the other ranks keep their rows in memory.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        measure_data: Any,
        *,
        probes: Union[None, ProbesOptions, Mapping[str, Any]] = None,
        train_data: Any = None,
        bn_policy: str = "train-restore",
        seed: int = 0,
        sink: Optional[RowSink] = None,
        sinks: Sequence[RowSink] = (),
        steps_per_epoch: Optional[int] = None,
        batch_size: Optional[int] = None,
        weight_decay: float = 0.0,
        include_l2: bool = True,
        ignore_index: Optional[int] = None,
        measure_batch_size: int = 1000,
        save_tensors: Optional[Callable[[str, dict[str, Tensor]], Any]] = None,
        resume: bool = False,
        process_group: Any = None,
    ) -> None:
        check_policy(bn_policy)
        self.options = probe_options(probes)
        for name, value in (("steps_per_epoch", steps_per_epoch), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}: must be a positive whole number or None; got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ConfigError(f"seed: must be a whole number in 0..2^63-1; got {seed!r}")
        trainable = named_trainable(model)
        if not trainable:
            raise ConfigError("model: it has no trainable parameter to measure")
        device = trainable[0][1].device
        if ignore_index is None:
            ignore_index = getattr(loss_fn, "ignore_index", None)
        measure = _to(as_batches(measure_data, measure_batch_size), device)
        train = _to(as_batches(train_data, measure_batch_size, "train_data"), device) if train_data is not None else measure
        self.group = process_group if process_group is not False else None
        self.sharded = process_group is not False and distributed.active(self.group)
        if self.sharded:
            measure, train = distributed.shard(measure, self.group), distributed.shard(train, self.group)
            if not distributed.is_main(self.group):  # rank 0 alone writes
                sink, sinks, save_tensors = None, (), None
        self.model, self.steps_per_epoch = model, steps_per_epoch
        self.env = Env(
            model=model, loss_fn=loss_fn, measure_batches=measure, train_batches=train, theta0=get_flat(model),
            seed=seed, device=device, bn_policy=bn_policy, weight_decay=float(weight_decay),
            include_l2=include_l2, ignore_index=ignore_index, batch_size=batch_size, save_tensors=save_tensors,
        )
        self.probes: list[Probe] = [
            PROBES[name](opts, self.env) for name, opts in self.options if opts is not None
        ]
        interp = self.options.interpolation
        if any(getattr(self.options, n) is not None for n in EIGEN_CONSUMERS) or (
                interp is not None and interp.lambda1 == "solve") or any(p.tracker_k() for p in self.probes):
            self.env.tracker = self._tracker(self._tracker_k())
        self.sink: RowSink = sink if sink is not None else MemorySink()
        self.sinks: list[RowSink] = [self.sink, *sinks]
        self.t = 0  # updates done so far
        self._epochs_done, self._last_epoch_end, self._last_lr = 0, -1, math.nan
        self._started, self._resume, self._closed = False, resume, False
        self._optimizer: Optional[torch.optim.Optimizer] = None  # the last one passed to step()

    # -------------------------------------------------------------------------------------- set-up
    def _tracker_k(self) -> int:
        o = self.options
        ks = [o.eigen.k if o.eigen else 1]
        ks += [max(p.eigen_indices) for p in (o.direction, o.alpha_step) if p is not None]
        ks += [o.gradient_noise.k] if o.gradient_noise is not None else []
        ks += [o.rotation.k] if o.rotation is not None else []
        return max(ks + [p.tracker_k() for p in self.probes])

    def _tracker(self, k: int) -> EigenTracker:
        e = self.options.eigen
        return EigenTracker(self.env, k, which=e.which if e else "LA", tol=e.tol if e else None,
                            tol_eig=e.tol_eig if e else 1e-3, max_hvps=e.max_hvps if e else 500,
                            curvature=e.curvature if e else "hessian")

    def track(self, k: int) -> EigenTracker:
        """Make sure the shared eigen tracker exists and holds at least ``k`` pairs (e.g. for Nudged-SGD)."""
        if self.env.tracker is None:
            self.env.tracker = self._tracker(k)
        self.env.tracker.k = max(self.env.tracker.k, k)
        return self.env.tracker

    def attach(self, sink: RowSink, *extra: RowSink) -> None:
        """Send rows to ``sink`` (read back by :meth:`table`) and ``extra`` sinks from now on (on rank 0
        only when measuring over a process group; the other ranks keep theirs in memory)."""
        if self.sharded and not distributed.is_main(self.group):
            return
        self.sink = sink
        self.sinks = [sink, *extra]

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def epoch(self) -> int:
        """Epochs completed so far."""
        return self._epochs_done

    def _epoch_of(self, t: int) -> int:
        """The 1-based epoch that the update θ_t → θ_{t+1} belongs to."""
        return t // self.steps_per_epoch + 1 if self.steps_per_epoch else self._epochs_done + 1

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Scope is closed")

    # ---------------------------------------------------------------------------------- measuring
    def _run(self, probes: Sequence[Probe], info: StepInfo, rows: Rows) -> Rows:
        for p in probes:
            for table, new in p.measure(info).items():
                if table in MERGED and table in rows:
                    for r in new:
                        rows[table][0].update(r)
                else:
                    rows.setdefault(table, []).extend(new)
        return rows

    def _commit(self, rows: Rows) -> None:
        for table_rows in rows.values():
            for r in table_rows:
                r["logged_at"] = self.t
        for s in self.sinks:
            s.append_many(rows)

    def _start(self, lr: float) -> None:
        """Step 0: the probes due before any update, at θ_0."""
        if self._resume:  # resuming without a restored state: start over
            self._truncate(-1)
        self._started = True
        info = StepInfo(step=0, epoch=0, epoch_end=False, lr=lr, optimizer=self._optimizer)
        self._commit(self._run([p for p in self.probes if p.due(0, False)], info, {}))

    def _truncate(self, step: int) -> None:
        for s in self.sinks:
            if hasattr(s, "truncate_after"):
                s.truncate_after(step)
        self._resume = False

    @contextlib.contextmanager
    def step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> Iterator[StepRecord]:
        """Measure around one update; see the module docstring for what is read when."""
        self._check_open()
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else math.nan
        self._optimizer = optimizer  # read (never written) by probes such as preconditioned_sharpness
        if not self._started:
            self._start(lr)
        t = self.t
        epoch = self._epoch_of(t)
        segment = [p for p in self.probes if p.wants_segment(t, epoch)]
        keep = bool(segment) or any(p.wants_theta_prev for p in self.probes)
        theta_prev = get_flat(self.model) if keep else None
        rec = StepRecord(self.model)
        yield rec  # an exception in the block propagates from here: nothing is measured for it
        self.t = t + 1
        epoch_end = bool(self.steps_per_epoch and self.t % self.steps_per_epoch == 0) or rec.epoch_end
        info = StepInfo(step=self.t, epoch=epoch, epoch_end=epoch_end, lr=lr, theta_prev=theta_prev,
                        grad=grad_flat(self.model), skipped=rec.skipped, optimizer=optimizer)
        rows: Rows = {"train": [{"step": self.t, "epoch": epoch, "lr": lr, **rec.train_cols}]}
        if epoch_end:
            rows["epoch"] = [{"epoch": epoch, "step": self.t, **rec.epoch_cols}]
        due = [p for p in self.probes if p.due(self.t, epoch_end) or p in segment]
        self._run(due, info, rows)
        self._last_lr = lr
        if epoch_end:
            self._epochs_done, self._last_epoch_end = epoch, self.t
        self._commit(rows)

    def end_epoch(self, **cols: Any) -> None:
        """End the epoch at the current step: the ``every: epoch`` probes run now, and an ``epoch`` row is
        written with ``cols`` (e.g. the caller's ``val_acc``) merged with the probes' columns.

        Without effect when the last block already ended the epoch (``steps_per_epoch``); columns then
        belong in ``rec.record_epoch`` inside that block."""
        self._check_open()
        if self._last_epoch_end == self.t:
            if cols:
                raise ValueError("this step already ended an epoch (steps_per_epoch); pass its columns with "
                                 "rec.record_epoch(...) inside the step block")
            return
        epoch = self._epochs_done + 1
        info = StepInfo(step=self.t, epoch=epoch, epoch_end=True, lr=self._last_lr, optimizer=self._optimizer)
        rows: Rows = {"epoch": [{"epoch": epoch, "step": self.t, **cols}]}
        # only the probes due because of the epoch end: the step's own schedule ran on exit of its block
        self._run([p for p in self.probes if p.due(self.t, True) and not p.due(self.t, False)], info, rows)
        self._epochs_done, self._last_epoch_end = epoch, self.t
        self._commit(rows)

    def log(self, table: str, rows: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]) -> None:
        """Add the caller's own rows to ``table`` (committed now, ``logged_at`` = the current step)."""
        self._check_open()
        if not isinstance(table, str) or not table.isidentifier():
            raise ConfigError(f"log: table name {table!r} must be an identifier such as 'epoch' or 'val'")
        rows = [rows] if isinstance(rows, Mapping) else list(rows)
        if not all(isinstance(r, Mapping) for r in rows):
            raise ConfigError(f"log: rows of {table!r} must be mappings of column names to values")
        self._commit({table: [dict(r) for r in rows]})

    def eigenpairs(self, k: Optional[int] = None) -> EigenResult:
        """The top-k eigenpairs of the tracked curvature (the Hessian unless ``probes.eigen.curvature`` names
        the GGN or the Fisher) at the current parameters: warm-started from the previous solve and computed
        at most once per step (shared with the probes)."""
        self._check_open()
        tracker = self.env.tracker or self.track(k or 5)  # a fresh tracker: the eigen probe's default K
        return tracker.get(self.t, k)

    def table(self, name: str):
        """The rows of ``name`` so far, as a pandas DataFrame (the columns of a ``sgdscope run`` table)."""
        return self.sink.table(name)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed loop needs to measure exactly as if uninterrupted (tensors and numbers)."""
        return {
            "format": 1, "step": self.t, "epochs_done": self._epochs_done, "last_epoch_end": self._last_epoch_end,
            "last_lr": self._last_lr, "started": self._started, "theta0": self.env.theta0,
            "probes": {p.name: p.state_dict() for p in self.probes},
            "tracker": self.env.tracker.state_dict() if self.env.tracker is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; with ``resume`` the rows committed after its step are dropped."""
        if not isinstance(state, Mapping) or state.get("format") != 1:
            raise ConfigError("load_state_dict: not a Scope state (from Scope.state_dict())")
        self.t, self._epochs_done = int(state["step"]), int(state["epochs_done"])
        self._last_epoch_end, self._last_lr = int(state["last_epoch_end"]), float(state["last_lr"])
        self._started = bool(state["started"])
        self.env.theta0 = state["theta0"].to(self.device)
        for p in self.probes:
            p.load_state_dict(state["probes"].get(p.name, {}))
        if self.env.tracker is not None and state.get("tracker"):
            self.env.tracker.load_state_dict(state["tracker"])
        if self._resume:
            self._truncate(self.t)

    def close(self) -> None:
        """Close every sink (idempotent)."""
        if not self._closed:
            self._closed = True
            for s in self.sinks:
                s.close()

    def __enter__(self) -> "Scope":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
