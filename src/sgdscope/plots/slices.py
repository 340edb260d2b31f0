"""The 2-D loss slice around an iterate (Li et al. 2018) as filled contours, with the earlier iterates
projected onto the slice's plane (table ``slice2d_path``), coloured by their step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sgdscope.plots._common import caveat, no_data, save, subplots, title
from sgdscope.store import RunStore
from sgdscope.tables import has


def slice_grid(sl: pd.DataFrame, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a values, b values, loss[a, b]) of the slice measured at ``step``."""
    g = sl[sl["step"] == step].pivot_table(index="a", columns="b", values="loss", aggfunc="mean")
    return g.index.to_numpy(float), g.columns.to_numpy(float), g.to_numpy(float)


def _panel(fig, ax, sl: pd.DataFrame, path: pd.DataFrame, step: int) -> None:
    a, b, loss = slice_grid(sl, step)
    # log-spaced levels from the slice's floor: a basin and steep walls both stay readable
    lo, hi = float(np.nanmin(loss)), float(np.nanmax(loss))
    levels = lo + (hi - lo) * (np.geomspace(1, 101, 16) - 1) / 100 if hi > lo else 8
    cs = ax.contourf(a, b, loss.T, levels=levels, cmap="viridis")
    ax.contour(a, b, loss.T, levels=levels, colors="white", linewidths=0.3, alpha=0.6)
    fig.colorbar(cs, ax=ax, shrink=0.85, label="loss", format="%.3g")
    ax.grid(False)  # the house grid would cut across the contours
    p = path[path["step"] == step].sort_values("snapshot_step") if has(path, "step", "a", "b") else path.iloc[:0]
    if len(p):
        inside = (p["a"].abs() <= a.max() * 1.0001) & (p["b"].abs() <= b.max() * 1.0001)
        ax.plot(p["a"].clip(a.min(), a.max()), p["b"].clip(b.min(), b.max()), color="white", lw=0.8, alpha=0.8)
        sc = ax.scatter(p["a"].clip(a.min(), a.max()), p["b"].clip(b.min(), b.max()), c=p["snapshot_step"],
                        cmap="autumn", s=14, zorder=3, edgecolors="black", linewidths=0.3)
        fig.colorbar(sc, ax=ax, shrink=0.85, label="step of the iterate")
        if (~inside).any():
            caveat(ax, f"{int((~inside).sum())} of {len(p)} iterates lie outside the span (drawn on its edge)")
        off = p["residual"] / p["distance"].where(p["distance"] > 0)
        if off.notna().any():
            ax.text(0.02, 0.02, f"off-plane share of θ_s − θ_t: median {off.median():.2f}", transform=ax.transAxes,
                    fontsize=7.5, color="white")
    ax.plot([0], [0], marker="*", color="red", ms=11, mec="black", mew=0.5, zorder=4)
    ax.set_xlabel("a (along d₁)")
    ax.set_ylabel("b (along d₂)")
    ax.set_title(f"step {step}")


def slice2d(store: RunStore, out_dir: Path) -> list[Path]:
    """The slice at the middle and the last measured step (one panel if only one), each with the iterates
    kept so far projected onto its plane (the star is θ_t)."""
    sl, path = store.table("slice2d"), store.table("slice2d_path")
    steps = sorted(sl["step"].unique()) if has(sl, "step", "a", "b", "loss") else []
    shown = sorted({steps[len(steps) // 2], steps[-1]}) if steps else []
    fig, axes = subplots(1, max(1, len(shown)), panel=(5.0, 4.0))
    if not shown:
        no_data(axes[0, 0], "no slice2d rows (enable probe 'slice2d')")
    for ax, step in zip(axes[0], shown):
        _panel(fig, ax, sl, path, int(step))
    which = ", ".join(sorted(set(sl["directions"]))) if "directions" in sl else "?"
    title(fig, f"2-D loss slice around θ_t (directions: {which}) with the projected trajectory", store.path.name)
    return [save(fig, out_dir / "slice2d.png")]
