"""Data-parallel measurement and training over a ``torch.distributed`` process group.

Sharding a measurement. Every rank holds the WHOLE measurement batch list ``[(x_1, y_1), ..., (x_B, y_B)]``
(the same list on every rank; the built-in trainer draws it from the seed, a researcher passes the same
data to :class:`~sgdscope.Scope` on every rank). :func:`shard` keeps on rank r the batches b with
``b mod W = r`` and puts an empty placeholder at every other position, so a batch keeps its index, hence
its dropout-mask stream ``fixed_masks(mask_seed, b)``, and its BatchNorm statistics (a batch is never cut).
A kernel that sees a :class:`Shard` weighs its batches by the GLOBAL count N = Σ_b n_b of real targets
(:func:`weigh_shard`), so rank r computes Σ_{b ∈ r} n_b·f_b / N exactly, and one SUM all-reduce
(:func:`reduce_shard`) gives Σ_b n_b·f_b / N, the one-process value up to the order of the float additions.
Explicit L2 terms (λ‖θ‖², 2λθ, 2λI) are added once, after the all-reduce.

With fewer batches than ranks some ranks hold nothing and add zeros: still exact, but no faster; let the
measurement set hold at least W batches (``measure.batch_size`` ≤ subset size / W).

Replicated solvers. A SUM all-reduce hands every rank the same bits, so a solver run on every rank from the
same generator (the eigensolver, the typical-step and α-step arithmetic) stays bit-identical across ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from sgdscope.curvature.flat import flatten, named_trainable
from sgdscope.errors import PeerFailed
from sgdscope.losses import Batch, Weighted, take, weigh

TIMEOUT_ENV = "SGDSCOPE_DIST_TIMEOUT"  # seconds a collective waits for a peer before failing
DEFAULT_TIMEOUT_S = 300.0


def _dist():
    import torch.distributed as dist

    return dist


def active(group: Any = None) -> bool:
    """True when a process group of more than one rank is initialised (``group``: None = the default)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 without an initialised group)."""
    dist = _dist()
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group: Any = None) -> int:
    """The ranks in ``group`` (1 without an initialised group)."""
    dist = _dist()
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main(group: Any = None) -> bool:
    """Rank 0: the one rank that writes the store, the checkpoints and the lock."""
    return rank(group) == 0


def all_reduce(t: Tensor, group: Any = None) -> Tensor:
    """Σ over the ranks of ``t`` (in place, returned); the identity on one process."""
    if active(group):
        _dist().all_reduce(t, op=_dist().ReduceOp.SUM, group=group)
    return t


def broadcast_object(obj: Any, group: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object); the identity on one process."""
    if not active(group):
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=_dist().get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def timeout() -> datetime.timedelta:
    """How long a collective waits for a peer (``SGDSCOPE_DIST_TIMEOUT`` seconds, default 300), so a rank
    whose peer died fails instead of waiting forever."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        secs = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        from sgdscope.errors import ConfigError

        raise ConfigError(f"{TIMEOUT_ENV}: must be a number of seconds; got {raw!r}") from None
    return datetime.timedelta(seconds=secs)


def init_from_env(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment), with
    gloo on CPU and NCCL on CUDA, unless one is initialised already. Returns whether this call created it
    (the caller then destroys it with :func:`shutdown`)."""
    dist = _dist()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout())
    import signal

    signal.signal(signal.SIGTERM, _sigterm)
    return True


def barrier(group: Any = None) -> None:
    """Wait for every rank (a no-op on one process)."""
    if active(group):
        _dist().barrier(group)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # torchrun stops the survivors of a dead rank with SIGTERM: end as interrupted


def shutdown() -> None:
    """Leave the process group (after a failure too: a dead peer must not keep this one waiting)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def peer_failures(group: Any = None) -> Iterator[None]:
    """Turn the error of a collective whose peer is gone (gloo: connection closed, or the timeout) into
    one-line :class:`PeerFailed`."""
    multi = active(group)
    try:
        yield
    except RuntimeError as err:
        if not multi or isinstance(err, PeerFailed):
            raise
        dist_err = isinstance(err, getattr(_dist(), "DistError", ())) or "gloo" in str(err).lower()
        if not dist_err:
            raise
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise PeerFailed(f"rank {rank(group)}: a peer rank stopped ({first[:160]})") from None


class StatusWriter:
    """Writes the run's status: rank 0 through its store; any other rank only to record a failure that
    rank 0 could not record itself because it died (its lock is then free: the kernel dropped its flock),
    and only over a status still ``running``."""

    def __init__(self, store: Any, out: Any) -> None:
        self.store, self.out = store, out

    def set(self, state: str, **fields: Any) -> None:
        if self.store is not None:
            self.store.set_status(state, **fields)
            return
        if state not in ("failed", "interrupted"):
            return
        from sgdscope.errors import RunStoreError
        from sgdscope.store import RunStore

        try:
            store = RunStore(self.out)
        except RunStoreError:
            return
        try:
            store.acquire_writer()
            if store.status().get("state") == "running":
                fields.pop("step", None), fields.pop("epoch", None)  # rank 0's last record of them stands
                store.set_status(state, **fields)
        except RunStoreError:
            pass  # rank 0 lives and records the end itself
        finally:
            store.close()


# -- data-parallel training ------------------------------------------------------------------------------


def part(n: int, group: Any = None) -> slice:
    """This rank's contiguous part of a global batch of ``n`` examples (``torch.tensor_split`` sizes: the
    first n mod W ranks take one more; a rank may get none when n < W)."""
    w, r = world_size(group), rank(group)
    size, extra = divmod(n, w)
    start = r * size + min(r, extra)
    return slice(start, start + size + (r < extra))


def sync_grads(params: Sequence[Tensor], group: Any = None) -> None:
    """Sum ``.grad`` over the ranks in one all-reduce of the flattened gradients (a missing one counts
    as zeros). Each rank backpropagated its part's loss weighted by n_r / n, so the sum is the exact mean
    gradient of the global batch, the one-process gradient up to float rounding (what
    DistributedDataParallel computes for equal parts, without its hooks on the parameters)."""
    if not active(group):
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    all_reduce(flat, group)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def broadcast_buffers(model: nn.Module, group: Any = None) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP's ``broadcast_buffers``:
    each rank's BN saw only its part of the batch, and the ranks must measure one model."""
    if not active(group):
        return
    src = _dist().get_global_rank(group, 0) if group is not None else 0
    for b in model.buffers():
        _dist().broadcast(b, src=src, group=group)


# -- sharded batch lists --------------------------------------------------------------------------------


class Shard(list):
    """Rank ``rank``'s part of the batch list ``full``: ``full[b]`` where ``b mod world = rank``, an empty
    batch (weight 0) elsewhere, so positions, mask streams and BN statistics are those of ``full``."""

    def __init__(self, full: Sequence[Batch], rank: int, world: int, group: Any = None) -> None:
        self.full, self.rank, self.world, self.group = list(full), rank, world, group
        super().__init__(b if i % world == rank else (take(b[0], slice(0, 0)), b[1][:0]) for i, b in enumerate(full))


def shard(batches: Sequence[Batch], group: Any = None) -> Sequence[Batch]:
    """``batches`` as this rank's :class:`Shard` when a group of several ranks is active, else unchanged."""
    if isinstance(batches, Shard) or not active(group):
        return batches
    return Shard(batches, rank(group), world_size(group), group)


def full(batches: Sequence[Batch]) -> list[Batch]:
    """The whole batch list behind ``batches`` (itself when it is not a :class:`Shard`)."""
    return batches.full if isinstance(batches, Shard) else list(batches)


def weigh_shard(batches: Sequence[Batch], ignore_index: Optional[int] = None) -> tuple[list[Weighted], int]:
    """:func:`sgdscope.losses.weigh` of this rank's batches with the GLOBAL total N = Σ_b n_b over every
    rank's batches (the list itself when not sharded); the rank's list may be empty."""
    if not isinstance(batches, Shard):
        return weigh(batches, ignore_index)
    weighted, total = weigh(batches.full, ignore_index)  # every rank holds the whole list: no communication
    return [w for w in weighted if w.index % batches.world == batches.rank], total


def reduce_shard(batches: Sequence[Batch], t: Tensor) -> Tensor:
    """Σ over the ranks of the partial sums ``t`` when ``batches`` is a :class:`Shard`; else ``t``."""
    return all_reduce(t, batches.group) if isinstance(batches, Shard) else t


# -- operators ------------------------------------------------------------------------------------------


class ShardedOperator:
    """The Hessian operator of a :class:`Shard`: ``H = Σ_r (N_r / N) H_r + 2λI`` with H_r the operator of
    rank r's batches (their own mean, weights n_b / N_r) and N_r, N the rank's and the global real targets,
    so ``H = Σ_b (n_b / N) ∇²L_b + 2λI`` exactly. Every product is one all-reduce; the 2λ term is added
    once, after it. Same protocol as :class:`~sgdscope.curvature.HessianOperator` (``matvec``, ``matmat``,
    ``dense``, ``gradient``, ``n_params``, ``device``, ``dtype``, ``method``, ``n_hvps``).

    ``make(batches, weight_decay, include_l2)`` builds the rank-local operator (a HessianOperator)."""

    def __init__(self, make: Callable[..., Any], model: nn.Module, batches: "Shard", weight_decay: float = 0.0,
                 include_l2: bool = True, param_filter: Any = None, ignore_index: Optional[int] = None) -> None:
        self.batches, self.model, self.param_filter = batches, model, param_filter
        mine, total = weigh_shard(batches, ignore_index)
        self._scale = sum(w.n for w in mine) / total
        # the local operator holds only this rank's batches; the empty placeholders keep their positions
        self.local = make(batches, weight_decay=0.0, include_l2=False) if mine else None
        named = named_trainable(model, param_filter)
        self._l2 = 2.0 * weight_decay if include_l2 else 0.0
        self.n_params = sum(p.numel() for _, p in named)
        self.device, self.dtype = named[0][1].device, named[0][1].dtype
        self.method = self.local.method if self.local is not None else "none"
        self.n_hvps = 0

    def _sum(self, local: Optional[Callable[[], Tensor]], like: Tensor) -> Tensor:
        out = local() * self._scale if local is not None else torch.zeros_like(like)
        return all_reduce(out, self.batches.group)

    def matvec(self, v: Tensor) -> Tensor:
        """Hv (one all-reduce of n numbers)."""
        v = v.to(device=self.device, dtype=self.dtype)
        out = self._sum(self.local and (lambda: self.local.matvec(v)), v) + self._l2 * v
        self.n_hvps += 1
        return out

    def matmat(self, V: Tensor) -> Tensor:
        """Rows Hv_i of the block ``V`` (m, n): one all-reduce of m·n numbers; counts m HVPs."""
        V = V.to(device=self.device, dtype=self.dtype)
        out = self._sum(self.local and (lambda: self.local.matmat(V)), V) + self._l2 * V
        self.n_hvps += V.shape[0]
        return out

    def dense(self) -> Tensor:
        """The full (n, n) matrix H: only for tiny models and tests."""
        return self.matmat(torch.eye(self.n_params, device=self.device, dtype=self.dtype))

    def gradient(self) -> Tensor:
        """∇L(θ) = Σ_b (n_b / N) ∇L_b (+ 2λθ once), as a flat vector; no HVP is counted."""
        theta = flatten(p.detach() for _, p in named_trainable(self.model, self.param_filter))
        return self._sum(self.local and self.local.gradient, theta) + self._l2 * theta

    def __repr__(self) -> str:
        return (f"ShardedOperator(rank={self.batches.rank}/{self.batches.world}, n_params={self.n_params}, "
                f"local={self.local!r}, l2={self._l2 / 2:g}, n_hvps={self.n_hvps})")


def hessian_operator(model: nn.Module, loss_fn: Any, batches: Sequence[Batch], cls: Any = None, **kw: Any) -> Any:
    """A ``cls`` operator (default :class:`~sgdscope.curvature.HessianOperator`; GGN and Fisher take the same
    keywords) over ``batches``, or a :class:`ShardedOperator` of such when ``batches`` is a :class:`Shard`."""
    from sgdscope.curvature import HessianOperator

    cls = cls or HessianOperator
    if not isinstance(batches, Shard):
        return cls(model, loss_fn, batches, **kw)
    wd, l2 = kw.pop("weight_decay", 0.0), kw.pop("include_l2", True)

    def make(b: Sequence[Batch], weight_decay: float, include_l2: bool) -> Any:
        return cls(model, loss_fn, list(b), weight_decay=weight_decay, include_l2=include_l2, **kw)

    return ShardedOperator(make, model, batches, wd, l2, kw.get("param_filter"), kw.get("ignore_index"))


def minibatch_grads(batches: Sequence[Batch], model: nn.Module, loss_fn: Any, x: Any, y: Tensor, batch_size: int,
                    n: int, generator: torch.Generator, **kw: Any) -> Tensor:
    """:func:`sgdscope.landscape.minibatch_grads` with its ``n`` gradients dealt out over the ranks of the
    :class:`Shard` ``batches``: every rank draws all n minibatches from the same generator (so they are the
    one-process minibatches whatever the world size), computes those j with ``j mod W = rank`` (minibatch j
    under its own masks ``fixed_masks(mask_seed, j)``) and leaves zeros elsewhere; the all-reduce then
    adds exact zeros, so the stack equals the one-process one bit for bit."""
    from sgdscope.landscape import minibatch_grads as draw

    if not isinstance(batches, Shard):
        return draw(model, loss_fn, x, y, batch_size, n, generator, **kw)
    g = draw(model, loss_fn, x, y, batch_size, n, generator, only=range(batches.rank, n, batches.world), **kw)
    return all_reduce(g, batches.group)
