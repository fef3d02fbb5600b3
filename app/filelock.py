"""File locks that coordinate the processes serving one data directory.

An ``flock`` lock belongs to an open file and goes with the process holding it, however that
process ends: a crash never leaves one behind, and a lock that can be taken proves that its
previous holder is gone.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class FileLock:
    """One lock file; ``acquire`` may be called until it succeeds, ``release`` undoes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, shared: bool = False, wait: bool = False) -> bool:
        """Take the lock (shared, or exclusive); without ``wait``, ``False`` if it is taken."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold ``path`` exclusively for the block, waiting for it if another process has it."""
    lock = FileLock(path)
    lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()


class Turns:
    """An exclusive lock taken and given back many times, over one file kept open.

    Waiting on it wakes the moment the holder lets go: processes that write one SQLite
    database take turns here rather than in SQLite's busy handler, which sleeps and retries.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> None:
        assert self._fd is not None, "turns after close"
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
