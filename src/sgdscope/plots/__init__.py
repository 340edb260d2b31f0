"""Figures, read only from run stores: the registry :data:`FIGURES` and :func:`plot`.

A *run figure* draws one run directory; a *sweep figure* compares the runs of a sweep directory. Each
figure names the tables, and the columns of them, that it cannot do without, so callers can tell
"nothing to draw" from a bug: a run from a user's own loop may hold any subset of the tables and
columns, and a figure without its data is skipped with a line (:func:`missing`) naming the table or
column and the probe that writes it. Panels whose optional columns are absent say so on the figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional

import matplotlib

from sgdscope.errors import ConfigError, RunStoreError
from sgdscope.plots import curves, geometry, noise, operators, sharpest, slices, walk
from sgdscope.plots._common import STYLE, lacks, source
from sgdscope.plots import sweep as sweep_figs
from sgdscope.store import RunStore
from sgdscope.sweepview import SweepView, is_sweep, open_sweep


class Figure(NamedTuple):
    """A registered figure: ``fn(store_or_sweep_view, out_dir) -> [png paths]``, the tables it needs
    (a sweep figure: in at least one run), what it shows, and for a sweep figure the grid keys that make
    it worth showing in a sweep report (``()``: always; a key ending in "." matches a whole section).
    ``sweep_keys is None`` marks a run figure. ``columns`` names, per table, the columns without which
    the figure cannot be drawn at all; a column that only one panel needs is not listed (that panel
    says it has no data instead)."""

    fn: Callable
    tables: tuple[str, ...]
    description: str
    sweep_keys: Optional[tuple[str, ...]] = None
    columns: Mapping[str, tuple[str, ...]] = {}  # table -> the columns the figure cannot do without


_ALWAYS: tuple[str, ...] = ()

FIGURES: dict[str, Figure] = {
    # one run
    "learning_curves": Figure(curves.learning_curves, ("train",),
                              "Loss, accuracy and learning rate: minibatch values per step, train/val/test per epoch.",
                              columns={"train": ("step",)}),
    "eigenvalues": Figure(sharpest.eigenvalues, ("eigen",),
                          "Top-K Hessian eigenvalues over training (log scale) with ‖H‖_F, and η·λ₁ against 2 "
                          "(Jastrzebski Figs. 1-2; a zoom column when the eigen probe has first_steps).",
                          columns={"eigen": ("step", "index", "value")}),
    "bowl": Figure(sharpest.bowl, ("direction",),
                   "Loss along each measured eigenvector in units of the typical SGD step: a 3-D surface coloured "
                   "by the eigenvalue, and a heat map of L(k)/L(0) (Jastrzebski Fig. 4 left, Figs. 9-12).",
                   columns={"direction": ("step", "eigen_index", "k", "loss")}),
    "alpha_step": Figure(sharpest.alpha_step, ("alpha_step",),
                         "Relative loss change of a step of α·η along e_i alone, per α, with a random direction "
                         "as control (Jastrzebski Fig. 4 right).",
                         columns={"alpha_step": ("step", "eigen_index", "alpha", "relative_change")}),
    "k_min": Figure(sharpest.k_min, ("k_min",),
                    "k_min, the half-width of the bowl in typical steps, per threshold (Jastrzebski sec. 3.2).",
                    columns={"k_min": ("step", "eigen_index", "threshold", "k_min")}),
    "alignment": Figure(sharpest.alignment, ("alignment",),
                        "|cos| of the minibatch and of the full gradient with each top eigenvector.",
                        columns={"alignment": ("step", "eigen_index")}),
    "walk": Figure(walk.walk, ("interpolation",),
                   "Loss interpolated between consecutive iterates, valley floors joined by a dashed line, barrier "
                   "crossings marked; above, the consecutive-gradient cosine and the distance from init "
                   "(Xing Figs. 1-2).", columns={"interpolation": ("step", "alpha", "loss")}),
    "slice2d": Figure(slices.slice2d, ("slice2d",),
                      "Filled contours of the 2-D loss slice around θ_t (along e₁, e₂ or filter-normalised random "
                      "directions, Li et al. 2018) with the earlier iterates projected onto its plane.",
                      columns={"slice2d": ("step", "a", "b", "loss")}),
    "gradient_noise": Figure(noise.gradient_noise, ("gradient_noise", "gradient_noise_step"),
                             "Gradient noise against curvature: σᵢ² = Var⟨g, eᵢ⟩ against λᵢ, σᵢ²/λᵢ over training, "
                             "overlap of the top noise directions with the top-K Hessian subspace (against chance) "
                             "and tr(C)/tr(H) (Xing App. D's future work).",
                             columns={"gradient_noise": ("step", "eigen_index", "eigenvalue", "variance", "ratio"),
                                      "gradient_noise_step": ("step",)}),
    "batch_sharpness": Figure(noise.batch_sharpness, ("batch_sharpness",),
                              "η·λ_max of the minibatch Hessian averaged over batches (min–max band), η·λ₁ and "
                              "SGD's stability limit 2 + 2β.",
                              columns={"batch_sharpness": ("step", "lr", "batch_sharpness", "batch_sharpness_min",
                                                           "batch_sharpness_max", "lr_batch_sharpness",
                                                           "lr_lambda_max", "threshold")}),
    "preconditioned_sharpness": Figure(noise.preconditioned_sharpness, ("preconditioned_sharpness",),
                                       "λ_max(P⁻¹H) with P the optimizer's preconditioner (Adam: √v̂ + ε) and λ₁(H) "
                                       "against the threshold (2+2β₁)/((1−β₁)η) = 38/η (Cohen et al. 2022).",
                                       columns={"preconditioned_sharpness": ("step", "preconditioned_sharpness",
                                                                             "lambda_max", "threshold", "ratio")}),
    "rotation": Figure(geometry.rotation, ("rotation",),
                       "Principal angles between the top-K Hessian subspace and the previous / the reference "
                       "measurement's, with the subspace overlaps (issue 13).",
                       columns={"rotation": ("step", "index", "angle_prev_deg", "angle_ref_deg")}),
    "step_classes": Figure(geometry.step_classes, ("step_classes",),
                           "Per epoch, the share of interpolated steps that descend, cross the valley floor or "
                           "climb a wall, and each class's mean η·λ₁ against 1 and 2 (issue 13).",
                           columns={"step_classes": ("epoch", "n_steps")}),
    # a sweep
    "sweep_curves": Figure(curves.sweep_curves, ("epoch",),
                           "Training loss, validation accuracy and distance from init of every run.", _ALWAYS),
    "peak_lambda": Figure(sweep_figs.peak_lambda_vs, ("eigen",),
                          "Peak λ₁ (5-point smoothed) and the time to 90% of it against each grid axis "
                          "(Jastrzebski Fig. 3).", _ALWAYS, columns={"eigen": ("step", "index", "value")}),
    "cosine_distance": Figure(sweep_figs.cosine_distance_vs, ("train",),
                              "Mean consecutive-gradient cosine and final distance from init against batch size "
                              "and lr (Xing Fig. 4).", ("optimizer.lr", "optimizer.batch_size")),
    "cosine_curves": Figure(walk.cosine_curves, ("train",),
                            "Consecutive-gradient cosine and distance over training, per batch size at fixed lr "
                            "and per lr at fixed batch size (Xing Figs. 2, 4).",
                            ("optimizer.lr", "optimizer.batch_size", "optimizer.name")),
    "variants": Figure(sharpest.variants, ("train", "eigen"),
                       "Loss and λ₁ of the subspace-restricted SGD variants and γ-rescalings started from one "
                       "checkpoint (Jastrzebski Fig. 5).",
                       ("optimizer.mode", "optimizer.gamma", "optimizer.freeze_subspace")),
    "nsgd": Figure(sharpest.nsgd, ("epoch", "eigen"),
                   "Nudged-SGD per γ: training and validation accuracy, λ₁ and ‖H‖_F (Jastrzebski Fig. 6).",
                   ("optimizer.gamma",)),
    "gd_vs_noise": Figure(walk.gd_vs_noise, ("epoch", "train"),
                          "GD, GD with isotropic noise and SGD: loss, accuracy, cosine, distance and final "
                          "parameter norm (Xing Fig. 5).", ("optimizer.name", "optimizer.noise_factor")),
    "curvature_kinds": Figure(operators.curvature_kinds, ("eigen",),
                              "λ₁ of the Hessian, the Gauss–Newton matrix and the empirical Fisher over training on "
                              "one axis, and their ratios to λ₁(H) (probes.eigen.curvature across the runs).",
                              ("probes.eigen.curvature",), columns={"eigen": ("step", "index", "value")}),
    "schedules": Figure(walk.schedules, ("epoch", "train"),
                        "Learning-rate schedules: lr, training loss and validation accuracy (Xing Fig. 6).",
                        ("schedule.",)),
}


def _relevant(fig: Figure, view: SweepView) -> bool:
    keys = fig.sweep_keys or ()
    return not keys or any(v == k or (k.endswith(".") and v.startswith(k)) for v in view.varying for k in keys)


def missing(name: str, target: RunStore | SweepView) -> Optional[str]:
    """Why figure ``name`` cannot be drawn from ``target``, in one line naming the table or column and
    what writes it; None when it can. A sweep figure needs each table (with its columns) in one run."""
    fig = FIGURES[name]
    for table in fig.tables:
        cols = tuple(fig.columns.get(table, ()))
        if isinstance(target, SweepView):
            reasons = [lacks(m.store, table, cols) for m in target.started()] or [lacks(None, table)]
            if all(reasons):
                return reasons[0] if len(set(reasons)) == 1 else f"{reasons[0]} (and no other run has it either)"
        elif (why := lacks(target, table, cols)) is not None:
            return why
    return None


def run_figures(store: RunStore) -> list[str]:
    """The run figures ``store`` has the data for, in registry order."""
    return [n for n, f in FIGURES.items() if f.sweep_keys is None and missing(n, store) is None]


def skipped_run_figures(store: RunStore) -> dict[str, str]:
    """``{figure: why}`` for the run figures ``store`` lacks the data for (see :func:`missing`)."""
    return {n: why for n, f in FIGURES.items() if f.sweep_keys is None and (why := missing(n, store)) is not None}


def sweep_figures(view: SweepView) -> list[str]:
    """The sweep figures that ``view`` has data for and whose grid makes them meaningful."""
    return [n for n, f in FIGURES.items() if f.sweep_keys is not None and _relevant(f, view) and missing(n, view) is None]


def plot(path: str | Path, name: str) -> list[Path]:
    """Draw figure ``name`` of the run or sweep at ``path`` into ``path/figures``; returns the PNG paths.

    Raises ConfigError for an unknown name or a run figure asked of a sweep (and vice versa), and
    RunStoreError when a table or column the figure needs is absent (the message names the probe).
    """
    path = Path(path)
    if name not in FIGURES:
        raise ConfigError(f"unknown figure {name!r}; choose one of: {', '.join(FIGURES)}")
    fig = FIGURES[name]
    if is_sweep(path):
        if fig.sweep_keys is None:
            raise ConfigError(f"{name!r} draws one run; give a run directory, e.g. {path / 'runs' / '<run>'}")
        target: RunStore | SweepView = open_sweep(path)
    else:
        target = RunStore(path)
        if fig.sweep_keys is not None:
            raise ConfigError(f"{name!r} compares the runs of a sweep; give a sweep directory (with sweep.yaml)")
    why = missing(name, target)
    if why is not None:
        raise RunStoreError(f"{path}: figure {name!r} {why}")
    return draw(name, target, path / "figures")


def draw(name: str, target: RunStore | SweepView, out_dir: Path) -> list[Path]:
    """Draw registered figure ``name`` of a run store or sweep view into ``out_dir``, in the house style."""
    with matplotlib.rc_context(STYLE):
        return FIGURES[name].fn(target, out_dir)


__all__ = ["FIGURES", "Figure", "draw", "missing", "plot", "run_figures", "skipped_run_figures", "source", "sweep_figures"]
