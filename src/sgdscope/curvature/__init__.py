"""Curvature of the training loss: flat parameter views, the Hessian operator and its Gauss–Newton and
empirical Fisher companions, eigensolvers, estimators.

>>> from sgdscope.curvature import HessianOperator, GGNOperator, FisherOperator, top_eigenpairs
"""

from sgdscope.curvature.eigen import EigenResult, top_eigenpairs
from sgdscope.curvature.estimators import (
    SpectralDensity,
    TraceEstimate,
    frobenius_topk,
    hutchinson_trace,
    spectral_density,
)
from sgdscope.curvature.ggn import FisherOperator, GGNOperator
from sgdscope.curvature.hessian import BLOCK_METHODS, HVP_METHODS, HessianOperator

# the operators the eigen probe's ``curvature`` option names; all take HessianOperator's keywords
CURVATURES = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}

__all__ = [
    "BLOCK_METHODS",
    "CURVATURES",
    "EigenResult",
    "FisherOperator",
    "GGNOperator",
    "HVP_METHODS",
    "HessianOperator",
    "SpectralDensity",
    "TraceEstimate",
    "frobenius_topk",
    "hutchinson_trace",
    "spectral_density",
    "top_eigenpairs",
]
