"""Summary rows of the measurements beyond the two papers (issue 13), one module per measurement.

Each module defines ``rows(store) -> list[(section, quantity, value, detail)]`` and is listed in
:data:`SECTIONS`; :func:`sgdscope.tables.run_summary` appends them after the papers' sections, so every
measurement gets its line in the run report. A module returns ``[]`` when the run lacks its table, so a
run from a user's own loop with any subset of tables gets the rows it has the data for.

The read side only: modules here import :mod:`sgdscope.store` and :mod:`sgdscope.tables` helpers, never
the trainer or the measurement layer.
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable

Row = tuple[str, str, float, str]

# module names under sgdscope.summaries, in report order
SECTIONS: tuple[str, ...] = ("rotation", "step_classes", "gradient_noise", "sharpness", "curvature_ops", "slices")


def extra_rows(store) -> list[Row]:
    """Every registered section's rows for ``store``, in :data:`SECTIONS` order."""
    out: list[Row] = []
    for name in SECTIONS:
        fn: Callable = import_module(f"sgdscope.summaries.{name}").rows
        out += fn(store)
    return out
