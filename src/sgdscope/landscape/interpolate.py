"""The loss at many points of parameter space: along a segment between iterates, or along a direction.

Everything here goes through :func:`loss_at_points`, which evaluates the mean loss

    L(θ_p) = Σ_b n_b · L_b(θ_p) / Σ_b n_b  (+ λ·‖θ_p‖² when ``weight_decay`` = λ > 0)

at a stack of flat parameter vectors θ_1..θ_P (rows of a ``(P, n_params)`` tensor, in
:func:`~sgdscope.curvature.flat.named_trainable` order). :func:`interpolate` and :func:`loss_along` only
build the stack.

Every point's forward pass on data batch b runs under :func:`sgdscope.policy.fixed_masks` with the
measurement's ``mask_seed`` and b (common random numbers), so where dropout is active all the points of
one call share one set of masks per batch and the loss is a smooth function along the path.

Two evaluation methods give the same numbers up to float rounding (with the same masks):

* ``"loop"``: write each θ_p into the model and run it; the model's parameters are restored bit for bit.
* ``"vmap"``: ``torch.func.functional_call`` under ``torch.func.vmap`` over the stacked parameters, so all
  points share one batched forward per data batch. BatchNorm buffers are handed to each point as its own
  throw-away copy: in train mode BN updates its running statistics in place, which vmap only allows on a
  batched tensor, and the copies also keep the model's statistics untouched. Under the ``"train"`` BN
  policy the original scripts let every evaluation update the real running statistics one after the
  other; vmap cannot reproduce that order, so ``"train"`` with BN always uses the loop.

``"auto"`` picks the loop. ``bench/interpolation.py`` measured it faster on CPU: vmap turns every layer
into one operation over all points at once, whose activations (points × batch × width) fall out of the
cache, while the loop's stay in it, and the arithmetic is the same. vmap is there for accelerators, where
fewer, larger kernels should win; that has not been measured here.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from sgdscope import distributed
from sgdscope.curvature.flat import get_flat, named_trainable, set_flat, unflatten
from sgdscope.errors import ConfigError
from sgdscope.losses import Batch, LossFn, Weighted, cross_entropy, forward, functional_forward, l2_penalty
from sgdscope.policy import check_policy, fixed_masks, measurement_mode, norm_buffers

METHODS = ("auto", "vmap", "loop")


def _resolve_method(model: nn.Module, bn_policy: str, method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    sequential_bn = bn_policy == "train" and bool(norm_buffers(model))
    if method == "vmap" and sequential_bn:
        raise ConfigError('method "vmap" cannot update BN running statistics in order; use bn_policy "train-restore"')
    return "loop" if method == "auto" else method


def _weighted_mean(
    batches: list[Weighted],
    total: int,
    mask_seed: int | None,
    device: torch.device,
    loss_of: Callable[[Weighted], Tensor],
) -> Tensor:
    """Σ_b n_b·loss_of(b) / N, each batch's forward pass under its own fixed dropout masks."""
    per_batch = []
    for w in batches:
        with fixed_masks(mask_seed, w.index, device):
            per_batch.append(loss_of(w) * w.n)
    return sum(per_batch) / total


def _losses_loop(
    model: nn.Module, points: Tensor, batches: list[Weighted], total: int, loss_fn: LossFn, mask_seed: int | None
) -> Tensor:
    saved = get_flat(model)
    params = [p for _, p in named_trainable(model)]  # looked up once, not per point
    try:
        out = []
        for theta in points:
            set_flat(model, theta, params=params)
            loss = _weighted_mean(batches, total, mask_seed, points.device, lambda w: loss_fn(forward(model, w.x), w.y))
            out.append(loss)
        return torch.stack(out)
    finally:
        set_flat(model, saved)


def _losses_vmap(
    model: nn.Module,
    points: Tensor,
    batches: list[Weighted],
    total: int,
    loss_fn: LossFn,
    mask_seed: int | None,
    chunk_size: int | None,
) -> Tensor:
    trainable = named_trainable(model)
    names = [n for n, _ in trainable]
    like = [p for _, p in trainable]
    trainable_names = set(names)
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in trainable_names}
    norm = norm_buffers(model)
    shared = {n: b for n, b in model.named_buffers() if n not in norm}

    def one(theta: Tensor, bufs: dict[str, Tensor], x, y: Tensor) -> Tensor:
        params = dict(zip(names, unflatten(theta, like)))
        return loss_fn(functional_forward(model, (params, frozen, shared, bufs), x), y)

    # randomness="same": every point draws the masks that the seeded RNG gives one plain forward pass, so
    # the points share them (and match the loop). The chunks are formed here rather than by vmap's
    # chunk_size so that each chunk's pass is seeded afresh by fixed_masks.
    batched = vmap(one, in_dims=(0, 0, None, None), randomness="same")
    out = []
    for chunk in points.split(chunk_size or len(points)):
        per_point = {n: b.detach().expand(len(chunk), *b.shape).clone() for n, b in model.named_buffers() if n in norm}
        loss = _weighted_mean(batches, total, mask_seed, points.device, lambda w: batched(chunk, per_point, w.x, w.y))
        out.append(loss)
    return torch.cat(out)


@torch.no_grad()
def loss_at_points(
    model: nn.Module,
    points: Tensor,
    batches: Sequence[Batch],
    loss_fn: LossFn = cross_entropy,
    bn_policy: str = "train-restore",
    weight_decay: float = 0.0,
    method: str = "auto",
    chunk_size: int | None = None,
    *,
    ignore_index: int | None = None,
    mask_seed: int | None = None,
) -> Tensor:
    """The mean loss at each row θ_p of ``points`` (shape ``(P, n_params)``): a tensor of shape ``(P,)``.

    L(θ_p) = Σ_b n_b·L_b(θ_p) / Σ_b n_b + λ‖θ_p‖², with n_b the targets in batch b that differ from
    ``ignore_index`` (all of them when None; a batch without any is skipped) and λ = ``weight_decay``.
    BN and dropout follow ``bn_policy`` (see :func:`sgdscope.policy.measurement_mode`); the model's
    parameters, the global RNG states and, except under ``"train"``, its buffers are left exactly as found.
    Common random numbers: every point's forward pass on batch b runs under ``fixed_masks(mask_seed, b)``,
    so all the points see the same dropout masks and L(θ_p) is a smooth, deterministic function of θ_p
    (``mask_seed=None``: the default seed).
    ``method`` is ``"loop"``, ``"vmap"`` or ``"auto"`` (module docstring); ``chunk_size`` bounds how many
    points vmap evaluates at once (memory), None meaning all.

    >>> m = nn.Linear(1, 1, bias=False)
    >>> batches = [(torch.ones(3, 1), torch.zeros(3, 1)), (torch.ones(1, 1), torch.zeros(1, 1))]
    >>> mse = lambda out, y: ((out - y) ** 2).mean()
    >>> loss_at_points(m, torch.tensor([[0.0], [2.0], [-3.0]]), batches, mse, method="loop")
    tensor([0., 4., 9.])
    """
    check_policy(bn_policy)
    method = _resolve_method(model, bn_policy, method)
    if points.dim() != 2:
        raise ValueError(f"points must be a (P, n_params) stack, got shape {tuple(points.shape)}")
    # a Shard (sgdscope.distributed): this rank's batches weighed by the global N, summed over the ranks
    weighted, total = distributed.weigh_shard(batches, ignore_index)
    with measurement_mode(model, bn_policy):
        if not weighted:  # a rank whose shard is empty adds zeros
            losses = points.new_zeros(len(points))
        elif method == "loop":
            losses = _losses_loop(model, points, weighted, total, loss_fn, mask_seed)
        else:
            losses = _losses_vmap(model, points, weighted, total, loss_fn, mask_seed, chunk_size)
    losses = distributed.reduce_shard(batches, losses)
    if weight_decay > 0:
        losses = losses + torch.stack([l2_penalty([theta], weight_decay) for theta in points])
    return losses


def _as_grid(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1)


def interpolate(
    model: nn.Module,
    theta_a: Tensor,
    theta_b: Tensor,
    alphas: Sequence[float] | Tensor,
    batches: Sequence[Batch],
    loss_fn: LossFn = cross_entropy,
    bn_policy: str = "train-restore",
    weight_decay: float = 0.0,
    method: str = "auto",
    chunk_size: int | None = None,
    *,
    ignore_index: int | None = None,
    mask_seed: int | None = None,
) -> Tensor:
    """L((1−α)·θa + α·θb) for each α in ``alphas`` (Xing et al.'s interpolation between iterates).

    The point is formed as ``(1−α)θa + αθb`` rather than ``θa + α(θb−θa)`` so that α = 0 and α = 1 give θa
    and θb exactly, and the end points equal plain evaluations of L(θa) and L(θb). All points share the
    dropout masks of ``mask_seed``, so identical end points give a flat curve and the curve from θb to θa is
    this one reversed. Other arguments as in :func:`loss_at_points`.

    >>> m = nn.Linear(1, 1, bias=False)
    >>> batches = [(torch.ones(2, 1), torch.zeros(2, 1))]
    >>> mse = lambda out, y: ((out - y) ** 2).mean()
    >>> interpolate(m, torch.tensor([-1.0]), torch.tensor([3.0]), [0, 0.25, 0.5, 1], batches, mse)
    tensor([1., 0., 1., 9.])
    """
    a = _as_grid(alphas, theta_a)
    return loss_at_points(
        model, (1 - a) * theta_a + a * theta_b, batches, loss_fn, bn_policy, weight_decay, method, chunk_size,
        ignore_index=ignore_index, mask_seed=mask_seed,
    )


def loss_along(
    model: nn.Module,
    theta: Tensor,
    direction: Tensor,
    ks: Sequence[float] | Tensor,
    batches: Sequence[Batch],
    loss_fn: LossFn = cross_entropy,
    bn_policy: str = "train-restore",
    weight_decay: float = 0.0,
    method: str = "auto",
    chunk_size: int | None = None,
    *,
    ignore_index: int | None = None,
    mask_seed: int | None = None,
) -> Tensor:
    """L(θ + k·d) for each k in ``ks``: a cross-section of the loss along ``direction`` d.

    Jastrzebski et al. take d = Δθ̄_i·e_i (the typical SGD step along the i-th eigenvector, see
    :func:`~sgdscope.landscape.directions.typical_step`), so k counts typical steps. All points share the
    dropout masks of ``mask_seed``, so the curve is continuous in k. Other arguments as in
    :func:`loss_at_points`.

    >>> m = nn.Linear(2, 1, bias=False)
    >>> batches = [(torch.eye(2), torch.zeros(2, 1))]
    >>> mse = lambda out, y: ((out - y) ** 2).mean()
    >>> loss_along(m, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), [-1, 0, 1], batches, mse)
    tensor([2.5000, 0.5000, 2.5000])
    """
    return loss_at_points(
        model, theta + _as_grid(ks, theta) * direction, batches, loss_fn, bn_policy, weight_decay, method, chunk_size,
        ignore_index=ignore_index, mask_seed=mask_seed,
    )
