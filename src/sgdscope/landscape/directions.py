"""The loss along the sharpest directions, in units of the typical SGD step (Jastrzebski et al. 2019, sec. 3).

With e a unit direction (an eigenvector e_i of the Hessian, or a random one as a control) and g_j the
gradients of m random minibatches of size S:

* typical step Δθ̄ = η·(1/m)·Σ_j |⟨g_j, e⟩|  (the paper uses m = 10);
* cross-section L(θ + k·Δθ̄·e) on a grid of k (:func:`~sgdscope.landscape.interpolate.loss_along`),
  and its width k_min (:func:`k_min`);
* step-length scan: (1/m)·Σ_j L(θ − α·η·⟨g_j, e⟩·e) − L(θ) for multipliers α (:func:`alpha_step_changes`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from sgdscope.curvature.flat import flatten, get_flat, named_trainable
from sgdscope.errors import ConfigError
from sgdscope.landscape.interpolate import loss_along
from sgdscope.losses import Batch, Inputs, LossFn, cross_entropy, forward, l2_penalty, n_targets, take
from sgdscope.policy import fixed_masks, measurement_mode


def random_direction(model: nn.Module, generator: torch.Generator) -> Tensor:
    """A unit vector drawn uniformly from the sphere in parameter space (the control direction).

    Drawn from ``generator`` only (never the global RNG), on the generator's device, then moved to the
    model's.
    """
    like = get_flat(model)
    d = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    return d / d.norm()


def minibatch_indices(
    n_examples: int, batch_size: int, n: int, generator: torch.Generator, device: torch.device | None = None
) -> list[Tensor]:
    """``n`` minibatches of ``batch_size`` example indices, each drawn without replacement (the first
    ``batch_size`` entries of its own random permutation) from ``generator``, on ``device``; the draws are
    independent of one another. :func:`minibatch_grads` and the batch-sharpness probe draw the same way."""
    if not 0 < batch_size <= n_examples:
        raise ConfigError(f"minibatch_grads: batch_size {batch_size} must be in 1..{n_examples}")
    return [torch.randperm(n_examples, generator=generator, device=generator.device)[:batch_size].to(device)
            for _ in range(n)]


def minibatch_grads(
    model: nn.Module,
    loss_fn: LossFn,
    x: Inputs,
    y: Tensor,
    batch_size: int,
    n: int,
    generator: torch.Generator,
    bn_policy: str = "train-restore",
    weight_decay: float = 0.0,
    *,
    ignore_index: int | None = None,
    mask_seed: int | None = None,
    only: Sequence[int] | None = None,
) -> Tensor:
    """Flat gradients ∇[L_B(θ) + λ‖θ‖²] of ``n`` random minibatches B of ``batch_size`` examples: ``(n, n_params)``.

    Each minibatch is drawn without replacement from the examples of ``(x, y)`` (``x`` of any input form:
    every tensor in it is indexed along dim 0) with ``generator`` (on its device). Minibatch j runs under
    ``fixed_masks(mask_seed, j)``: its dropout masks are a function of (mask_seed, j) alone, so the
    gradients are a deterministic function of θ and the two generators' seeds. The global RNG states are
    saved and restored, ``.grad`` of the parameters is not touched, and BN follows ``bn_policy`` (its
    running statistics restored unless the policy is ``"train"``).

    The mean loss of a minibatch is ``loss_fn``'s own (over its real targets); ``ignore_index`` only serves
    to refuse a minibatch without any real target, whose mean loss, and so gradient, is undefined.

    ``only``: compute just the gradients j in it and leave zero rows elsewhere (every minibatch is still
    drawn, so the ones computed are those of the full call); :func:`sgdscope.distributed.minibatch_grads`
    deals the rows out over ranks this way.
    """
    if not 0 < batch_size <= len(y):
        raise ConfigError(f"minibatch_grads: batch_size {batch_size} must be in 1..{len(y)}")
    params = [p for _, p in named_trainable(model)]
    keep = set(range(n)) if only is None else set(only)
    out = []
    with measurement_mode(model, bn_policy):
        for j, idx in enumerate(minibatch_indices(len(y), batch_size, n, generator, y.device)):
            if j not in keep:
                out.append(torch.zeros(sum(p.numel() for p in params), device=y.device, dtype=params[0].dtype))
                continue
            if n_targets(y[idx], ignore_index) == 0:
                raise ValueError(f"minibatch_grads: minibatch {j} holds only ignore_index={ignore_index} targets")
            with fixed_masks(mask_seed, j, y.device):
                loss = loss_fn(forward(model, take(x, idx)), y[idx]) + l2_penalty(params, weight_decay)
            out.append(flatten(torch.autograd.grad(loss, params)))
    return torch.stack(out)


def typical_step(model: nn.Module, direction: Tensor, lr: float, grads: Tensor) -> float:
    """Δθ̄ = η·(1/m)·Σ_j |⟨g_j, e⟩| for the ``(m, n_params)`` stack ``grads`` and the unit ``direction`` e.

    >>> m = nn.Linear(2, 1, bias=False)
    >>> typical_step(m, torch.tensor([1.0, 0.0]), 0.1, torch.tensor([[3.0, 5.0], [-1.0, 7.0]]))
    0.2
    """
    n_params = sum(p.numel() for _, p in named_trainable(model))
    if grads.dim() != 2 or grads.shape[1] != n_params or direction.shape != (n_params,):
        raise ValueError(f"expected grads (m, {n_params}) and a direction ({n_params},)")
    return lr * float((grads @ direction).abs().mean())


def k_min(ks: Sequence[float] | Tensor, losses: Sequence[float] | Tensor, l0: float, threshold: float) -> float:
    """The half-width of the bowl along a direction, in grid units: the smallest grid k > 0 with
    L(k) ≥ (1+threshold)·L0, provided some grid k < 0 also has L(k) ≥ (1+threshold)·L0; NaN otherwise.

    ``threshold`` 0.01 / 0.1 means 1% / 10% above L0 = L(θ). The authors' code recorded 0 where the bowl
    does not close on both sides; NaN keeps such steps out of averages instead of pulling them to 0. A NaN
    loss never counts as exceeding the threshold; +inf does.

    >>> ks = [-2, -1, 0, 1, 2, 4]
    >>> k_min(ks, [1.2, 1.0, 1.0, 1.005, 1.02, 1.5], 1.0, 0.01)
    2.0
    >>> k_min(ks, [1.2, 1.0, 1.0, 1.005, 1.02, 1.5], 1.0, 0.1)
    4.0
    >>> k_min(ks, [1.05, 1.0, 1.0, 1.005, 1.02, 1.5], 1.0, 0.1)
    nan
    """
    k = torch.as_tensor(ks, dtype=torch.float64).reshape(-1)
    l = torch.as_tensor(losses, dtype=torch.float64).reshape(-1).cpu()
    if k.shape != l.shape:
        raise ValueError(f"k_min: {len(k)} grid points for {len(l)} losses")
    above = l >= (1 + threshold) * l0
    if not bool(above[k < 0].any()) or not bool(above[k > 0].any()):
        return math.nan
    return float(k[(k > 0) & above].min())


def alpha_step_changes(
    model: nn.Module,
    e: Tensor,
    lr: float,
    grads: Tensor,
    alphas: Sequence[float],
    batches: Sequence[Batch],
    loss_fn: LossFn = cross_entropy,
    bn_policy: str = "train-restore",
    weight_decay: float = 0.0,
    method: str = "auto",
    *,
    ignore_index: int | None = None,
    mask_seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """For each α: the loss change of a step of α·η along e alone, averaged over the minibatch gradients.

    Returns ``(change, relative)``, each of shape ``(len(alphas),)``:

        change_α = (1/m)·Σ_j L(θ − α·η·⟨g_j, e⟩·e) − L(θ),   relative_α = change_α / L(θ)

    (a fraction; the paper prints 100·relative %). θ is the model's current parameters, which are left
    untouched; the loss is evaluated on ``batches`` as in :func:`~sgdscope.landscape.interpolate.loss_along`,
    L(θ) and every shifted point with the same dropout masks (``mask_seed``), so a change is the loss's own
    and not a difference of masks.
    """
    theta = get_flat(model)
    proj = grads @ e
    kw = dict(
        loss_fn=loss_fn, bn_policy=bn_policy, weight_decay=weight_decay, method=method,
        ignore_index=ignore_index, mask_seed=mask_seed,
    )
    l0 = loss_along(model, theta, e, [0.0], batches, **kw)[0]
    change = torch.stack([loss_along(model, theta, e, -a * lr * proj, batches, **kw).mean() for a in alphas]) - l0
    return change, change / l0
