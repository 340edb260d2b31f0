"""Shared test fixtures: a case matrix of small models, as curvlinops' test suite has.

Each case is a tiny model that sgdscope does not define (plain ``nn.Sequential`` or a small ``nn.Module``
written here), its loss function (written here too, so an oracle built on it does not reuse the package's
losses) and a few ``(x, y)`` batches of uneven sizes, all on CPU in float64 so dense oracles agree with the
package to round-off. The ids are stable: tests select and report cases by them.

* ``mlp``: Linear-Tanh-Linear, cross-entropy.
* ``cnn_bn``: Conv2d-BatchNorm2d-Tanh-Linear, cross-entropy; the running statistics are set away from their
  initial (0, 1) so that "eval" and batch statistics give different Hessians.
* ``lstm``: Embedding-LSTM-Linear next-token model, cross-entropy over every token (a batch's weight is its
  number of tokens).
* ``frozen_layer``: a three-layer MLP whose middle layer has ``requires_grad=False``, mean squared error on
  two regression targets (a loss other than cross-entropy).
* ``dropout``: Linear-Tanh-Dropout-Linear, cross-entropy.

Use the ``case`` fixture (parametrized over every id) or ``make_case(id)`` for one of them; each call
builds a fresh model, so a test may change it in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

F64 = torch.float64
CASE_IDS = ("mlp", "cnn_bn", "lstm", "frozen_layer", "dropout")


@dataclass
class Case:
    """One entry of the matrix. ``frozen`` names the parameters with ``requires_grad=False``;
    ``per_example`` says the loss of a batch is a mean of independent per-example terms in the policies of
    ``policies`` (true except under batch statistics), so a mean over all examples at once is an oracle for
    the exactly weighted mean over the batches. ``policies`` are the BN policies under which the loss is a
    deterministic function of the parameters (no dropout mask drawn), i.e. where a dense oracle exists."""

    id: str
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batches: list[tuple[Tensor, Tensor]]
    frozen: tuple[str, ...] = ()
    policies: tuple[str, ...] = ("eval", "train-restore")
    has_bn: bool = False
    has_dropout: bool = False

    @property
    def n_examples(self) -> int:
        return sum(len(y) for _, y in self.batches)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


def ce(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over every target; ``out`` (..., C) against integer targets (...)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def mse(out: Tensor, y: Tensor) -> Tensor:
    """Mean squared error over every target entry."""
    return ((out - y) ** 2).mean()


class TinyLSTM(nn.Module):
    """A next-token model: token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, vocab: int = 6, emb: int = 3, hidden: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.head(h)


# Uneven on purpose: exact weighting over batches is part of what the oracles check.
SIZES = (5, 3, 2)


def _classification(g: torch.Generator, shape: tuple[int, ...], classes: int) -> list[tuple[Tensor, Tensor]]:
    return [(torch.randn(n, *shape, generator=g, dtype=F64), torch.randint(0, classes, (n,), generator=g)) for n in SIZES]


def _build(case_id: str) -> Case:
    g = torch.Generator().manual_seed(sum(map(ord, case_id)))
    if case_id == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        return Case(case_id, model.to(F64), ce, _classification(g, (5,), 3))
    if case_id == "cnn_bn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)).to(F64)
        bn = model[1]
        with torch.no_grad():
            bn.running_mean.copy_(0.3 * torch.randn(3, generator=g, dtype=F64))
            bn.running_var.copy_(0.5 + torch.rand(3, generator=g, dtype=F64))
            bn.weight.copy_(1 + 0.2 * torch.randn(3, generator=g, dtype=F64))
            bn.bias.copy_(0.1 * torch.randn(3, generator=g, dtype=F64))
        return Case(case_id, model, ce, _classification(g, (1, 5, 5), 3), has_bn=True)
    if case_id == "lstm":
        vocab, seq = 6, 4
        batches = []
        for n in SIZES:
            tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
            batches.append((tokens[:, :-1], tokens[:, 1:]))
        return Case(case_id, TinyLSTM(vocab).to(F64), ce, batches)
    if case_id == "frozen_layer":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
        model[2].requires_grad_(False)
        batches = [(torch.randn(n, 4, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)) for n in SIZES]
        return Case(case_id, model, mse, batches, frozen=("2.weight", "2.bias"))
    if case_id == "dropout":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.4), nn.Linear(7, 3))
        # In train mode a forward pass draws a dropout mask: only "eval" has a deterministic dense oracle.
        return Case(case_id, model.to(F64), ce, _classification(g, (5,), 3), policies=("eval",), has_dropout=True)
    raise KeyError(f"no test case {case_id!r}; known: {', '.join(CASE_IDS)}")


def build_case(case_id: str, seed: int = 0) -> Case:
    """A fresh case by id. The model's initialisation is drawn from ``seed`` inside a forked RNG, so building
    a case never moves the global random stream another test may rely on."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(case_id)


@pytest.fixture(params=CASE_IDS)
def case(request) -> Case:
    """Every case of the matrix in turn (test ids ``[mlp]``, ``[cnn_bn]``, ...)."""
    return build_case(request.param)


@pytest.fixture
def make_case() -> Callable[..., Case]:
    """``make_case("lstm")``: one case by id, for tests that need a particular model."""
    return build_case
