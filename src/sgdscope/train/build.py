"""Building a run from its config: the device, the minibatch stream, the optimizer, the measurement subset.

Determinism is by construction. The minibatch of step t is a pure function of (seed, t): pass
p = t // batches_per_pass is a permutation drawn from a generator seeded by (seed, p), and augmentation of
step t draws from a generator seeded by (seed, t) (:mod:`sgdscope.seeds`). So a run resumed at any
checkpoint sees exactly the batches the uninterrupted run saw, and probes, which use their own
generators, cannot shift them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sgdscope import seeds
from sgdscope.config import RunConfig
from sgdscope.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use auto or cpu")
    return torch.device(name)


class BatchStream:
    """Minibatch indices as a pure function of the step (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.n, self.bs, self.seed, self.device = n, min(batch_size, n), seed, device
        self.per_pass = math.ceil(n / self.bs)
        self._cache: tuple[int, Tensor] | None = None

    def indices(self, step: int) -> Tensor:
        p, i = divmod(step, self.per_pass)
        if self._cache is None or self._cache[0] != p:
            g = seeds.generator(self.seed, "pass", p)
            self._cache = (p, torch.randperm(self.n, generator=g).to(self.device))
        return self._cache[1][i * self.bs : (i + 1) * self.bs]


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD (momentum optional), Nudged-SGD, or Adam (``betas``, ``eps``); for all of them L2 is the
    explicit loss term ``optimizer.weight_decay``·Σw², so Adam's own weight_decay is 0 (L2-regularised Adam,
    not AdamW: see config.OptimizerConfig)."""
    o = cfg.optimizer
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=0.0)
    if o.name == "nsgd":
        from sgdscope.optim import NudgedSGD

        return NudgedSGD(params, lr=o.lr, momentum=o.momentum, gamma=o.gamma, mode=o.mode)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum)


def measure_subset(cfg: RunConfig, n: int, device: torch.device) -> Tensor:
    """The seeded, fixed measurement subset: max(⌈subset·n⌉, min_subset) sorted indices (at most n)."""
    m = cfg.measure
    size = min(n, max(math.ceil(m.subset * n), m.min_subset))
    g = seeds.generator(cfg.seed, "measure-subset", 0)
    return torch.randperm(n, generator=g)[:size].sort().values.to(device)


def steps_per_epoch(cfg: RunConfig, stream: BatchStream) -> int:
    """1 for full-batch GD; ⌈epoch_size / batch⌉ with ``train.epoch_size``; else one pass over the data."""
    if cfg.optimizer.name in ("gd", "noisy_gd"):
        return 1
    if cfg.train.epoch_size:
        return max(1, math.ceil(cfg.train.epoch_size / stream.bs))
    return stream.per_pass
