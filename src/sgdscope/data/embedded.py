"""Datasets that need no files: scikit-learn's digits, MNIST-1D (generated) and a synthetic teacher-student set."""

from __future__ import annotations

import random

import numpy as np
import torch

from sgdscope.config import DataConfig
from sgdscope.data.core import Source
from sgdscope.errors import ConfigError

# The synthetic set is a fixed dataset, like the other embedded ones: only the split follows the run seed.
SYNTHETIC_SEED = 0
TEACHER_HIDDEN = 64


def digits(cfg: DataConfig) -> Source:
    """scikit-learn's 1,797 8×8 digits as (1, 8, 8) images with values 0..16 (scaled by 1/16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).to(torch.float32).unsqueeze(1)
    return Source(x, torch.from_numpy(d.target), 10, scale=1 / 16, info={"source": "sklearn.datasets.load_digits"})


def mnist1d(cfg: DataConfig) -> Source:
    """MNIST-1D generated offline with the package's default arguments and ``cfg.mnist1d_samples`` examples.

    Signals are (1, 40); the package's own 80/20 split gives the test set. The generator reseeds the
    global ``random`` and ``numpy`` streams, so both are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = cfg.mnist1d_samples
    if args.num_samples < 20:
        raise ConfigError(
            f"data.mnist1d_samples: needs at least 20 (2 per class for train and test); got {args.num_samples}"
        )
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def signals(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).unsqueeze(1)

    return Source(
        signals(d["x"]),
        torch.from_numpy(np.asarray(d["y"], dtype=np.int64)),
        10,
        x_test=signals(d["x_test"]),
        y_test=torch.from_numpy(np.asarray(d["y_test"], dtype=np.int64)),
        info={"source": "mnist1d.data.make_dataset", "mnist1d_seed": args.seed, "mnist1d_samples": args.num_samples},
    )


def synthetic(cfg: DataConfig) -> Source:
    """A teacher-student set: ``n_samples`` standard-normal inputs of shape ``cfg.input_shape``, labelled by a
    fixed random teacher.

    The teacher is a one-hidden-layer tanh network on the flattened input,
    ``z = W₂ tanh(W₁ x / √D) / √H`` with Gaussian W₁ (H×D), W₂ (C×H), H = 64; the label is
    ``argmax_c (z_c − mean_n z_c)``, the centring keeping the classes roughly balanced.
    """
    shape = tuple(cfg.input_shape)
    if not shape or min(shape) < 1:
        raise ConfigError(f"data.input_shape: must be a non-empty list of positive sizes; got {list(shape)}")
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    x = torch.randn((cfg.n_samples, *shape), generator=g)
    flat = x.reshape(cfg.n_samples, -1)
    w1 = torch.randn(flat.shape[1], TEACHER_HIDDEN, generator=g)
    w2 = torch.randn(TEACHER_HIDDEN, cfg.num_classes, generator=g)
    z = torch.tanh(flat @ w1 / flat.shape[1] ** 0.5) @ w2 / TEACHER_HIDDEN**0.5
    y = (z - z.mean(0)).argmax(1)
    info = {"source": "teacher-student", "data_seed": SYNTHETIC_SEED, "teacher_hidden": TEACHER_HIDDEN}
    return Source(x, y, cfg.num_classes, info=info)
