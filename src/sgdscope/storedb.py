"""The SQLite file under a run store: what counts as damage, and connections this process counts.

Kept apart from :mod:`sgdscope.store` (the rows) because both the store and ``sgdscope check`` read it.
"""

from __future__ import annotations

import collections
import re
import sqlite3
import weakref
from pathlib import Path

# SQLite's primary result codes for a file that is not (or no longer) a database, and the short read of
# a truncated one; a busy or locked database is an OperationalError with other codes and is not damage.
_DAMAGE_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_SHORT_READ = 522  # SQLITE_IOERR_SHORT_READ
# damage that SQLite reports under its generic SQLITE_ERROR code: a header field out of range
_DAMAGE_MESSAGES = {"unsupported file format"}


def damage_reason(err: BaseException) -> str | None:
    """What SQLite said, if ``err`` (or an error it wraps, as pandas does) says the file is damaged."""
    while err is not None:
        code = getattr(err, "sqlite_errorcode", None)
        if isinstance(err, sqlite3.DatabaseError) and code is not None and (code & 0xFF in _DAMAGE_CODES
                                                                           or code == _SHORT_READ):
            return " ".join(str(err).split())[:200]
        if isinstance(err, sqlite3.DatabaseError) and str(err) in _DAMAGE_MESSAGES:
            return str(err)
        # Python's own decoding of a TEXT cell: the store writes only UTF-8, so other bytes are damage
        # (the message quotes the cell, which may hold anything: only the column is kept)
        if isinstance(err, sqlite3.OperationalError) and str(err).startswith("Could not decode to UTF-8"):
            col = re.match(r"Could not decode to UTF-8 column '([^']{0,60})'", str(err))
            return f"text that is not UTF-8 in column {col.group(1)!r}" if col else "text that is not UTF-8"
        if isinstance(err, UnicodeDecodeError):  # a garbled schema: even SQLite's message about it is not UTF-8
            return "text that is not UTF-8 in the schema"
        err = err.__cause__ or err.__context__
    return None


# Open SQLite connections per database file in this process. SQLite's locks are POSIX record locks, which
# the kernel drops for the whole process when ANY descriptor of the file is closed: reading the header with
# a second descriptor while a connection is open would silently unlock that connection and let a concurrent
# writer and this process's checkpoint interleave (a store corrupted on resume, seen in test_sigint).
OPEN_CONNECTIONS: collections.Counter = collections.Counter()


def _forget_connection(key: str) -> None:
    OPEN_CONNECTIONS[key] -= 1


class CountedConnection(sqlite3.Connection):
    """A connection counted in ``OPEN_CONNECTIONS`` until it is closed or collected (whichever comes first:
    a connection can outlive its store, held by a reader such as pandas)."""

    def count_as(self, key: str) -> None:
        OPEN_CONNECTIONS[key] += 1
        self._uncount = weakref.finalize(self, _forget_connection, key)

    def close(self) -> None:
        super().close()
        if hasattr(self, "_uncount"):
            self._uncount()  # runs once: a later collection does not count it off again


def header_problem(db: Path) -> str | None:
    """Why the bytes of ``db`` cannot be a whole SQLite database, or None if they may be.

    Checked before SQLite opens the file, because SQLite takes a zero-length file for an empty database
    (and would silently turn it into one), and reads a truncated one without complaint until it reaches a
    missing page.
    """
    try:
        size = db.stat().st_size
        with open(db, "rb") as f:
            head = f.read(100)
    except OSError as err:
        return f"unreadable: {err.strerror}"
    if size == 0:
        return "zero-length file"
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        return "not an SQLite database"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    header_valid = head[24:28] == head[92:96]  # SQLite's rule for trusting the in-header page count
    wal = db.with_name(db.name + "-wal")
    # with a live WAL, pages can be in the log and not yet in the file, so only SQLite can judge the size
    if header_valid and pages and not (wal.is_file() and wal.stat().st_size) and size < page * pages:
        return f"truncated: {size} bytes, the header says {page * pages}"
    return None


