"""Durable file operations: what makes a write survive a crash or power loss.

A file's bytes are durable after ``fsync`` of the file; its name only after ``fsync`` of
the directory holding it. Every module that publishes files uses these two helpers.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.filesystems import refused


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot sync a directory at all (EINVAL: some network, FUSE and
        # pseudo file systems): their names are as durable as they make them, and refusing
        # to store on them would protect nothing. A failed sync (EIO) is still an error.
        if not refused(exc):
            raise
    finally:
        os.close(fd)


def temporary_for(path: Path) -> Path:
    """Where ``write_atomically`` writes ``path`` before renaming it into place: what a
    crash during the write leaves."""
    return path.with_name(path.name + ".tmp")


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` all at once: a temporary file, fsync, rename, fsync of
    the directory. Readers see the old content or the new, never a mix."""
    tmp = temporary_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
