"""Blobs as files under the data directory.

Layout: ``blobs/ab/cd/<key>`` for committed blobs and ``staging/<process>/<key>`` while
writing. A blob
is written to staging, fsynced, then renamed into place (atomic on one filesystem) and the
directory fsynced, so a crash leaves either nothing or a whole blob, never half of one.
Keys are random hex chosen here; no client string ever reaches a path.

Staged files of a process that is gone (a crash) are deleted when the next one starts:
nobody was ever told they were stored.
The index commits after the blobs it references are published, so the index never names a
missing blob; the price is that a crash between publishing and that commit leaves blobs
that nothing references. They are never served, only wasted space, and reclaiming them
needs the index's list of keys: that is a sweeper's job above this module.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from app.durable import fsync_dir
from app.errors import NotFound, ServiceUnavailable
from app.filelock import FileLock

READ_CHUNK = 1024 * 1024
_LOCK = ".lock"
_KEY_CHARS = frozenset("0123456789abcdef")


class FileBlobWriter:
    def __init__(self, store: FileInstanceStore, key: str) -> None:
        self._store = store
        self._key = key
        self._staged = store.staging_dir / key
        # Created by the first write, in the worker thread that makes it: creating a file
        # is metadata work (and, on a busy filesystem, a wait) the event loop should not do.
        self._file: IO[bytes] | None = None
        self._finished = False
        self._size = 0

    @property
    def key(self) -> str:
        return self._key

    @property
    def size(self) -> int:
        return self._size

    def write_blocking(self, data: bytes) -> None:
        """Append ``data``; blocking, for worker threads (the caller never runs two at once)."""
        assert not self._finished, "write after finish"
        try:
            if self._file is None:
                self._file = open(self._staged, "xb")  # noqa: SIM115
            self._file.write(data)
        except OSError as exc:
            raise _unwritable(exc) from exc
        self._size += len(data)

    def finish_blocking(self) -> None:
        """Flush, fsync and close what was written (an empty blob if nothing was); blocking."""
        if self._finished:
            return
        self._finished = True
        f, self._file = self._file, None
        try:
            _flush_and_close(f, self._staged)
        except OSError as exc:
            raise _unwritable(exc) from exc

    def open_staged(self) -> IO[bytes]:
        return open(self._staged, "rb")  # noqa: SIM115

    async def commit(self) -> None:
        final = self._store.path_for(self._key)

        def finish_and_publish() -> None:
            self.finish_blocking()  # a no-op when the writer finished it already
            try:
                _publish(self._staged, final)
            except OSError as exc:
                raise _unwritable(exc) from exc

        await asyncio.to_thread(finish_and_publish)

    async def abort(self) -> None:
        """Discard the staged bytes; safe to call at any point, and more than once."""
        self._finished = True
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError:
                pass  # flushing bytes we are about to delete failed; nothing is lost
        self._staged.unlink(missing_ok=True)


def _unwritable(exc: OSError) -> ServiceUnavailable:
    return ServiceUnavailable(f"the blob store cannot be written: {exc.strerror or exc}")


def _flush_and_close(f: IO[bytes] | None, path: Path) -> None:
    if f is None:  # nothing was written: the blob is empty, and must exist all the same
        f = open(path, "xb")  # noqa: SIM115
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` that also makes each new directory's entry durable in its parent."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass  # a concurrent commit made it; its entry is fsynced below all the same
        fsync_dir(directory.parent)


def _publish(staged: Path, final: Path) -> None:
    _make_dirs(final.parent)
    os.replace(staged, final)
    fsync_dir(final.parent)


def _remove_abandoned(staging: Path) -> int:
    """Remove what processes that are gone staged; how many others are still staging."""
    alive = 0
    for entry in staging.iterdir():
        if entry.name.endswith(_LOCK):
            owner = FileLock(entry)
            if not owner.acquire():
                alive += 1
                continue
            shutil.rmtree(staging / entry.name[: -len(_LOCK)], ignore_errors=True)
            entry.unlink(missing_ok=True)
            owner.release()
        elif entry.is_dir():
            if not (staging / (entry.name + _LOCK)).exists():
                shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)  # staged when all processes shared one directory
    return alive


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir())


def _blobs_before(directory: Path, older_than: float) -> list[str]:
    keys = []
    for entry in os.scandir(directory):
        if len(entry.name) == 32 and _KEY_CHARS.issuperset(entry.name):
            try:
                # ctime, not mtime: publishing (a rename) changes it, so a blob staged long
                # ago and only just published does not look old.
                if entry.stat().st_ctime < older_than:
                    keys.append(entry.name)
            except FileNotFoundError:
                continue  # deleted meanwhile
    return keys


class FileInstanceStore:
    """``InstanceStore`` on a local filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self._blob_root = str(self.blob_dir)
        staging = root / "staging"
        for d in (self.blob_dir, staging):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Each process stages in a directory of its own, beside a lock it holds while it
        # runs: staged files of a process that is gone were never acknowledged to anyone,
        # and a directory whose lock can be taken (or that has none) is such a process's.
        #: Whether another process was serving this directory when this store opened.
        self.shared = _remove_abandoned(staging) > 0
        name = secrets.token_hex(8)
        self._owner = FileLock(staging / (name + _LOCK))
        self._owner.acquire()  # before the directory exists, so it is never unowned
        self.staging_dir = staging / name
        self.staging_dir.mkdir(mode=0o700)
        #: The file system blobs live on (``st_dev``): staged files are renamed into place,
        #: so it is staging's. A file's, not a directory's: on an overlay a directory may
        #: report the overlay's device and a file the layer's.
        self.device = os.stat(self._owner.path).st_dev

    def close(self) -> None:
        """Stop staging: the staging directory goes, and with it anything still in it."""
        if self._owner.held:
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            self._owner.path.unlink(missing_ok=True)
            self._owner.release()

    def path_for(self, key: str) -> Path:
        return Path(self._blob_path(key))

    def _blob_path(self, key: str) -> str:
        # A string, not a Path: retrievals open one blob per instance, and joining Paths
        # cost a tenth of the event loop's time sending a study.
        if len(key) != 32 or not _KEY_CHARS.issuperset(key):
            raise NotFound("no such blob")
        return f"{self._blob_root}/{key[:2]}/{key[2:4]}/{key}"

    async def create(self) -> FileBlobWriter:
        return FileBlobWriter(self, secrets.token_hex(16))

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self.path_for(key)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError as exc:
            raise NotFound("the stored object is missing") from exc
        try:
            if start:
                f.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                want = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                chunk = await asyncio.to_thread(f.read, want)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            f.close()

    def open_blocking(self, key: str) -> IO[bytes]:
        try:
            # Unbuffered: readers of stored objects read at offsets, in large pieces.
            return open(self._blob_path(key), "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError as exc:
            raise NotFound("the stored object is missing") from exc

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path_for(key).unlink, True)

    async def keys(self, older_than: float) -> AsyncIterator[list[str]]:
        # One two-level fan-out directory per thread hop keeps each batch small.
        for top in await asyncio.to_thread(_subdirs, self.blob_dir):
            for leaf in await asyncio.to_thread(_subdirs, top):
                batch = await asyncio.to_thread(_blobs_before, leaf, older_than)
                if batch:
                    yield batch

    async def check(self) -> None:
        def probe() -> None:
            probe_path = self.staging_dir / f".probe-{secrets.token_hex(4)}"
            probe_path.write_bytes(b"ok")
            probe_path.unlink()

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise ServiceUnavailable(f"the blob store is not writable: {exc.strerror}") from exc
