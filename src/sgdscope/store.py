"""RunStore: one run directory with an append-only SQLite table store, tensors, config and status.

Layout (DESIGN.md): ``config.yaml``, ``status.json``, ``metrics.db`` (SQLite, WAL), ``tensors/``,
``checkpoints/``, ``figures/``, ``report.html``. Rows are appended one probe-call at a time in a single
transaction, so a reader (``report``, ``RunStore.table``) on a run that is still writing sees either all
of a probe's rows for a step or none of them.

One process writes a run directory at a time: a writer holds an exclusive ``flock`` on ``RUN_DIR/.lock``
(which names its PID) for as long as it lives, and the kernel drops that lock when the process dies, so a
lock left by a killed writer is taken over by the next one. A damaged ``metrics.db`` (truncated, zero-length,
not SQLite) raises a one-line :class:`RunStoreError` pointing at ``sgdscope check DIR``; :meth:`RunStore.check`
says what is wrong and whether the run can resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pandas as pd
import yaml

from sgdscope.errors import RunStoreError, StoreDamagedError
from sgdscope.storedb import OPEN_CONNECTIONS, CountedConnection, damage_reason, header_problem
from sgdscope.lock import LOCK_FILE, WriterLock, writer_lock  # noqa: F401 - re-exported: part of this API

STORE_FORMAT = 1
STATES = ("running", "done", "failed", "interrupted")
DB_FILE = "metrics.db"
# Columns that identify one observation, per table: a second row with the same key means a step was
# committed twice (two writers, or a resume that did not truncate).
UNIQUE_KEYS = {"train": ("step",), "epoch": ("epoch",), "eigen": ("step", "index")}


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
        self._lock = WriterLock(self.path)
        self._side_files: set[Path] = set()  # SQLite's -wal/-shm files that did not exist before this store opened

    # ------------------------------------------------------------------------------------------ creation
    @staticmethod
    def check_target(path: str | Path, resume: bool, *, resume_hint: str, out_hint: str) -> None:
        """Raise :class:`RunStoreError` unless ``path`` can hold the run: a directory to resume, or for a new
        run a path that is absent or an empty directory. The hints name the caller's own spelling of the
        resume switch and of the output (``resume=True`` / ``out`` in Python, ``--resume`` / ``--out`` on
        the command line), so the one line says what to change."""
        p = Path(path)
        if resume and not p.is_dir():
            raise RunStoreError(f"{p}: cannot resume, no such run directory (drop {resume_hint} to start it)")
        if p.exists() and not p.is_dir():
            raise RunStoreError(f"{p}: exists and is not a directory; choose another {out_hint}")
        if not resume and p.exists() and any(p.iterdir()):
            raise RunStoreError(f"{p}: already exists and is not empty; pass {resume_hint} to continue it "
                                f"or choose another {out_hint}")

    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any], *, writer: bool = False) -> "RunStore":
        """Make a new run directory holding ``config`` (already resolved) and a ``running`` status.

        With ``writer=True`` the writer lock is taken before anything is written, so of two processes
        creating the same directory at once, one fails before it touches the other's config.
        """
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        store = cls(p, _new=True)
        if writer:
            store.acquire_writer()
        for sub in ("tensors", "checkpoints", "figures"):
            (p / sub).mkdir(exist_ok=True)
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

    # ------------------------------------------------------------------------------------------- writer
    def acquire_writer(self) -> None:
        """Become the one writer of this directory until :meth:`release_writer` or :meth:`close` (or the
        process's death, however it dies; or this object's, which closes the lock file). Idempotent. Raises
        RunStoreError naming the PID of the process that holds it."""
        self._lock.acquire()

    def release_writer(self) -> None:
        """Let another process write this directory (a no-op when this store is not its writer)."""
        self._lock.release()

    def writer_pid(self) -> int | None:
        """The PID of the process writing this directory now (-1 if it has not said yet), or None."""
        return os.getpid() if self._lock.held else WriterLock.holder(self.path)

    # --------------------------------------------------------------------------------------------- rows
    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn SQLite's "not a database" and "malformed" errors into a one-line RunStoreError."""
        try:
            yield
        except RunStoreError:
            raise
        except Exception as err:  # noqa: BLE001 - pandas wraps sqlite3's error in its own class
            reason = damage_reason(err)
            if reason is None:
                raise
            self._close_db()
            self._drop_side_files()
            raise StoreDamagedError(self.path / DB_FILE, reason) from None

    def _drop_side_files(self) -> None:
        """Remove the -wal and -shm files that this store's open made, if the log is empty.

        SQLite removes them itself when the last connection closes, except on a damaged file, whose final
        checkpoint fails; a command that refuses a damaged store must leave the directory as it found it.
        Never while another process writes the directory: its connection may have made those files between
        this store's look and its open (a writer starting up), and unlinking a live WAL corrupts the store.
        """
        if not self._lock.held and WriterLock.holder(self.path) is not None:
            return
        db = self.path / DB_FILE
        wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
        if wal in self._side_files and wal.is_file() and wal.stat().st_size == 0:
            wal.unlink(missing_ok=True)
            if shm in self._side_files:
                shm.unlink(missing_ok=True)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            path = self.path / DB_FILE
            key = str(path.resolve())
            # the header is read with a descriptor of our own only while no connection here has the file open
            problem = header_problem(path) if path.exists() and not OPEN_CONNECTIONS[key] else None
            if problem is not None:
                raise StoreDamagedError(path, problem)
            self._side_files = {f for f in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
                                if not f.exists()}
            with self._guard():
                db = sqlite3.connect(path, timeout=30, isolation_level=None, factory=CountedConnection)
                db.count_as(key)
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                except BaseException:
                    db.close()
                    raise
            self._db = db
        return self._db

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            self._columns.clear()

    def close(self) -> None:
        """Close the database and give up the writer lock, if held."""
        self._close_db()
        self.release_writer()

    def _ensure(self, table: str, rows: list[dict[str, Any]]) -> None:
        cols = self._columns.get(table)
        if cols is None:
            cols = self._column_names(table)
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
        with self._guard():
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
                if db.in_transaction:  # SQLite may have rolled back itself (a corrupt page): do not mask the error
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
        with self._guard():
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                for name in self._table_names():
                    if "logged_at" in self._column_names(name):
                        db.execute(f'DELETE FROM "{name}" WHERE logged_at > ?', (step,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _table_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]

    def _column_names(self, table: str) -> set[str]:
        return {r[1] for r in self.db.execute(f'PRAGMA table_info("{table}")')}

    def _starting(self) -> bool:
        """Whether metrics.db is the empty file that SQLite creates a moment before it writes the header, in
        another process that holds the writer lock: no rows yet, not damage (and a reader must not open it,
        which would write the header itself)."""
        db = self.path / DB_FILE
        return db.stat().st_size == 0 and not self._lock.held and WriterLock.holder(self.path) is not None

    def tables(self) -> list[str]:
        """Names of the tables that hold rows."""
        if not (self.path / DB_FILE).is_file() or (self._db is None and self._starting()):
            return []
        with self._guard():
            return self._table_names()

    def table(self, name: str) -> pd.DataFrame:
        """All rows of table ``name`` as a DataFrame (empty if the table has no rows yet)."""
        if name not in self.tables():
            return pd.DataFrame()
        with self._guard():
            return pd.read_sql_query(f'SELECT * FROM "{name}" ORDER BY rowid', self.db)

    # -------------------------------------------------------------------------------------------- check
    def check(self):
        """Check the store without changing its data (see :func:`sgdscope.storecheck.check_store`)."""
        from sgdscope.storecheck import check_store

        return check_store(self)

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
