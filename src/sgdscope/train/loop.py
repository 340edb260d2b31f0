"""The Trainer: the training loop of ``sgdscope run``, a client of :class:`~sgdscope.measure.Scope`.

Ordering inside a step t → t+1: lr from the schedule; inside ``scope.step``: the gradient on batch t, the
Nudged-SGD subspace when due, the update, and at an epoch end the evaluation; on leaving the block the
Scope runs the probes due at step t + 1 and commits the step's rows in one transaction; then the
checkpoint if one is due. Every row carries ``logged_at`` = the step count when it was committed, so
resuming from a checkpoint at step s drops exactly the rows with ``logged_at > s`` and recomputes them.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

import sgdscope
from sgdscope import distributed, seeds
from sgdscope.config import RunConfig
from sgdscope.curvature.flat import get_flat, named_trainable
from sgdscope.errors import ConfigError, DivergenceError, RunStoreError
from sgdscope.losses import LOSSES, evaluate, l2_penalty, n_targets, split_batches
from sgdscope.measure.scope import Scope, StepRecord
from sgdscope.policy import measurement_mode
from sgdscope.train.build import BatchStream, build_optimizer, measure_subset, steps_per_epoch
from sgdscope.train.checkpoint import FORMAT, load_checkpoint, save_checkpoint


class Trainer:
    """Trains one run into a run store. Use :func:`sgdscope.train.run` rather than this class directly."""

    def __init__(self, cfg: RunConfig, device: torch.device, progress: bool = True, resume: bool = False) -> None:
        from sgdscope.data import load_dataset
        from sgdscope.models import build_model
        from sgdscope.optim import build_schedule

        self.cfg, self.device, self.progress = cfg, device, progress
        self.store = None  # attached by run() once everything validated
        torch.manual_seed(cfg.seed)
        self.data = load_dataset(cfg.data, cfg.seed, device)
        self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes, task=self.data.task).to(device)
        if cfg.start_from:
            try:
                self.model.load_state_dict(load_checkpoint(Path(cfg.start_from))["model"])
            except (RuntimeError, TypeError, ValueError, AttributeError) as err:  # another model's weights
                first = (str(err).strip().splitlines() or ["mismatch"])[0].rstrip(":")
                raise RunStoreError(f"start_from: {cfg.start_from} does not fit this model ({first})") from None
        self.loss_fn = LOSSES[cfg.train.loss]
        self.params = [p for _, p in named_trainable(self.model)]
        n_train = len(self.data.train.x)
        o = cfg.optimizer
        self.full_batch = o.name in ("gd", "noisy_gd")
        if not self.full_batch and o.batch_size > n_train:
            raise ConfigError(f"optimizer.batch_size: {o.batch_size} is larger than the training set ({n_train})")
        self.stream = BatchStream(n_train, o.batch_size, cfg.seed, device)
        self.steps_per_epoch = steps_per_epoch(cfg, self.stream)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.optimizer = build_optimizer(cfg, self.params)
        self.schedule = build_schedule(cfg.schedule, o.lr, self.steps_per_epoch)
        self.noise = None
        if o.name == "noisy_gd":
            from sgdscope.optim import IsotropicNoise

            self.noise = IsotropicNoise.estimate(
                self.model, self.loss_fn, self.data.train.x, self.data.train.y, o.gd_chunk,
                factor=o.noise_factor, scales=o.noise_scales,
            )
        self.train_batches = split_batches(self.data.train.x, self.data.train.y, cfg.train.eval_batch_size)
        self.measure_idx = measure_subset(cfg, n_train, device)
        m = cfg.measure
        self.scope = Scope(
            self.model, self.loss_fn, (self.data.train.x[self.measure_idx], self.data.train.y[self.measure_idx]),
            probes=cfg.probes, train_data=self.train_batches, bn_policy=m.bn_policy, seed=cfg.seed,
            steps_per_epoch=self.steps_per_epoch, batch_size=min(o.batch_size, n_train),
            weight_decay=o.weight_decay, include_l2=m.include_l2, measure_batch_size=m.batch_size, resume=resume,
        )
        self.theta0_norm = float(self.scope.env.theta0.norm())  # the Scope already holds θ0: no second copy
        if o.name == "nsgd":  # the subspace comes from the Scope's tracker: size it before anything runs
            self.scope.track(o.k)
        self.step, self.epoch, self.best_val_acc = 0, 0, -1.0
        self.val_history: list[float] = []  # early stopping reads this, never the store
        self.nan_streak = 0  # on_nan: skip: consecutive skipped steps
        self.first_loss: Optional[float] = None  # the divergence bound's reference (train.divergence_factor)

    def attach(self, store, *extra_sinks) -> None:
        """Give the trainer its run directory (after every input was validated)."""
        self.store = store
        self.scope.attach(store, *extra_sinks)
        self.scope.env.save_tensors = store.save_tensors

    def info(self) -> dict[str, Any]:
        """What the run config records beside the user's keys: versions, data provenance, sizes."""
        env = self.scope.env
        return {
            "versions": {
                "sgdscope": str(sgdscope.__version__), "torch": str(torch.__version__),
                "python": platform.python_version(), "device": str(self.device),
            },
            "resolved": {
                "n_params": sum(p.numel() for p in self.params),
                "n_train": len(self.data.train.x), "n_val": len(self.data.val.x),
                "n_test": len(self.data.test.x) if self.data.test is not None else 0,
                "measure_subset_size": len(self.measure_idx),
                "steps_per_epoch": self.steps_per_epoch,
                "bn_policy": self.cfg.measure.bn_policy,
                "loss": self.cfg.train.loss,
                "l2_in_loss": self.cfg.optimizer.weight_decay > 0,
                "l2_in_measurements": env.l2 > 0,
                "grad_cosine_includes_l2": self.cfg.optimizer.weight_decay > 0,
                "data": self.data.info,
            },
        }

    # ------------------------------------------------------------------------------------- one step
    def _grad_minibatch(self, step: int) -> tuple[float, float]:
        idx = self.stream.indices(step)
        x, y = self.data.train.x[idx], self.data.train.y[idx]
        if self.cfg.data.augment:
            from sgdscope.data import augment_batch

            x = augment_batch(x, seeds.generator(self.cfg.seed, "augment", step, device=self.device))
        self.model.train()
        if distributed.active():
            return self._grad_part(x, y)
        out = self.model(x)
        loss = self.loss_fn(out, y)
        (loss + l2_penalty(self.params, self.cfg.optimizer.weight_decay)).backward()
        return float(loss.detach()), float((out.argmax(-1) == y).float().mean())

    def _grad_part(self, x, y) -> tuple[float, float]:
        """Data-parallel: this rank's part of the global minibatch, its loss weighted by n_r / n, the
        gradients summed over the ranks (one all-reduce), the L2 term once (rank 0's); the loss and the
        accuracy of the whole minibatch come back summed the same way."""
        from sgdscope.losses import take

        n, sl = n_targets(y), distributed.part(len(y))
        xr, yr = take(x, sl), y[sl]
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        if len(yr):
            out = self.model(xr)
            loss = self.loss_fn(out, yr) * (n_targets(yr) / n)
            l2 = l2_penalty(self.params, self.cfg.optimizer.weight_decay) if distributed.is_main() else 0.0
            (loss + l2).backward()
            stats += torch.stack([loss.detach().double(), (out.argmax(-1) == yr).double().sum() / y.numel()])
        distributed.sync_grads(self.params)
        distributed.all_reduce(stats)
        return float(stats[0]), float(stats[1])

    def _grad_full(self) -> tuple[float, float]:
        """Exact mean gradient over the training set in chunks: ∇ Σ_c (n_c/N)·L_c."""
        self.model.train()
        n = len(self.data.train.x)
        loss_sum, correct = 0.0, 0.0
        chunks = split_batches(self.data.train.x, self.data.train.y, self.cfg.optimizer.gd_chunk)
        w, r = distributed.world_size(), distributed.rank()
        for c, (x, y) in enumerate(chunks):
            if c % w != r:  # data-parallel: chunk c is rank c mod W's
                continue
            out = self.model(x)
            loss = self.loss_fn(out, y)
            (loss * (n_targets(y) / n)).backward()
            loss_sum += float(loss.detach()) * n_targets(y)
            correct += float((out.argmax(-1) == y).sum())
        l2 = l2_penalty(self.params, self.cfg.optimizer.weight_decay)
        if torch.is_tensor(l2) and r == 0:  # added once over the ranks
            l2.backward()
        if w > 1:
            distributed.sync_grads(self.params)
            stats = distributed.all_reduce(torch.tensor([loss_sum, correct], dtype=torch.float64, device=self.device))
            loss_sum, correct = float(stats[0]), float(stats[1])
        return loss_sum / n, correct / n

    def train_step(self) -> Optional[dict[str, Any]]:
        """One update θ_t → θ_{t+1} inside ``scope.step``; returns the ``epoch`` row at an epoch end."""
        step, epoch = self.step, self.step // self.steps_per_epoch + 1
        epoch_end = (step + 1) % self.steps_per_epoch == 0
        lr = self.schedule.apply(self.optimizer, step, epoch)
        ev = None
        with self.scope.step(self.optimizer) as rec:
            self.optimizer.zero_grad(set_to_none=True)
            loss, acc = self._grad_full() if self.full_batch else self._grad_minibatch(step)
            if self.noise is not None:
                self.noise.add_(self.params, self.scope.env.generator("isotropic-noise", step))
            grad = rec.grad()
            if math.isfinite(loss) and bool(torch.isfinite(grad).all()):
                # checked on θ_t before its update, as a NaN is: the rows of every step before stay
                self._check_bound("loss", loss, self.first_loss, "the first loss", step, lr)
                norm = float(torch.sqrt(sum((p.detach() ** 2).sum() for p in self.params)))
                self._check_bound("parameter norm", norm, self.theta0_norm, "the initial norm", step, lr)
                self.first_loss = loss if self.first_loss is None else self.first_loss
                self._refresh_subspace(step)
                self.optimizer.step()
                distributed.broadcast_buffers(self.model)  # BN saw each rank's part: rank 0's statistics rule
                self.nan_streak = 0
                skipped = 0
            else:
                what = "loss" if not math.isfinite(loss) else "gradient"
                reason = f"{what} became {loss if what == 'loss' else 'non-finite'} at step {step + 1}, lr {lr:g}"
                self._skip_step(rec, step, lr, reason)
                skipped = 1
            rec.record(batch_loss=loss, batch_acc=acc, **({"skipped": skipped} if self.cfg.on_nan == "skip" else {}))
            self.step = step + 1
            if epoch_end:
                self.epoch = epoch
                ev = self.evaluate_epoch()
                rec.record_epoch(**ev)
        return ev

    def _check_bound(self, what: str, value: float, ref: Optional[float], ref_name: str, step: int, lr: float) -> None:
        """A finite but exploding run fails like a NaN one: ``value`` > factor·max(ref, 1) is divergence."""
        factor = self.cfg.train.divergence_factor
        if factor is None or ref is None:
            return
        bound = factor * max(ref, 1.0)
        if not value <= bound:  # NaN counts as past it
            raise DivergenceError(f"{what} became {value:.3g}, past the divergence bound {bound:.3g} "
                                  f"({factor:g} × {ref_name}), at step {step + 1}, lr {lr:g}")

    def _skip_step(self, rec: StepRecord, step: int, lr: float, reason: str) -> None:
        """``on_nan: skip``: drop the update of a step whose loss or gradient is non-finite (θ_{t+1} = θ_t,
        optimizer state untouched) and log its row with ``skipped = 1``; non-finite parameters still stop the
        run, since no later step could recover from them, and so does a whole epoch of consecutive skips (the
        parameters are finite but every batch overflows). ``on_nan: stop`` stops at once."""
        if self.cfg.on_nan != "skip":
            raise DivergenceError(reason)
        if not bool(torch.isfinite(get_flat(self.model)).all()):
            raise DivergenceError(f"parameters became non-finite at step {step + 1}, lr {lr:g} ({reason})")
        if self.nan_streak >= self.steps_per_epoch:
            raise DivergenceError(f"{reason}; {self.nan_streak} steps before it were skipped too (on_nan: skip gives up "
                                  "after a whole epoch of them)")
        self.nan_streak += 1
        rec.skip()

    def _refresh_subspace(self, step: int) -> None:
        """Nudged-SGD: (re)compute U from the Scope's eigen tracker when due (from ``nudge_from`` on)."""
        o = self.cfg.optimizer
        if o.name != "nsgd" or step < o.nudge_from or self.optimizer.frozen:
            return
        since = step - o.nudge_from
        every = self.steps_per_epoch if o.refresh == "epoch" else o.refresh
        if since % every == 0 or self.optimizer.subspace is None:
            res = self.scope.eigenpairs(o.k)
            self.optimizer.set_subspace(res.vectors[: o.k], freeze=o.freeze_subspace)

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate_epoch(self) -> dict[str, Any]:
        """Exactly weighted loss and accuracy on train, validation and test, the model in eval mode."""
        with measurement_mode(self.model, "eval"):
            bs = self.cfg.train.eval_batch_size
            tl, ta = evaluate(self.model, self.loss_fn, self.train_batches)
            vl, va = evaluate(self.model, self.loss_fn, split_batches(self.data.val.x, self.data.val.y, bs))
            if self.data.test is not None:
                sl, sa = evaluate(self.model, self.loss_fn, split_batches(self.data.test.x, self.data.test.y, bs))
            else:
                sl, sa = float("nan"), float("nan")
        return {
            "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va, "test_loss": sl, "test_acc": sa,
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    # ---------------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "step": self.step, "epoch": self.epoch, "best_val_acc": self.best_val_acc,
            "val_history": list(self.val_history),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "scope": self.scope.state_dict(),
            "noise": self.noise.state_dict() if self.noise is not None else {},
            "nan_streak": self.nan_streak, "first_loss": self.first_loss,
        }

    def save_checkpoint(self, name: str = "last.pt") -> None:
        if self.store is None:  # not rank 0: rank 0 writes the one checkpoint every rank resumes from
            return
        save_checkpoint(self.store.path / "checkpoints" / name, self.checkpoint_state())

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.best_val_acc = state["step"], state["epoch"], state["best_val_acc"]
        self.val_history = list(state["val_history"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.scope.load_state_dict(state["scope"])
        if self.noise is not None:
            self.noise.load_state_dict(state["noise"])
        self.nan_streak = state.get("nan_streak", 0)
        self.first_loss = state["first_loss"]

    def _checkpoint_due(self, epoch_end: bool) -> bool:
        every = self.cfg.train.checkpoint_every
        return epoch_end or (every != "epoch" and self.step % every == 0)

    # ---------------------------------------------------------------------------------- the loop
    def fit(self) -> None:
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
            dynamic_ncols=True, mininterval=0.5, leave=False,
        )
        try:
            while self.step < self.total_steps:
                ev = self.train_step()
                stop = False
                if ev is not None:
                    self.schedule.observe(self.epoch, ev)
                    bar.set_postfix(epoch=self.epoch, loss=f"{ev['train_loss']:.3g}", val_acc=f"{ev['val_acc']:.3f}")
                    stop = self._early_stop(ev["val_acc"])
                    if ev["val_acc"] > self.best_val_acc:
                        self.best_val_acc = ev["val_acc"]
                        self.save_checkpoint("best.pt")
                if self._checkpoint_due(ev is not None):
                    self.save_checkpoint()
                    if self.store is not None:
                        self.store.set_status("running", step=self.step, epoch=self.epoch)
                bar.update(1)
                if stop:
                    break
        finally:
            bar.close()

    def _early_stop(self, val_acc: float) -> bool:
        """Stop after ``early_stop_patience`` epochs without a better validation accuracy."""
        self.val_history.append(val_acc)
        patience = self.cfg.train.early_stop_patience
        if patience is None:
            return False
        accs = self.val_history
        best = max(range(len(accs)), key=accs.__getitem__)
        return len(accs) - 1 - best >= patience
