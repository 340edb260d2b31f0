"""Pre-activation ResNets for CIFAR-sized inputs (ResNet-32 / ResNet-56), with or without BatchNorm."""

from __future__ import annotations

from torch import Tensor, nn

from sgdscope.config import ModelConfig
from sgdscope.models.layers import ConvOps, conv_ops, glorot_uniform_, he_normal_fan_out_, maybe_dropout, scaled
from sgdscope.models.layers import variance_scaling_, zero_bias

BLOCKS_PER_STAGE = {"resnet32": 5, "resnet56": 9}
STAGE_FILTERS = (16, 32, 64)


class PreActBlock(nn.Module):
    """[BN] → ReLU → conv 3×3 (stride) → [BN] → ReLU → [Dropout] → conv 3×3, plus the shortcut.

    The shortcut is the identity, or a 1×1 conv with the block's stride when the shape changes; that conv
    reads the pre-activated input, as in He et al. (2016, "Identity mappings").
    """

    def __init__(self, ops: ConvOps, cin: int, cout: int, stride: int, batchnorm: bool, dropout: float):
        super().__init__()
        self.bn1 = ops.bn(cin) if batchnorm else nn.Identity()
        self.conv1 = ops.conv(cin, cout, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn2 = ops.bn(cout) if batchnorm else nn.Identity()
        self.dropout = maybe_dropout(dropout)
        self.conv2 = ops.conv(cout, cout, 3, padding=1, bias=not batchnorm)
        reshapes = stride != 1 or cin != cout
        self.shortcut = ops.conv(cin, cout, 1, stride=stride, bias=not batchnorm) if reshapes else None

    def forward(self, x: Tensor) -> Tensor:
        a = self.bn1(x).relu()
        skip = x if self.shortcut is None else self.shortcut(a)
        h = self.conv2(self.dropout(self.bn2(self.conv1(a)).relu()))
        return h + skip


class PreActResNet(nn.Module):
    """conv 3×3 (16) → 3 stages of n :class:`PreActBlock` (16/32/64 filters, stride 2 entering stages 2 and
    3) → [BN] → ReLU → global average pool → Linear. Filters are multiplied by ``cfg.width_factor``.

    Convs carry a bias only without BN (where the original Keras model had one). Initialisation:

    * with BN: He-normal (fan-out) convs, BN γ = 1, β = 0;
    * without BN, the depth-scaled init of Taki (2017) used by Jastrzebski et al.: every conv (stem,
      blocks, shortcuts) is VarianceScaling with scale s = 2 / (3n), i.e. std √(s / fan_in), drawn as in
      Keras 2.2 from a ±2σ truncated normal rescaled by 1/0.8796 so the std is exactly that (see
      :func:`~sgdscope.models.layers.variance_scaling_`).

    The final Linear is Glorot-uniform in both cases; all biases start at 0.
    """

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        ops = conv_ops(input_shape, cfg.name)
        n = cfg.blocks_per_stage or BLOCKS_PER_STAGE[cfg.name]
        filters = [scaled(f, cfg.width_factor) for f in STAGE_FILTERS]
        self.stem = ops.conv(input_shape[0], filters[0], 3, padding=1, bias=not cfg.batchnorm)
        blocks, cin = [], filters[0]
        for stage, cout in enumerate(filters):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(PreActBlock(ops, cin, cout, stride, cfg.batchnorm, cfg.dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = ops.bn(cin) if cfg.batchnorm else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)
        convs = [m for m in self.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
        for conv in convs:
            if cfg.batchnorm:
                he_normal_fan_out_(conv)
            else:
                variance_scaling_(conv.weight, 2.0 / len(blocks))
                zero_bias(conv)
        glorot_uniform_(self.fc)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.blocks(self.stem(x))).relu()
        return self.fc(h.flatten(2).mean(-1))
