"""Shared plotting machinery: one visual style, panels, titles and saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

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


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="white")
    return path


def auto_window(n: int, target: int = 60) -> int:
    """A smoothing window that leaves about ``target`` independent points of a per-step series."""
    return max(1, n // target)


def title(fig, text: str, sub: str | None = None) -> None:
    """The figure's title, followed by what it was drawn from (the run or the sweep folder)."""
    fig.suptitle(f"{text}   ·   {sub}" if sub else text, fontsize=11.5, fontweight="bold", x=0.01, ha="left")


def no_data(ax, text: str = "no data") -> None:
    """Mark an empty panel instead of leaving a blank axis that looks like a bug."""
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#9ca3af", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
