"""Mirror a run's scalar tables into TensorBoard event files under ``RUN_DIR/tb/``.

The store stays the source of truth; TensorBoard is a live view of it. Calling
:func:`mirror_to_tensorboard` again writes only the rows added since the last call (recorded in
``tb/.mirrored.json``). When a resumed run has dropped rows that were already mirrored and has not yet
recomputed them, the mirror is rebuilt from scratch, so TensorBoard never shows rows the store lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from sgdscope.errors import ConfigError
from sgdscope.store import RunStore, atomic_write_bytes

STATE = ".mirrored.json"

# Columns that tell apart the rows of one step in a long table: they go into the tag, not the value.
KEYS: dict[str, tuple[str, ...]] = {
    "eigen": ("index",), "direction": ("eigen_index", "k"), "k_min": ("eigen_index", "threshold"),
    "alpha_step": ("direction", "alpha"), "alignment": ("eigen_index",), "interpolation": ("alpha",),
}
_NOT_VALUES = {"step", "epoch", "logged_at"}


def _tag_suffix(row: pd.Series, keys: tuple[str, ...]) -> str:
    parts = [f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row]
    return "/" + ",".join(parts) if parts else ""


def _unchanged(df: pd.DataFrame, done: dict[str, Any]) -> bool:
    """Whether the rows mirrored before are still the table's first rows (see the module docstring)."""
    n = done.get("rows", 0)
    if "logged_at" in df and done.get("hw") is not None:
        return int((df["logged_at"] <= done["hw"]).sum()) == n
    return len(df) >= n


def _write_rows(writer: Any, table: str, rows: pd.DataFrame) -> None:
    keys = KEYS.get(table, ())
    values = [c for c in rows.columns if c not in _NOT_VALUES and c not in keys and pd.api.types.is_numeric_dtype(rows[c])]
    for _, row in rows.iterrows():
        suffix = _tag_suffix(row, keys)
        for col in values:
            if pd.notna(row[col]):
                writer.add_scalar(f"{table}/{col}{suffix}", float(row[col]), global_step=int(row["step"]))


def mirror_to_tensorboard(run_dir: str | Path) -> Path:
    """Write the run's scalar tables as TensorBoard scalars under ``RUN_DIR/tb`` and return that folder.

    Tags are ``table/column`` plus the row's key columns (``eigen/value/index=1``,
    ``alpha_step/relative_change/direction=e1,alpha=2``), at the row's step. Safe to call repeatedly.
    Needs the optional ``tensorboard`` package (ConfigError if absent).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: mirroring needs the tensorboard package: pip install 'sgdscope[tensorboard]'") from None
    store = RunStore(run_dir)
    tb = store.path / "tb"
    state_path = tb / STATE
    state: dict[str, dict[str, Any]] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    tabs = {name: df for name, df in ((n, store.table(n)) for n in store.tables()) if "step" in df}
    if not all(_unchanged(tabs.get(name, pd.DataFrame()), done) for name, done in state.items()):
        for f in tb.glob("events.out.tfevents.*"):
            f.unlink()
        state = {}
    writer = None
    try:
        for name, df in tabs.items():
            n = state.get(name, {}).get("rows", 0)
            if len(df) <= n:
                continue
            writer = writer or SummaryWriter(log_dir=str(tb))
            _write_rows(writer, name, df.iloc[n:])
            hw = int(df["logged_at"].max()) if "logged_at" in df and df["logged_at"].notna().any() else None
            state[name] = {"rows": len(df), "hw": hw}
    finally:
        if writer is not None:
            writer.close()
        store.close()
    atomic_write_bytes(state_path, json.dumps(state, indent=1).encode())
    return tb
