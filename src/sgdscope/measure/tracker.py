"""Top-K curvature eigenpairs along the trajectory, warm-started from the previous measurement.

The :class:`EigenTracker` owns the curvature operator on the fixed measurement set (the Hessian, or the
Gauss–Newton or empirical Fisher matrix: ``probes.eigen.curvature``) and the last Ritz vectors. Every
consumer (the ``eigen`` probe, the direction, α-step and alignment probes, Nudged-SGD through
``Scope.eigenpairs``) asks it for the pairs at the current step, so one solve serves them all, and each
solve starts from the previous vectors: along a trajectory the top eigenspace moves slowly, which is
what makes the warm start pay. The consumers get the eigenvectors of whichever operator the tracker
holds: with ``curvature: ggn`` the direction probes walk along GGN eigenvectors and Nudged-SGD rescales the
GGN's top subspace.
"""

from __future__ import annotations

from typing import Any, Optional

from sgdscope import distributed
from sgdscope.curvature import CURVATURES, EigenResult, HessianOperator, top_eigenpairs
from sgdscope.measure.env import Env


def method_kwargs(memo: dict[str, str]) -> dict[str, str]:
    """An operator's ``method``/``block_method`` keywords from a memo that :func:`remember_methods` filled:
    the methods chosen before, "auto" (timed) for what has not been chosen yet."""
    return {"method": memo.get("single", "auto"), "block_method": memo.get("block", "auto")}


def remember_methods(memo: dict[str, str], op: Any) -> None:
    """Record in ``memo`` the HVP methods that ``op`` resolved ("auto" times them at its first products).

    A measurement builds a new operator at every step; once "auto" has chosen, the memo keeps that choice
    for the rest of the run and, in a checkpoint, for its resumption, which would otherwise time afresh and
    could pick another method (two that nearly tie, on a busy machine) and so differ in the last bits."""
    inner = getattr(op, "local", op)  # a ShardedOperator's own rank's operator (None: an empty shard)
    for kind, attr in (("single", "method"), ("block", "block_method")):
        chosen = getattr(inner, attr, None)
        if chosen is not None and kind not in memo:
            memo[kind] = chosen


class EigenTracker:
    """Computes the top-``k`` eigenpairs at most once per step, each solve warm-started.

    ``k`` grows to the largest ``k`` ever asked for, so one cached result serves every consumer.
    """

    def __init__(self, env: Env, k: int, which: str = "LA", tol: Optional[float] = None, max_hvps: int = 500,
                 tol_eig: Optional[float] = 1e-3, curvature: str = "hessian") -> None:
        n = sum(p.numel() for p in env.model.parameters() if p.requires_grad)
        if k > n:
            from sgdscope.errors import ConfigError

            raise ConfigError(f"probes.eigen.k: {k} is larger than the number of parameters ({n})")
        if curvature not in CURVATURES:
            from sgdscope.errors import ConfigError

            raise ConfigError(f"probes.eigen.curvature: {curvature!r} is not one of {', '.join(CURVATURES)}")
        self.env, self.k, self.which, self.tol, self.max_hvps, self.n_params = env, k, which, tol, max_hvps, n
        self.tol_eig, self.curvature = tol_eig, curvature
        self.vectors = None
        # the HVP methods "auto" chose at the first solve (remember_methods), kept in the checkpoint
        self.hvp_methods: dict[str, str] = {}
        self._cache: Optional[tuple[int, EigenResult]] = None
        self._restored_last: Optional[tuple[int, Any]] = None  # `last` after a restore, until the next solve

    def operator(self, step: int = 0) -> HessianOperator:
        """H (or G, or F: ``curvature``) of the mean measured loss at the model's current parameters,
        dropout masks fixed per step (the same masks whichever operator, so the three are comparable);
        sharded over the ranks, one all-reduce per product, when the measurement set is a Shard."""
        env = self.env
        return distributed.hessian_operator(
            env.model, env.loss_fn, env.measure_batches, bn_policy=env.bn_policy, weight_decay=env.l2,
            include_l2=env.l2 > 0, ignore_index=env.ignore_index, mask_seed=env.mask_seed("hessian", step),
            cls=CURVATURES[self.curvature], **method_kwargs(self.hvp_methods),
        )

    def get(self, step: int, k: Optional[int] = None) -> EigenResult:
        """The top-``max(k, self.k)`` eigenpairs at ``step`` (solved once per step, then cached)."""
        want = max(k or 0, self.k)
        if want > self.n_params:
            from sgdscope.errors import ConfigError

            raise ConfigError(f"eigenpairs: k = {want} is larger than the number of parameters ({self.n_params})")
        if self._cache is not None and self._cache[0] == step and len(self._cache[1].values) >= want:
            return self._cache[1]
        self.k = want
        op = self.operator(step)
        res = top_eigenpairs(
            op, k=want, which=self.which, tol=self.tol, tol_eig=self.tol_eig,
            max_hvps=self.max_hvps, init=self.vectors, generator=self.env.generator("eigen-init", step),
        )
        # the next solve starts from every Ritz vector this one kept (its guard too, where it returns them)
        basis = getattr(res, "basis", None)
        self.vectors = basis if basis is not None else res.vectors
        remember_methods(self.hvp_methods, op)
        self._cache = (step, res)
        return res

    @property
    def last(self) -> Optional[tuple[int, Any]]:
        """``(step, eigenvalues)`` of the last solve (kept across a state_dict round trip), or None before any."""
        if self._cache is not None:
            return self._cache[0], self._cache[1].values
        return self._restored_last

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": self.vectors, "k": self.k, "last": self.last, "hvp_methods": dict(self.hvp_methods)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        v = state.get("vectors")
        self.vectors = v.to(self.env.device) if v is not None else None
        self.k = max(self.k, int(state.get("k", self.k)))
        self._cache = None
        self.hvp_methods = dict(state.get("hvp_methods", {}))
        last = state.get("last")
        self._restored_last = (int(last[0]), last[1]) if last is not None else None
