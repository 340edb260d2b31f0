"""Models: parameter counts from hand formulas, output shapes, initialisation and invalid combinations."""

from __future__ import annotations

import math

import pytest
import torch

from sgdscope.config import ModelConfig
from sgdscope.errors import ConfigError
from sgdscope.losses import cross_entropy
from sgdscope.models import build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int, dims: int = 2, bias: bool = True) -> int:
    return cin * cout * k**dims + (cout if bias else 0)


def dense(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def forward_shape(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.randn(2, *shape)).shape)


# ---------------------------------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("batchnorm", [False, True])
def test_mlp_count_and_shape(batchnorm):
    m = build_model(ModelConfig(name="mlp", widths=[500, 350], batchnorm=batchnorm), (40,), 10)
    bn = 2 * (500 + 350) if batchnorm else 0
    assert n_params(m) == dense(40, 500) + dense(500, 350) + dense(350, 10) + bn
    assert forward_shape(m, (40,)) == (2, 10)
    assert forward_shape(build_model(ModelConfig(name="mlp", dropout=0.5), (1, 8, 8), 10), (1, 8, 8)) == (2, 10)


# ---------------------------------------------------------------------------------------------- SimpleCNN


def simplecnn_count(cin: int, f: list[int], k: int, flat_side: int, dims: int, classes: int = 10) -> int:
    convs = conv(cin, f[0], k, dims) + conv(f[0], f[1], k, dims) + conv(f[1], f[2], k, dims) + conv(f[2], f[3], k, dims)
    return convs + dense(f[3] * flat_side**dims, 128) + dense(128, classes)


@pytest.mark.parametrize("padding, flat_side", [("same", 8), ("valid", 6)])  # 32→16→8 vs 32→30→15→13→6
def test_simplecnn_cifar_counts(padding, flat_side):
    m = build_model(ModelConfig(name="simplecnn", padding=padding), (3, 32, 32), 10)
    assert n_params(m) == simplecnn_count(3, [32, 32, 64, 64], 3, flat_side, 2)
    assert forward_shape(m, (3, 32, 32)) == (2, 10)


def test_simplecnn_1d_medium_and_overrides():
    m = build_model(ModelConfig(name="simplecnn", width_factor=0.5), (1, 40), 10)
    assert n_params(m) == simplecnn_count(1, [16, 16, 32, 32], 3, 10, 1)  # ≈48k, as in the CPU plan
    assert forward_shape(m, (1, 40)) == (2, 10)
    medium = build_model(ModelConfig(name="simplecnn", variant="medium"), (1, 40), 10)
    assert n_params(medium) == simplecnn_count(1, [100, 100, 200, 200], 5, 10, 1)
    cfg = ModelConfig(name="simplecnn", filters=[4, 4, 8, 8], kernel_size=5, padding="valid")
    custom = build_model(cfg, (1, 40), 3)
    assert n_params(custom) == simplecnn_count(1, [4, 4, 8, 8], 5, 7, 1, classes=3)  # 40→36→18→14→7
    assert forward_shape(custom, (1, 40)) == (2, 3)


def test_simplecnn_digits_and_init():
    m = build_model(ModelConfig(name="simplecnn", width_factor=0.5, batchnorm=True), (1, 8, 8), 10)
    assert forward_shape(m, (1, 8, 8)) == (2, 10)
    first = m.net[0]
    bound = math.sqrt(6 / (9 * 1 + 9 * 16))  # glorot uniform: fan_in = k²·c_in, fan_out = k²·c_out
    assert first.weight.abs().max() <= bound and torch.count_nonzero(first.bias) == 0
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="simplecnn", padding="valid"), (1, 8, 8), 10)
    assert str(err.value).startswith("model.padding:") and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------- VGG


def test_vgg11_cifar_count():
    m = build_model(ModelConfig(name="vgg11", batchnorm=True), (3, 32, 32), 10)
    channels = [3, 64, 128, 256, 256, 512, 512, 512, 512]
    convs = sum(conv(a, b, 3) + 2 * b for a, b in zip(channels, channels[1:]))  # + BN γ, β
    assert n_params(m) == convs + dense(512, 512) + dense(512, 512) + dense(512, 10)
    assert forward_shape(m, (3, 32, 32)) == (2, 10)


def test_vgg11_small_inputs_skip_pools():
    m = build_model(ModelConfig(name="vgg11", width_factor=0.125), (1, 8, 8), 10)  # 8→4→2→1, then no pool
    assert sum(isinstance(x, torch.nn.MaxPool2d) for x in m.modules()) == 3
    assert forward_shape(m, (1, 8, 8)) == (2, 10)
    assert forward_shape(build_model(ModelConfig(name="vgg11", width_factor=0.125), (1, 40), 10), (1, 40)) == (2, 10)


# ------------------------------------------------------------------------------------------------ ResNet


def resnet_count(n: int, filters=(16, 32, 64), cin: int = 3, bn: bool = True, dims: int = 2, classes: int = 10) -> int:
    bias, norm = not bn, (lambda c: 2 * c if bn else 0)
    total = conv(cin, filters[0], 3, dims, bias)
    prev = filters[0]
    for f in filters:
        for b in range(n):
            total += norm(prev) + conv(prev, f, 3, dims, bias) + norm(f) + conv(f, f, 3, dims, bias)
            total += conv(prev, f, 1, dims, bias) if prev != f else 0
            prev = f
    return total + norm(prev) + dense(prev, classes)


def test_resnet32_with_bn_count():
    m = build_model(ModelConfig(name="resnet32", batchnorm=True), (3, 32, 32), 10)
    assert n_params(m) == resnet_count(5) == 466_714  # ≈0.46M
    assert forward_shape(m, (3, 32, 32)) == (2, 10)


def test_resnet56_and_small_variants():
    assert n_params(build_model(ModelConfig(name="resnet56", batchnorm=True), (3, 32, 32), 10)) == resnet_count(9)
    cfg = ModelConfig(name="resnet32", blocks_per_stage=1, width_factor=0.5)
    m = build_model(cfg, (1, 40), 10)
    assert n_params(m) == resnet_count(1, (8, 16, 32), cin=1, bn=False, dims=1)
    assert forward_shape(m, (1, 40)) == (2, 10)
    assert forward_shape(build_model(cfg, (1, 8, 8), 10), (1, 8, 8)) == (2, 10)


def test_resnet_without_bn_uses_depth_scaled_init():
    torch.manual_seed(0)
    m = build_model(ModelConfig(name="resnet32"), (3, 32, 32), 10)
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 15 + 2  # stem, two per block, two shortcuts
    standardised = []
    for c in convs:
        expected = math.sqrt(2 / (15 * c.weight[0].numel()))  # scale 2/blocks over fan_in
        if c.weight.numel() >= 9000:
            assert c.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert c.weight.abs().max() <= 2 * expected / 0.8796 + 1e-6  # truncated at ±2σ'
        assert torch.count_nonzero(c.bias) == 0
        standardised.append(c.weight.flatten() / expected)
    assert torch.cat(standardised).std().item() == pytest.approx(1.0, rel=0.02)


# -------------------------------------------------------------------------------------------------- LSTM


def test_lstm_count_shape_and_loss():
    vocab, e, h = 50, 16, 20
    m = build_model(ModelConfig(name="lstm", embed=e, hidden=h, layers=2, dropout=0.1), (7,), vocab, task="lm")
    lstm = 4 * h * (e + h) + 8 * h + 4 * h * (h + h) + 8 * h  # two layers, each with two bias vectors
    assert n_params(m) == vocab * e + lstm + dense(h, vocab)
    m.eval()  # no dropout: the causality check below compares two forward passes
    tokens = torch.randint(0, vocab, (3, 7))
    out = m(tokens)
    assert out.shape == (3, 7, vocab)
    # At initialisation the next-token distribution is close to uniform: the loss is about log(vocab).
    loss = float(cross_entropy(out, torch.randint(0, vocab, (3, 7))).detach())
    assert loss == pytest.approx(math.log(vocab), abs=0.15)
    # A language model is causal: changing token 4 changes the outputs from position 4 on, never before.
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % vocab
    out2 = m(changed)
    assert torch.equal(out[:, :4], out2[:, :4])
    assert (out[:, 4:] - out2[:, 4:]).abs().amax(dim=-1).min() > 0


# ---------------------------------------------------------------------------------------- invalid combos


@pytest.mark.parametrize(
    "kwargs, shape, task, field",
    [
        ({"name": "lstm"}, (3, 32, 32), None, "model.name"),
        ({"name": "lstm"}, (64,), "classification", "model.name"),
        ({"name": "mlp"}, (20,), "lm", "model.name"),
        ({"name": "simplecnn"}, (40,), None, "model.name"),
        ({"name": "resnet32"}, (64,), None, "model.name"),
        ({"name": "vgg11", "filters": [1, 2, 3, 4]}, (3, 32, 32), None, "model.filters"),
        ({"name": "mlp", "padding": "valid"}, (64,), None, "model.padding"),
        ({"name": "lstm", "batchnorm": True}, (20,), "lm", "model.batchnorm"),
        ({"name": "simplecnn", "filters": [8, 8]}, (1, 8, 8), None, "model.filters"),
        ({"name": "mlp", "widths": [10, 0]}, (64,), None, "model.widths"),
    ],
)
def test_invalid_combinations_are_config_errors(kwargs, shape, task, field):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(**kwargs), shape, 10, task=task)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)
