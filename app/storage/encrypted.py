"""Encryption at rest for any ``InstanceStore``: every blob is an iex encrypted object.

Wraps a plaintext-oblivious store (files today, an object store later): bytes are sealed
with the writing trust's DEK as they stream in, staged and published by the inner store as
ciphertext, and opened segment by segment on read. The blob key is the object id bound into
every segment, so a blob moved under another key fails its integrity check.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Callable
from typing import IO, Any, Protocol, TypeVar, cast

from app.crypto.keystore import DataKeys
from app.crypto.reader import DecryptingReader, NotCached
from app.crypto.segments import Sealer
from app.filesystems import NOWAIT_READS
from app.rawio import SeekableReader

BUFFER_SIZE = 64 * 1024
#: Plaintext a writer keeps from the start and from the end of its blob: enough for the
#: header of nearly every instance and for what may follow Pixel Data (trailing padding),
#: so that parsing what was just staged decrypts nothing.
STAGED_PREFIX = 64 * 1024
STAGED_TAIL = 4 * 1024
#: Plaintext decrypted per trip to a worker thread when streaming a blob.
READ_BATCH = 4 * 1024 * 1024

T = TypeVar("T")


class _InnerWriter(Protocol):
    @property
    def key(self) -> str: ...

    def write_blocking(self, data: bytes) -> None: ...

    def finish_blocking(self) -> None: ...

    def open_staged(self) -> IO[bytes]: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...


class _InnerStore(Protocol):
    #: The file system (``st_dev``) its blobs are files on.
    device: int

    async def create(self) -> _InnerWriter: ...

    def open_blocking(self, key: str) -> IO[bytes]: ...

    async def delete(self, key: str) -> None: ...

    def keys(self, older_than: float) -> AsyncIterator[list[str]]: ...

    async def check(self) -> None: ...


#: Plaintext gathered before a writer hashes, seals and writes it in a worker thread.
WRITE_BATCH = 1024 * 1024


class EncryptingWriter:
    def __init__(
        self, inner: _InnerWriter, sealer: Sealer, keys: DataKeys, *, digest: bool = False
    ) -> None:
        self._inner = inner
        self._sealer = sealer
        self._keys = keys
        self._size = 0
        self._finished = False
        self._header_written = False
        #: The last job handed to a worker thread, which ``abort`` waits for.
        self._job: asyncio.Future[Any] | None = None
        self._prefix = bytearray()
        self._tail = b""
        # Only on request: hashing costs more CPU than sealing (SHA-256 ~1.3 GB/s here,
        # AES-256-GCM ~8 GB/s).
        self._sha256 = hashlib.sha256() if digest else None
        #: Plaintext received but not yet sealed (and hashed) and written, and its size.
        self._pending: list[bytes] = []
        self._pending_size = 0

    @property
    def key(self) -> str:
        return self._inner.key

    def _keep_ends(self, data: bytes) -> None:
        if len(self._prefix) < STAGED_PREFIX:
            self._prefix += data[: STAGED_PREFIX - len(self._prefix)]
        if len(data) >= STAGED_TAIL:
            self._tail = bytes(data[-STAGED_TAIL:])
        else:
            self._tail = (self._tail + bytes(data))[-STAGED_TAIL:]

    @property
    def size(self) -> int:
        """Plaintext bytes written."""
        return self._size

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the plaintext; complete once ``finish`` returned."""
        if self._sha256 is None:
            raise RuntimeError("this writer was created without a digest")
        return self._sha256.hexdigest()

    async def write(self, data: bytes) -> None:
        self._keep_ends(data)
        self._size += len(data)
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= WRITE_BATCH:
            # Hashing, sealing and writing a batch in one worker-thread trip (network reads
            # are too small to be worth a trip each). The batch before must be done first,
            # as the digest and the cipher run in order, but this one is not waited for:
            # the next batch is received meanwhile.
            await self._settled()
            pending = self._take_pending()
            self._start(lambda: self._absorb(pending, False))

    def _take_pending(self) -> list[bytes]:
        pending, self._pending, self._pending_size = self._pending, [], 0
        return pending

    def _start(self, work: Callable[[], T]) -> asyncio.Future[T]:
        # Kept: ``abort`` must not remove the staged file before the job creates or
        # writes it, and the next job must not start before this one is done.
        job = asyncio.ensure_future(asyncio.to_thread(work))
        self._job = job
        return job

    async def _settled(self) -> None:
        """Wait for the job in flight, if any; raise what it raised."""
        if self._job is not None:
            # Shielded: a cancelled caller must not cancel a job that is already running.
            await asyncio.shield(self._job)

    async def _in_thread(self, work: Callable[[], T]) -> T:
        await self._settled()
        return await asyncio.shield(self._start(work))

    def _absorb(self, pending: list[bytes], last: bool) -> None:
        sealed: list[bytes] = [] if self._header_written else [self._sealer.header]
        self._header_written = True
        for data in pending:
            if self._sha256 is not None:
                self._sha256.update(data)
            sealed += self._sealer.update(data)
        if last:
            sealed += self._sealer.finish()
        for segment in sealed:  # a write each rather than a copy into one
            self._inner.write_blocking(segment)

    async def finish(self) -> None:
        if not self._finished:
            await self._in_thread(self._finisher())

    async def finish_and_read(self, read: Callable[[IO[bytes]], T]) -> T:
        """``finish``, then ``read`` the staged plaintext: one worker-thread trip for both."""
        finish = self._finisher()

        def run() -> T:
            finish()
            with self.open_staged() as fp:
                return read(fp)

        return await self._in_thread(run)

    def _finisher(self) -> Callable[[], None]:
        """The blocking rest of ``finish``: the last batch sealed, the file made durable."""
        if self._finished:
            return lambda: None
        self._finished = True
        pending = self._take_pending()

        def finish() -> None:
            self._absorb(pending, True)
            self._inner.finish_blocking()

        return finish

    def open_staged(self) -> IO[bytes]:
        """The plaintext written, for reading back (the header parse): its first and last
        bytes come from memory; the rest is decrypted from the staged file if a read needs it."""

        def decrypting() -> DecryptingReader:
            return DecryptingReader(self._inner.open_staged(), self._keys.key, self.key)

        return _buffered(_KeptEndsReader(bytes(self._prefix), self._tail, self._size, decrypting))

    async def commit(self) -> None:
        await self.finish()
        await self._inner.commit()

    async def abort(self) -> None:
        job = self._job
        if job is not None:
            await asyncio.wait([job])
            if not job.cancelled():
                job.exception()  # its outcome no longer matters: seen, so not reported
        await self._inner.abort()


class EncryptedInstanceStore:
    """``InstanceStore`` that encrypts into an inner store."""

    def __init__(self, inner: _InnerStore, keys: DataKeys, segment_size: int) -> None:
        self._inner = inner
        self._keys = keys
        self._segment_size = segment_size

    async def create(self, trust: str, *, digest: bool = False) -> EncryptingWriter:
        if self._keys.needs_new_key(trust):
            key_id, key = await asyncio.to_thread(self._keys.for_writing, trust)
        else:
            key_id, key = self._keys.for_writing(trust)
        inner = await self._inner.create()
        sealer = Sealer(key, key_id, inner.key, self._segment_size)
        return EncryptingWriter(inner, sealer, self._keys, digest=digest)

    def _open(self, key: str, *, cached_only: bool = False) -> DecryptingReader:
        raw = self._inner.open_blocking(key)
        try:
            return DecryptingReader(raw, self._keys.key, key, cached_only=cached_only)
        except BaseException:
            raw.close()
            raise

    def _open_cached(self, key: str) -> DecryptingReader | None:
        """``key`` opened from the page cache alone, or ``None`` if that would wait."""
        if NOWAIT_READS.supported(self._inner.device) is False:
            return None
        try:
            return self._open(key, cached_only=True)
        except NotCached:
            return None

    def open_blocking(self, key: str) -> IO[bytes]:
        return _buffered(self._open(key))

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        # Opening authenticates the header and the final segment (so the length is genuine);
        # every other segment is authenticated as it is read. A trip to a worker thread
        # costs more than reading and decrypting one segment from the page cache, so an
        # object whose opening reads are all cached is opened right here: for an instance
        # of one segment (most of them) that is the whole of it. Anything that would wait
        # for the disk, and each further READ_BATCH bytes, goes to a worker thread; so does
        # every opening on a file system that cannot read from the page cache alone (tmpfs,
        # overlayfs, NFS, ...), where even the open stays off the event loop.
        reader = self._open_cached(key)
        if reader is None:
            reader = await _in_worker(lambda: self._open(key), on_abandon=DecryptingReader.close)
        # A worker thread may be decrypting with the reader when this generator is closed
        # or cancelled: the reader is then closed when the thread is done, never under it.
        job: asyncio.Future[list[bytes]] | None = None
        try:
            batches = _Batches(reader, start, end)
            batch = batches.next() if reader.layout.segments == 1 else None  # decrypted
            while True:
                if batch is None:
                    job = asyncio.ensure_future(asyncio.to_thread(batches.next))
                    batch = await asyncio.shield(job)
                    job = None
                for chunk in batch:
                    yield chunk
                if batches.done or not batch:
                    break
                batch = None
        finally:
            if job is not None and not job.done():
                job.add_done_callback(lambda done: _close_after(done, reader))
            else:
                reader.close()  # a no-op once the last batch has closed it

    async def delete(self, key: str) -> None:
        await self._inner.delete(key)

    def keys(self, older_than: float) -> AsyncIterator[list[str]]:
        return self._inner.keys(older_than)

    async def check(self) -> None:
        await self._inner.check()


class _Batches:
    """The plaintext of [start, end) of one object, about ``READ_BATCH`` bytes at a time
    (whole segments). The batch that reaches the end also closes the object."""

    def __init__(self, reader: DecryptingReader, start: int, end: int | None) -> None:
        self.reader = reader
        stop = reader.size if end is None else min(end, reader.size)
        self._left = max(stop - start, 0)
        self._segments = reader.iter_range(start, stop)

    @property
    def done(self) -> bool:
        return self._left <= 0

    def next(self) -> list[bytes]:
        batch: list[bytes] = []
        size = 0
        if self._left > 0:
            for chunk in self._segments:
                batch.append(chunk)
                size += len(chunk)
                if size >= READ_BATCH:
                    break
            self._left -= size
        if self._left <= 0:
            self.reader.close()
        return batch


class _KeptEndsReader(SeekableReader):
    """A seekable reader of ``size`` bytes that begin with ``prefix`` and end with ``tail``;
    what lies between is read from the reader ``open_rest`` makes, on the first read there."""

    def __init__(
        self, prefix: bytes, tail: bytes, size: int, open_rest: Callable[[], DecryptingReader]
    ) -> None:
        super().__init__()
        self._prefix = prefix
        self._tail = tail
        self._tail_start = size - len(tail)
        self._size = size
        self._open_rest = open_rest
        self._rest: DecryptingReader | None = None

    @property
    def name(self) -> str:
        return "<staged object>"

    @property
    def size(self) -> int:
        return self._size

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        if self._pos >= self._size or not len(out):
            return 0
        if self._pos < len(self._prefix):
            n = min(len(out), len(self._prefix) - self._pos)
            out[:n] = self._prefix[self._pos : self._pos + n]
        elif self._pos >= self._tail_start:
            start = self._pos - self._tail_start
            n = min(len(out), len(self._tail) - start)
            out[:n] = self._tail[start : start + n]
        else:
            if self._rest is None:
                self._rest = self._open_rest()
            self._rest.seek(self._pos)
            n = self._rest.readinto(out)
        self._pos += n
        return n

    def close(self) -> None:
        if self._rest is not None:
            self._rest.close()
        super().close()


def _buffered(reader: io.RawIOBase) -> IO[bytes]:
    # Parsers read a few bytes at a time; a buffer keeps that off the decrypting path.
    return cast(IO[bytes], io.BufferedReader(reader, BUFFER_SIZE))


async def _in_worker(work: Callable[[], T], *, on_abandon: Callable[[T], None]) -> T:
    """``work`` in a worker thread; if the wait is cancelled, ``on_abandon`` gets what the
    thread still produces (so that, say, a file it opens is closed)."""
    job = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:

        def abandon(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                on_abandon(done.result())

        job.add_done_callback(abandon)
        raise


def _close_after(job: asyncio.Future[Any], reader: DecryptingReader) -> None:
    if not job.cancelled():
        job.exception()  # nobody waits for it any more: seen, so not reported
    reader.close()
