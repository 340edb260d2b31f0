"""One writer per directory: an exclusive ``flock`` on ``DIRECTORY/.lock`` naming the writer's PID.

Run directories (a ``sgdscope run``, a Scope's ``out``) and sweep directories take it for as long as their
writer lives. The kernel drops a ``flock`` when its holder dies, even by SIGKILL, so a lock left by a killed
writer is taken over by the next one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from sgdscope.errors import RunStoreError

LOCK_FILE = ".lock"


def busy(directory: Path) -> RunStoreError:
    """The error for a directory whose writer lock is held, naming the holder's PID when it has written it."""
    try:
        pid = (directory / LOCK_FILE).read_text().strip()
    except OSError:
        pid = ""
    who = f"PID {pid}" if pid.isdigit() else "PID unknown"  # the holder truncates and rewrites it: a race can read ""
    return RunStoreError(f"{directory}: another sgdscope process ({who}) is writing to it; wait for it or stop it")


class WriterLock:
    """An exclusive ``flock`` on ``DIRECTORY/.lock`` that holds this process's PID while it is held.

    ``flock`` (not a PID file checked for liveness) because the kernel releases it when the holder dies, even
    by SIGKILL, so there is never a stale lock to clean up and no PID-reuse race. The file is never
    removed: unlinking it on release would let a waiter lock the old inode while a newcomer locks a new one.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._file: Any = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock (a no-op when this object holds it); RunStoreError naming the holder if it is taken."""
        import fcntl  # POSIX only, imported where it is needed so that reading a store works everywhere

        if self._file is not None:
            return
        path = self.directory / LOCK_FILE
        try:
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)
        except OSError as err:
            raise RunStoreError(f"{self.directory}: cannot take the writer lock {path} ({err.strerror})") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise busy(self.directory) from None
        except BaseException:
            f.close()
            raise
        f.truncate(0)
        f.write(f"{os.getpid()}\n".encode())
        self._file = f

    def release(self) -> None:
        """Drop the lock (a no-op when not held). The PID is erased first, so the file never names a process
        that no longer writes."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.truncate(0)
        finally:
            f.close()  # closing the descriptor is what drops the flock

    @staticmethod
    def holder(directory: str | Path) -> int | None:
        """The PID of the process that holds the lock of ``directory`` now, or None (probed with a shared
        lock on a read-only descriptor, so probing writes nothing)."""
        import fcntl

        path = Path(directory) / LOCK_FILE
        try:
            f = open(path, "rb")
        except OSError:
            return None
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return None


@contextlib.contextmanager
def writer_lock(directory: str | Path) -> Iterator[Path]:
    """Hold the one-writer lock of ``directory`` (a sweep directory, say) for the ``with`` block.

    The directory is made if absent. A second holder, in this process or another, gets
    ``RunStoreError("DIR: another sgdscope process (PID n) is writing to it; wait for it or stop it")``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(d)
    lock.acquire()
    try:
        yield d
    finally:
        lock.release()
