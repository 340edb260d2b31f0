"""Loss landscapes seen by SGD: interpolation between iterates, valleys, loss along sharp directions."""

from sgdscope.landscape.directions import (
    alpha_step_changes,
    k_min,
    minibatch_grads,
    minibatch_indices,
    random_direction,
    typical_step,
)
from sgdscope.landscape.interpolate import interpolate, loss_along, loss_at_points
from sgdscope.landscape.slices import filter_normalized_direction, loss_slice, plane_coordinates, slice_axis
from sgdscope.landscape.valley import BARRIER_REL_TOL, STEP_CLASSES, ValleyProfile, step_class, valley_profile

__all__ = [
    "BARRIER_REL_TOL",
    "STEP_CLASSES",
    "ValleyProfile",
    "alpha_step_changes",
    "filter_normalized_direction",
    "interpolate",
    "k_min",
    "loss_along",
    "loss_at_points",
    "loss_slice",
    "minibatch_grads",
    "plane_coordinates",
    "minibatch_indices",
    "random_direction",
    "slice_axis",
    "step_class",
    "typical_step",
    "valley_profile",
]
