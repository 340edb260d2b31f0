"""The valley seen between two consecutive iterates (Xing et al. 2018, sec. 3).

Given the interpolated losses L(α) = L((1−α)θ_t + αθ_{t+1}) on a grid that contains both end points:

* valley floor y_t = min_α L(α);
* height of the iterate above the floor h_t = L(0) − y_t (options: L(1) − y_t, or ½(L(0)+L(1)) − y_t);
* a barrier is crossed when some interior point 0 < α < 1 is higher than both end points (the paper's
  footnote 1) by more than a stated tolerance, by default a relative 1e-6 of the higher end (so float
  round-off of a flat curve cannot make a barrier); its height is max_interior L − max(L(0), L(1)).

Each step is also given a class, from the quadratic picture Xing et al. (2018, sec. 6, after LeCun et al.
1998) use to read their plots (see :func:`step_class`): it *descends* toward the valley floor without
passing it, *crosses* the floor (an interior minimum) or *climbs* a wall (it ends higher than it started).

NaN losses (a diverged evaluation) are treated as missing points: they are skipped for the floor and for
the barrier. A NaN end point makes the height (and the barrier height) NaN, and no barrier is reported,
because "higher than both end points" is undefined. +inf is an ordinary, very high loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from sgdscope.errors import ConfigError

HEIGHTS = ("start", "end", "mean")
# The default relative tolerance of the barrier test: float32 losses carry a relative round-off of about
# 6e-8 per operation, and a mean over batches accumulates a few of them, so a rise of 1e-6·|m| is above
# round-off and far below any barrier worth reporting.
BARRIER_REL_TOL = 1e-6


@dataclass(frozen=True)
class ValleyProfile:
    """The valley summary of one interpolation (all plain Python numbers; see :func:`valley_profile`)."""

    floor: float
    argmin_alpha: float
    interior_min: bool
    height: float
    barrier: bool
    barrier_height: float
    left_loss: float
    right_loss: float


def _as_list(values: Sequence[float] | Tensor) -> list[float]:
    if isinstance(values, Tensor):
        return [float(v) for v in values.detach().reshape(-1).cpu()]
    return [float(v) for v in values]


def valley_profile(
    losses: Sequence[float] | Tensor,
    alphas: Sequence[float] | Tensor,
    height: str = "start",
    rel_tol: float = BARRIER_REL_TOL,
    abs_tol: float = 0.0,
) -> ValleyProfile:
    """Floor, height and barrier of an interpolated loss curve L(α) with α ∈ [0, 1], 0 and 1 included.

    * ``floor`` = min_α L(α); ``argmin_alpha`` = the α attaining it, preferring an end point on ties (then
      the smallest α), so ``interior_min`` ⇔ 0 < argmin_alpha < 1 ⇔ the floor is strictly below both end
      points.
    * ``height``: ``"start"`` L(0) − floor, ``"end"`` L(1) − floor, ``"mean"`` ½(L(0)+L(1)) − floor.
    * ``barrier``: some interior L(α) > m + max(abs_tol, rel_tol·|m|), with m = max(L(0), L(1)): a rise
      above both ends larger than the tolerance. The default is the relative ``BARRIER_REL_TOL`` = 1e-6
      (and no absolute floor), so an interior point that ties with an end point, or exceeds it only by
      round-off, is no barrier; ``rel_tol=0`` gives the paper's "strictly higher". ``barrier_height`` =
      max_interior L − m if a barrier, else 0.

    Raises ConfigError if ``alphas`` lacks 0 or 1, leaves [0, 1], or does not match ``losses`` in length.

    >>> p = valley_profile([1.0, 0.4, 0.5, 0.9], [0, 1/3, 2/3, 1])
    >>> (p.floor, p.interior_min, round(p.height, 6), p.barrier)
    (0.4, True, 0.6, False)
    >>> p = valley_profile([1.0, 1.5, 0.5], [0, 0.5, 1], height="mean")
    >>> (p.barrier, p.barrier_height, p.height, p.argmin_alpha)
    (True, 0.5, 0.25, 1.0)
    """
    ls, al = _as_list(losses), _as_list(alphas)
    if len(ls) != len(al):
        raise ConfigError(f"valley_profile: {len(ls)} losses for {len(al)} alphas")
    if 0.0 not in al or 1.0 not in al:
        raise ConfigError("valley_profile: alphas must include both end points 0 and 1")
    if min(al) < 0.0 or max(al) > 1.0:
        raise ConfigError("valley_profile: alphas must lie in [0, 1]")
    if height not in HEIGHTS:
        raise ConfigError(f"valley_profile: height {height!r} is not one of {', '.join(HEIGHTS)}")
    left, right = ls[al.index(0.0)], ls[al.index(1.0)]
    interior = [(a, l) for a, l in zip(al, ls) if 0.0 < a < 1.0 and not math.isnan(l)]

    ends = [(a, l) for a, l in ((0.0, left), (1.0, right)) if not math.isnan(l)]
    candidates = sorted(ends) + sorted(interior)  # ends first: min() keeps the first of equal losses
    argmin_alpha, floor = min(candidates, key=lambda c: c[1]) if candidates else (math.nan, math.nan)

    top = math.nan if math.isnan(left) or math.isnan(right) else max(left, right)
    peak = max((l for _, l in interior), default=-math.inf)
    barrier = not math.isnan(top) and peak > top + max(abs_tol, rel_tol * abs(top))
    reference = {"start": left, "end": right, "mean": 0.5 * (left + right)}[height]
    return ValleyProfile(
        floor=floor,
        argmin_alpha=argmin_alpha,
        interior_min=0.0 < argmin_alpha < 1.0,
        height=reference - floor,
        barrier=barrier,
        barrier_height=peak - top if barrier else (math.nan if math.isnan(top) else 0.0),
        left_loss=left,
        right_loss=right,
    )


STEP_CLASSES = ("descend", "cross", "climb", "flat")
# the class of a segment with a NaN end point: none of the above is defined
UNDEFINED = "undefined"


def step_class(profile: ValleyProfile, rel_tol: float = BARRIER_REL_TOL, abs_tol: float = 0.0) -> tuple[str, float]:
    """The class of one interpolated step and the absolute tolerance τ it was decided with.

    With L0 = L(θ_t), L1 = L(θ_{t+1}), y = min_α L(α) (the floor) and τ = max(abs_tol, rel_tol·max(|L0|, |L1|)):

    * ``"climb"``: L1 > L0 + τ — the step ends higher than it started: it overshoots the floor and lands
      higher on the far wall (η·λ > 2 along a direction of a quadratic), or walks uphill;
    * ``"cross"``: not a climb, and y < min(L0, L1) − τ — an interior minimum: the step passes the valley
      floor and ends on the other wall no higher than it started (1 < η·λ < 2: under-damped);
    * ``"descend"``: neither, and L1 < L0 − τ — the loss falls to the end without passing a floor
      (η·λ < 1: over-damped);
    * ``"flat"``: none of these by more than τ (a step too small to tell);
    * ``"undefined"`` when L0 or L1 is NaN.

    On the pure quadratic L(x) = ½λx² with the step x → (1 − ηλ)x the classes are exactly those η·λ
    ranges (with L1 = (1 − ηλ)²L0). The α grid resolves a floor only where a grid point falls below both
    ends: a floor within the last grid interval before α = 1 reads as a descent.

    >>> step_class(valley_profile([1.0, 0.3, 0.5], [0, 0.5, 1]))[0], step_class(valley_profile([1.0, 0.6, 0.4], [0, 0.5, 1]))[0]
    ('cross', 'descend')
    """
    left, right, floor = profile.left_loss, profile.right_loss, profile.floor
    if math.isnan(left) or math.isnan(right):
        return UNDEFINED, math.nan
    tol = max(abs_tol, rel_tol * max(abs(left), abs(right)))
    if right > left + tol:
        return "climb", tol
    if floor < min(left, right) - tol:
        return "cross", tol
    if right < left - tol:
        return "descend", tol
    return "flat", tol
