"""Bundled recipes: YAML run configs that reproduce a figure or table of the two papers.

A recipe file is a run config with one extra top-level section, ``recipe:``, that says what it
reproduces, its size (``cpu`` runs on an embedded dataset in minutes; ``paper`` uses the paper's model
and data) and the claim it tests; an optional ``recipe.grid`` makes it a sweep (``sgdscope sweep``).
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


def _meta(name: str, path: Path, raw: dict[str, Any]) -> Recipe:
    m = raw.get("recipe") or {}
    return Recipe(
        name=name, path=path, reproduces=str(m.get("reproduces", "")), size=str(m.get("size", "")),
        claim=str(m.get("claim", "")), grid=dict(m.get("grid") or {}), figures=list(m.get("figures") or []),
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
