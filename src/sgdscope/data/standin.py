"""Synthetic stand-ins for the file datasets (``data.synthetic: true``): the named dataset's exact shape, no files.

A stand-in has what the real reader would hand over for the official files, so a run's splits, steps per
epoch, model and measurement sizes are those of the real run:

==============  ===========  =======  =================  ============
dataset         per example  classes  training pool      test set
==============  ===========  =======  =================  ============
cifar10         (3, 32, 32)  10       50,000             10,000
cifar100        (3, 32, 32)  100      50,000             10,000
mnist           (1, 28, 28)  10       60,000             10,000
fashion_mnist   (1, 28, 28)  10       60,000             10,000
tiny_imagenet   (3, 64, 64)  200      500 per class      50 per class
ptb             tokens       10,000   929,589 tokens     73,760 val, 82,430 test tokens
==============  ===========  =======  =================  ============

(``tiny_classes`` / ``tiny_per_class`` cut the Tiny ImageNet stand-in as they cut the real folder.)

Images are ``uint8`` like the files (scale 1/255). Example i of class c is ``x_i = (t_c + u_i) // 2`` with a
fixed per-class template t_c (uniform bytes from a generator seeded :data:`STANDIN_SEED`) and noise u_i
drawn from a generator seeded by (split, i), and ``y_i = hash(split, i) mod C``. So the classes
are learnable and roughly balanced, and every example is a pure function of its index: only the rows the
split keeps are ever generated (a 256-example ``train_size`` builds 256 CIFAR images, not 50,000). Tokens
of the PTB stand-in are drawn from a Zipf-like law (p(w) ∝ 1/(w+1)), ``<eos>``-free, from the same seed.

The run records ``data.synthetic: true`` in its config.yaml and ``source: synthetic stand-in`` in its data
provenance, so a stand-in run cannot pass for a real one. The real readers are untouched by this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from sgdscope.config import DataConfig
from sgdscope.data.core import Source
from sgdscope.errors import ConfigError

STANDIN_SEED = 0
_ROW_CHUNK = 2048  # rows combined at once: bounds the int16 temporaries to ~50 MB on 64×64×3 images


@dataclass(frozen=True)
class Layout:
    """What the official files of an image dataset hold: per-example shape, classes, pool and test sizes."""

    shape: tuple[int, ...]
    classes: int
    n_train: int
    n_test: int


IMAGES: dict[str, Layout] = {
    "cifar10": Layout((3, 32, 32), 10, 50_000, 10_000),
    "cifar100": Layout((3, 32, 32), 100, 50_000, 10_000),
    "mnist": Layout((1, 28, 28), 10, 60_000, 10_000),
    "fashion_mnist": Layout((1, 28, 28), 10, 60_000, 10_000),
    "tiny_imagenet": Layout((3, 64, 64), 200, 500, 50),  # per class, as in the folder
}
PTB_VOCAB = 10_000
PTB_TOKENS = {"train": 929_589, "val": 73_760, "test": 82_430}


def _hash32(v: Tensor) -> Tensor:
    """An integer hash of non-negative int64 values below 2^31 into [0, 2^32) (lowbias32-style mixing), for labels.
    Every intermediate stays below 2^63, so int64 arithmetic never overflows on any device."""
    h = (v * 2654435761) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _labels(split: int, n: int, classes: int) -> Tensor:
    return _hash32((torch.arange(n, dtype=torch.int64) * 2 + split * 0x2545F49 + 1) & 0x7FFFFFFF) % classes


class StandinRows:
    """The images of one stand-in split, generated on indexing: ``rows[idx]`` (an index tensor or a slice)
    is a ``uint8`` tensor (len(idx), *shape) equal to the same rows of the fully built split."""

    def __init__(self, split: int, labels: Tensor, shape: tuple[int, ...], templates: Tensor) -> None:
        self.split, self.labels, self.shape_, self.templates = split, labels, shape, templates

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.shape_)

    def __getitem__(self, idx: Union[Tensor, slice]) -> Tensor:
        idx = torch.arange(len(self))[idx] if isinstance(idx, slice) else torch.as_tensor(idx, dtype=torch.int64)
        d = self.templates.shape[1]
        noise = torch.empty((len(idx), d), dtype=torch.uint8)
        g = torch.Generator()
        for r, i in enumerate(idx.tolist()):
            # one generator seed per (split, example): row i is the same whichever rows are asked with it
            g.manual_seed((STANDIN_SEED << 48) | (self.split << 32) | i)
            torch.randint(0, 256, (d,), generator=g, dtype=torch.uint8, out=noise[r])
        out = torch.empty_like(noise)
        for s in range(0, len(idx), _ROW_CHUNK):  # (t + u) // 2 in int16, a chunk at a time, to bound memory
            t = self.templates[self.labels[idx[s : s + _ROW_CHUNK]]].to(torch.int16)
            out[s : s + len(t)] = ((t + noise[s : s + len(t)]) // 2).to(torch.uint8)
        return out.reshape(len(idx), *self.shape_)


def _info(name: str, **extra: Any) -> dict[str, Any]:
    return {"source": "synthetic stand-in", "mimics": name, "standin_seed": STANDIN_SEED, "files": [], **extra}


def images(cfg: DataConfig) -> Source:
    """The stand-in of an image dataset (see the module docstring), as a :class:`Source` with lazy rows."""
    lay = IMAGES[cfg.name]
    classes, n_train, n_test = lay.classes, lay.n_train, lay.n_test
    if cfg.name == "tiny_imagenet":
        if cfg.tiny_classes is not None and cfg.tiny_classes > classes:
            raise ConfigError(f"data.tiny_classes: {cfg.tiny_classes} exceeds the {classes} classes of tiny_imagenet")
        classes = cfg.tiny_classes or classes
        n_train = classes * min(cfg.tiny_per_class or n_train, n_train)
        n_test = classes * n_test
    d = 1
    for s in lay.shape:
        d *= s
    g = torch.Generator().manual_seed(STANDIN_SEED)
    templates = torch.randint(0, 256, (classes, d), generator=g, dtype=torch.uint8)
    y, yt = _labels(0, n_train, classes), _labels(1, n_test, classes)
    x, xt = StandinRows(0, y, lay.shape, templates), StandinRows(1, yt, lay.shape, templates)
    return Source(x, y, classes, x_test=xt, y_test=yt, scale=1 / 255, info=_info(cfg.name))  # type: ignore[arg-type]


def ptb(cfg: DataConfig) -> tuple[dict[str, Tensor], int, dict[str, Any]]:
    """The PTB stand-in: three token streams of the real lengths over a 10,000-word vocabulary."""
    g = torch.Generator().manual_seed(STANDIN_SEED)
    p = 1.0 / torch.arange(1, PTB_VOCAB + 1, dtype=torch.float64)
    streams = {k: torch.multinomial(p, n, replacement=True, generator=g) for k, n in PTB_TOKENS.items()}
    return streams, PTB_VOCAB, _info("ptb", vocab_size=PTB_VOCAB, tokens=dict(PTB_TOKENS))
