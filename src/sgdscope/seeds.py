"""The one seed formula: every random stream of a run is a pure function of (run seed, tag, index).

Training (the minibatch permutation of pass p, the augmentation of step t, isotropic noise) and every
measurement (eigensolver start vectors, minibatch gradients, dropout masks, random control directions)
draw from generators seeded here, each stream under its own tag, so no stream can shift another: adding a
probe never changes the batches training sees, and a resumed run recomputes every stream exactly.
"""

from __future__ import annotations

import zlib

import torch

_MOD = 2**63 - 1


def seed_for(seed: int, tag: str, i: int = 0) -> int:
    """s = (seed·1000003 + crc32(tag)·7919 + i) mod (2⁶³ − 1): distinct tags give unrelated streams.

    >>> seed_for(0, "pass", 0) == seed_for(0, "pass", 0) != seed_for(0, "pass", 1)
    True
    """
    return (seed * 1_000_003 + zlib.crc32(tag.encode()) * 7919 + i) % _MOD


def generator(seed: int, tag: str, i: int = 0, device: torch.device | str | None = None) -> torch.Generator:
    """A fresh generator on ``device`` seeded by :func:`seed_for`: reproducible and isolated from the
    global RNG that training uses."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    g.manual_seed(seed_for(seed, tag, i))
    return g
