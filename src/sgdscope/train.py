"""The Trainer: the training loop, evaluation, checkpoints, resume and the probe calls.

Determinism is by construction. The minibatch of step t is a pure function of (seed, t): pass
p = t // batches_per_pass is a permutation drawn from a generator seeded by (seed, p), and augmentation of
step t draws from a generator seeded by (seed, t). So a run resumed at any checkpoint sees exactly the
batches the uninterrupted run saw, and probes, which use their own generators, cannot shift them.

Ordering inside a step t → t+1: lr from the schedule, gradient on batch t, update, then the probes due
at step t+1 (epoch-end probes and evaluation come last), then the checkpoint if one is due. Every row
carries ``logged_at`` = the step count when it was committed, so resuming from a checkpoint at step s
deletes exactly the rows with ``logged_at > s`` and recomputes them.
"""

from __future__ import annotations

import math
import platform
import re
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

import sgdscope
from sgdscope.config import RunConfig, to_dict
from sgdscope.curvature.flat import get_flat, grad_flat, named_trainable
from sgdscope.errors import ConfigError, DivergenceError, RunStoreError
from sgdscope.losses import cross_entropy, evaluate, l2_penalty, n_targets, split_batches
from sgdscope.policy import measurement_mode
from sgdscope.probes.base import Context, Probe, StepInfo
from sgdscope.probes.basic import StepStats, weight_spectral_norm_mean
from sgdscope.store import RunStore, atomic_write_bytes


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def _seed_for(seed: int, tag: str, i: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(tag.encode()) * 7919 + i) % (2**63 - 1)


class BatchStream:
    """Minibatch indices as a pure function of the step (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.n, self.bs, self.seed, self.device = n, min(batch_size, n), seed, device
        self.per_pass = math.ceil(n / self.bs)
        self._cache: tuple[int, Tensor] | None = None

    def indices(self, step: int) -> Tensor:
        p, i = divmod(step, self.per_pass)
        if self._cache is None or self._cache[0] != p:
            g = torch.Generator().manual_seed(_seed_for(self.seed, "pass", p))
            self._cache = (p, torch.randperm(self.n, generator=g).to(self.device))
        return self._cache[1][i * self.bs : (i + 1) * self.bs]


class Trainer:
    """Trains one run into a :class:`RunStore`. Use :func:`run` rather than this class directly."""

    def __init__(self, cfg: RunConfig, device: torch.device, progress: bool = True) -> None:
        from sgdscope.data import load_dataset
        from sgdscope.models import build_model

        self.cfg, self.device, self.progress = cfg, device, progress
        self.store: RunStore | None = None  # attached by run() once everything validated
        torch.manual_seed(cfg.seed)
        self.data = load_dataset(cfg.data, cfg.seed, device)
        self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes, task=self.data.task).to(device)
        if cfg.start_from:
            try:
                self.model.load_state_dict(_load_checkpoint(Path(cfg.start_from))["model"])
            except (RuntimeError, TypeError, ValueError, AttributeError) as err:  # another model's weights
                first = (str(err).strip().splitlines() or ["mismatch"])[0].rstrip(":")
                raise RunStoreError(f"start_from: {cfg.start_from} does not fit this model ({first})") from None
        self.loss_fn = cross_entropy
        self.params = [p for _, p in named_trainable(self.model)]
        n_train = len(self.data.train.x)
        o = cfg.optimizer
        self.full_batch = o.name in ("gd", "noisy_gd")
        if not self.full_batch and o.batch_size > n_train:
            raise ConfigError(f"optimizer.batch_size: {o.batch_size} is larger than the training set ({n_train})")
        self.stream = BatchStream(n_train, o.batch_size, cfg.seed, device)
        if self.full_batch:
            self.steps_per_epoch = 1
        elif cfg.train.epoch_size:
            self.steps_per_epoch = max(1, math.ceil(cfg.train.epoch_size / self.stream.bs))
        else:
            self.steps_per_epoch = self.stream.per_pass
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.optimizer = self._build_optimizer()
        from sgdscope.optim import build_schedule

        self.schedule = build_schedule(cfg.schedule, o.lr, self.steps_per_epoch)
        self.noise = None
        if o.name == "noisy_gd":
            from sgdscope.optim import IsotropicNoise

            self.noise = IsotropicNoise.estimate(
                self.model, self.loss_fn, self.data.train.x, self.data.train.y, o.gd_chunk,
                factor=o.noise_factor, scales=o.noise_scales,
            )
        self.theta0 = get_flat(self.model)
        self.train_batches = split_batches(self.data.train.x, self.data.train.y, cfg.train.eval_batch_size)
        self.measure_idx = self._measure_subset(n_train)
        mx, my = self.data.train.x[self.measure_idx], self.data.train.y[self.measure_idx]
        self.ctx = Context(
            cfg=cfg, model=self.model, loss_fn=self.loss_fn, dataset=self.data, device=device,
            measure_x=mx, measure_y=my, measure_batches=split_batches(mx, my, cfg.measure.batch_size), train_batches=self.train_batches,
            theta0=self.theta0, steps_per_epoch=self.steps_per_epoch,
        )
        from sgdscope.probes import build_probes

        self.probes: list[Probe] = build_probes(cfg, self.ctx)
        self.stats = StepStats()
        self.step, self.epoch, self.best_val_acc = 0, 0, -1.0
        self.nan_streak = 0  # on_nan: skip: consecutive skipped steps

    def attach(self, store: RunStore) -> None:
        """Give the trainer its run directory (after every input was validated)."""
        self.store = store
        self.ctx.save_tensors = store.save_tensors

    # ---------------------------------------------------------------------------------------- set-up
    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optimizer
        if o.name == "nsgd":
            from sgdscope.optim import NudgedSGD

            return NudgedSGD(self.params, lr=o.lr, momentum=o.momentum, gamma=o.gamma, mode=o.mode)
        return torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum)

    def _measure_subset(self, n: int) -> Tensor:
        m = self.cfg.measure
        size = min(n, max(math.ceil(m.subset * n), m.min_subset))
        g = torch.Generator().manual_seed(_seed_for(self.cfg.seed, "measure-subset", 0))
        return torch.randperm(n, generator=g)[:size].sort().values.to(self.device)

    def info(self) -> dict[str, Any]:
        """What the run config records beside the user's keys: versions, data provenance, sizes."""
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
                "l2_in_loss": self.cfg.optimizer.weight_decay > 0,
                "l2_in_measurements": self.ctx.l2_in_measurements > 0,
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

            g = torch.Generator(device=self.device).manual_seed(_seed_for(self.cfg.seed, "augment", step))
            x = augment_batch(x, g)
        self.model.train()
        out = self.model(x)
        loss = self.loss_fn(out, y)
        (loss + l2_penalty(self.params, self.cfg.optimizer.weight_decay)).backward()
        return float(loss.detach()), float((out.argmax(-1) == y).float().mean())

    def _grad_full(self) -> tuple[float, float]:
        """Exact mean gradient over the training set in chunks: ∇ Σ_c (n_c/N)·L_c."""
        self.model.train()
        n = len(self.data.train.x)
        loss_sum, correct = 0.0, 0.0
        for x, y in split_batches(self.data.train.x, self.data.train.y, self.cfg.optimizer.gd_chunk):
            out = self.model(x)
            loss = self.loss_fn(out, y)
            (loss * (n_targets(y) / n)).backward()
            loss_sum += float(loss.detach()) * n_targets(y)
            correct += float((out.argmax(-1) == y).sum())
        l2 = l2_penalty(self.params, self.cfg.optimizer.weight_decay)
        if torch.is_tensor(l2):
            l2.backward()
        return loss_sum / n, correct / n

    def train_step(self) -> tuple[dict[str, Any], Optional[Tensor], Tensor]:
        """One update θ_t → θ_{t+1}. Returns the ``train`` row, θ_t (if a probe wants it) and g_t."""
        step, epoch = self.step, self.step // self.steps_per_epoch + 1
        epoch_end = (step + 1) % self.steps_per_epoch == 0
        lr = self.schedule.apply(self.optimizer, step, epoch)
        wd = self.cfg.optimizer.weight_decay
        keep = wd > 0 or any(p.wants_prev(step + 1, epoch, epoch_end) for p in self.probes)
        theta_prev = get_flat(self.model) if keep else None
        self.optimizer.zero_grad(set_to_none=True)
        loss, acc = self._grad_full() if self.full_batch else self._grad_minibatch(step)
        if self.noise is not None:
            self.noise.add_(self.params, self.ctx.generator("isotropic-noise", step))
        grad = grad_flat(self.model)
        if not (math.isfinite(loss) and bool(torch.isfinite(grad).all())):
            what = "loss" if not math.isfinite(loss) else "gradient"
            val = loss if what == "loss" else "non-finite"
            reason = f"{what} became {val} at step {step + 1}, lr {lr:g}"
            if self.cfg.on_nan != "skip":
                raise DivergenceError(reason)
            return self._skip_step(step, epoch, lr, loss, acc, grad, theta_prev, reason)
        self._refresh_subspace(step)
        self.optimizer.step()
        self.step = step + 1
        self.nan_streak = 0
        theta = get_flat(self.model)
        row = {"step": self.step, "epoch": epoch, "lr": lr, "batch_loss": loss, "batch_acc": acc}
        row.update(self.stats.row(grad, theta, self.theta0, 2 * wd * theta_prev if wd > 0 else None))
        if self.cfg.on_nan == "skip":
            row["skipped"] = 0
        return row, theta_prev, grad

    def _skip_step(self, step: int, epoch: int, lr: float, loss: float, acc: float, grad: Tensor,
                   theta_prev: Optional[Tensor], reason: str) -> tuple[dict[str, Any], Optional[Tensor], Tensor]:
        """``on_nan: skip``: drop the update of a step whose loss or gradient is non-finite (θ_{t+1} = θ_t,
        optimizer state untouched) and log its row with ``skipped = 1``; non-finite parameters still stop the
        run, since no later step could recover from them, and so does a whole epoch of consecutive skips (the
        parameters are finite but every batch overflows). The cosine of the next step is taken with the last
        gradient that was used."""
        self.optimizer.zero_grad(set_to_none=True)
        theta = get_flat(self.model)
        if not bool(torch.isfinite(theta).all()):
            raise DivergenceError(f"parameters became non-finite at step {step + 1}, lr {lr:g} ({reason})")
        if self.nan_streak >= self.steps_per_epoch:
            raise DivergenceError(f"{reason}; {self.nan_streak} steps before it were skipped too (on_nan: skip gives up "
                                  "after a whole epoch of them)")
        self.nan_streak += 1
        self.step = step + 1
        row = {
            "step": self.step, "epoch": epoch, "lr": lr, "batch_loss": loss, "batch_acc": acc,
            "grad_norm": float(grad.norm()), "param_distance": float((theta - self.theta0).norm()),
            "grad_cosine_prev": float("nan"), "skipped": 1,
        }
        return row, theta_prev, grad

    def _refresh_subspace(self, step: int) -> None:
        """Nudged-SGD: (re)compute U from the eigen tracker when due (from ``nudge_from`` on)."""
        o = self.cfg.optimizer
        if o.name != "nsgd" or step < o.nudge_from or self.optimizer.frozen:
            return
        since = step - o.nudge_from
        every = self.steps_per_epoch if o.refresh == "epoch" else o.refresh
        if since % every == 0 or self.optimizer.subspace is None:
            res = self.ctx.tracker.get(step, o.k)
            self.optimizer.set_subspace(res.vectors[: o.k], freeze=o.freeze_subspace)

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate_epoch(self) -> dict[str, Any]:
        with measurement_mode(self.model, "eval"):
            bs = self.cfg.train.eval_batch_size
            tl, ta = evaluate(self.model, self.loss_fn, self.train_batches)
            vl, va = evaluate(self.model, self.loss_fn, split_batches(self.data.val.x, self.data.val.y, bs))
            if self.data.test is not None:
                sl, sa = evaluate(self.model, self.loss_fn, split_batches(self.data.test.x, self.data.test.y, bs))
            else:
                sl, sa = float("nan"), float("nan")
        return {
            "epoch": self.epoch, "step": self.step, "train_loss": tl, "train_acc": ta, "val_loss": vl,
            "val_acc": va, "test_loss": sl, "test_acc": sa,
            "weight_spectral_norm_mean": weight_spectral_norm_mean(self.model),
            "param_norm": float(get_flat(self.model).norm()), "lr": self.optimizer.param_groups[0]["lr"],
        }

    # ---------------------------------------------------------------------------------- probes
    def run_probes(self, info: StepInfo) -> dict[str, list[dict[str, Any]]]:
        rows: dict[str, list[dict[str, Any]]] = {}
        for p in self.probes:
            if p.due(info.step, info.epoch, info.epoch_end) or (info.theta_prev is not None and p.wants_prev(info.step, info.epoch, info.epoch_end)):
                for table, r in p.measure(info).items():
                    rows.setdefault(table, []).extend(r)
        return rows

    def commit(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        for rows in tables.values():
            for r in rows:
                r["logged_at"] = self.step
        self.store.append_many(tables)

    # ---------------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": 1, "step": self.step, "epoch": self.epoch, "best_val_acc": self.best_val_acc,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "theta0": self.theta0,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "stats": self.stats.state_dict(),
            "probes": {p.name: p.state_dict() for p in self.probes},
            "tracker": self.ctx.tracker.state_dict() if self.ctx.tracker is not None else {},
            "noise": self.noise.state_dict() if self.noise is not None else {},
            "nan_streak": self.nan_streak,
        }

    def save_checkpoint(self, name: str = "last.pt") -> None:
        import io

        buf = io.BytesIO()
        torch.save(self.checkpoint_state(), buf)
        atomic_write_bytes(self.store.path / "checkpoints" / name, buf.getvalue())

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.best_val_acc = state["step"], state["epoch"], state["best_val_acc"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.theta0 = self.ctx.theta0 = state["theta0"].to(self.device)
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.stats.load_state_dict(state["stats"])
        for p in self.probes:
            p.load_state_dict(state["probes"].get(p.name, {}))
        if self.ctx.tracker is not None:
            self.ctx.tracker.load_state_dict(state["tracker"])
        if self.noise is not None:
            self.noise.load_state_dict(state["noise"])
        self.nan_streak = state.get("nan_streak", 0)

    def _checkpoint_due(self, epoch_end: bool) -> bool:
        every = self.cfg.train.checkpoint_every
        return epoch_end or (every != "epoch" and self.step % every == 0)

    # ---------------------------------------------------------------------------------- the loop
    def fit(self) -> None:
        if self.step == 0:
            self.commit(self.run_probes(StepInfo(step=0, epoch=0, epoch_end=False, lr=self.schedule.lr_at(0, 1))))
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
            dynamic_ncols=True, mininterval=0.5, leave=False,
        )
        try:
            while self.step < self.total_steps:
                row, theta_prev, grad = self.train_step()
                epoch_end = self.step % self.steps_per_epoch == 0
                epoch = (self.step - 1) // self.steps_per_epoch + 1
                info = StepInfo(step=self.step, epoch=epoch, epoch_end=epoch_end, lr=row["lr"], theta_prev=theta_prev, grad=grad)
                tables = {"train": [row]}
                stop = False
                if epoch_end:
                    self.epoch = epoch
                    ev = self.evaluate_epoch()
                    tables["epoch"] = [ev]
                    self.schedule.observe(epoch, ev)
                    bar.set_postfix(epoch=epoch, loss=f"{ev['train_loss']:.3g}", val_acc=f"{ev['val_acc']:.3f}")
                    stop = self._early_stop(ev)
                for t, r in self.run_probes(info).items():
                    tables.setdefault(t, []).extend(r)
                self.commit(tables)
                if epoch_end and tables["epoch"][0]["val_acc"] > self.best_val_acc:
                    self.best_val_acc = tables["epoch"][0]["val_acc"]
                    self.save_checkpoint("best.pt")
                if self._checkpoint_due(epoch_end):
                    self.save_checkpoint()
                    self.store.set_status("running", step=self.step, epoch=self.epoch)
                    if self.cfg.tensorboard:
                        from sgdscope.tb import mirror_to_tensorboard

                        mirror_to_tensorboard(self.store.path)
                bar.update(1)
                if stop:
                    break
        finally:
            bar.close()

    def _early_stop(self, ev: dict[str, Any]) -> bool:
        patience = self.cfg.train.early_stop_patience
        if patience is None:
            return False
        hist = self.store.table("epoch")
        accs = list(hist["val_acc"]) if len(hist) else []
        accs.append(ev["val_acc"])
        best = max(range(len(accs)), key=accs.__getitem__)
        return len(accs) - 1 - best >= patience


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RunStoreError(f"checkpoint: no file {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: one line on stderr only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not ours"
        text = str(err)
        if "Weights only load failed" in text:  # torch goes on to advise weights_only=False: never do that
            detail = re.search(r"Unsupported [^.\n]*", text)
            first = "it holds objects other than tensors and containers; refused by weights_only=True"
            first += f": {detail.group(0)}" if detail else ""
        else:
            first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
        raise RunStoreError(f"checkpoint: {path} is not a sgdscope checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RunStoreError(f"checkpoint: {path} is not a sgdscope checkpoint (no 'model' state dict)")
    return state


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} ({a!r} -> {b!r})"]


def run(config: RunConfig | dict | str | Path, out: str | Path | None = None, *, resume: bool = False,
        progress: bool = True) -> Path:
    """Train one run, measuring as configured, and return the run directory.

    ``config`` is a :class:`RunConfig`, a raw mapping or a YAML path. With ``resume=True`` an existing
    run directory continues from its last checkpoint (its config must match, ``device`` aside).
    """
    from sgdscope.config import load_config, validate

    if isinstance(config, (str, Path)):
        cfg = load_config(config)
    elif isinstance(config, dict):
        cfg = validate(config)
    else:
        cfg = config
    out = Path(out) if out is not None else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    device = resolve_device(cfg.device)
    want = to_dict(cfg)
    if resume and out.exists():
        store = RunStore(out)
        have = {k: v for k, v in store.config().items() if k not in ("versions", "resolved")}
        diffs = [d for d in _diff(have, want) if not d.startswith("device ")]
        if diffs:
            raise RunStoreError(f"{out}: cannot resume with a different config: {'; '.join(diffs)}")
        if store.status().get("state") == "done":
            return out
    elif out.exists() and any(out.iterdir()):
        raise RunStoreError(f"{out}: already exists and is not empty; pass --resume to continue it or choose --out")
    else:
        store = None
    trainer = Trainer(cfg, device, progress)  # every input error surfaces here, before anything is written
    if store is None:
        store = RunStore.create(out, {**want, **trainer.info()})
        store.save_tensors("measure_subset", {"indices": trainer.measure_idx})
    else:
        for stale in (store.path / "checkpoints").glob(".*.tmp"):  # a crash inside an atomic write
            stale.unlink()
        ckpt = store.path / "checkpoints" / "last.pt"
        if ckpt.is_file():
            state = _load_checkpoint(ckpt)
            if state.get("format") != 1:
                raise RunStoreError(f"checkpoint: {ckpt} is not a sgdscope run checkpoint (format {state.get('format')!r})")
            trainer.load_checkpoint(state)
        store.truncate_after(trainer.step if ckpt.is_file() else -1)
    trainer.attach(store)
    store.set_status("running", step=trainer.step, epoch=trainer.epoch)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        store.set_status("interrupted", step=trainer.step, epoch=trainer.epoch)
        raise
    except DivergenceError as err:
        store.set_status("failed", step=trainer.step, epoch=trainer.epoch, error=str(err))
        raise
    except BaseException as err:
        store.set_status("failed", step=trainer.step, epoch=trainer.epoch, error=f"{type(err).__name__}: {err}")
        raise
    finally:
        store.close()
    store.set_status("done", step=trainer.step, epoch=trainer.epoch)
    return out
