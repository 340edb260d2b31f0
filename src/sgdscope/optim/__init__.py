"""Optimizers and learning-rate schedules: Nudged SGD, isotropic-noise GD, and the papers' schedules."""

from sgdscope.optim.noise import IsotropicNoise, gradient_variance
from sgdscope.optim.nsgd import NudgedSGD
from sgdscope.optim.schedules import LRSchedule, build_schedule

__all__ = ["IsotropicNoise", "LRSchedule", "NudgedSGD", "build_schedule", "gradient_variance"]
