"""VGG-11 (configuration A) for CIFAR-sized inputs, as in the Walk-with-SGD code."""

from __future__ import annotations

import math

from torch import Tensor, nn

from sgdscope.config import ModelConfig
from sgdscope.models.layers import conv_ops, he_normal_fan_out_, maybe_dropout, scaled

CFG_A = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
CLASSIFIER_WIDTH = 512


class VGG11(nn.Module):
    """Configuration A of 3×3 'same' convs ([BN] → ReLU after each) and 2× max-pools, then a classifier
    Linear(·, 512) → ReLU → Linear(512, 512) → ReLU → Linear(512, classes) ([Dropout] before the first two).

    Channels and the classifier width are multiplied by ``cfg.width_factor``. A max-pool is skipped when
    its input is already under 2 wide, so small inputs (8×8 digits: 8→4→2→1, then no more pools) keep
    every conv layer instead of collapsing to nothing. Convs: He-normal (fan-out), zero bias; Linear
    layers: PyTorch's default, as in the original code.
    """

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        ops = conv_ops(input_shape, "vgg11")
        channels, size = input_shape[0], list(input_shape[1:])
        layers: list[nn.Module] = []
        for v in CFG_A:
            if v == "M":
                if min(size) >= 2:
                    layers.append(ops.pool(2))
                    size = [s // 2 for s in size]
                continue
            out = scaled(v, cfg.width_factor)
            norm = ops.bn(out) if cfg.batchnorm else nn.Identity()
            layers += [ops.conv(channels, out, 3, padding=1), norm, nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        width = scaled(CLASSIFIER_WIDTH, cfg.width_factor)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            maybe_dropout(cfg.dropout),
            nn.Linear(channels * math.prod(size), width),
            nn.ReLU(),
            maybe_dropout(cfg.dropout),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )
        for m in self.features:
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                he_normal_fan_out_(m)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
