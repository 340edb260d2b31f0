"""Datasets as tensors on the run's device (no DataLoader), readers for the standard files, augmentation.

``load_dataset(cfg, seed, device)`` returns a :class:`Dataset` whose splits already live on ``device``;
see :mod:`sgdscope.data.core` for the split and normalisation rules.
"""

from __future__ import annotations

from typing import Callable

import torch

from sgdscope.config import DataConfig
from sgdscope.data import embedded, readers, standin
from sgdscope.data.augment import augment_batch
from sgdscope.data.core import Dataset, Source, Split, assemble, assemble_lm
from sgdscope.errors import ConfigError

__all__ = ["Dataset", "Split", "augment_batch", "load_dataset"]

_CLASSIFICATION: dict[str, Callable[[DataConfig], Source]] = {
    "digits": embedded.digits,
    "mnist1d": embedded.mnist1d,
    "synthetic": embedded.synthetic,
    "cifar10": readers.read_cifar,
    "cifar100": readers.read_cifar,
    "mnist": readers.read_mnist,
    "fashion_mnist": readers.read_mnist,
    "tiny_imagenet": readers.read_tiny_imagenet,
}
_IMAGES = {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "tiny_imagenet"}


def load_dataset(cfg: DataConfig, seed: int, device: torch.device | str = "cpu") -> Dataset:
    """Read or generate the dataset named by ``cfg.name``, split it with ``seed`` and move it to ``device``.

    With ``cfg.synthetic`` a file dataset is replaced by its stand-in of the same shape
    (:mod:`sgdscope.data.standin`) and no file is read. Raises :class:`~sgdscope.errors.DataError` for missing or malformed files and
    :class:`~sgdscope.errors.ConfigError` for settings the data cannot satisfy.
    """
    device = torch.device(device)
    if cfg.augment and cfg.name == "ptb":
        raise ConfigError("data.augment: ptb is text and has no augmentation; set data.augment=false")
    if cfg.augment and cfg.flatten and cfg.name in _IMAGES:
        raise ConfigError(
            f"data.augment: flattened {cfg.name} images cannot be cropped or flipped; set data.flatten=false "
            "(the MLP flattens its input itself)"
        )
    if cfg.name == "ptb":
        streams, vocab_size, info = (standin.ptb if cfg.synthetic else readers.read_ptb)(cfg)
        return assemble_lm(cfg, streams, vocab_size, info, device)
    return assemble(cfg, seed, (standin.images if cfg.synthetic else _CLASSIFICATION[cfg.name])(cfg), device)
