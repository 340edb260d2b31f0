"""SimpleCNN of Jastrzebski et al. (2019, App. F), in 2-D for images and 1-D for signals."""

from __future__ import annotations

import math

from torch import Tensor, nn

from sgdscope.config import ModelConfig
from sgdscope.errors import ConfigError
from sgdscope.models.layers import conv_ops, glorot_uniform_, maybe_dropout, scaled

# (filters of conv1..conv4, kernel size) per variant; "medium" is the NSGD model of the paper's footnote 10.
VARIANTS = {"standard": ([32, 32, 64, 64], 3), "medium": ([100, 100, 200, 200], 5)}
HIDDEN = 128


class SimpleCNN(nn.Module):
    """conv1 → ReLU → conv2 → ReLU → maxpool 2 → conv3 → ReLU → conv4 → ReLU → maxpool 2 → FC 128 → ReLU
    → FC, with 3×3 kernels and 32, 32, 64, 64 filters (standard) or 5×5 and 100, 100, 200, 200 (medium).

    conv1 and conv3 use 'same' padding; conv2 and conv4 use ``cfg.padding`` ('same' as the paper states,
    'valid' as the released code does). With ``cfg.batchnorm`` a BatchNorm follows every conv and the hidden
    FC; with ``cfg.dropout`` a Dropout precedes each FC. Glorot-uniform weights, zero biases.
    """

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        ops = conv_ops(input_shape, "simplecnn")
        filters, kernel = VARIANTS[cfg.variant]
        if cfg.filters is not None:
            if len(cfg.filters) != 4 or min(cfg.filters) < 1:
                raise ConfigError(
                    f"model.filters: simplecnn needs 4 positive filter counts (conv1..conv4); got {cfg.filters}"
                )
            filters = cfg.filters
        kernel = cfg.kernel_size or kernel
        channels, size = input_shape[0], list(input_shape[1:])
        trace = ["×".join(map(str, size))]
        layers: list[nn.Module] = []
        for i, f in enumerate(filters):
            f = scaled(f, cfg.width_factor)
            padding = cfg.padding if i % 2 else "same"
            norm = ops.bn(f) if cfg.batchnorm else nn.Identity()
            layers += [ops.conv(channels, f, kernel, padding=padding), norm, nn.ReLU()]
            if padding == "valid":
                size = [s - kernel + 1 for s in size]
            if i % 2:
                layers.append(ops.pool(2))
                size = [s // 2 for s in size]
            trace.append("×".join(map(str, size)))
            if min(size) < 1:
                raise self._too_small(cfg, input_shape, kernel, trace)
            channels = f
        layers += [nn.Flatten(), maybe_dropout(cfg.dropout), nn.Linear(channels * math.prod(size), HIDDEN)]
        layers += [nn.BatchNorm1d(HIDDEN) if cfg.batchnorm else nn.Identity(), nn.ReLU()]
        layers += [maybe_dropout(cfg.dropout), nn.Linear(HIDDEN, num_classes)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                glorot_uniform_(m)

    @staticmethod
    def _too_small(cfg: ModelConfig, input_shape: tuple[int, ...], kernel: int, trace: list[str]) -> ConfigError:
        path = " → ".join(trace)
        if cfg.padding == "valid":
            return ConfigError(
                f"model.padding: 'valid' with kernel {kernel} shrinks the input {tuple(input_shape)} to nothing "
                f"({path}); use model.padding=same or a smaller model.kernel_size"
            )
        return ConfigError(
            f"model.name: simplecnn needs inputs at least 4 wide (two 2× max-pools); got {tuple(input_shape)}"
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
