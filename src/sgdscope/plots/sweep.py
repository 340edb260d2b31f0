"""Sweep-level summaries: one number per run against each grid axis — peak λ₁ and its time against η
and S (Jastrzebski Fig. 3), mean cosine and distance against batch size and lr (Xing Fig. 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from matplotlib.ticker import NullFormatter

from sgdscope.plots._common import caveat, color, no_data, save, subplots, title
from sgdscope.store import RunStore
from sgdscope.sweepview import SweepView, label_for, symbol
from sgdscope.tables import final_distance, mean_cosine, peak_lambda

Metric = tuple[str, Callable[[RunStore], float]]


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


MIN_POINTS = 3  # fewer values than this on an axis show no trend, whatever line joins them


def _against(ax, view: SweepView, axis: str, name: str, fn: Callable[[RunStore], float]) -> None:
    """``fn`` of each run against grid key ``axis``: one series per setting of the other varying keys.

    With several seeds per grid point the series is the mean over seeds with their min–max range as
    error bars and each seed as a faint dot; with one seed, the points alone. Points are joined only
    where an axis has at least :data:`MIN_POINTS` values, and the panel says when it has fewer or only one
    seed. The y range includes 0 when the values have one sign, so that a difference of a few percent
    is not stretched into a steep trend by autoscaling.
    """
    others = [k for k in view.varying if k != axis]
    values = view.grid[axis]
    numeric = _numeric(values)
    lines: dict[str, dict[Any, list[float]]] = {}
    for m in view.started():
        y = fn(m.store)
        if np.isfinite(y):
            lines.setdefault(label_for(m.params, others), {}).setdefault(m.params.get(axis), []).append(y)
    if not lines:
        no_data(ax, f"no run has {name}")
        return
    n_points = max(len(pts) for pts in lines.values())
    n_seeds = max(len(v) for pts in lines.values() for v in pts.values())
    for i, (label, pts) in enumerate(lines.items()):
        xs = [v for v in values if v in pts]
        pos = xs if numeric else [values.index(v) for v in xs]
        ys = np.array([np.mean(pts[v]) for v in xs])
        if n_seeds > 1:
            # clipped at 0: the mean of equal values can differ from them by round-off
            err = np.clip(np.array([[ys[j] - min(pts[v]), max(pts[v]) - ys[j]] for j, v in enumerate(xs)]).T, 0, None)
            for p, v in zip(pos, xs):
                ax.scatter([p] * len(pts[v]), pts[v], color=color(i), s=9, alpha=0.35, lw=0)
        else:
            err = None
        ax.errorbar(pos, ys, yerr=err, color=color(i), marker="o", ms=4, capsize=3,
                    ls="-" if len(xs) >= MIN_POINTS else "none", label=label or None)
    every = [y for pts in lines.values() for v in pts.values() for y in v]
    if min(every) > 0:
        ax.set_ylim(bottom=0)
    elif max(every) < 0:
        ax.set_ylim(top=0)
    if numeric and min(values) > 0 and max(values) / min(values) >= 8:
        ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in values) else 10)
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:g}" for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the grid values are labelled
    elif not numeric:
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([str(v) for v in values])
    ax.set_xlabel(symbol(axis))
    ax.set_ylabel(name)
    warn = []
    if n_points < MIN_POINTS:
        warn.append(f"only {n_points} value{'s' if n_points != 1 else ''} of {symbol(axis)}: no trend can be read")
    warn.append("1 seed: no spread shown" if n_seeds == 1 else f"mean of {n_seeds} seeds; bars: min–max")
    caveat(ax, "\n".join(warn))
    if any(lines):  # labels are empty when nothing else varies: no legend then
        ax.legend(fontsize=7.5, loc="lower right")


def against_axes(view: SweepView, metrics: list[Metric], path: Path, heading: str) -> Path:
    """A grid of panels: one row per varying grid key, one column per metric."""
    keys = view.varying
    fig, axes = subplots(max(1, len(keys)), len(metrics), panel=(4.3, 3.0))
    for c, (name, fn) in enumerate(metrics):
        if not keys:
            no_data(axes[0, c], "the sweep varies no grid key")
        for r, key in enumerate(keys):
            _against(axes[r, c], view, key, name, fn)
    title(fig, heading, view.path.name)
    return save(fig, path)


def peak_lambda_vs(view: SweepView, out_dir: Path) -> list[Path]:
    """Peak λ₁ (5-point smoothed) and the time it first reaches 90% of that peak, against each grid axis."""
    metrics = [("peak λ₁ (smoothed)", lambda s: peak_lambda(s)["peak"]),
               ("epochs to 90% of peak", lambda s: peak_lambda(s)["t90_epoch"])]
    return [against_axes(view, metrics, out_dir / "peak_lambda.png", "Peak sharpness and its time (Jastrzebski Fig. 3)")]


def cosine_distance_vs(view: SweepView, out_dir: Path) -> list[Path]:
    """Mean consecutive-gradient cosine and final distance from init, against each grid axis."""
    metrics = [("mean cos(g_t−1, g_t)", mean_cosine), ("final ‖θ − θ₀‖", final_distance)]
    return [against_axes(view, metrics, out_dir / "cosine_distance.png", "Cosine and distance (Xing Fig. 4)")]
