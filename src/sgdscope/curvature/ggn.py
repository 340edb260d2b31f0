"""Gauss–Newton and empirical Fisher operators: positive semi-definite companions of the Hessian.

Both are products ``Jᵀ M J`` of a Jacobian J of the parameters into some output space and a small
symmetric "middle" M there, applied to flat vectors without ever forming J: a forward-mode product
``u = J v`` (``torch.func.jvp`` through the model), the middle ``w = M u`` in output space, and a
reverse-mode product ``Jᵀ w`` (``torch.func.vjp``, whose one forward pass and retained graph serve every
vector of a block). The middle M is applied by autograd too. With the batches weighted exactly by their
real targets (N = Σ_b n_b):

* **generalised Gauss–Newton** (Schraudolph 2002; Martens 2020): with f_b(θ) the model's outputs on batch b
  and L_b the loss of batch b as a function of those outputs (``loss_fn(f_b, y_b)``, the mean over its real
  targets),

      G = Σ_b (n_b / N) J_bᵀ ∇²_f L_b J_b  + 2λI,      J_b = ∂f_b/∂θ.

  ∇²_f L_b is applied by autograd (the pullback of the gradient in the outputs), so any twice-differentiable
  loss works, not only cross-entropy and MSE. G is the Hessian less its term Σ_k (∂L/∂f_k) ∇²f_k: equal to H
  for a model linear in θ, and positive semi-definite wherever the loss is convex in the outputs.

* **empirical Fisher** (the uncentred second moment of per-example gradients; Kunstner et al. 2019 for
  its caveats): with ℓ_i the mean loss over the n_i real targets of example i (so that
  L = Σ_i n_i ℓ_i / N),

      F = (1/N) Σ_i n_i ∇ℓ_i ∇ℓ_iᵀ  + 2λI,

  i.e. J_ℓᵀ diag(n) J_ℓ / N with J_ℓ the Jacobian of the vector of per-example losses of a batch. For one
  target per example (classification) this is the textbook (1/N) Σ_i ∇ℓ_i∇ℓ_iᵀ; examples whose targets
  are all ``ignore_index`` have n_i = 0 and drop out. ℓ_i is ``loss_fn`` called on example i's slice of
  the batch's outputs and targets (``loss_fn(out[i:i+1], y[i:i+1])``), so a mean-reduction loss needs no
  ``reduction="none"`` variant; the slices go through ``torch.func.vmap`` (``per_example="vmap"``) or a
  plain loop (``"loop"``); ``"auto"`` (the default) tries vmap and falls back to the loop for a loss that
  vmap cannot trace (data-dependent Python control flow, ``.item()``). The batch's
  forward pass is shared, so under batch statistics ∇ℓ_i includes the dependence of example i's output on
  the other examples through BatchNorm, as SGD's own gradient does.

Everything else follows :class:`~sgdscope.curvature.hessian.HessianOperator`, whose constructor, weights,
gradient and protocol these classes inherit (``matvec``, ``matmat``, ``dense``, ``gradient``, ``n_params``,
``device``, ``dtype``, ``n_hvps`` counting one per vector): each product runs inside
:func:`sgdscope.policy.measurement_mode`, every forward pass on batch b (the jvp's and the vjp's) runs
under ``fixed_masks(mask_seed, b)`` so both see the same dropout masks as the Hessian with that seed, and
BatchNorm only ever writes private copies of its running statistics. ``method`` is accepted for the
shared signature and ignored (the products above have one way).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from sgdscope.curvature.flat import flatten, unflatten
from sgdscope.curvature.hessian import HessianOperator
from sgdscope.losses import Batch, Inputs, LossFn, functional_forward, n_targets, take
from sgdscope.policy import fixed_masks, measurement_mode

PER_EXAMPLE = ("auto", "vmap", "loop")


class _JtMJ(HessianOperator):
    """``Σ_b Jᵀ_b M_b J_b + 2λI`` for the output map and middle of a subclass (see the module docstring)."""

    kind = "jtmj"

    def _outputs(self, params: dict[str, Tensor], b: int, x: Inputs) -> Tensor:
        # the model's outputs at ``params`` with batch b's masks; buffers cloned inside (see HessianOperator._loss)
        others = {n: p.detach() for n, p in self.model.named_parameters() if n not in params}
        buffers = {n: t.clone() for n, t in self.model.named_buffers()}
        with fixed_masks(self.mask_seed, b, self.device):
            return functional_forward(self.model, {**others, **buffers, **params}, x)

    def _map(self, b: int, batch: Batch, scale: float) -> tuple[Callable[[dict[str, Tensor]], Tensor], Callable]:
        """(θ ↦ z, z ↦ (u ↦ M u)): the output map of batch b, and its middle operator at the outputs z."""
        raise NotImplementedError

    def _apply(self, V: Tensor, block: bool) -> Tensor:
        params = {n: p.detach() for n, p in self._params().items()}
        tangents = dict(zip(self._names, unflatten(V, list(params.values()))))
        out = self._l2 * V
        with measurement_mode(self.model, self.bn_policy), torch.no_grad():
            for b, batch, scale in self._terms:
                f, middle = self._map(b, batch, scale)
                z, pullback = vjp(f, params)  # one forward; its graph is kept for every vector of the block
                m = middle(z.detach())

                def one(t: dict[str, Tensor]) -> dict[str, Tensor]:
                    return pullback(m(jvp(f, (params,), (t,))[1]))[0]

                # randomness="same": the block's forward passes draw the masks of a single pass, which
                # fixed_masks inside f seeds, so a block row equals the single product
                g = vmap(one, randomness="same")(tangents) if block else one(tangents)
                out += flatten((g[n] for n in self._names), batch_dims=V.ndim - 1)
        self.n_hvps += V.shape[0] if block else 1
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_params={self.n_params}, batches={len(self.batches)}, "
                f"bn_policy={self.bn_policy!r}, l2={self._l2 / 2:g}, n_hvps={self.n_hvps})")


class GGNOperator(_JtMJ):
    """The generalised Gauss–Newton matrix G = Σ_b (n_b/N) J_bᵀ ∇²_f L_b J_b + 2λI of the exactly weighted
    mean loss (module docstring); the keywords of :class:`HessianOperator`.

    For a model linear in its parameters G is the Hessian; e.g. least squares L(w) = ½ mean (xᵀw − y)²
    has G = H = XᵀX / N:

    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> half_sq = lambda out, y: 0.5 * ((out.squeeze(-1) - y) ** 2).mean()
    >>> GGNOperator(lin, half_sq, [(x, torch.zeros(2, dtype=torch.float64))]).dense()
    tensor([[1., 1.],
            [1., 2.]], dtype=torch.float64)
    """

    kind = "ggn"

    def _map(self, b: int, batch: Batch, scale: float):
        x, y = batch
        loss_of_outputs = grad(lambda z: scale * self.loss_fn(z, y))

        def middle(z: Tensor) -> Callable[[Tensor], Tensor]:
            # ∇²_f L_b u as the pullback of the output-space gradient (reverse over reverse; ∇²_f L_b is
            # symmetric): exact for any twice-differentiable loss, and one graph for every u of the block.
            # (Forward over reverse trips on losses whose backward writes in place, e.g. F.mse_loss.)
            pull = vjp(loss_of_outputs, z)[1]
            return lambda u: pull(u)[0]

        return (lambda p: self._outputs(p, b, x)), middle


class FisherOperator(_JtMJ):
    """The empirical Fisher F = (1/N) Σ_i n_i ∇ℓ_i∇ℓ_iᵀ + 2λI over the measured examples (module
    docstring); the keywords of :class:`HessianOperator`, and ``per_example`` ("auto", "vmap" or "loop"):
    how the per-example losses ℓ_i = loss_fn(out[i:i+1], y[i:i+1]) are formed.

    Two examples of a one-weight least-squares model ℓ_i = ½(w x_i − y_i)² at w = 0 with (x, y) = (1, 1),
    (2, −1): ∇ℓ = (−1, 2), so F = ((−1)² + 2²) / 2 = 2.5:

    >>> import torch
    >>> lin = torch.nn.Linear(1, 1, bias=False).double()
    >>> _ = lin.weight.data.zero_()
    >>> half_sq = lambda out, y: 0.5 * ((out.squeeze(-1) - y) ** 2).mean()
    >>> x, y = torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> FisherOperator(lin, half_sq, [(x, y)]).dense()
    tensor([[2.5000]], dtype=torch.float64)
    """

    kind = "fisher"

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], *args: Any,
                 per_example: str = "auto", **kw: Any) -> None:
        # every other argument is HessianOperator's, passed on as given
        if per_example not in PER_EXAMPLE:
            raise ValueError(f"FisherOperator: per_example {per_example!r} is not one of {', '.join(PER_EXAMPLE)}")
        super().__init__(model, loss_fn, batches, *args, **kw)
        self.per_example = per_example
        self._total = sum(n_targets(y, self.ignore_index) for _, y in self.batches)

    def _example_weights(self, y: Tensor) -> Tensor:
        """n_i, the real targets of each example of ``y`` (1 each without ``ignore_index``)."""
        flat = y.reshape(len(y), -1)
        if self.ignore_index is None:
            return torch.full((len(y),), flat.shape[1], device=y.device, dtype=self.dtype)
        return (flat != self.ignore_index).sum(1).to(self.dtype)

    def _losses(self, z: Tensor, y: Tensor) -> Tensor:
        """ℓ_i = loss_fn(z[i:i+1], y[i:i+1]) for every example (each a batch of one, so the loss's own
        mean over its real targets applies)."""
        if self.per_example != "loop":
            try:
                return vmap(lambda zi, yi: self.loss_fn(zi.unsqueeze(0), yi.unsqueeze(0)))(z, y)
            except Exception:
                if self.per_example == "vmap":
                    raise
                self.per_example = "loop"  # this loss does not vmap: the loop from now on (same numbers)
        return torch.stack([self.loss_fn(z[i : i + 1], y[i : i + 1]) for i in range(len(y))])

    def _map(self, b: int, batch: Batch, scale: float):
        x, y = batch
        n_i = self._example_weights(y)
        # Examples without a real target are left out before the loss: their mean over zero targets is 0/0,
        # whose NaN would leak through the pullback even with weight 0.
        keep = (n_i > 0).nonzero().squeeze(1)
        yk, wk = y[keep], n_i[keep] / self._total

        def f(p: dict[str, Tensor]) -> Tensor:
            return self._losses(take(self._outputs(p, b, x), keep), yk)

        return f, lambda z: (lambda u: wk * u)
