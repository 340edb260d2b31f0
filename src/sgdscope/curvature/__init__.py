"""Curvature of the training loss: flat parameter views, the Hessian operator, eigensolvers, estimators.

>>> from sgdscope.curvature import HessianOperator, top_eigenpairs, frobenius_topk, hutchinson_trace
"""

from sgdscope.curvature.eigen import EigenResult, top_eigenpairs
from sgdscope.curvature.estimators import (
    SpectralDensity,
    TraceEstimate,
    frobenius_topk,
    hutchinson_trace,
    spectral_density,
)
from sgdscope.curvature.hessian import HVP_METHODS, HessianOperator

__all__ = [
    "EigenResult",
    "HVP_METHODS",
    "HessianOperator",
    "SpectralDensity",
    "TraceEstimate",
    "frobenius_topk",
    "hutchinson_trace",
    "spectral_density",
    "top_eigenpairs",
]
