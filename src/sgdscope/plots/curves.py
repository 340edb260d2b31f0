"""Learning curves of a run, and the one generic "curves of several runs" figure that the papers'
comparison figures (variants, NSGD per γ, GD vs noise, schedules, cosine per batch size) are made of."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from sgdscope.plots._common import (
    auto_window,
    caveat,
    color,
    legend_or_note,
    missing_column,
    no_data,
    save,
    subplots,
    title,
)
from sgdscope.store import RunStore
from sgdscope.sweepview import Member, SweepView, label_for
from sgdscope.tables import has, smooth, time_axis

_SPLITS = (("train", "-", "o"), ("val", "--", "s"), ("test", ":", "^"))


def _epoch_and_batch(ax, store: RunStore, batch_col: str, epoch_col: str, ylabel: str) -> None:
    """One panel: the per-step minibatch value (smoothed, light) under the per-epoch train/val/test values."""
    t = time_axis(store)
    tr, ep = store.table("train"), store.table("epoch")
    if has(tr, "step", batch_col):
        y = tr[batch_col].to_numpy(dtype=float)
        ax.plot(t(tr["step"]), smooth(y, auto_window(len(y))), color="#94a3b8", lw=1.0, label="minibatch (smoothed)")
    # Epoch rows sit at their step; a user's epoch rows without one sit at their epoch on an epoch axis.
    x = t(ep["step"]) if has(ep, "step") else ep["epoch"] if has(ep, "epoch") and t.label == "epoch" else None
    if x is not None:
        for i, (split, ls, marker) in enumerate(_SPLITS):
            col = f"{split}_{epoch_col}"
            if col in ep and ep[col].notna().any():
                ax.plot(x, ep[col], ls=ls, marker=marker, ms=3.5, color=color(i), label=split)
    ax.set_xlabel(t.label)
    ax.set_ylabel(ylabel)
    legend_or_note(ax, f"{missing_column('train', batch_col)}\nand no epoch.train_{epoch_col} rows")


def learning_curves(store: RunStore, out_dir: Path) -> list[Path]:
    """Loss, accuracy and learning rate against time: minibatch values per step, train/val/test per epoch."""
    fig, axes = subplots(1, 3, panel=(4.3, 3.1))
    _epoch_and_batch(axes[0, 0], store, "batch_loss", "loss", "loss")
    axes[0, 0].set_title("loss")
    _epoch_and_batch(axes[0, 1], store, "batch_acc", "acc", "accuracy")
    axes[0, 1].set_title("accuracy")
    tr, t, ax = store.table("train"), time_axis(store), axes[0, 2]
    if has(tr, "step", "lr") and tr["lr"].notna().any():
        ax.plot(t(tr["step"]), tr["lr"], color=color(4))
        lr = tr["lr"].to_numpy(dtype=float)
        if np.nanmin(lr) > 0 and np.nanmax(lr) / np.nanmin(lr) > 20:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.15 * np.nanmax(lr))
        ax.set_xlabel(t.label)
        ax.set_ylabel("η")
    else:
        no_data(ax, missing_column("train", "lr"))
    ax.set_title("learning rate")
    title(fig, "Learning curves", store.path.name)
    return [save(fig, out_dir / "learning_curves.png")]


# ----------------------------------------------------------------------------- comparisons across runs


@dataclass(frozen=True)
class Curve:
    """One panel of a comparison: column ``y`` of ``table`` for every run (seeds averaged).

    ``where`` filters rows (e.g. ``{"index": 1}`` for λ₁); ``smooth`` applies a moving average to noisy
    per-step series; ``vary`` restricts the panel to the runs that differ only in that grid key (the
    others held at their first grid value: Xing Fig. 4); ``final`` draws the last value of each run as a
    bar instead of a curve.
    """

    table: str
    y: str
    title: str
    where: Mapping[str, Any] = field(default_factory=dict)
    logy: bool = False
    smooth: bool = False
    vary: Optional[str] = None
    final: bool = False


def _series(member: Member, c: Curve) -> Optional[pd.DataFrame]:
    """(x, y) of one run for panel ``c`` (None when the run has no such rows)."""
    df = member.store.table(c.table)
    if not has(df, "step", c.y, *c.where):  # without the filter column the rows are not the ones asked for
        return None
    for k, v in c.where.items():
        df = df[df[k] == v]
    df = df[["step", c.y]].dropna()
    if not len(df):
        return None
    df = df.groupby("step", as_index=False)[c.y].mean()
    return pd.DataFrame({"x": time_axis(member.store)(df["step"]), "y": df[c.y].to_numpy(dtype=float)})


def _panel_members(view: SweepView, vary: Optional[str]) -> tuple[list[Member], list[str], str]:
    """The runs a panel shows, the keys its legend names, and what it holds fixed (for the title)."""
    started = view.started()
    if vary is None or vary not in view.varying:
        return started, view.varying, ""
    fixed = {k: view.grid[k][0] for k in view.varying if k != vary}
    chosen = [m for m in started if all(m.params.get(k) == v for k, v in fixed.items())]
    return chosen, [vary], label_for(fixed, list(fixed))


def _groups(members: list[Member], keys: list[str]) -> dict[str, list[Member]]:
    """Members grouped by legend label, so that seeds of one grid point become one curve."""
    out: dict[str, list[Member]] = {}
    for m in members:
        out.setdefault(label_for(m.params, keys) or m.name, []).append(m)
    return out


def _draw(ax, view: SweepView, c: Curve, colours: dict[str, str]) -> tuple[bool, int]:
    """Draw panel ``c``; returns whether it used the figure-wide labels (and so the shared legend), and
    the most seeds averaged into one of its curves (0: nothing drawn).

    A ``vary`` panel names only its own key, so it carries its own legend and colours.
    """
    members, keys, fixed = _panel_members(view, c.vary)
    shared = keys == view.varying
    ax.set_title(f"{c.title} ({fixed})" if fixed else c.title)
    drawn, seeds, xlabel = 0, 0, "epoch"
    for i, (label, group) in enumerate(_groups(members, keys).items()):
        parts = [s for s in (_series(m, c) for m in group) if s is not None]
        if not parts:
            continue
        col = colours.get(label, color(i)) if shared else color(i)
        xlabel = time_axis(group[0].store).label
        stats = pd.concat(parts).groupby("x", as_index=False)["y"].agg(["mean", "min", "max"])
        if c.smooth:
            for k in ("mean", "min", "max"):
                stats[k] = smooth(stats[k], auto_window(len(stats)))
        if c.final:
            last = stats.iloc[-1]
            err = ([[max(last["mean"] - last["min"], 0)], [max(last["max"] - last["mean"], 0)]] if len(parts) > 1
                   else None)
            ax.bar(drawn, last["mean"], yerr=err, capsize=3, color=col, label=label)
        else:
            ax.plot(stats["x"], stats["mean"], color=col, label=label, lw=1.4)
            if len(parts) > 1:  # the seeds of one grid point: their mean, and their range as a band
                ax.fill_between(stats["x"], stats["min"], stats["max"], color=col, alpha=0.18, lw=0)
        drawn += 1
        seeds = max(seeds, len(parts))
    if not drawn:
        no_data(ax, missing_column(c.table, c.y))
        return False, 0
    if c.logy:
        ax.set_yscale("log")
    if c.final:
        ax.set_xticks([])
    else:
        ax.set_xlabel(xlabel)
    if not shared:
        ax.legend(fontsize=7.5)
    return shared, seeds


def compare(view: SweepView, curves: list[Curve], path: Path, heading: str, ncols: int = 3) -> Path:
    """The comparison figure: one panel per :class:`Curve` (``ncols`` to a row), one line (or bar) per
    grid point, one legend for the panels that show every run. A panel that varies a key the sweep holds
    fixed shows every run instead, once (a GD-vs-SGD sweep still gets its cosine and distance panels).
    Seeds of a grid point are averaged, their min–max range shaded; the figure's foot says which."""
    kept: dict[tuple, Curve] = {}
    for c in curves:
        if c.vary is not None and c.vary not in view.varying:
            c = replace(c, vary=None, title=c.title.split(" vs ")[0])
        kept.setdefault((c.table, c.y, tuple(c.where.items()), c.vary, c.final), c)
    curves = list(kept.values())
    ncols = min(ncols, len(curves))
    nrows = -(-len(curves) // ncols)
    fig, axes = subplots(nrows, ncols, panel=(4.4, 3.1))
    labels = list(_groups(view.started(), view.varying))
    colours = {label: color(i) for i, label in enumerate(labels)}
    shared, seeds = zip(*(_draw(ax, view, c, colours) for ax, c in zip(axes.flat, curves)))
    if max(seeds) == 1:
        caveat(fig, "one seed per grid point: the curves show no spread between seeds")
    elif max(seeds) > 1:
        caveat(fig, f"each curve: the mean of its seeds (up to {max(seeds)}); shaded: their min–max range")
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    if any(shared) and len(labels) > 1:
        handles = [Line2D([], [], color=colours[label], lw=2) for label in labels]
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    title(fig, heading, view.path.name)
    return save(fig, path)


def sweep_curves(view: SweepView, out_dir: Path) -> list[Path]:
    """The learning curves of every run of a sweep, overlaid (seeds averaged)."""
    curves = [Curve("epoch", "train_loss", "training loss", logy=True), Curve("epoch", "val_acc", "validation accuracy"),
              Curve("train", "param_distance", "‖θ − θ₀‖")]
    return [compare(view, curves, out_dir / "sweep_curves.png", "Learning curves of every run")]
