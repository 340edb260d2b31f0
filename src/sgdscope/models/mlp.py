"""Fully connected classifier, as in the Walk-with-SGD MLP (Linear → BatchNorm1d → ReLU per hidden layer)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from sgdscope.models.layers import maybe_dropout


class MLP(nn.Module):
    """Flatten, then for each hidden width: Linear → [BatchNorm1d] → ReLU → [Dropout]; a final Linear.

    Linear layers keep PyTorch's default initialisation, as the Walk-with-SGD code did.
    """

    def __init__(
        self, input_shape: tuple[int, ...], widths: list[int], num_classes: int, batchnorm: bool, dropout: float
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for w in widths:
            layers += [nn.Linear(fan_in, w), nn.BatchNorm1d(w) if batchnorm else nn.Identity(), nn.ReLU()]
            layers.append(maybe_dropout(dropout))
            fan_in = w
        layers.append(nn.Linear(fan_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
