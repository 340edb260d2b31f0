"""Exact Hessian-vector products of a scalar function of named parameters: the kernels behind
:class:`sgdscope.curvature.hessian.HessianOperator`.

Each kernel takes ``loss``, a function of a dict ``name -> tensor`` returning a scalar f(θ), the point θ
(``params``, detached) and tangents v (``tangents``, same names; a block carries a leading dimension m),
and returns ∇²f(θ)v per name. Every kernel computes the same symmetric matrix; they differ in cost:

* :func:`forward_over_reverse`: Hv = d/dt ∇f(θ + tv) at t = 0 with forward-mode dual numbers
  (``torch.autograd.forward_ad``) carried through one forward and one backward pass.
* :func:`jvp_block`: the same derivative for a block through ``torch.func``: ``vmap`` of ``jvp`` of
  ``grad``, so the primal forward and backward work is shared by the block's rows.
* :func:`reverse_over_reverse`: Hv = ∇_θ ⟨∇f(θ), v⟩: a first backward that records its own graph
  (``create_graph``) and a second backward with v as its output gradient. A block shares the forward and
  first backward; its second backwards run one per row on the retained graph, or (``batched``) as one
  vmapped backward (``is_grads_batched``).

Flop count per linear or convolution layer, in units of that layer's forward product: a gradient takes 3
(2 for the first layer, whose input needs no gradient), an HVP by either route 9 (4 for the first layer),
of which the primal forward and backward are the gradient's 3. So one HVP costs at least 2.5-3 gradients
(2.5 when the first layer dominates), and a block of m at least (3 + 6m)/9 HVPs: 3.67 for m = 5 (3.4 when
the first layer dominates), whichever kernel is used; batching only buys back per-operation overhead.
The measured costs are in bench/results/curvature.json.

>>> import torch
>>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
>>> f = lambda p: 0.5 * p["w"] @ A @ p["w"] + p["w"].sum() ** 3
>>> w, v = {"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([1.0, 0.0])}
>>> forward_over_reverse(f, w, v)["w"], reverse_over_reverse(f, w, v)["w"]
(tensor([2., 1.]), tensor([2., 1.]))
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import grad, jvp, vmap

Loss = Callable[[dict[str, Tensor]], Tensor]
Named = dict[str, Tensor]


def _zeros_for_none(out: list[Tensor | None], params: Named, lead: tuple[int, ...] = ()) -> Named:
    # A parameter the loss does not reach, or whose gradient does not depend on θ, has a zero row of H.
    return {n: torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device) if h is None else h
            for (n, p), h in zip(params.items(), out)}


def forward_over_reverse(loss: Loss, params: Named, tangents: Named) -> Named:
    """∇²f(θ)v by forward mode over reverse mode: the loss is evaluated at dual parameters θ + εv, and the
    tangent part of its gradient is Hv. One dual forward and one dual backward; no graph of the backward
    is kept, so the memory is that of a gradient whose saved tensors carry tangents (about twice)."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad(), fwAD.dual_level():
        value = loss({n: fwAD.make_dual(leaf, tangents[n]) for n, leaf in leaves.items()})
        if not value.requires_grad:  # the loss does not depend on the measured parameters
            return _zeros_for_none([None] * len(params), params)
        gs = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        tangent = [None if g is None else fwAD.unpack_dual(g).tangent for g in gs]
        return _zeros_for_none([None if t is None or t._is_zerotensor() else t for t in tangent], params)


def jvp_block(loss: Loss, params: Named, tangents: Named) -> Named:
    """Rows ∇²f(θ)v_j for a block of tangents (leading dimension m): ``vmap`` of ``jvp`` of ``grad``.

    ``randomness="same"``: the block draws the random numbers of one product (the caller seeds them), so
    a row equals the single product with the same vector."""
    g = grad(loss)
    return vmap(lambda t: jvp(g, (params,), (t,))[1], randomness="same")(tangents)


def reverse_over_reverse(loss: Loss, params: Named, tangents: Named, block: bool = False,
                         batched: bool = False) -> Named:
    """∇²f(θ)v = ∇_θ⟨∇f(θ), v⟩ by two reverse passes; a ``block`` (leading dimension m) shares the forward
    and the first backward. Its second backwards run one row at a time on the retained graph, or with
    ``batched`` as one backward vmapped over the rows (``is_grads_batched``), which trades per-operation
    overhead for memory and batching rules."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    names, inputs = list(leaves), list(leaves.values())
    m = len(next(iter(tangents.values()))) if block else 1
    lead = (m,) if block else ()
    with torch.enable_grad():
        value = loss(leaves)
        if not value.requires_grad:
            return _zeros_for_none([None] * len(names), params, lead)
        gs = torch.autograd.grad(value, inputs, create_graph=True, allow_unused=True)
        # Gradients that do not depend on θ (or are missing) have no graph: nothing to differentiate, and
        # autograd refuses them as outputs.
        live = [(g, n) for g, n in zip(gs, names) if g is not None and g.requires_grad]
        if not live:
            return _zeros_for_none([None] * len(names), params, lead)
        outs, grads = [g for g, _ in live], [tangents[n] for _, n in live]
        if not block or batched:
            hv = torch.autograd.grad(outs, inputs, grad_outputs=grads, allow_unused=True,
                                     is_grads_batched=block)
            return _zeros_for_none(list(hv), params, lead)
        # One row at a time, each copied into the block's output as it comes, so only one row's
        # products are alive beside it.
        out = {n: torch.zeros(m, *p.shape, dtype=p.dtype, device=p.device) for n, p in params.items()}
        for j in range(m):
            hv = torch.autograd.grad(outs, inputs, grad_outputs=[t[j] for t in grads], allow_unused=True,
                                     retain_graph=j < m - 1)
            for n, h in zip(names, hv):
                if h is not None:
                    out[n][j] = h
    return out


def add_into(out: Tensor, hv: Named, names: list[str]) -> None:
    """``out`` (flat (n,) or a block (m, n)) += the per-name products ``hv``, written through views of
    ``out`` in ``names`` order, so no flat copy of the product is made."""
    lead, i = out.shape[:-1], 0
    for n in names:
        h = hv[n]
        k = h[0].numel() if lead else h.numel()
        out[..., i : i + k].view(*lead, *h.shape[len(lead):]).add_(h)
        i += k
