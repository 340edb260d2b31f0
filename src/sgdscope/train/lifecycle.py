"""One run's life: validate, create or reopen the run directory, train, record how it ended."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sgdscope import distributed
from sgdscope.config import RunConfig, to_dict
from sgdscope.errors import DivergenceError, RunStoreError
from sgdscope.store import RunStore
from sgdscope.train.build import resolve_device
from sgdscope.train.checkpoint import check_format, load_checkpoint
from sgdscope.train.loop import Trainer


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} ({a!r} -> {b!r})"]


def _as_config(config: RunConfig | dict | str | Path) -> RunConfig:
    from sgdscope.config import load_config, validate

    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, dict):
        return validate(config)
    return config


def _reopen(out: Path, want: dict[str, Any]) -> RunStore:
    """The run directory to resume: it must exist and hold the same config (``device`` aside)."""
    store = RunStore(out)
    have = {k: v for k, v in store.config().items() if k not in ("versions", "resolved")}
    diffs = [d for d in _diff(have, want) if not d.startswith("device ")]
    if diffs:
        raise RunStoreError(f"{out}: cannot resume with a different config: {'; '.join(diffs)}")
    return store


def _extra_sinks(cfg: RunConfig, store: RunStore) -> list:
    if not cfg.tensorboard:
        return []
    from sgdscope.tb import TensorBoardSink

    return [TensorBoardSink(store.path / "tb")]


def run(config: RunConfig | dict | str | Path, out: str | Path | None = None, *, resume: bool = False,
        progress: bool = True) -> Path:
    """Train one run, measuring as configured, and return the run directory.

    ``config`` is a :class:`RunConfig`, a raw mapping or a YAML path. With ``resume=True`` an existing
    run directory continues from its last checkpoint (its config must match, ``device`` aside); rows
    committed after that checkpoint are dropped and recomputed, bit for bit.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this: they join one process group
    (:func:`sgdscope.distributed.init_from_env`), train data-parallel and measure sharded; rank 0 alone
    holds the directory's lock and writes the store and the checkpoints (see README, "Several processes").
    """
    cfg = _as_config(config)
    device = resolve_device(cfg.device)
    created = distributed.init_from_env(device)
    try:
        return _run(cfg, out, device, resume, progress)
    finally:
        if created:
            distributed.shutdown()


def _claim(out: Path, want: dict[str, Any], resume: bool) -> tuple[RunStore | None, bool]:
    """Rank 0's checks of the run directory: the store to resume (its lock taken) or None for a new run,
    and whether that run is already done."""
    RunStore.check_target(out, resume, resume_hint="--resume", out_hint="--out")
    if not resume:
        return None, False
    store = _reopen(out, want)
    try:
        store.acquire_writer()  # before reading its status: another writer may be finishing it
        done = store.status().get("state") == "done"
    except BaseException:
        store.close()
        raise
    if done:
        store.close()
    return store, done


def _run(cfg: RunConfig, out: str | Path | None, device, resume: bool, progress: bool) -> Path:
    main = distributed.is_main()
    # every rank must write to rank 0's directory (a default name carries rank 0's clock)
    out = Path(distributed.broadcast_object(str(out) if out is not None else time.strftime("runs/run-%Y%m%d-%H%M%S")))
    want = to_dict(cfg)
    store, verdict = None, "go"
    if main:
        try:
            store, done = _claim(out, want, resume)
            verdict = "done" if done else "go"
        except BaseException as err:
            distributed.broadcast_object(f"{type(err).__name__}: {err}")  # the other ranks stop too
            raise
    verdict = distributed.broadcast_object(verdict)
    if verdict == "done":
        return out
    if verdict != "go":
        raise RunStoreError(f"rank 0 refused {out} ({verdict})")
    progress = progress and main
    try:  # until training starts, any failure gives the directory's lock back
        # every input error surfaces here, before anything is written; on resume the Scope drops the rows
        # committed after the restored step (all of them when no checkpoint was written yet)
        trainer = Trainer(cfg, device, progress, resume=resume)
        if store is None and main:
            store = RunStore.create(out, {**want, **trainer.info()}, writer=True)
            store.save_tensors("measure_subset", {"indices": trainer.measure_idx})
        elif main:
            for stale in (store.path / "checkpoints").glob(".*.tmp"):  # a crash inside an atomic write
                stale.unlink()
        if main:
            trainer.attach(store, *_extra_sinks(cfg, store))
        distributed.barrier()  # the other ranks read the checkpoint once rank 0 has tidied the directory
        ckpt = out / "checkpoints" / "last.pt"
        if resume and ckpt.is_file():
            state = load_checkpoint(ckpt)
            check_format(ckpt, state)
            trainer.load_checkpoint(state)
    except BaseException:
        if store is not None:
            store.close()
        raise
    status = distributed.StatusWriter(store, out)  # rank 0's store; a survivor's when rank 0 died
    status.set("running", step=trainer.step, epoch=trainer.epoch)
    try:
        with distributed.peer_failures():
            trainer.fit()
    except KeyboardInterrupt:
        status.set("interrupted", step=trainer.step, epoch=trainer.epoch)
        raise
    except DivergenceError as err:
        status.set("failed", step=trainer.step, epoch=trainer.epoch, error=str(err))
        raise
    except BaseException as err:
        status.set("failed", step=trainer.step, epoch=trainer.epoch, error=f"{type(err).__name__}: {err}")
        raise
    else:
        status.set("done", step=trainer.step, epoch=trainer.epoch)
    finally:
        trainer.scope.close()  # closes the store and its sinks, and releases the directory's lock
    return out
