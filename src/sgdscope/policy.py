"""Measurement policies: how BatchNorm, dropout and random streams behave while a probe measures.

Every measurement runs inside :func:`measurement_mode`, which guarantees that the training trajectory is
not perturbed: the model's train/eval flags, the BatchNorm running statistics and the global torch RNG
states are exactly as before when the context exits (except the running statistics under ``"train"``,
which is documented as perturbing because it reproduces the original scripts).

Inside a measurement every forward pass on data batch b runs under :func:`fixed_masks` (common random
numbers): the global RNG is seeded from the measurement's mask seed and b, so dropout draws the same
masks for batch b at every point and in every product of one measurement, and the measurement is a
deterministic function of the parameters. The RNG state that training uses is restored around each such
pass, so it is untouched under every policy.
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


DEFAULT_MASK_SEED = 0
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    # SplitMix64's finaliser: a bijection on 64-bit words that scatters nearby inputs, so the streams of
    # (seed, b) and (seed, b + 1) or (seed + 1, b) share no structure.
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mask_stream_seed(seed: int | None, index: int) -> int:
    """The RNG seed of the masks of batch (or minibatch) ``index`` in a measurement with mask seed
    ``seed``: s = splitmix64(splitmix64(seed) ⊕ index), cut to 63 bits (what ``manual_seed`` accepts on
    every backend). ``None`` means :data:`DEFAULT_MASK_SEED`.

    >>> mask_stream_seed(None, 3) == mask_stream_seed(0, 3) != mask_stream_seed(0, 4)
    True
    """
    seed = DEFAULT_MASK_SEED if seed is None else int(seed)
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (int(index) & _MASK64)) >> 1


@contextlib.contextmanager
def fixed_masks(seed: int | None, batch_index: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block with the global RNG seeded from ``(seed, batch_index)``, then restore the RNG states.

    This is the one mechanism behind the common random numbers of a measurement: every forward pass on
    batch b of a measurement runs inside ``fixed_masks(mask_seed, b, device)``, so dropout (and any other
    layer that draws from the global RNG) sees the same random numbers at every parameter point, in every
    Hessian-vector product and in the gradient, whichever way the pass is computed (plain autograd,
    ``torch.func`` transforms, ``vmap(..., randomness="same")``). The CPU generator is always seeded; the
    CUDA generator of ``device`` too when ``device`` is a CUDA device. All RNG states are saved before and
    restored after (:func:`rng_preserved`), so training's random streams are exactly as they were.

    >>> with fixed_masks(7, 0):
    ...     a = torch.rand(2)
    >>> with fixed_masks(7, 0):
    ...     b = torch.rand(2)
    >>> torch.equal(a, b)
    True
    """
    s = mask_stream_seed(seed, batch_index)
    dev = torch.device(device) if device is not None else None
    with rng_preserved():
        torch.random.default_generator.manual_seed(s)
        # Only an initialised CUDA is seeded: seeding an uninitialised one would queue the seed for its
        # lazy initialisation and so change training's CUDA stream later.
        if dev is not None and dev.type == "cuda" and torch.cuda.is_initialized():
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(s)
        yield


@contextlib.contextmanager
def measurement_mode(model: nn.Module, policy: str = "train-restore") -> Iterator[nn.Module]:
    """Put ``model`` in the mode named by ``policy`` for a measurement, and undo it afterwards.

    * ``"eval"``: ``model.eval()``: BN uses running statistics, dropout is off.
    * ``"train-restore"``: ``model.train()``: BN uses batch statistics (what SGD experiences); the BN
      running statistics, the per-module train flags and the RNG states are saved and restored, so any
      number of forward passes leaves no trace.
    * ``"train"``: ``model.train()`` with running statistics updated, as the original scripts did.
      The train flags and the RNG states are restored.

    Dropout masks are not drawn from training's stream under any policy: the kernels seed each forward
    pass with :func:`fixed_masks`.
    """
    check_policy(policy)
    flags = [(m, m.training) for m in model.modules()]
    saved = [b.detach().clone() for b in norm_buffers(model).values()] if policy == "train-restore" else None
    with rng_preserved():
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
