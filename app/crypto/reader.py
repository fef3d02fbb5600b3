"""A seekable, read-only file object over an encrypted object.

pydicom and range reads see plaintext; only the segments touched are read and decrypted,
one segment is cached. Blocking: use from worker threads, or open ``cached_only`` where
waiting for a disk is not allowed.

Both fast paths are optional: a file system that refuses ``RWF_NOWAIT`` makes every
``cached_only`` opening there ``NotCached`` (the caller then opens in a worker thread, with
plain reads), and one that refuses memory maps is read with ``pread`` (``app.filesystems``).
"""

from __future__ import annotations

import io
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import IO

from app.crypto.segments import DEFAULT_SEGMENT_SIZE, MAX_HEADER_SIZE, TAG_SIZE, Header, Opener
from app.filesystems import MEMORY_MAPS, NOWAIT_READS
from app.rawio import SeekableReader

KeyLookup = Callable[[str], bytes]

#: Bytes read when an object is opened: its header and a whole default-sized segment.
HEAD_READ = MAX_HEADER_SIZE + DEFAULT_SEGMENT_SIZE + TAG_SIZE
#: Linux's "fail rather than wait for the disk" flag for preadv, where there is one.
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


#: Per thread, the buffer opening reads land in when they need not outlive the opening.
_scratch = threading.local()


def _scratch_view(size: int) -> memoryview:
    buffer: bytearray | None = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = bytearray(HEAD_READ)
    return memoryview(buffer)[:size]


class NotCached(Exception):
    """Opening the object would wait for the disk (``cached_only`` was asked), or its file
    system cannot tell without waiting."""


class DecryptingReader(SeekableReader):
    """Plaintext of one encrypted object.

    With ``cached_only`` opening reads only what the page cache holds and raises
    ``NotCached`` otherwise, so an event loop can open an object without waiting on a disk;
    on a file system that refuses such reads, always ``NotCached``.
    """

    def __init__(
        self, raw: IO[bytes], keys: KeyLookup, object_id: str, *, cached_only: bool = False
    ) -> None:
        super().__init__()
        self._raw = raw
        self._object_id = object_id
        self._fd: int | None = raw.fileno() if _has_fileno(raw) else None
        if self._fd is not None:
            stat = os.fstat(self._fd)
            self._device, total = stat.st_dev, stat.st_size
        else:
            self._device, total = -1, _size_by_seek(raw)
        if cached_only and (
            self._fd is None or _NOWAIT is None or NOWAIT_READS.supported(self._device) is False
        ):
            raise NotCached(object_id)
        self._nowait = cached_only
        # One read brings the header and, for an object of one segment (most instances),
        # the whole ciphertext: opening it then costs a single system call.
        head = self._read_at(0, min(total, HEAD_READ))
        self._head: bytes | memoryview = head
        self._pos = 0
        self._cached_index = -1
        self._cached = b""
        self._mmap: mmap.mmap | None = None
        self._map: memoryview | None = None
        try:
            header = Header.decode(bytes(head[:MAX_HEADER_SIZE]), object_id)
            self._opener = Opener(keys(header.key_id), header, object_id, total)
            self.layout = self._opener.layout
            if isinstance(head, memoryview) and self.layout.segments > 1:
                self._head = bytes(head)  # the segments before the last are read later
            # Opening the final segment up front authenticates the object's length, so a
            # read that stops short of the end still detects truncation or appended bytes.
            self.segment(self.layout.segments - 1)
        finally:
            if isinstance(head, memoryview):  # the thread's scratch buffer: never kept
                if self._head is head:
                    self._head = b""
                head.release()
        self._nowait = False

    def _read_at(self, offset: int, size: int) -> bytes | memoryview:
        # pread: the copy is made with the GIL released, where faulting in mapped pages
        # during decryption would hold it; the cheaper way for objects of a segment or two.
        if self._fd is None:
            self._raw.seek(offset)
            return self._raw.read(size)
        if not self._nowait:
            return os.pread(self._fd, size, offset)
        assert _NOWAIT is not None
        # preadv needs a buffer, and a fresh one is zeroed first: the opening read reuses the
        # thread's, which halves its cost.
        reusable = offset == 0 and size <= HEAD_READ
        buffer = _scratch_view(size) if reusable else memoryview(bytearray(size))
        try:
            read = os.preadv(self._fd, [buffer], offset, _NOWAIT)
        except BlockingIOError:
            read = -1  # the file system honours the flag: the pages are just not cached
        except OSError as exc:
            buffer.release()
            if NOWAIT_READS.refusal(self._device, exc):
                raise NotCached(self._object_id) from None
            raise
        if NOWAIT_READS.supported(self._device) is None:
            NOWAIT_READS.learn(self._device, True)
        if read != size:  # not (or not all) in the page cache; a short read also lands here
            buffer.release()
            raise NotCached(self._object_id)
        return buffer

    def _mapped(self, offset: int, size: int) -> memoryview | None:
        """Ciphertext [offset, offset + size) straight from the page cache, through a memory
        map made on first use; ``None`` when the object is not a file or its file system
        cannot map it (it is then read with ``pread``)."""
        if self._fd is None or MEMORY_MAPS.supported(self._device) is False:
            return None
        if self._map is None:
            try:
                self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                if MEMORY_MAPS.refusal(self._device, exc):
                    return None
                raise
            self._map = memoryview(self._mmap)
        return self._map[offset : offset + size]

    @property
    def name(self) -> str:
        """What parsers that record file names see: the object, not a path to reopen."""
        return f"<encrypted object {self._opener.object_id}>"

    @property
    def size(self) -> int:
        return self.layout.plaintext_size

    def segment(self, index: int) -> bytes:
        """Plaintext of one segment (authenticated)."""
        if index != self._cached_index:
            layout = self.layout
            offset, want = layout.segment_offset(index), layout.segment_ciphertext_size(index)
            if offset + want <= len(self._head):
                with memoryview(self._head)[offset : offset + want] as ciphertext:
                    self._cached = self._opener.open(index, ciphertext)
            elif self._nowait or (mapped := self._mapped(offset, want)) is None:
                self._cached = self._opener.open(index, self._read_at(offset, want))
            else:
                # Past the opening read, segments are decrypted from a memory map: no copy
                # into a read buffer, which for large objects read end to end is the
                # cheaper way. The view is released even on failure, or the map could not
                # be closed.
                if index < layout.segments - 1:  # reading on past the first segment
                    self._head = b""
                with mapped as ciphertext:
                    self._cached = self._opener.open(index, ciphertext)
                # Pages read stay mapped, and counted in the resident set, until dropped:
                # an object of 1 GB read end to end would otherwise look like 1 GB of memory.
                # They stay in the page cache; reading them again only faults them back.
                assert self._mmap is not None
                _drop_pages(self._mmap, offset, want)
            self._cached_index = index
        return self._cached

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        if self._pos >= self.size or len(out) == 0:
            return 0
        seg_size = self.layout.segment_size
        written = 0
        while written < len(out) and self._pos < self.size:
            index, within = divmod(self._pos, seg_size)
            plain = self.segment(index)
            n = min(len(plain) - within, len(out) - written)
            out[written : written + n] = plain[within : within + n]
            written += n
            self._pos += n
        return written

    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        """Plaintext [start, end) as one chunk per touched segment."""
        end = min(end, self.size)
        seg_size = self.layout.segment_size
        for index in self.layout.segments_for(start, end):
            plain = self.segment(index)
            base = index * seg_size
            lo, hi = max(start - base, 0), min(end - base, len(plain))
            yield plain if (lo, hi) == (0, len(plain)) else plain[lo:hi]

    def close(self) -> None:
        if not self.closed:
            self._cached = self._head = b""
            if self._map is not None:
                self._map.release()
                self._map = None
            if self._mmap is not None:
                self._mmap.close()
                self._mmap = None
            self._raw.close()
        super().close()


def _has_fileno(raw: IO[bytes]) -> bool:
    try:
        raw.fileno()
    except (OSError, AttributeError, io.UnsupportedOperation):
        return False
    return True


def _size_by_seek(raw: IO[bytes]) -> int:
    return raw.seek(0, io.SEEK_END)


def _drop_pages(mapping: mmap.mmap, offset: int, length: int) -> None:
    """Unmap the whole pages within [offset, offset + length) from this process."""
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
