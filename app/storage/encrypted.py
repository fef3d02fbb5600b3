"""Encryption at rest for any ``InstanceStore``: every blob is an iex encrypted object.

Wraps a plaintext-oblivious store (files today, an object store later): bytes are sealed
with the writing trust's DEK as they stream in, staged and published by the inner store as
ciphertext, and opened segment by segment on read. The blob key is the object id bound into
every segment, so a blob moved under another key fails its integrity check.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import IO, Protocol, cast

from app.crypto.keystore import DataKeys
from app.crypto.reader import DecryptingReader
from app.crypto.segments import Sealer

BUFFER_SIZE = 64 * 1024


class _InnerWriter(Protocol):
    @property
    def key(self) -> str: ...

    async def write(self, data: bytes) -> None: ...

    async def finish(self) -> None: ...

    def open_staged(self) -> IO[bytes]: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...


class _InnerStore(Protocol):
    async def create(self) -> _InnerWriter: ...

    def open_blocking(self, key: str) -> IO[bytes]: ...

    async def delete(self, key: str) -> None: ...

    def keys(self, older_than: float) -> AsyncIterator[list[str]]: ...

    async def check(self) -> None: ...


class EncryptingWriter:
    def __init__(self, inner: _InnerWriter, sealer: Sealer, keys: DataKeys) -> None:
        self._inner = inner
        self._sealer = sealer
        self._keys = keys
        self._size = 0
        self._finished = False

    @property
    def key(self) -> str:
        return self._inner.key

    @property
    def size(self) -> int:
        """Plaintext bytes written."""
        return self._size

    async def write(self, data: bytes) -> None:
        sealed = self._sealer.update(data)
        self._size += len(data)
        if sealed:
            await self._inner.write(sealed)

    async def finish(self) -> None:
        if not self._finished:
            self._finished = True
            await self._inner.write(self._sealer.finish())
        await self._inner.finish()

    def open_staged(self) -> IO[bytes]:
        return _buffered(DecryptingReader(self._inner.open_staged(), self._keys.key, self.key))

    async def commit(self) -> None:
        await self.finish()
        await self._inner.commit()

    async def abort(self) -> None:
        await self._inner.abort()


class EncryptedInstanceStore:
    """``InstanceStore`` that encrypts into an inner store."""

    def __init__(self, inner: _InnerStore, keys: DataKeys, segment_size: int) -> None:
        self._inner = inner
        self._keys = keys
        self._segment_size = segment_size

    async def create(self, trust: str) -> EncryptingWriter:
        if self._keys.needs_new_key(trust):
            key_id, key = await asyncio.to_thread(self._keys.for_writing, trust)
        else:
            key_id, key = self._keys.for_writing(trust)
        inner = await self._inner.create()
        sealer = Sealer(key, key_id, inner.key, self._segment_size)
        try:
            await inner.write(sealer.header)
        except BaseException:
            await inner.abort()
            raise
        return EncryptingWriter(inner, sealer, self._keys)

    def _open(self, key: str) -> DecryptingReader:
        return DecryptingReader(self._inner.open_blocking(key), self._keys.key, key)

    def open_blocking(self, key: str) -> IO[bytes]:
        return _buffered(self._open(key))

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        # Opening authenticates the header and the final segment (so the length is genuine);
        # every other segment is authenticated as it is read.
        reader = await asyncio.to_thread(self._open, key)
        try:
            stop = reader.size if end is None else min(end, reader.size)
            segments = reader.iter_range(start, stop)
            while (chunk := await asyncio.to_thread(next, segments, None)) is not None:
                yield chunk
        finally:
            reader.close()

    async def delete(self, key: str) -> None:
        await self._inner.delete(key)

    def keys(self, older_than: float) -> AsyncIterator[list[str]]:
        return self._inner.keys(older_than)

    async def check(self) -> None:
        await self._inner.check()


def _buffered(reader: DecryptingReader) -> IO[bytes]:
    # Parsers read a few bytes at a time; a buffer keeps that off the decrypting path.
    return cast(IO[bytes], io.BufferedReader(reader, BUFFER_SIZE))
