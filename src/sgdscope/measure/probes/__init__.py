"""Every probe, by the name its options take in ``probes:`` (see :mod:`sgdscope.measure.options`)."""

from __future__ import annotations

from sgdscope.measure.probes.base import Probe, StepInfo
from sgdscope.measure.probes.eigen import EigenProbe
from sgdscope.measure.probes.noise import GradientNoiseProbe
from sgdscope.measure.probes.rotation import RotationProbe
from sgdscope.measure.probes.sharpness import BatchSharpnessProbe, PreconditionedSharpnessProbe
from sgdscope.measure.probes.sharpest import AlignmentProbe, AlphaStepProbe, DirectionProbe
from sgdscope.measure.probes.slices import Slice2DProbe
from sgdscope.measure.probes.stats import DistanceProbe, GradientProbe, WeightsProbe, weight_spectral_norm_mean
from sgdscope.measure.probes.walk import InterpolationProbe

PROBES: dict[str, type[Probe]] = {
    cls.name: cls
    for cls in (GradientProbe, DistanceProbe, WeightsProbe, EigenProbe, DirectionProbe, AlphaStepProbe,
                AlignmentProbe, InterpolationProbe, Slice2DProbe, GradientNoiseProbe, BatchSharpnessProbe,
                PreconditionedSharpnessProbe, RotationProbe)
}
# probes that always read the shared eigen tracker; a probe that reads it only for some options (slice2d
# with eigen directions) says so by its tracker_k() instead
EIGEN_CONSUMERS = ("eigen", "direction", "alpha_step", "alignment", "gradient_noise", "batch_sharpness",
                   "preconditioned_sharpness", "rotation")

__all__ = ["PROBES", "EIGEN_CONSUMERS", "Probe", "StepInfo", "weight_spectral_norm_mean"]
