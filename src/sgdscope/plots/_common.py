"""Shared plotting machinery: one visual style, panels, titles and saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib
from matplotlib.figure import Figure

from sgdscope.store import RunStore

PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
           "#65a30d", "#9333ea"]

# The house style; figure functions run inside matplotlib.rc_context(STYLE) (see sgdscope.plots.draw).
STYLE: dict[str, Any] = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.titleweight": "normal",
    "axes.labelsize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.7,
    "axes.edgecolor": "#9ca3af",
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "lines.linewidth": 1.6,
    "xtick.color": "#374151",
    "ytick.color": "#374151",
}


def color(i: int) -> str:
    """The i-th colour of the palette (cycling)."""
    return PALETTE[i % len(PALETTE)]


def subplots(nrows: int = 1, ncols: int = 1, *, panel: tuple[float, float] = (4.6, 3.2), **kw: Any):
    """A figure of ``nrows × ncols`` panels of size ``panel`` inches; returns ``(fig, axes)`` with
    ``axes`` always 2-D.

    A bare :class:`~matplotlib.figure.Figure`, not pyplot: no backend, no display and no global figure
    registry, so drawing is headless and leaves a user's own matplotlib session alone.
    """
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


NOTES_KEY = "Description"  # the PNG text chunk that holds a figure's notes


def notes(fig: Figure) -> list[str]:
    """Every text annotation drawn on ``fig`` (no-data marks, caveats), in drawing order."""
    return [t.get_text() for t in fig.texts] + [t.get_text() for ax in fig.axes for t in ax.texts]


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path``.

    The figure's notes (:func:`notes`) also go into the PNG's ``Description`` text chunk, so what a
    figure says about missing data or too few points can be read without looking at it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="white", metadata={NOTES_KEY: "\n".join(notes(fig))})
    return path


def auto_window(n: int, target: int = 60) -> int:
    """A smoothing window that leaves about ``target`` independent points of a per-step series."""
    return max(1, n // target)


def title(fig, text: str, sub: str | None = None) -> None:
    """The figure's title, followed by what it was drawn from (the run or the sweep folder)."""
    fig.suptitle(f"{text}   ·   {sub}" if sub else text, fontsize=11.5, fontweight="bold", x=0.01, ha="left")


def no_data(ax, text: str = "no data", clear: bool = True) -> None:
    """Mark an empty panel instead of leaving a blank axis that looks like a bug (``clear=False`` keeps
    the ticks, for a panel that shares its axis with one that has data)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#9ca3af", transform=ax.transAxes, wrap=True,
            fontsize=8.5)
    if clear:
        ax.set_xticks([])
        ax.set_yticks([])


def caveat(where, text: str) -> None:
    """A warning of what a panel (an Axes: written just above it) or a whole figure (a Figure: at its
    foot) cannot show, such as too few points or a single seed. Outside the data area, so that it
    never hides a point."""
    style = {"fontsize": 7.5, "color": "#b45309"}
    if isinstance(where, Figure):
        where.supxlabel(text, **style)
    else:
        where.text(0.0, 1.02, text, ha="left", va="bottom", transform=where.transAxes, **style)


def missing_column(table: str, column: str) -> str:
    """The no-data text of a panel whose column the run's table lacks, with what writes it."""
    return f"no {table}.{column} rows\n({source(table, column)})"


def legend_or_note(ax, text: str, **kw: Any) -> None:
    """A legend when the panel drew something labelled, else a no-data mark saying what is missing."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)
    elif not ax.lines and not ax.collections:
        no_data(ax, text)


# What writes each table: named in the line that says why a figure is not drawn.
SOURCES = {
    "train": "the per-step rows of `sgdscope run` or `scope.step`",
    "epoch": "the per-epoch rows of `sgdscope run`; in your own loop, scope.log('epoch', {...})",
    "eigen": "probe 'eigen'", "curvature": "probe 'eigen'", "direction": "probe 'direction'",
    "k_min": "probe 'direction'", "alpha_step": "probe 'alpha_step'", "alignment": "probe 'alignment'",
    "interpolation": "probe 'interpolation'", "valley": "probe 'interpolation'",
    "slice2d": "probe 'slice2d'", "slice2d_path": "probe 'slice2d'",
    "gradient_noise": "probe 'gradient_noise'", "gradient_noise_step": "probe 'gradient_noise'",
    "batch_sharpness": "probe 'batch_sharpness'", "preconditioned_sharpness": "probe 'preconditioned_sharpness'",
    "step_classes": "probe 'interpolation'", "rotation": "probe 'rotation'",
}
# Columns written by a probe other than the one that writes the rest of their table.
COLUMN_SOURCES = {
    ("train", "grad_cosine_prev"): "probe 'gradient'", ("train", "grad_norm"): "probe 'gradient'",
    ("train", "param_distance"): "probe 'distance'", ("epoch", "weight_spectral_norm_mean"): "probe 'weights'",
    ("epoch", "param_norm"): "probe 'weights'",
}


def source(table: str, column: Optional[str] = None) -> str:
    """What writes ``table`` (or its ``column``): the probe to enable, or the rows to log."""
    if column is not None and (table, column) in COLUMN_SOURCES:
        return f"enable {COLUMN_SOURCES[table, column]}"
    where = SOURCES.get(table, f"rows in table {table!r}")
    if column is not None and table == "epoch":  # epoch rows of an own loop are the user's: say how to add one
        return f"log it: scope.log('epoch', {{..., {column!r}: ...}})"
    return f"enable {where}" if where.startswith("probe") else f"written by {where}"


def lacks(store: Optional[RunStore], table: str, columns: tuple[str, ...] = ()) -> Optional[str]:
    """Why ``store`` cannot give ``table`` with ``columns``, in one line; None when it can."""
    if store is None or table not in store.tables():
        return f"needs rows in table {table!r}, which has none ({source(table)})"
    have = set(store.table(table).columns)
    gone = [c for c in columns if c not in have]
    if gone:
        return f"needs column {gone[0]!r} of table {table!r}, which the run's rows do not have ({source(table, gone[0])})"
    return None
