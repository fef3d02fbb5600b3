"""A seekable, read-only file object over an encrypted object.

pydicom and range reads see plaintext; only the segments touched are read and decrypted,
one segment is cached. Blocking: use from worker threads.
"""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Callable, Iterator
from typing import IO

from app.crypto.segments import MAX_HEADER_SIZE, Header, Opener
from app.rawio import SeekableReader

KeyLookup = Callable[[str], bytes]


class DecryptingReader(SeekableReader):
    def __init__(self, raw: IO[bytes], keys: KeyLookup, object_id: str) -> None:
        super().__init__()
        self._raw = raw
        self._mmap: mmap.mmap | None = None
        self._map: memoryview | None = None
        if _has_fileno(raw):
            total = os.fstat(raw.fileno()).st_size
            if total:
                self._mmap = mmap.mmap(raw.fileno(), total, access=mmap.ACCESS_READ)
                self._map = memoryview(self._mmap)
        else:
            total = _size_by_seek(raw)
        raw.seek(0)
        header = Header.decode(raw.read(MAX_HEADER_SIZE), object_id)
        self._opener = Opener(keys(header.key_id), header, object_id, total)
        self.layout = self._opener.layout
        self._pos = 0
        self._cached_index = -1
        self._cached = b""
        # Opening the final segment up front authenticates the object's length, so a read
        # that stops short of the end still detects truncation or appended bytes.
        self.segment(self.layout.segments - 1)

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
            if self._map is not None:
                # Decrypt straight from the page cache: no copy into a read buffer. The view
                # is released even on failure, or the mapping could not be closed.
                with self._map[offset : offset + want] as ciphertext:
                    self._cached = self._opener.open(index, ciphertext)
                # Pages read stay mapped, and counted in the resident set, until dropped:
                # an object of 1 GB read end to end would otherwise look like 1 GB of memory.
                # They stay in the page cache; reading them again only faults them back.
                assert self._mmap is not None
                _drop_pages(self._mmap, offset, want)
            else:
                self._raw.seek(offset)
                self._cached = self._opener.open(index, self._raw.read(want))
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
            self._cached = b""
            if self._map is not None:
                self._map.release()
                self._map = None
            if self._mmap is not None:
                self._mmap.close()
                self._mmap = None
            self._raw.close()
        super().close()


def _drop_pages(mapping: mmap.mmap, offset: int, length: int) -> None:
    """Unmap the whole pages within [offset, offset + length) from this process."""
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def _has_fileno(raw: IO[bytes]) -> bool:
    try:
        raw.fileno()
    except (OSError, AttributeError, io.UnsupportedOperation):
        return False
    return True


def _size_by_seek(raw: IO[bytes]) -> int:
    return raw.seek(0, io.SEEK_END)
