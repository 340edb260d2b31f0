"""Measurement policies: how BatchNorm, dropout and random streams behave while a probe measures.

Every measurement runs inside :func:`measurement_mode`, which guarantees that the training trajectory is
not perturbed: the model's train/eval flags, the BatchNorm running statistics and the global torch RNG
states are exactly as before when the context exits (except under ``"train"``, which is documented as
perturbing because it reproduces the original scripts).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

BN_POLICIES = ("eval", "train-restore", "train")

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def check_policy(policy: str) -> str:
    """Return ``policy`` if it is a known BN policy, else raise ConfigError naming the allowed values."""
    from sgdscope.errors import ConfigError

    if policy not in BN_POLICIES:
        raise ConfigError(f"bn_policy: {policy!r} is not one of {', '.join(BN_POLICIES)}")
    return policy


def norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of the model's BatchNorm layers (running statistics, batch counts), by qualified name."""
    return {
        f"{mod_name}.{b_name}" if mod_name else b_name: b
        for mod_name, mod in model.named_modules()
        if isinstance(mod, _NORM_TYPES)
        for b_name, b in mod.named_buffers(recurse=False)
    }


@contextlib.contextmanager
def rng_preserved(device: torch.device | None = None) -> Iterator[None]:
    """Save and restore the CPU (and, if used, the CUDA) global RNG state around a block."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def measurement_mode(model: nn.Module, policy: str = "train-restore") -> Iterator[nn.Module]:
    """Put ``model`` in the mode named by ``policy`` for a measurement, and undo it afterwards.

    * ``"eval"``: ``model.eval()``: BN uses running statistics, dropout is off.
    * ``"train-restore"``: ``model.train()``: BN uses batch statistics (what SGD experiences); the BN
      running statistics, the per-module train flags and the RNG states are saved and restored, so any
      number of forward passes leaves no trace.
    * ``"train"``: ``model.train()`` with running statistics updated, as the original scripts did.
      Only the train flags are restored.
    """
    check_policy(policy)
    flags = [(m, m.training) for m in model.modules()]
    saved = [b.detach().clone() for b in norm_buffers(model).values()] if policy == "train-restore" else None
    with rng_preserved() if policy != "train" else contextlib.nullcontext():
        try:
            model.train(policy != "eval")
            yield model
        finally:
            if saved is not None:
                with torch.no_grad():
                    for b, s in zip(norm_buffers(model).values(), saved):
                        b.copy_(s)
            for m, f in flags:
                m.training = f
