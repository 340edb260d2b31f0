"""Pieces shared by the convolutional models: 1-D/2-D layer families, channel scaling and initialisers.

Initialisers draw from the global torch RNG, so seeding it before :func:`sgdscope.models.build_model`
fixes the initial parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from sgdscope.errors import ConfigError

# Std of a standard normal truncated to ±2σ; Keras divides by it so the truncated draw keeps the target std.
TRUNCATED_NORMAL_STD = 0.87962566103423978


@dataclass(frozen=True)
class ConvOps:
    """The layer classes for inputs with one (C, L) or two (C, H, W) spatial dimensions."""

    conv: type
    bn: type
    pool: type


def conv_ops(input_shape: tuple[int, ...], model_name: str) -> ConvOps:
    """Pick Conv2d/BatchNorm2d/MaxPool2d for (C, H, W) inputs and their 1-D twins for (C, L)."""
    if len(input_shape) == 3:
        return ConvOps(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
    if len(input_shape) == 2:
        return ConvOps(nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
    raise ConfigError(
        f"model.name: {model_name} needs images (C, H, W) or signals (C, L), got input shape {tuple(input_shape)}"
        " (set data.flatten=false)"
    )


def scaled(channels: int, width_factor: float) -> int:
    """``channels`` multiplied by ``model.width_factor``, rounded, at least 1."""
    return max(1, round(channels * width_factor))


def maybe_dropout(p: float) -> nn.Module:
    """A Dropout layer, or Identity when ``p`` is 0 (so dropout-free models hold no random layers)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def zero_bias(m: nn.Module) -> None:
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)


def glorot_uniform_(m: nn.Module) -> None:
    """Keras' default: W ~ U(−a, a), a = √(6 / (fan_in + fan_out)), bias 0."""
    nn.init.xavier_uniform_(m.weight)
    zero_bias(m)


def he_normal_fan_out_(m: nn.Module) -> None:
    """He-normal on fan-out, σ = √(2 / (k^d · out_channels)), bias 0 (the Walk-with-SGD code's conv init)."""
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    zero_bias(m)


def variance_scaling_(weight: Tensor, scale: float) -> None:
    """Keras-2.2 ``VarianceScaling(scale, mode='fan_in', distribution='normal')``.

    A normal truncated at ±2 of its σ′, with σ′ = √(scale / fan_in) / 0.8796 so that the truncated draw has
    standard deviation √(scale / fan_in).
    """
    fan_in = weight[0].numel()
    std = math.sqrt(scale / fan_in) / TRUNCATED_NORMAL_STD
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
