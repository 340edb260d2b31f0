"""Batch augmentation on the batch's device, vectorised over examples and driven by one explicit generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_IMAGE_PAD = 4
MAX_SIGNAL_SHIFT = 3


def image_pad(height: int, width: int) -> int:
    """Crop padding for an image size: 4 px as in the papers' CIFAR runs (1/8 of 32), and 1/8 of the shorter
    side for smaller images (at least 1 px), so 8×8 digits move by one pixel rather than half their size."""
    return min(MAX_IMAGE_PAD, max(1, min(height, width) // 8))


def _draw(generator: torch.Generator, high: int, n: int, device: torch.device) -> Tensor:
    # Drawn on the generator's device so a CPU generator can drive a GPU batch, then moved.
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)


def _crop_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    pad = image_pad(h, w)
    dy = _draw(generator, 2 * pad + 1, n, x.device)
    dx = _draw(generator, 2 * pad + 1, n, x.device)
    flip = _draw(generator, 2, n, x.device).bool()
    rows = dy[:, None] + torch.arange(h, device=x.device)
    j = torch.arange(w, device=x.device)
    # Flipping after cropping reads column w-1-j of the crop, so both fold into one column index.
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - j, j)
    padded = F.pad(x, (pad, pad, pad, pad))
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def _circular_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    n, length = x.shape[0], x.shape[-1]
    shift = _draw(generator, 2 * MAX_SIGNAL_SHIFT + 1, n, x.device) - MAX_SIGNAL_SHIFT
    idx = (torch.arange(length, device=x.device) - shift[:, None]) % length
    if x.ndim == 3:
        idx = idx[:, None, :].expand(-1, x.shape[1], -1)
    return x.gather(-1, idx)


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Randomly augment a batch, returning a new tensor of the same shape on the same device.

    * Images (N, C, H, W): zero-pad by p = :func:`image_pad` (4 px on CIFAR) on every side, crop back to
      H×W at a uniform offset (dy, dx) ∈ {0..2p}², then flip horizontally with probability 1/2. On
      normalised inputs zero is the training mean of each channel.
    * Signals (N, C, L) or (N, L): circular shift by s ∈ {−3..3}, ``out[..., j] = x[..., (j − s) mod L]``.

    Every random draw comes from ``generator`` (none from the global RNG), so a generator in a given state
    always produces the same augmentation.
    """
    if x.ndim == 4:
        return _crop_flip(x, generator)
    if x.ndim in (2, 3):
        return _circular_shift(x, generator)
    raise ValueError(
        f"augment_batch: expected images (N, C, H, W) or signals (N, C, L) / (N, L), got shape {tuple(x.shape)}"
    )
