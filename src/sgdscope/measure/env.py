"""What every probe may read: the model, its loss, the fixed measurement data and the run's conventions.

An :class:`Env` is built once by :class:`~sgdscope.measure.scope.Scope`. It holds no run config: the few
conventions a measurement needs (BN policy, the explicit L2 coefficient, the ignore index of padded
targets, the training minibatch size) are plain fields, so the same probes serve the built-in trainer and
a researcher's own loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from sgdscope import distributed, seeds
from sgdscope.losses import Batch, split_batches

if TYPE_CHECKING:  # pragma: no cover
    from sgdscope.measure.tracker import EigenTracker


def _is_batch(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], Tensor)


def as_batches(data: Any, batch_size: int, what: str = "measure_data") -> list[Batch]:
    """``(x, y)`` (cut into batches of ``batch_size`` examples) or a list of ``(x, y)`` batches, as a list.

    ``x`` may be a tensor, a tuple of tensors (``model(*x)``) or a dict of tensors (``model(**x)``).
    """
    if _is_batch(data):  # (x, y) with a target tensor y; a list of two batches has a pair at [1]
        return split_batches(data[0], data[1], batch_size)
    if isinstance(data, (list, tuple)) and data and all(_is_batch(b) for b in data):
        return [tuple(b) for b in data]
    from sgdscope.errors import ConfigError

    raise ConfigError(f"{what}: expected an (inputs, targets) pair or a non-empty list of such batches, "
                      f"got {type(data).__name__}")


def _cat(parts: Sequence[Any]) -> Any:
    first = parts[0]
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(torch.cat([p[i] for p in parts]) for i in range(len(first)))
    return torch.cat(list(parts))


def concat(batches: Sequence[Batch]) -> Batch:
    """One ``(x, y)`` pair holding every example of ``batches`` (tensor, tuple or dict inputs)."""
    if len(batches) == 1:
        return batches[0]
    return _cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@dataclass
class Env:
    """The measurement environment of one Scope."""

    model: nn.Module
    loss_fn: Callable[[Any, Tensor], Tensor]
    measure_batches: list[Batch]
    train_batches: list[Batch]  # the training set for interpolation over "full" data (else = measure)
    theta0: Tensor
    seed: int
    device: torch.device
    bn_policy: str = "train-restore"
    weight_decay: float = 0.0  # λ of an explicit L2 term λ·Σw² in the training loss
    include_l2: bool = True  # whether measured losses and Hessians include that term
    ignore_index: Optional[int] = None  # targets equal to it carry no weight (padding)
    batch_size: Optional[int] = None  # the training minibatch size, for probes that draw minibatch gradients
    tracker: Optional["EigenTracker"] = None
    save_tensors: Optional[Callable[[str, dict[str, Tensor]], Any]] = None
    _joined: Optional[Batch] = field(default=None, repr=False)

    @property
    def l2(self) -> float:
        """λ used by measurements: the explicit L2 coefficient when ``include_l2``, else 0."""
        return self.weight_decay if self.include_l2 else 0.0

    @property
    def measure_xy(self) -> Batch:
        """The whole measurement set as one pair (for drawing minibatches), joined once."""
        if self._joined is None:  # the whole set, also where this rank measures a Shard of it
            self._joined = concat(distributed.full(self.measure_batches))
        return self._joined

    @property
    def measure_size(self) -> int:
        """Examples in the measurement set (sequences, for a language model)."""
        return sum(len(y) for _, y in distributed.full(self.measure_batches))

    @property
    def minibatch_size(self) -> int:
        """The minibatch size of the drawn gradients: the training batch size, at most the measurement set."""
        n = self.measure_size
        return min(self.batch_size or n, n)

    def generator(self, tag: str, step: int) -> torch.Generator:
        """A generator on the measurement device seeded by (seed, tag, step): reproducible and isolated."""
        return seeds.generator(self.seed, tag, step, device=self.device)

    def mask_seed(self, tag: str, step: int) -> int:
        """The dropout-mask seed of one measurement: common random numbers for all its points and products."""
        return seeds.seed_for(self.seed, f"masks/{tag}", step)

    def kernel_kw(self, tag: str, step: int) -> dict[str, Any]:
        """The keywords every landscape kernel takes: loss, BN policy, L2, ignore index, mask seed."""
        return dict(loss_fn=self.loss_fn, bn_policy=self.bn_policy, weight_decay=self.l2,
                    ignore_index=self.ignore_index, mask_seed=self.mask_seed(tag, step))
