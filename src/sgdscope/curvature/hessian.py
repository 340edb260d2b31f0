"""The Hessian of the mean training loss as a linear operator on flat parameter vectors.

For a batch list ``[(x_1, y_1), ..., (x_B, y_B)]`` with ``n_b = n_targets(y_b, ignore_index)`` real targets
each (inputs ``x_b`` of any form of :mod:`sgdscope.losses`), the loss is the exact mean over real targets
(plus the explicit L2 term when asked)

    L(θ) = Σ_b n_b L_b(θ) / Σ_b n_b  +  λ Σ_i θ_i²,

and the operator applies its Hessian H = Σ_b (n_b / N) ∇²L_b(θ) + 2λI to vectors, without forming it.
Two exact ways to get a Hessian-vector product (HVP) are offered:

* ``"jvp"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``: Hv = d/dt ∇L(θ + t v) at 0;
  a block of vectors goes through ``torch.func.vmap`` so the forward/backward work is shared.
* ``"double-backward"``: reverse-over-reverse, Hv = ∇_θ ⟨∇L(θ), v⟩ with ``torch.autograd.grad``; a block
  shares one forward and first backward and runs the second backward per vector on the retained graph.

Every product runs inside :func:`sgdscope.policy.measurement_mode`, and the BatchNorm buffers the forward
passes see are private copies, so no product ever writes the model's running statistics (under any
policy). Each forward pass on batch b runs under ``fixed_masks(mask_seed, b)``: both methods, single
products, blocks and :meth:`HessianOperator.gradient` see one set of dropout masks per batch, so the
operator is one fixed symmetric matrix (the Hessian of the loss with those masks frozen), whatever the
method, and training's random streams are untouched.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from sgdscope.curvature.flat import ParamFilter, flatten, named_trainable, unflatten
from sgdscope.losses import Batch, Inputs, LossFn, functional_forward, weigh
from sgdscope.policy import check_policy, fixed_masks, measurement_mode

HVP_METHODS = ("jvp", "double-backward")
# "auto" times both methods on the operator's first product and keeps the faster, per model and batch shape
# (:data:`AUTO_CHOICES`), because neither wins everywhere: on 2 CPU cores double backward was 1.3-2.4x
# cheaper on MLPs (torch.func's per-call set-up dominates small models) and jvp 17% cheaper on SimpleCNN
# (bench/results/curvature.json, "costs"); a GPU can reorder them again.
AUTO_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}
_AUTO_REPEATS = 2  # the first call of a method pays one-off set-up: its best of two is what is compared


class HessianOperator:
    """Hessian of the exactly weighted mean loss over ``batches``, restricted to the parameters that pass
    ``param_filter`` (frozen parameters are never included).

    ``H = Σ_b n_b ∇²L_b / Σ_b n_b + 2λI`` with ``λ = weight_decay`` when ``include_l2`` and n_b the targets
    of batch b that differ from ``ignore_index`` (all of them when None); a batch without any real target
    has weight 0 and is skipped. Parameters that the forward pass never uses get zero rows and columns.
    The parameters are read from the model at every product, so the operator follows the model if it is
    changed in place.

    ``bn_policy`` ("eval", "train-restore", "train") is applied around every product; none of them lets a
    product write the BatchNorm running statistics or move a global RNG. Where dropout is active, batch b
    uses the masks of ``fixed_masks(mask_seed, b)`` in every product and in the gradient (``None``: the
    default seed), so the operator is a deterministic function of the parameters.
    ``method``: "jvp", "double-backward", or "auto": the first single product and the first block are
    each timed by both methods on the first batch (a block on two of its rows; best of two calls each; these timing products are
    counted in ``n_timing_hvps``, not ``n_hvps``) and the faster is kept, cached in :data:`AUTO_CHOICES`
    per model, batch shapes, device, dtype and policy, so the operators a tracker builds step after step
    time once. ``method_timings`` holds the seconds compared. Blocks are applied ``max_block`` vectors at a
    time to bound memory.

    Attributes: ``n_params``, ``device``, ``dtype``, ``method`` (the HVP method of single products, None
    under "auto" until the first one), ``block_method`` (of blocks) and ``n_hvps`` (products applied so
    far; a block of m vectors counts m).

    A quadratic model L(w) = ½ wᵀAw has H = A exactly:

    >>> import torch
    >>> from sgdscope.models.quadratic import Quadratic, output_mean
    >>> A = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
    >>> op = HessianOperator(Quadratic(A), output_mean, [(torch.zeros(4), torch.zeros(4))])
    >>> op.dense()
    tensor([[ 2.,  1.],
            [ 1., -3.]], dtype=torch.float64)
    >>> op.matvec(torch.tensor([1.0, 0.0], dtype=torch.float64)), op.n_hvps
    (tensor([2., 1.], dtype=torch.float64), 3)
    >>> HessianOperator(Quadratic(A), output_mean, [(torch.zeros(4), torch.zeros(4))],
    ...                 weight_decay=0.5).dense()
    tensor([[ 3.,  1.],
            [ 1., -2.]], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Batch],
        bn_policy: str = "train-restore",
        weight_decay: float = 0.0,
        include_l2: bool = True,
        param_filter: ParamFilter = None,
        method: str = "auto",
        max_block: int = 16,
        *,
        ignore_index: int | None = None,
        mask_seed: int | None = None,
    ) -> None:
        check_policy(bn_policy)
        self.batches = list(batches)
        try:
            weighted, total = weigh(self.batches, ignore_index)
        except ValueError as e:
            raise ValueError(f"HessianOperator: {e}") from None
        if method not in ("auto",) + HVP_METHODS:
            raise ValueError(f"HessianOperator: method {method!r} is not one of auto, {', '.join(HVP_METHODS)}")
        if max_block < 1:
            raise ValueError("HessianOperator: max_block must be at least 1")
        named = named_trainable(model, param_filter)
        if not named:
            raise ValueError("HessianOperator: no trainable parameter passes param_filter")
        self.model, self.loss_fn, self.bn_policy = model, loss_fn, bn_policy
        self.ignore_index, self.mask_seed = ignore_index, mask_seed
        self.auto = method == "auto"
        self.method = None if self.auto else method
        self.block_method = None if self.auto else method
        self.method_timings: dict[str, dict[str, float]] = {}
        self.n_timing_hvps = 0
        self.max_block = max_block
        # (mask stream, batch, n_b / N) for the batches that carry weight
        self._terms = [(w.index, (w.x, w.y), w.n / total) for w in weighted]
        self._names = [n for n, _ in named]
        self._l2 = 2.0 * weight_decay if include_l2 else 0.0
        self.n_params = sum(p.numel() for _, p in named)
        self.device, self.dtype = named[0][1].device, named[0][1].dtype
        self.n_hvps = 0

    # -- the loss as a function of the measured parameters --------------------------------------------

    def _params(self) -> dict[str, Tensor]:
        live = dict(self.model.named_parameters())
        return {n: live[n].detach() for n in self._names}

    def _loss(self, params: dict[str, Tensor], x: Inputs, y: Tensor, scale: float) -> Tensor:
        # Unmeasured parameters enter as constants; buffers are cloned inside the (possibly transformed)
        # function because torch.func forbids in-place writes to captured tensors and the model's running
        # statistics must not move.
        others = {n: p.detach() for n, p in self.model.named_parameters() if n not in params}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        out = functional_forward(self.model, {**others, **buffers, **params}, x)
        return scale * self.loss_fn(out, y)

    # -- products -----------------------------------------------------------------------------------

    def _hvp_jvp(self, params: dict[str, Tensor], tangents: dict[str, Tensor], batch: Batch, scale: float, block: bool):
        g = grad(lambda p: self._loss(p, *batch, scale))

        def one(t: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(g, (params,), (t,))[1]

        # randomness="same": the block draws the masks of one product, from the seed fixed_masks set, so a
        # block row equals the single product with the same vector.
        return vmap(one, randomness="same")(tangents) if block else one(tangents)

    def _hvp_double_backward(
        self, params: dict[str, Tensor], tangents: dict[str, Tensor], batch: Batch, scale: float, block: bool
    ):
        leaves = {n: p.requires_grad_() for n, p in params.items()}
        names = list(leaves)
        rows = [{n: t[j] for n, t in tangents.items()} for j in range(len(tangents[names[0]]))] if block else [tangents]
        out = []
        with torch.enable_grad():
            loss = self._loss(leaves, *batch, scale)
            gs = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, materialize_grads=True)
            # Gradients of parameters the loss does not reach are materialised constants: nothing to
            # differentiate, and autograd refuses them as outputs.
            live = [(g, n) for g, n in zip(gs, names) if g.requires_grad]
            # One forward and first backward serve the whole block; the second backward runs per vector
            # on the retained graph. On CPU this beat is_grads_batched, whose vmap costs more than the
            # loop it saves: block of 5 / one HVP 3.4-3.9 against 4.2-4.8 (MLPs, SimpleCNN; 1 thread).
            for j, t in enumerate(rows):
                hv = torch.autograd.grad(
                    [g for g, _ in live],
                    list(leaves.values()),
                    grad_outputs=[t[n] for _, n in live],
                    allow_unused=True,
                    retain_graph=j < len(rows) - 1,
                ) if live else [None] * len(names)
                out.append({n: torch.zeros_like(params[n]) if h is None else h for n, h in zip(names, hv)})
        return {n: torch.stack([o[n] for o in out]) for n in names} if block else out[0]

    def _auto_key(self, block: bool) -> tuple:
        def shape(x: Inputs) -> tuple:
            if isinstance(x, dict):
                return tuple((k, tuple(v.shape)) for k, v in sorted(x.items()))
            if isinstance(x, (tuple, list)):
                return tuple(tuple(t.shape) for t in x)
            return tuple(x.shape)

        batches = tuple((shape(x), tuple(y.shape)) for _, (x, y), _ in self._terms)
        return (id(self.model), type(self.model).__qualname__, self.n_params, batches, str(self.device),
                str(self.dtype), self.bn_policy, block)

    def _time(self, method: str, params: dict[str, Tensor], tangents: dict[str, Tensor], block: bool) -> float:
        """Seconds of one product by ``method`` on the first batch, best of ``_AUTO_REPEATS`` calls."""
        b, batch, scale = self._terms[0]
        hvp = self._hvp_jvp if method == "jvp" else self._hvp_double_backward
        best = math.inf
        for _ in range(_AUTO_REPEATS):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            with fixed_masks(self.mask_seed, b, self.device):
                hvp({n: p.detach() for n, p in params.items()}, tangents, batch, scale, block)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - t0)
        return best

    def _choose(self, params: dict[str, Tensor], tangents: dict[str, Tensor], block: bool, m: int) -> str:
        """The method for this kind of product: fixed, cached, or timed now (see the class docstring)."""
        current = self.block_method if block else self.method
        if current is not None:
            return current
        key = self._auto_key(block)
        if key not in AUTO_CHOICES:
            if block:  # two rows show how each method batches, at a fraction of a large block's cost
                m = min(m, 2)
                tangents = {n: t[:m] for n, t in tangents.items()}
            timings = {}
            for meth in HVP_METHODS:
                try:
                    timings[meth] = self._time(meth, params, tangents, block)
                except RuntimeError:  # e.g. torch.func cannot trace this model (jvp of a ZeroTensor grad)
                    if meth == HVP_METHODS[-1] and not timings:
                        raise
                    timings[meth] = math.inf
            self.n_timing_hvps += _AUTO_REPEATS * len(HVP_METHODS) * m
            AUTO_CHOICES[key] = (min(timings, key=timings.get), timings)
        chosen, self.method_timings["block" if block else "single"] = AUTO_CHOICES[key]
        if block:
            self.block_method = chosen
        else:
            self.method = chosen
        return chosen

    def _apply(self, V: Tensor, block: bool) -> Tensor:
        params = self._params()
        tangents = dict(zip(self._names, unflatten(V, list(params.values()))))
        out = self._l2 * V
        with measurement_mode(self.model, self.bn_policy), torch.no_grad():
            method = self._choose(params, tangents, block, V.shape[0] if block else 1)
            hvp = self._hvp_jvp if method == "jvp" else self._hvp_double_backward
            for b, batch, scale in self._terms:
                with fixed_masks(self.mask_seed, b, self.device):
                    hv = hvp({n: p.detach() for n, p in params.items()}, tangents, batch, scale, block)
                out += flatten((hv[n] for n in self._names), batch_dims=V.ndim - 1)
        self.n_hvps += V.shape[0] if block else 1
        return out

    def _check(self, V: Tensor, ndim: int) -> Tensor:
        if V.ndim != ndim or V.shape[-1] != self.n_params:
            want = "(n,)" if ndim == 1 else "(m, n)"
            raise ValueError(f"expected a {want} tensor with n = {self.n_params}, got shape {tuple(V.shape)}")
        return V.to(device=self.device, dtype=self.dtype)

    def matvec(self, v: Tensor) -> Tensor:
        """Hv for a flat vector ``v`` of shape (n,)."""
        return self._apply(self._check(v, 1), block=False)

    def matmat(self, V: Tensor) -> Tensor:
        """Rows Hv_i for a block ``V`` of shape (m, n), computed ``max_block`` rows at a time; counts m HVPs."""
        V = self._check(V, 2)
        return torch.cat([self._apply(C, block=True) for C in V.split(self.max_block)]) if len(V) else V.clone()

    def dense(self) -> Tensor:
        """The full (n, n) matrix H, one column per basis vector: only for tiny models and tests."""
        return self.matmat(torch.eye(self.n_params, device=self.device, dtype=self.dtype))

    def gradient(self) -> Tensor:
        """∇L(θ) = Σ_b n_b ∇L_b / Σ_b n_b (+ 2λθ with the L2 term), as a flat vector, with the dropout masks
        of the products; no HVP is counted."""
        params = self._params()
        out = self._l2 * flatten(params.values())
        with measurement_mode(self.model, self.bn_policy), torch.no_grad():
            for b, batch, scale in self._terms:
                with fixed_masks(self.mask_seed, b, self.device):
                    g = grad(lambda p: self._loss(p, *batch, scale))(params)
                out += flatten(g[n] for n in self._names)
        return out

    def __repr__(self) -> str:
        return (
            f"HessianOperator(n_params={self.n_params}, batches={len(self.batches)}, "
            f"method={'auto: ' if self.auto else ''}{self.method!r}/{self.block_method!r}, "
            f"bn_policy={self.bn_policy!r}, l2={self._l2 / 2:g}, n_hvps={self.n_hvps})"
        )

