"""TensorBoard as a view of a run's rows: a live row sink, and a mirror for runs already stored.

The store stays the source of truth; TensorBoard only shows it. There are two ways in, and both go
through :class:`TensorBoardSink`, so a row looks the same in TensorBoard whichever way it came:

* **Live**: pass ``TensorBoardSink(log_dir)`` in a Scope's ``sinks``. The Scope hands it each step's
  rows as it commits them to the store, so nothing re-reads a table.
* **Afterwards**: :func:`mirror_to_tensorboard` writes a stored run's rows under ``RUN_DIR/tb``. Called
  again, it reads and writes only the rows committed since the last call (``logged_at`` past the last
  one mirrored, filtered in SQL, remembered in ``tb/.mirrored.json``). When a resumed run has dropped
  rows that were already mirrored, the mirror is rebuilt from scratch, so TensorBoard never shows rows
  the store lost.

Tags are ``table/column`` plus the row's key columns, ``eigen/value/index=1`` or
``alpha_step/relative_change/direction=e1,alpha=2``, at ``global_step`` = the row's ``step``.

Only measured quantities become scalars. :data:`METADATA` lists the columns that are not: they say
where or how a row was measured (its step, the solver's bookkeeping, the policy), and a plot of them
over time would only be noise beside the measurements.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from sgdscope.errors import ConfigError

STATE = ".mirrored.json"

# Columns that tell apart the rows of one step in a long table: they go into the tag, not the value.
KEYS: dict[str, tuple[str, ...]] = {
    "eigen": ("index",), "direction": ("eigen_index", "k"), "k_min": ("eigen_index", "threshold"),
    "alpha_step": ("direction", "alpha"), "alignment": ("eigen_index",), "interpolation": ("alpha",),
}

#: Columns never written as scalars, in any table (key columns of :data:`KEYS` go into the tag instead).
METADATA: frozenset[str] = frozenset({
    # where the row sits: the step is TensorBoard's own axis; the epoch and commit step only relabel it
    "step", "epoch", "logged_at",
    # which row of a long table it is (when a table has no KEYS entry, e.g. the user's own tables)
    "index", "eigen_index", "threshold",
    # how the measurement was taken: constant over a run, or the eigensolver's bookkeeping. n_hvps and
    # iterations count work spent, not a property of the model; the residual, which is one, stays.
    "subset_size", "bn_policy", "includes_l2", "which", "tol", "k", "seed",
    "n_hvps", "iterations", "converged", "has_negative",
    # a copy of eigen/value carried by the direction, k_min and alignment rows for their own figures
    "eigenvalue",
})


def _plain(v: Any) -> Any:
    """A 0-d tensor or NumPy scalar as the Python number it holds; anything else unchanged."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        return v.item()
    return v


def _scalar(v: Any) -> Optional[float]:
    """The value as a float, or None where TensorBoard gets nothing.

    Text has no scalar. A non-finite value is left out because the store keeps it as NULL, the same as
    a column a row does not have: writing it here would make the live view differ from the mirror.
    """
    v = _plain(v)
    if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and not math.isfinite(v)):
        return float(v)
    return None


def _tag_suffix(row: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    vals = [(k, _plain(row[k])) for k in keys if row.get(k) is not None]
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in vals]
    return "/" + ",".join(parts) if parts else ""


def _step(row: Mapping[str, Any]) -> Optional[int]:
    """The row's step: its ``step`` column, else the step whose commit wrote it; None if it has neither."""
    for col in ("step", "logged_at"):
        v = _plain(row.get(col))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return int(v)
    return None


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: mirroring needs the tensorboard package: pip install 'sgdscope[tensorboard]'") from None
    return SummaryWriter


class TensorBoardSink:
    """A row sink that writes each committed row's measured quantities as TensorBoard scalars.

    It has the row-sink interface (``append_many``, ``close``), so a Scope feeds it beside its store:
    ``Scope(..., sinks=[TensorBoardSink("runs/mine/tb")])``. The event file is opened with the first row,
    so a sink that never gets one leaves no empty file, and flushed after every commit, so TensorBoard
    shows a running loop's rows as they land. On a resume the Scope calls :meth:`truncate_after`, as it
    does on the store. Needs the optional ``tensorboard`` package (ConfigError if absent).

    >>> import tempfile
    >>> sink = TensorBoardSink(tempfile.mkdtemp())
    >>> sink.append_many({"eigen": [{"step": 5, "index": 1, "value": 3.5, "subset_size": 1000}]})
    >>> sink.tags_written
    ['eigen/value/index=1']
    >>> sink.close()
    """

    def __init__(self, log_dir: str | Path) -> None:
        self._writer_cls = _summary_writer()  # fail at construction, not at the first commit of a long run
        self.log_dir = Path(log_dir)
        self._purge_step: Optional[int] = None
        self._writer: Any = None
        self._tags: set[str] = set()

    @property
    def tags_written(self) -> list[str]:
        """Every tag this sink has written, sorted."""
        return sorted(self._tags)

    def append_many(self, tables: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Write the rows of one commit. A row with neither ``step`` nor ``logged_at`` has no place on
        TensorBoard's axis and is left out."""
        wrote = False
        for table, rows in tables.items():
            keys = KEYS.get(table, ())
            for row in rows:
                step = _step(row)
                if step is None:
                    continue
                suffix = _tag_suffix(row, keys)
                for col, v in row.items():
                    x = None if col in METADATA or col in keys else _scalar(v)
                    if x is None:
                        continue
                    if self._writer is None:
                        self._writer = self._writer_cls(log_dir=str(self.log_dir), purge_step=self._purge_step)
                        self._purge_step = None
                    tag = f"{table}/{col}{suffix}"
                    self._writer.add_scalar(tag, x, global_step=step)
                    self._tags.add(tag)
                    wrote = True
        if wrote:
            self._writer.flush()

    def truncate_after(self, step: int) -> None:
        """A resume drops the rows logged after ``step`` and recomputes them: from the next row on,
        TensorBoard hides what this folder holds at steps past ``step``, so none of them shows twice.

        An event file can only be truncated by step, not by commit: an ``interpolation`` or ``valley``
        row of step ``step``, committed at ``step + 1``, is recomputed beside the one kept (same values
        in a deterministic run).
        """
        if self._writer is None:
            self._purge_step = step + 1  # the next writer opens its file with the purge
            return
        # In the open file, so the purge comes after the events it hides: TensorBoard reads a folder's
        # files in name order, and two files named in the same second need not sort by age.
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self._writer._get_file_writer().add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _rows(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    cur = db.execute(sql, args)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f'PRAGMA table_info("{table}")')}


def _unchanged(db: sqlite3.Connection, table: str, done: Mapping[str, Any]) -> bool:
    """Whether the rows mirrored before are all still in the table (see the module docstring).

    Rows are dropped only by a resume, and only those with ``logged_at`` past the checkpoint, so the
    mirrored rows are intact exactly when as many rows as were mirrored still have ``logged_at`` up to
    the last one mirrored. A resumed run that has recomputed them is intact again and is not rebuilt.
    """
    if table not in {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}:
        return done.get("rows", 0) == 0
    if done.get("hw") is not None and "logged_at" in _columns(db, table):
        (n,) = db.execute(f'SELECT COUNT(*) FROM "{table}" WHERE logged_at <= ?', (done["hw"],)).fetchone()
    else:
        (n,) = db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()
        n = min(n, done.get("rows", 0))  # a table without logged_at only grows
    return n == done.get("rows", 0)


def _new_rows(db: sqlite3.Connection, table: str, done: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows committed since ``done`` and the state after them. Tables from before ``logged_at``
    existed (old stores) are followed by their row count instead."""
    n, hw = done.get("rows", 0), done.get("hw")
    if "logged_at" in _columns(db, table):
        where, args = ("WHERE logged_at > ?", (hw,)) if hw is not None else ("", ())
        rows = _rows(db, f'SELECT * FROM "{table}" {where} ORDER BY rowid', args)
        stamps = [r["logged_at"] for r in rows if r["logged_at"] is not None]
        return rows, {"rows": n + len(rows), "hw": max(stamps, default=hw)}
    rows = _rows(db, f'SELECT * FROM "{table}" ORDER BY rowid LIMIT -1 OFFSET ?', (n,))
    return rows, {"rows": n + len(rows), "hw": None}


def mirror_to_tensorboard(run_dir: str | Path) -> Path:
    """Write a stored run's rows as TensorBoard scalars under ``RUN_DIR/tb`` and return that folder.

    Same tags and metadata rule as :class:`TensorBoardSink`, which writes them. Safe to call repeatedly,
    also on a run that is still writing: each call reads, in one snapshot of ``metrics.db`` opened
    read-only, only the rows committed since the last call. Needs the optional ``tensorboard`` package
    (ConfigError if absent); a directory that is not a run raises RunStoreError, and one whose ``tb``
    folder a live :class:`TensorBoardSink` wrote raises ConfigError.
    """
    _summary_writer()
    from sgdscope.store import RunStore, atomic_write_bytes  # the live sink needs no store

    path = RunStore(run_dir).path  # checks that it is a run directory
    tb = path / "tb"
    state_path = tb / STATE
    state: dict[str, dict[str, Any]] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if not state and any(tb.glob("events.out.tfevents.*")):
        # events without the mirror's record: a live sink wrote them (``sgdscope run --tensorboard``)
        raise ConfigError(
            f"tensorboard: {tb} already holds the events a TensorBoardSink wrote during the run; mirroring "
            "would show every row twice (delete the folder to mirror the store instead)"
        )
    if not (path / "metrics.db").is_file():
        return tb
    db = sqlite3.connect(f"{(path / 'metrics.db').resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    sink = None
    try:
        db.execute("BEGIN")  # one read snapshot: the checks and the rows agree though a writer commits
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        if not all(_unchanged(db, name, done) for name, done in state.items()):
            for f in tb.glob("events.out.tfevents.*"):
                f.unlink()
            state = {}
        sink = TensorBoardSink(tb)
        for name in names:
            rows, state[name] = _new_rows(db, name, state.get(name, {}))
            sink.append_many({name: rows})
        db.execute("COMMIT")
    finally:
        if sink is not None:
            sink.close()
        db.close()
    atomic_write_bytes(state_path, json.dumps(state, indent=1).encode())
    return tb
