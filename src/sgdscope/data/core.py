"""Datasets as on-device tensors: the containers, the seeded split and the normalisation.

Every classification source hands over a :class:`Source` (examples as read, possibly still ``uint8``), and
:func:`assemble` turns it into a :class:`Dataset`:

1. a seeded permutation of the training pool (``torch.Generator().manual_seed(seed)``);
2. sources without an official test set hold out the first ``test_size`` (default 20%) of it as test set;
3. the next ``val_size`` (default 10% of what remains; 5,000 of CIFAR's 50,000) become the validation set,
   the rest the training set, truncated to ``train_size``; an official test set is truncated to
   ``test_size`` in file order;
4. values are scaled to [0, 1] (``Source.scale``) and normalised per channel with training statistics,
   ``x ← (x − μ_c) / σ_c`` with μ_c, σ_c the mean and (population) standard deviation of channel c over
   every training example and position. A per-example shape (C, ...) has C channels; a flat one is one channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from sgdscope.config import DataConfig
from sgdscope.errors import ConfigError

HELDOUT_TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


@dataclass
class Split:
    """One split: inputs ``x`` (float32, or int64 tokens) and integer targets ``y``, on one device."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A dataset ready for training: three splits on the run's device plus what describes them.

    ``num_classes`` is the vocabulary size for language models; ``input_shape`` is per example;
    ``info`` is plain data (YAML-able) recorded in the run config: sizes, split seed, normalisation
    statistics and the files read.
    """

    name: str
    train: Split
    val: Split
    test: Optional[Split]
    num_classes: int
    input_shape: tuple[int, ...]
    task: str
    info: dict[str, Any]


@dataclass
class Source:
    """Classification examples as read, before splitting.

    ``x`` is (N, *shape) in the natural layout ((C, H, W) images, (C, L) signals or flat vectors) and any
    dtype; ``scale`` maps its values into [0, 1] (1.0 when they are already real-valued). ``x_test`` is the
    official test set, or None when one is to be held out of the pool.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    x_test: Optional[Tensor] = None
    y_test: Optional[Tensor] = None
    scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


def _take(n: Optional[int], available: int, key: str, name: str, what: str) -> int:
    if n is None:
        return available
    if n > available:
        raise ConfigError(f"data.{key}: {n} exceeds the {available} {what} that {name} has")
    return n


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = [d for d in range(x.ndim) if d != 1] if x.ndim >= 3 else list(range(x.ndim))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    std = var.sqrt()
    # A constant channel (e.g. a blank border) would otherwise divide by zero.
    return mean.reshape(-1), torch.where(std > 0, std, torch.ones_like(std)).reshape(-1)


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    shape = (1, -1) + (1,) * (x.ndim - 2) if x.ndim >= 3 else (1,) * x.ndim
    return x.sub_(mean.reshape(shape)).div_(std.reshape(shape))


def assemble(cfg: DataConfig, seed: int, src: Source, device: torch.device) -> Dataset:
    """Split, scale, normalise (and, if ``cfg.flatten``, flatten) a classification :class:`Source`."""
    name = cfg.name
    perm = torch.randperm(len(src.y), generator=torch.Generator().manual_seed(seed))
    if src.x_test is None:
        n_test = cfg.test_size if cfg.test_size is not None else round(HELDOUT_TEST_FRACTION * len(perm))
        n_test = _take(n_test, len(perm) - 1, "test_size", name, "examples available for testing")
        test_idx, perm = perm[:n_test], perm[n_test:]
        x_test, y_test = src.x[test_idx], src.y[test_idx]
    else:
        n_test = _take(cfg.test_size, len(src.y_test), "test_size", name, "test examples")
        x_test, y_test = src.x_test[:n_test], src.y_test[:n_test]
    n_val = cfg.val_size if cfg.val_size is not None else round(VAL_FRACTION * len(perm))
    n_val = _take(n_val, len(perm) - 1, "val_size", name, "examples available for validation")
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    train_idx = train_idx[: _take(cfg.train_size, len(train_idx), "train_size", name, "training examples")]

    def prepared(x: Tensor) -> Tensor:
        return x.to(torch.float32).mul_(src.scale)

    xs = {"train": prepared(src.x[train_idx]), "val": prepared(src.x[val_idx]), "test": prepared(x_test)}
    ys = {"train": src.y[train_idx], "val": src.y[val_idx], "test": y_test}
    mean, std = _channel_stats(xs["train"])
    splits = {}
    for key, x in xs.items():
        x = _normalise(x, mean, std)
        if cfg.flatten:
            x = x.flatten(1)  # (also for an empty split, where reshape(0, -1) is ambiguous)
        splits[key] = Split(x.to(device), ys[key].to(torch.int64).to(device))
    info = {
        "name": name,
        "split_seed": seed,
        "sizes": {k: len(s) for k, s in splits.items()},
        "scale": src.scale,
        "normalisation": {"mean": mean.tolist(), "std": std.tolist()},
        "flatten": cfg.flatten,
        **src.info,
    }
    return Dataset(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"] if len(splits["test"]) else None,
        num_classes=src.num_classes,
        input_shape=tuple(splits["train"].x.shape[1:]),
        task="classification",
        info=info,
    )


def lm_sequences(ids: Tensor, seq_len: int) -> Split:
    """Cut a token stream into non-overlapping next-token pairs: x[i] = ids[iT:(i+1)T], y[i] = ids[iT+1:(i+1)T+1]."""
    n = (len(ids) - 1) // seq_len
    return Split(ids[: n * seq_len].reshape(n, seq_len), ids[1 : n * seq_len + 1].reshape(n, seq_len))


def assemble_lm(cfg: DataConfig, streams: dict[str, Tensor], vocab_size: int, info: dict[str, Any], device) -> Dataset:
    """Turn the train/val/test token streams of a language-model corpus into sequence splits.

    The corpus has its own validation and test files, so nothing is drawn at random: ``train_size``,
    ``val_size`` and ``test_size`` keep the first sequences of each stream.
    """
    limits = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    splits = {}
    for key, ids in streams.items():
        s = lm_sequences(ids, cfg.seq_len)
        n = _take(limits[key], len(s), f"{key}_size", cfg.name, f"{key} sequences of {cfg.seq_len} tokens")
        splits[key] = Split(s.x[:n].to(device), s.y[:n].to(device))
    return Dataset(
        name=cfg.name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"] if len(splits["test"]) else None,
        num_classes=vocab_size,
        input_shape=(cfg.seq_len,),
        task="lm",
        info={"name": cfg.name, "sizes": {k: len(s) for k, s in splits.items()}, "seq_len": cfg.seq_len, **info},
    )
