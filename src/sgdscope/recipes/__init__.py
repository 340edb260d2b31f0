"""Bundled recipes: YAML run configs that reproduce a figure or table of the two papers.

A recipe file is a run config with one extra top-level section, ``recipe:``, that says what it
reproduces, its size (``cpu`` runs on an embedded dataset in minutes; ``paper`` uses the paper's model
and data) and the claim it tests; an optional ``recipe.grid`` makes it a sweep (``sgdscope sweep``).

A ``paper`` recipe also carries ``recipe.estimate_cpu`` (and, once measured on a GPU, ``recipe.estimate_gpu``):
the estimated wall time of the whole recipe, every grid point and measurement included, as written by
``bench/paper_estimates.py --write`` (an extrapolation from timed steps and measurements; see bench/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgdscope.config import load_raw

HERE = Path(__file__).parent


@dataclass
class Recipe:
    name: str
    path: Path
    reproduces: str
    size: str
    claim: str
    grid: dict[str, list[Any]] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    estimate_cpu: dict[str, Any] | None = None  # {hours, runs, threads, device, by}
    estimate_gpu: dict[str, Any] | None = None

    def estimate_line(self) -> str:
        """``CPU ≈ 41.2 h (3 runs, 1 thread) | GPU: not measured`` (empty for a recipe without an estimate)."""
        if self.estimate_cpu is None and self.estimate_gpu is None:
            return ""
        parts = []
        for what, est in (("CPU", self.estimate_cpu), ("GPU", self.estimate_gpu)):
            if not est:
                parts.append(f"{what}: not measured")
                continue
            hours = float(est.get("hours", float("nan")))
            size = f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"
            extra = f", {est['threads']} thread{'s' * (est['threads'] != 1)}" if what == "CPU" and "threads" in est else ""
            runs = int(est.get("runs", 1))
            parts.append(f"{what} ≈ {size} ({runs} run{'s' * (runs != 1)}{extra})")
        return " | ".join(parts) + "  [extrapolated: bench/paper_estimates.py]"


def _meta(name: str, path: Path, raw: dict[str, Any]) -> Recipe:
    m = raw.get("recipe") or {}
    return Recipe(
        name=name, path=path, reproduces=str(m.get("reproduces", "")), size=str(m.get("size", "")),
        claim=str(m.get("claim", "")), grid=dict(m.get("grid") or {}), figures=list(m.get("figures") or []),
        estimate_cpu=m.get("estimate_cpu"), estimate_gpu=m.get("estimate_gpu"),
    )


def list_recipes() -> list[Recipe]:
    """Every bundled recipe, sorted by name."""
    return [_meta(p.stem, p, load_raw(p)) for p in sorted(HERE.glob("*.yaml"))]


def resolve(name_or_path: str | Path) -> tuple[dict[str, Any], Recipe | None]:
    """Load a config file or a bundled recipe by name; returns (raw run config, recipe metadata or None)."""
    p = Path(name_or_path)
    if not p.is_file() and (HERE / f"{name_or_path}.yaml").is_file():
        p = HERE / f"{name_or_path}.yaml"
    raw = load_raw(p)
    meta = raw.pop("recipe", None)
    return raw, (_meta(p.stem, p, {"recipe": meta}) if meta is not None else None)
