"""Measurements taken along the trajectory, each a :class:`~sgdscope.probes.base.Probe` with a schedule."""

from __future__ import annotations

from sgdscope.config import RunConfig
from sgdscope.probes.base import Context, Probe, StepInfo
from sgdscope.probes.eigen import EigenProbe, EigenTracker

__all__ = ["Context", "Probe", "StepInfo", "EigenTracker", "build_probes"]


def _tracker_k(cfg: RunConfig) -> int:
    p = cfg.probes
    ks = [p.eigen.k if p.eigen else 1]
    if p.direction:
        ks.append(max(p.direction.eigen_indices))
    if p.alpha_step:
        ks.append(max(p.alpha_step.eigen_indices))
    if cfg.optimizer.name == "nsgd":
        ks.append(cfg.optimizer.k)
    return max(ks)


def build_probes(cfg: RunConfig, ctx: Context) -> list[Probe]:
    """Instantiate the probes the config enables, and the eigen tracker they (or Nudged-SGD) share."""
    p = cfg.probes
    needs_tracker = p.eigen or p.direction or p.alpha_step or p.alignment or cfg.optimizer.name == "nsgd"
    if needs_tracker:
        e = p.eigen
        ctx.tracker = EigenTracker(
            ctx, _tracker_k(cfg), which=e.which if e else "LA", tol=e.tol if e else 1e-3,
            max_hvps=e.max_hvps if e else 500,
        )
    probes: list[Probe] = []
    if p.eigen:
        probes.append(EigenProbe(p.eigen, ctx))
    for name, cls in _extra_probes().items():
        pcfg = getattr(p, name)
        if pcfg is not None:
            probes.append(cls(pcfg, ctx))
    return probes


def _extra_probes() -> dict[str, type[Probe]]:
    """The trajectory probes of the two papers (imported lazily: they pull in the landscape code)."""
    from sgdscope.probes.sharpest import AlignmentProbe, AlphaStepProbe, DirectionProbe
    from sgdscope.probes.walk import InterpolationProbe

    return {
        "direction": DirectionProbe,
        "alpha_step": AlphaStepProbe,
        "alignment": AlignmentProbe,
        "interpolation": InterpolationProbe,
    }
