"""Reading a sweep directory back: the ``sweep.yaml`` spec, its members and their labels.

This is the read side of :mod:`sgdscope.sweep`. Figures, tables, reports and claims read sweeps through
it, and it imports nothing of the executor, the config validation or the trainer: a sweep written on a
cluster, by an older process or half-way through can be read on a laptop that only has the store.

Layout::

    SWEEP_DIR/
      sweep.yaml            the base config, the grid, the seeds and every run's overrides and folder
      runs/lr=0.1_bs=64/    an ordinary run directory (DESIGN.md) per grid point
      report.html           written by ``sgdscope report SWEEP_DIR``
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

from sgdscope.errors import RunStoreError
from sgdscope.store import RunStore

SWEEP_FORMAT = 1
SWEEP_FILE = "sweep.yaml"

# Short names for folder names (ASCII) and for legends (the papers' symbols).
_FOLDER_NAMES = {"batch_size": "bs", "noise_factor": "noise", "weight_decay": "wd"}
_SYMBOLS = {"optimizer.lr": "η", "optimizer.batch_size": "S", "optimizer.gamma": "γ", "optimizer.momentum": "μ",
            "optimizer.noise_factor": "noise", "optimizer.weight_decay": "λ", "optimizer.name": "optimizer",
            "optimizer.mode": "mode", "schedule.name": "schedule"}


def _short(key: str, keys: Iterable[str], names: Mapping[str, str]) -> str:
    """The name of ``key`` in ``names`` (by full key, then by last part), else its last part, or the whole
    key where the last part would be ambiguous among ``keys``."""
    leaf = key.rsplit(".", 1)[-1]
    clash = sum(1 for k in keys if k.rsplit(".", 1)[-1] == leaf) > 1
    return names.get(key) or (key if clash else names.get(leaf, leaf))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def run_name(overrides: Mapping[str, Any]) -> str:
    """The folder name of a grid point, e.g. ``lr=0.1_bs=64_seed=0``.

    >>> run_name({"optimizer.lr": 0.1, "optimizer.batch_size": 64, "seed": 0})
    'lr=0.1_bs=64_seed=0'
    """
    if not overrides:
        return "run"
    parts = [f"{_short(k, overrides, _FOLDER_NAMES)}={_fmt(v)}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9.+=_-]", "-", "_".join(parts))


def symbol(key: str) -> str:
    """The papers' symbol for a grid key (``optimizer.lr`` → ``η``), else its last part."""
    return _short(key, [key], _SYMBOLS)


def label_for(params: Mapping[str, Any], varying: list[str]) -> str:
    """A legend label from the grid values that vary, in the papers' symbols (``η=0.1, S=64``).

    >>> label_for({"optimizer.lr": 0.1, "optimizer.batch_size": 64, "seed": 1}, ["optimizer.lr", "optimizer.batch_size"])
    'η=0.1, S=64'
    """
    parts = [f"{_short(k, varying, _SYMBOLS)}={_fmt(params[k])}" for k in varying if k in params]
    return ", ".join(parts)


@dataclass
class Member:
    """One run of a sweep: its folder name, its grid values, a legend label and its store (None until
    the run has started)."""

    name: str
    params: dict[str, Any]
    label: str
    path: Path
    store: Optional[RunStore]


def _varying(grid: Mapping[str, list[Any]]) -> list[str]:
    return [k for k, v in grid.items() if len(v) > 1 and k != "seed"]


@dataclass
class SweepView:
    """A sweep directory read back: ``grid`` (with the seed axis when there is one) and its members."""

    path: Path
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    members: list[Member]

    @property
    def varying(self) -> list[str]:
        """The grid keys with more than one value, the seed aside: what tells the runs apart."""
        return _varying(self.grid)

    @property
    def n_seeds(self) -> int:
        """How many seeds each grid point has (the ``seed`` axis, from ``--seeds`` or ``--grid seed=...``)."""
        return len(self.grid.get("seed") or [None])

    def started(self) -> list[Member]:
        """The members that have a run directory to read."""
        return [m for m in self.members if m.store is not None]


def is_sweep(path: str | Path) -> bool:
    """Whether ``path`` is a sweep directory (holds ``sweep.yaml``)."""
    return (Path(path) / SWEEP_FILE).is_file()


def _read_spec(path: Path) -> dict[str, Any]:
    """The parsed ``sweep.yaml`` of ``path``; a damaged or foreign file is a :class:`RunStoreError`."""
    try:
        spec = yaml.safe_load((path / SWEEP_FILE).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RunStoreError(f"{path}/{SWEEP_FILE}: unreadable ({type(err).__name__})") from None
    if not isinstance(spec, dict) or spec.get("format") != SWEEP_FORMAT or not isinstance(spec.get("runs"), list):
        raise RunStoreError(f"{path}/{SWEEP_FILE}: not a sweep file of this sgdscope version")
    return spec


def open_sweep(path: str | Path) -> SweepView:
    """Read a sweep directory; runs not yet started have ``store=None``."""
    path = Path(path)
    if not is_sweep(path):
        raise RunStoreError(f"{path}: not a sweep directory (no {SWEEP_FILE})")
    spec = _read_spec(path)
    grid = dict(spec.get("grid") or {})
    if (spec.get("seeds") or 1) > 1:
        grid["seed"] = list(range(spec["seeds"]))
    varying = _varying(grid)
    members = []
    for r in spec["runs"]:
        run_dir = path / r["dir"]
        store = RunStore(run_dir) if (run_dir / "status.json").is_file() else None
        params = dict(r.get("overrides") or {})
        members.append(Member(r["name"], params, label_for(params, varying) or r["name"], run_dir, store))
    return SweepView(path, dict(spec.get("base") or {}), grid, members)


__all__ = ["SWEEP_FILE", "SWEEP_FORMAT", "Member", "SweepView", "is_sweep", "label_for", "open_sweep", "run_name",
           "symbol"]
