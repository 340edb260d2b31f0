"""RunStore: one run directory with an append-only SQLite table store, tensors, config and status.

Layout (DESIGN.md): ``config.yaml``, ``status.json``, ``metrics.db`` (SQLite, WAL), ``tensors/``,
``checkpoints/``, ``figures/``, ``report.html``. Rows are appended one probe-call at a time in a single
transaction, so a reader (``report``, ``RunStore.table``) on a run that is still writing sees either all
of a probe's rows for a step or none of them.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import yaml

from sgdscope.errors import RunStoreError

STORE_FORMAT = 1
STATES = ("running", "done", "failed", "interrupted")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sql_type(v: Any) -> str:
    if v is None:  # type unknown yet (a NaN first value): no declared type, so later values keep their own
        return ""  # (a TEXT column would turn every later float into a 15-digit string)
    if isinstance(v, bool) or isinstance(v, int):
        return "INTEGER"
    if isinstance(v, float):
        return "REAL"
    return "TEXT"


def _clean(v: Any) -> Any:
    """SQLite has no NaN: store non-finite floats as NULL (read back as NaN by pandas)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):  # 0-d tensors / numpy scalars
        return _clean(v.item())
    return v


class RunStore:
    """A run directory. ``RunStore(path)`` opens an existing run; :meth:`create` makes a new one.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> s = RunStore.create(d, {"seed": 0})
    >>> s.append("train", [{"step": 1, "batch_loss": 2.5}, {"step": 2, "batch_loss": 2.0}])
    >>> s.table("train")["batch_loss"].tolist()
    [2.5, 2.0]
    """

    def __init__(self, path: str | Path, *, _new: bool = False) -> None:
        self.path = Path(path)
        if not _new:
            if not (self.path / "config.yaml").is_file() or not (self.path / "status.json").is_file():
                raise RunStoreError(f"{self.path}: not a sgdscope run directory (no config.yaml/status.json)")
            fmt = self.status().get("format")
            if fmt != STORE_FORMAT:
                raise RunStoreError(
                    f"{self.path}: run-store format {fmt!r} is not this version's ({STORE_FORMAT}); "
                    "use the sgdscope version that wrote it"
                )
        self._db: sqlite3.Connection | None = None
        self._columns: dict[str, set[str]] = {}

    # ------------------------------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any]) -> "RunStore":
        """Make a new run directory holding ``config`` (already resolved) and a ``running`` status."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        for sub in ("tensors", "checkpoints", "figures"):
            (p / sub).mkdir(exist_ok=True)
        store = cls(p, _new=True)
        store.write_config(config)
        store.set_status("running", step=0, epoch=0)
        return store

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.path / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False).encode())

    def config(self) -> dict[str, Any]:
        """The resolved config as a dict (with the ``versions`` section)."""
        return yaml.safe_load((self.path / "config.yaml").read_text()) or {}

    # ------------------------------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunStoreError(f"{self.path}/status.json: unreadable ({err})") from None

    def set_status(self, state: str, **fields: Any) -> None:
        assert state in STATES, state
        old = {}
        if (self.path / "status.json").is_file():
            old = self.status()
        old.update(fields, state=state, format=STORE_FORMAT)
        if state != "failed":
            old.pop("error", None)
        atomic_write_bytes(self.path / "status.json", json.dumps(old, indent=1).encode())

    # --------------------------------------------------------------------------------------------- rows
    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.path / "metrics.db", timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _ensure(self, table: str, rows: list[dict[str, Any]]) -> None:
        cols = self._columns.get(table)
        if cols is None:
            cols = {r[1] for r in self.db.execute(f'PRAGMA table_info("{table}")')}
            if not cols:
                first = {}
                for r in rows:
                    for k, v in r.items():
                        if first.get(k) is None:
                            first[k] = v
                decl = ", ".join(f'"{k}" {_sql_type(v)}' for k, v in first.items())
                self.db.execute(f'CREATE TABLE IF NOT EXISTS "{table}" ({decl})')
                cols = set(first)
            self._columns[table] = cols
        for r in rows:
            for k, v in r.items():
                if k not in cols:
                    self.db.execute(f'ALTER TABLE "{table}" ADD COLUMN "{k}" {_sql_type(v)}')
                    cols.add(k)

    def append_many(self, tables: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Append rows to several tables in ONE transaction (all of them land, or none)."""
        tables = {t: [{k: _clean(v) for k, v in r.items()} for r in rows] for t, rows in tables.items()}
        tables = {t: rows for t, rows in tables.items() if rows}
        if not tables:
            return
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, rows in tables.items():
                self._ensure(table, rows)
                keys = sorted({k for r in rows for k in r})
                sql = f'INSERT INTO "{table}" ({", ".join(chr(34) + k + chr(34) for k in keys)}) VALUES ({", ".join("?" * len(keys))})'
                db.executemany(sql, [tuple(r.get(k) for k in keys) for r in rows])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._columns.clear()
            raise

    def append(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ``rows`` (dicts of column -> value) to ``table`` in one transaction."""
        self.append_many({table: rows})

    def truncate_after(self, step: int) -> None:
        """Drop every row committed after the checkpoint at ``step`` (column ``logged_at`` > step).

        A resumed run recomputes those rows deterministically, so none is lost or duplicated.
        """
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                if "logged_at" in {r[1] for r in db.execute(f'PRAGMA table_info("{name}")')}:
                    db.execute(f'DELETE FROM "{name}" WHERE logged_at > ?', (step,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def tables(self) -> list[str]:
        """Names of the tables that hold rows."""
        if not (self.path / "metrics.db").is_file():
            return []
        return [r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]

    def table(self, name: str) -> pd.DataFrame:
        """All rows of table ``name`` as a DataFrame (empty if the table has no rows yet)."""
        if name not in self.tables():
            return pd.DataFrame()
        return pd.read_sql_query(f'SELECT * FROM "{name}" ORDER BY rowid', self.db)

    # ------------------------------------------------------------------------------------------ tensors
    def save_tensors(self, name: str, tensors: Mapping[str, Any]) -> Path:
        """Save tensors as ``tensors/<name>.safetensors`` (atomically)."""
        from safetensors.torch import save

        path = self.path / "tensors" / f"{name}.safetensors"
        atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
        return path

    def load_tensors(self, name: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(self.path / "tensors" / f"{name}.safetensors")
