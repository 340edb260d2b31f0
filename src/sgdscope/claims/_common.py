"""What every claim check shares: the result type, the runs of a recipe read back, small tests on series."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sgdscope.store import RunStore
from sgdscope.tables import Runs, as_runs


# ------------------------------------------------------------------------------------------ results


@dataclass
class ClaimResult:
    """The outcome of testing one claim: ``numbers`` (DataFrame), ``checks`` ({name: passed}), and ``held``
    (every check not in ``soft`` passed and there was something to check)."""

    experiment: str
    claim: str
    numbers: pd.DataFrame
    checks: dict[str, bool]
    soft: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        hard = [v for k, v in self.checks.items() if k not in self.soft]
        return bool(hard) and all(hard)

    @property
    def verdict(self) -> str:
        return "held" if self.held else "did not hold"

    def summary(self) -> str:
        """A few lines: the verdict, each check, the notes."""
        lines = [f"{self.experiment}: {self.verdict} — {self.claim}"]
        for k, v in self.checks.items():
            lines.append(f"  [{'x' if v else ' '}] {k}{' (soft)' if k in self.soft else ''}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _Run:
    label: str
    store: RunStore
    config: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def state(self) -> str:
        return str(self.store.status().get("state", "?"))


def load_runs(runs: Runs) -> list[_Run]:
    """The runs of a recipe from any form :func:`sgdscope.tables.as_runs` accepts (runs never started are
    skipped)."""
    return [_Run(label, store, store.config()) for label, store in as_runs(runs).items()]


def _monotone(values: Sequence[float], increasing: bool, strict: bool = True) -> bool:
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or np.isnan(v).any():
        return False
    d = np.diff(v) if increasing else -np.diff(v)
    return bool((d > 0).all() if strict else (d >= 0).all())


def _final_epoch(run: _Run) -> pd.Series | None:
    ep = run.store.table("epoch")
    return ep.iloc[-1] if len(ep) else None
