"""The Hessian of the mean training loss as a linear operator on flat parameter vectors.

For a batch list ``[(x_1, y_1), ..., (x_B, y_B)]`` with ``n_b = n_targets(y_b, ignore_index)`` real targets
each (inputs ``x_b`` of any form of :mod:`sgdscope.losses`), the loss is the exact mean over real targets
(plus the explicit L2 term when asked)

    L(θ) = Σ_b n_b L_b(θ) / Σ_b n_b  +  λ Σ_i θ_i²,

and the operator applies its Hessian H = Σ_b (n_b / N) ∇²L_b(θ) + 2λI to vectors, without forming it.
Exact Hessian-vector products (HVPs) come from :mod:`sgdscope.curvature.hvp`, by one of two routes:

* ``"jvp"``: forward over reverse, Hv = d/dt ∇L(θ + t v) at 0: a single product carries dual numbers
  (``torch.autograd.forward_ad``) through one forward and backward pass; a block goes through
  ``torch.func.vmap`` of ``jvp`` of ``grad``, so the primal forward/backward work is shared.
* ``"double-backward"``: reverse over reverse, Hv = ∇_θ ⟨∇L(θ), v⟩ with ``torch.autograd.grad``; a block
  shares one forward and first backward and runs the second backward per vector on the retained graph,
  or (block method ``"double-backward-batched"``) as one backward vmapped over the block.

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

from sgdscope.curvature import hvp
from sgdscope.curvature.flat import ParamFilter, flatten, named_trainable, unflatten
from sgdscope.losses import Batch, Inputs, LossFn, functional_forward, weigh
from sgdscope.policy import check_policy, fixed_masks, measurement_mode

HVP_METHODS = ("jvp", "double-backward")
BLOCK_METHODS = HVP_METHODS + ("double-backward-batched",)
# "auto" times the methods on the operator's first products and keeps the fastest, per model and batch
# shape (:data:`AUTO_CHOICES`), because none wins everywhere: on one CPU thread double backward is the
# cheaper single product on MLPs and forward over reverse on SimpleCNN (the double backward of a
# convolution spends extra time in transposed-layout convolutions); the batched second backward wins
# blocks only on small models, where per-operation overhead dominates (bench/results/curvature.json,
# "kernels"); the allocator (page faults, see bench/README.md) and a GPU can reorder them again.
AUTO_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}
# The first call of a method pays one-off set-up, so each is timed at least twice and its best kept; a
# product of a few milliseconds is timed again, up to _AUTO_MAX_ROUNDS rounds or _AUTO_BUDGET_S seconds in
# all, because the best of two such is decided by the machine's noise (measured: a tiny MLP's two block
# methods swapped places from run to run on a busy box).
_AUTO_REPEATS, _AUTO_MAX_ROUNDS, _AUTO_BUDGET_S = 2, 10, 0.05
# Another method replaces double backward only when it is faster by more than this share: methods that
# nearly tie would otherwise be picked by the machine's noise, and two runs of one config (or a run and its
# resumption) would differ in the last bits for little gain. 10% was not enough: on the tiny test MLP the
# batched block measured 14-18% faster on some runs and not on others, on a busy box.
AUTO_PREFERRED, AUTO_MARGIN = "double-backward", 0.25


def pick(timings: dict[str, float]) -> str:
    """The method "auto" keeps from measured seconds: the fastest, unless :data:`AUTO_PREFERRED` is within
    :data:`AUTO_MARGIN` of it, t_pref ≤ (1 + margin)·t_min (then the preferred one: a tie is not a reason to
    switch).

    >>> pick({"jvp": 1.0, "double-backward": 1.05}), pick({"jvp": 1.0, "double-backward": 1.3})
    ('double-backward', 'jvp')
    """
    best = min(timings, key=timings.get)
    pref = timings.get(AUTO_PREFERRED, math.inf)
    return AUTO_PREFERRED if math.isfinite(pref) and pref <= (1 + AUTO_MARGIN) * timings[best] else best


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
    ``method``: "jvp", "double-backward", or "auto"; ``block_method``: one of :data:`BLOCK_METHODS`, or
    None for the same as ``method`` ("auto" included). Under "auto" the first single product is timed by
    each of :data:`HVP_METHODS` and the first block by each of :data:`BLOCK_METHODS`, on the first batch
    (a block on two of its rows), the methods interleaved, best of two calls each (wall clock; these timing
    products are counted in ``n_timing_hvps``, not ``n_hvps``); the fastest is kept (double backward
    unless another beats it by more than 25%, :func:`pick`), cached in
    :data:`AUTO_CHOICES` per model class and parameter shapes, batch shapes, device, dtype and policy, so the operators a tracker
    builds step after step time once. ``method_timings`` holds the seconds compared. Blocks are applied
    ``max_block`` vectors at a time to bound memory.

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
        block_method: str | None = None,
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
        block_method = method if block_method is None else block_method
        if block_method not in ("auto",) + BLOCK_METHODS:
            raise ValueError(f"HessianOperator: block_method {block_method!r} is not one of auto, "
                             f"{', '.join(BLOCK_METHODS)}")
        if max_block < 1:
            raise ValueError("HessianOperator: max_block must be at least 1")
        named = named_trainable(model, param_filter)
        if not named:
            raise ValueError("HessianOperator: no trainable parameter passes param_filter")
        self.model, self.loss_fn, self.bn_policy = model, loss_fn, bn_policy
        self.ignore_index, self.mask_seed = ignore_index, mask_seed
        self.auto = "auto" in (method, block_method)
        self.method = None if method == "auto" else method
        self.block_method = None if block_method == "auto" else block_method
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

    def _hvp(self, method: str, params: dict[str, Tensor], tangents: dict[str, Tensor], batch: Batch, scale: float,
             block: bool) -> dict[str, Tensor]:
        """Batch ``batch``'s term of H v (``block``: of each row of the tangents) by ``method``."""
        def loss(p: dict[str, Tensor]) -> Tensor:
            return self._loss(p, *batch, scale)

        if method == "jvp":
            return hvp.jvp_block(loss, params, tangents) if block else hvp.forward_over_reverse(loss, params, tangents)
        return hvp.reverse_over_reverse(loss, params, tangents, block, batched=method == "double-backward-batched")

    def _auto_key(self, block: bool) -> tuple:
        def shape(x: Inputs) -> tuple:
            if isinstance(x, dict):
                return tuple((k, tuple(v.shape)) for k, v in sorted(x.items()))
            if isinstance(x, (tuple, list)):
                return tuple(tuple(t.shape) for t in x)
            return tuple(x.shape)

        batches = tuple((shape(x), tuple(y.shape)) for _, (x, y), _ in self._terms)
        # The model's class and parameter shapes, not its id: a fresh instance of the same model (a second
        # run in one process) costs the same and so gets the same choice, and a freed model's id can be
        # reused by a different one.
        shapes = tuple((n, tuple(p.shape)) for n, p in named_trainable(self.model))
        return (type(self.model).__qualname__, shapes, self.n_params, batches, str(self.device), str(self.dtype),
                self.bn_policy, block)

    def _time(self, methods: Sequence[str], params: dict[str, Tensor], tangents: dict[str, Tensor],
              block: bool) -> tuple[dict[str, float], int]:
        """Seconds of one product on the first batch by each of ``methods``, best of ``_AUTO_REPEATS``
        rounds or more (up to ``_AUTO_MAX_ROUNDS`` while the rounds so far took under ``_AUTO_BUDGET_S``),
        and the number of rounds run. The methods alternate within a round, so a slow spell of the machine
        hits them alike. A method that fails (e.g. torch.func cannot trace the model) gets inf; the last
        one's error is raised if all fail."""
        b, batch, scale = self._terms[0]
        best = dict.fromkeys(methods, math.inf)
        failed: dict[str, RuntimeError] = {}
        start, rounds = time.perf_counter(), 0
        while rounds < _AUTO_REPEATS or (rounds < _AUTO_MAX_ROUNDS and time.perf_counter() - start < _AUTO_BUDGET_S):
            rounds += 1
            for method in methods:
                if method in failed:
                    continue
                self._sync()
                t0 = time.perf_counter()
                try:
                    with fixed_masks(self.mask_seed, b, self.device):
                        self._hvp(method, params, tangents, batch, scale, block)
                except RuntimeError as e:
                    failed[method] = e
                    continue
                self._sync()
                best[method] = min(best[method], time.perf_counter() - t0)
        if len(failed) == len(methods):
            raise failed[methods[-1]]
        return best, rounds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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
            methods = BLOCK_METHODS if block else HVP_METHODS
            timings, rounds = self._time(methods, params, tangents, block)
            self.n_timing_hvps += rounds * sum(math.isfinite(t) for t in timings.values()) * m
            AUTO_CHOICES[key] = (pick(timings), timings)
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
            for b, batch, scale in self._terms:
                with fixed_masks(self.mask_seed, b, self.device):
                    hvp.add_into(out, self._hvp(method, params, tangents, batch, scale, block), self._names)
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
        with measurement_mode(self.model, self.bn_policy), torch.enable_grad():
            for b, batch, scale in self._terms:
                leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
                with fixed_masks(self.mask_seed, b, self.device):
                    loss = self._loss(leaves, *batch, scale)
                if loss.requires_grad:  # a loss that does not reach the measured parameters has gradient 0
                    g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                    hvp.add_into(out, {n: torch.zeros_like(p) if gi is None else gi
                                       for (n, p), gi in zip(params.items(), g)}, self._names)
        return out

    def __repr__(self) -> str:
        return (
            f"HessianOperator(n_params={self.n_params}, batches={len(self.batches)}, "
            f"method={'auto: ' if self.auto else ''}{self.method!r}/{self.block_method!r}, "
            f"bn_policy={self.bn_policy!r}, l2={self._l2 / 2:g}, n_hvps={self.n_hvps})"
        )

