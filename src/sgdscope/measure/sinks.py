"""Row sinks: where a Scope's committed rows go.

A sink is any object with ``append_many(tables)`` (one transaction: every row of every table lands, or
none) and ``close()``; :class:`sgdscope.store.RunStore` is one, :class:`MemorySink` keeps rows in memory,
and a TensorBoard writer can sit beside either. Only the first sink is read back (``table``).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import pandas as pd

Rows = dict[str, list[dict[str, Any]]]


@runtime_checkable
class RowSink(Protocol):
    def append_many(self, tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> None: ...

    def close(self) -> None: ...


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v  # 0-d tensors and numpy scalars become Python numbers


class MemorySink:
    """Rows in memory, read back as DataFrames with the same columns a run directory would give."""

    def __init__(self) -> None:
        self._rows: dict[str, list[dict[str, Any]]] = {}

    def append_many(self, tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        staged = {t: [{k: _plain(v) for k, v in r.items()} for r in rows] for t, rows in tables.items() if rows}
        for t, rows in staged.items():  # staged first: a failing conversion adds nothing
            self._rows.setdefault(t, []).extend(rows)

    def truncate_after(self, step: int) -> None:
        """Drop the rows committed after ``step`` (``logged_at > step``), as a run store does on resume."""
        for t, rows in self._rows.items():
            self._rows[t] = [r for r in rows if r.get("logged_at", -1) <= step]

    def tables(self) -> list[str]:
        return sorted(t for t, rows in self._rows.items() if rows)

    def table(self, name: str) -> pd.DataFrame:
        return pd.DataFrame(self._rows.get(name, []))

    def close(self) -> None:
        pass
