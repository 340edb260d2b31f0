"""The options of every probe: pydantic models shared by a run config's ``probes:`` section and by
:class:`~sgdscope.measure.Scope`'s ``probes=`` mapping, so both take the same keys, defaults and checks.

A probe is enabled by its presence (``None`` disables it). The per-step and per-epoch statistics
(``gradient``, ``distance``, ``weights``) are on by default; the trajectory probes are off.

Schedules (``every``): ``"epoch"`` runs at step 0 and at each epoch end; an integer N runs at every N-th
step, step 0 included; ``first_steps: M`` also runs at every step up to M (the papers' zoom).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sgdscope.errors import ConfigError, format_validation_error

Every = Union[Literal["epoch"], int]


class Strict(BaseModel):
    """Unknown keys are errors, assignments are validated, and NaN or infinite numbers are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def check_every(v: Any) -> Any:
    """``every`` is "epoch" or a positive whole number of steps (0 would never run, -5 is no schedule)."""
    if v == "epoch" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        return v
    raise ValueError("must be 'epoch' or a positive number of steps")


def check_eigen_indices(v: list[int]) -> list[int]:
    """Eigenvector numbers are 1-based (1 = the sharpest direction) and at least one is asked for."""
    if not v or min(v) < 1:
        raise ValueError("must be a non-empty list of 1-based eigen indices")
    return v


class _Probe(Strict):
    every: Every = "epoch"
    first_steps: int = Field(0, ge=0)  # zoom: also measure at every step <= first_steps

    _every = field_validator("every", mode="before")(check_every)


class GradientProbe(Strict):
    """Per step (table ``train``): ‖g‖ and cos(g_{t−1}, g_t) of the gradient the update used."""


class DistanceProbe(Strict):
    """Per step (table ``train``): ‖θ_t − θ_0‖."""


class WeightsProbe(Strict):
    """Per epoch end (table ``epoch``): ρ(W), the mean largest singular value of the weight matrices, and ‖θ‖."""


class EigenProbe(_Probe):
    """Top-K eigenpairs of the curvature operator named by ``curvature``: the Hessian (default), the
    generalised Gauss–Newton matrix or the empirical Fisher (:mod:`sgdscope.curvature.ggn`). The tracker
    holds that operator's pairs, so the direction, α-step and alignment probes and Nudged-SGD read its
    eigenvectors too. ``tol``: the relative residual target, None = the solver's default (1e-3 from a
    random start, 5e-2 from the previous step's basis); ``tol_eig``: the relative eigenvalue error bound
    every pair must also meet (None: residual only). See :func:`sgdscope.curvature.top_eigenpairs`."""

    curvature: Literal["hessian", "ggn", "fisher"] = "hessian"
    k: int = Field(5, gt=0, le=100)
    which: Literal["LA", "LM"] = "LA"
    tol: Optional[float] = Field(None, gt=0)
    tol_eig: Optional[float] = Field(1e-3, gt=0)
    max_hvps: int = Field(500, gt=0)
    save_vectors: bool = False


class DirectionProbe(_Probe):
    eigen_indices: list[int] = Field(default_factory=lambda: [1, 3, 5])
    ks: list[float] = Field(default_factory=lambda: [0, 0.25, -0.25, 0.5, -0.5, 1, -1, 2, -2, 4, -4, 8, -8, 16, -16])
    n_grads: int = Field(10, gt=0)
    thresholds: list[float] = Field(default_factory=lambda: [0.01, 0.1])

    _indices = field_validator("eigen_indices")(check_eigen_indices)


class AlphaStepProbe(_Probe):
    eigen_indices: list[int] = Field(default_factory=lambda: [1])
    alphas: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1, 2, 4])
    n_grads: int = Field(10, gt=0)

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if not v or any(a <= 0 for a in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must be a non-empty, increasing list of positive step multipliers")
        return v

    _indices = field_validator("eigen_indices")(check_eigen_indices)


class InterpolationProbe(_Probe):
    every: Every = 1
    epochs: Optional[list[int]] = Field(default_factory=lambda: [1])  # None: every epoch
    alphas: Union[int, list[float]] = 10
    subset: Literal["full", "measure"] = "full"
    height: Literal["start", "end", "mean"] = "start"
    # λ₁ beside each step class: "last" = the last value the shared eigen tracker solved (no extra solve;
    # NaN without an eigen-reading probe), "solve" = a tracked solve at every interpolated segment's end
    lambda1: Literal["last", "solve"] = "last"
    class_rel_tol: float = Field(1e-6, ge=0)  # step classes: rises and falls below this share of the loss are none

    @field_validator("alphas")
    @classmethod
    def _grid(cls, v: Union[int, list[float]]) -> Union[int, list[float]]:
        if isinstance(v, int):
            if v < 2:
                raise ValueError("needs at least 2 points")
            return v
        if len(v) < 2 or any(b <= a for a, b in zip(v, v[1:])) or v[0] != 0 or v[-1] != 1:
            raise ValueError("must be a sorted list of at least 2 distinct values from 0 to 1 (the two iterates)")
        return v


class Slice2DProbe(_Probe):
    """The loss on a 2-D grid around θ_t (Li et al. 2018) and the trajectory projected onto that plane
    (:mod:`sgdscope.measure.probes.slices`)."""

    directions: Literal["eigen", "random"] = "eigen"  # e₁, e₂ of the tracker | filter-normalised random
    grid: int = Field(21, ge=3, le=201)  # points per axis
    span: float = Field(1.0, gt=0)  # a, b ∈ [−span, span]: parameter distance (eigen) or filter units (random)
    subset: Literal["measure", "full"] = "measure"
    method: Literal["auto", "loop", "vmap"] = "auto"  # loss_at_points' evaluation: vmap batches a grid row
    max_snapshots: int = Field(64, ge=2, le=10_000)  # past iterates kept (on CPU) for the projected path
class RotationProbe(_Probe):
    """Principal angles between the tracked top-K subspace and the previous / the reference measurement's.

    ``k`` defaults to the eigen probe's k (5 without it); ``reference_step`` 0 compares with the first
    measurement, s > 0 with the first measurement at a step ≥ s."""

    k: Optional[int] = Field(None, gt=0, le=100)
    reference_step: int = Field(0, ge=0)


class AlignmentProbe(_Probe):
    """cos(g, e_i) of the minibatch and the full gradient with each tracked eigenvector (no extra keys)."""


class GradientNoiseProbe(_Probe):
    """σ_i² = Var_j⟨g_j, e_i⟩ over ``n_grads`` minibatch gradients against λ_i for the top ``k`` pairs; the
    overlap of the top ``m`` noise directions with the top-k Hessian subspace; tr(C)/tr(H), tr(H) by
    Hutchinson with ``trace_samples`` Rademacher vectors (see :mod:`sgdscope.curvature.noise`)."""

    n_grads: int = Field(32, ge=3)
    k: int = Field(5, gt=0, le=100)
    m: int = Field(3, gt=0)
    trace_samples: int = Field(30, ge=2)

    @model_validator(mode="after")
    def _m(self) -> "GradientNoiseProbe":
        if self.m > self.k or self.m > self.n_grads - 1:
            raise ValueError(f"m ({self.m}) must be <= k ({self.k}) and <= n_grads - 1 ({self.n_grads - 1}): "
                             "the overlap compares m noise directions with k Hessian ones, and n gradients span n - 1")
        return self


class BatchSharpnessProbe(_Probe):
    """λ_max of the Hessian of each of ``n_batches`` minibatches of the training batch size, averaged; each
    solve stops at relative residual ``tol`` or after ``max_hvps`` products. In a Scope, pass
    ``batch_size`` (else a "minibatch" is the whole measurement set and this is the full-batch λ₁)."""

    n_batches: int = Field(10, gt=0)
    tol: float = Field(1e-2, gt=0)
    max_hvps: int = Field(100, gt=0)


class PreconditionedSharpnessProbe(_Probe):
    """λ_max(P⁻¹H) on the measurement set, P the optimizer's current diagonal preconditioner (Adam: √v̂ + ε;
    SGD: I), against its stability threshold (see :mod:`sgdscope.curvature.preconditioned`)."""

    tol: float = Field(1e-3, gt=0)
    max_hvps: int = Field(200, gt=0)


class ProbesOptions(Strict):
    """Every probe's options; ``None`` disables a probe."""

    gradient: Optional[GradientProbe] = Field(default_factory=GradientProbe)
    distance: Optional[DistanceProbe] = Field(default_factory=DistanceProbe)
    weights: Optional[WeightsProbe] = Field(default_factory=WeightsProbe)
    eigen: Optional[EigenProbe] = None
    direction: Optional[DirectionProbe] = None
    alpha_step: Optional[AlphaStepProbe] = None
    interpolation: Optional[InterpolationProbe] = None
    alignment: Optional[AlignmentProbe] = None
    slice2d: Optional[Slice2DProbe] = None
    gradient_noise: Optional[GradientNoiseProbe] = None
    batch_sharpness: Optional[BatchSharpnessProbe] = None
    preconditioned_sharpness: Optional[PreconditionedSharpnessProbe] = None
    rotation: Optional[RotationProbe] = None

    @model_validator(mode="after")
    def _rotation_k(self) -> "ProbesOptions":
        # resolved here, so the run config records the K actually measured
        if self.rotation is not None and self.rotation.k is None:
            self.rotation.k = self.eigen.k if self.eigen is not None else 5
        return self


def probe_options(probes: Union[None, ProbesOptions, Mapping[str, Any]]) -> ProbesOptions:
    """Validate a ``probes`` mapping (as in a run config) into :class:`ProbesOptions`.

    A bad key or value raises a one-line :class:`~sgdscope.errors.ConfigError` naming it:

    >>> probe_options({"eigen": {"k": 0}})
    Traceback (most recent call last):
    ...
    sgdscope.errors.ConfigError: probes.eigen.k: Input should be greater than 0; got 0
    """
    if probes is None:
        return ProbesOptions()
    if isinstance(probes, ProbesOptions):
        return probes
    if not isinstance(probes, Mapping):
        raise ConfigError(f"probes: expected a mapping of probe names to options, got {type(probes).__name__}")
    # `{"eigen": {}}` and `{"eigen": True}` both enable a probe with its defaults
    raw = {k: ({} if v is True else v) for k, v in probes.items()}
    try:
        return ProbesOptions.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix="probes")) from None
