"""The models of both papers: MLP, SimpleCNN, VGG-11, pre-activation ResNet-32/56 and an LSTM language model.

``build_model(cfg, input_shape, num_classes)`` checks that the model fits the data and that no setting
meant for another model is given, then builds it. Initialisation draws from the global torch RNG.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from sgdscope.config import ModelConfig
from sgdscope.errors import ConfigError
from sgdscope.models.lstm import LSTMLanguageModel
from sgdscope.models.mlp import MLP
from sgdscope.models.resnet import PreActResNet
from sgdscope.models.simplecnn import SimpleCNN
from sgdscope.models.vgg import VGG11

__all__ = ["build_model", "MLP", "SimpleCNN", "VGG11", "PreActResNet", "LSTMLanguageModel"]

_CNNS = ("simplecnn", "vgg11", "resnet32", "resnet56")
# Keys that only some models read; a non-default value for any other model is rejected, not ignored.
_OWNERS = {
    "widths": ("mlp",),
    "filters": ("simplecnn",),
    "kernel_size": ("simplecnn",),
    "padding": ("simplecnn",),
    "variant": ("simplecnn",),
    "width_factor": _CNNS,
    "blocks_per_stage": ("resnet32", "resnet56"),
    "batchnorm": ("mlp",) + _CNNS,
    "hidden": ("lstm",),
    "layers": ("lstm",),
    "embed": ("lstm",),
}

_BUILDERS: dict[str, Callable[[ModelConfig, tuple[int, ...], int], nn.Module]] = {
    "mlp": lambda cfg, shape, k: MLP(shape, cfg.widths, k, cfg.batchnorm, cfg.dropout),
    "simplecnn": SimpleCNN,
    "vgg11": VGG11,
    "resnet32": PreActResNet,
    "resnet56": PreActResNet,
    "lstm": lambda cfg, shape, k: LSTMLanguageModel(k, cfg.embed, cfg.hidden, cfg.layers, cfg.dropout),
}


def _check(cfg: ModelConfig, input_shape: tuple[int, ...], task: Optional[str]) -> None:
    for key, owners in _OWNERS.items():
        value = getattr(cfg, key)
        if cfg.name not in owners and value != ModelConfig.model_fields[key].get_default(call_default_factory=True):
            raise ConfigError(f"model.{key}: applies only to {', '.join(owners)}, not {cfg.name}; got {value!r}")
    if cfg.name == "lstm" and (task == "classification" or len(input_shape) != 1):
        raise ConfigError(
            f"model.name: lstm is a language model over token sequences (seq_len,), but the data is "
            f"{task or 'shaped'} {tuple(input_shape)}; use data.name=ptb or another model"
        )
    if cfg.name != "lstm" and task == "lm":
        raise ConfigError(f"model.name: {cfg.name} cannot model token sequences; use model.name=lstm for data.name=ptb")
    if cfg.name == "mlp" and min(cfg.widths, default=1) < 1:
        raise ConfigError(f"model.widths: hidden widths must be positive; got {cfg.widths}")


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, task: Optional[str] = None
) -> nn.Module:
    """Build ``cfg.name`` for per-example ``input_shape`` and ``num_classes`` outputs (vocabulary size for lm).

    ``task`` ("classification" or "lm", as in :class:`sgdscope.data.Dataset`) is optional; given, it
    also rejects a classifier on token data. Raises a one-line ConfigError naming the offending field.
    """
    input_shape = tuple(int(s) for s in input_shape)
    _check(cfg, input_shape, task)
    return _BUILDERS[cfg.name](cfg, input_shape, num_classes)
