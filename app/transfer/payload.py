"""An upload's payload as one blocking, seekable, read-only file over its consecutive pieces.

A completed tus upload is a run of encrypted chunk blobs; archive readers need one file
they can seek in (a zip is read from its end). Pieces are opened only when a read reaches
them and at most one is open at a time, so a payload of thousands of chunks holds one
decrypting reader, never a copy of the plaintext. Blocking: use from worker threads.

A piece that cannot be read (``ServiceUnavailable``) or that ends before its recorded
length (``IntegrityError``) is the store's failure; archive readers let both through
instead of blaming the archive.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import IO

from app.crypto.errors import IntegrityError
from app.errors import ServiceUnavailable
from app.rawio import SeekableReader

#: One piece: its recorded length and how to open a reader of exactly that many bytes.
Piece = tuple[int, Callable[[], IO[bytes]]]


class ChunkedPayload(SeekableReader):
    """The concatenation of ``pieces``. ``readinto`` stops at a piece boundary, so one call
    may return fewer bytes than asked, but it returns 0 only at the end of the payload."""

    def __init__(self, pieces: Sequence[Piece]) -> None:
        super().__init__()
        if any(length < 0 for length, _ in pieces):
            raise ValueError("a piece cannot have a negative length")
        self._lengths = [length for length, _ in pieces]
        self._openers = [opener for _, opener in pieces]
        self._starts = [0, *accumulate(self._lengths)][:-1]
        self._size = sum(self._lengths)
        self._index = -1
        self._piece: IO[bytes] | None = None
        #: Position inside the open piece, so sequential reads need no seek.
        self._piece_pos = 0

    @property
    def size(self) -> int:
        return self._size

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        self._check_open()
        out = memoryview(buffer).cast("B")
        if self._pos >= self._size or not len(out):
            return 0
        # The last piece starting at or before the position: zero-length pieces share their
        # start with the next one, and bisect_right steps over them.
        index = bisect.bisect_right(self._starts, self._pos) - 1
        within = self._pos - self._starts[index]
        want = min(len(out), self._lengths[index] - within)
        try:
            piece = self._open(index)
            if within != self._piece_pos:
                piece.seek(within)
                self._piece_pos = within
            data = piece.read(want)
        except OSError as exc:
            # The store failed, not the upload: this must not read as a malformed archive.
            self._close_piece()
            raise ServiceUnavailable(
                f"upload piece {index} could not be read: {exc.strerror or type(exc).__name__}"
            ) from exc
        if not data:
            # The store and the upload state disagree about this chunk: not the uploader's
            # doing, and not something a retry of the upload would fix.
            raise IntegrityError(
                f"upload piece {index}",
                f"ended after {within} of its recorded {self._lengths[index]} bytes",
            )
        n = len(data)
        out[:n] = data
        self._pos += n
        self._piece_pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._close_piece()
        super().close()

    def _open(self, index: int) -> IO[bytes]:
        if index != self._index or self._piece is None:
            self._close_piece()
            self._piece = self._openers[index]()
            self._index = index
            # Seek once after opening rather than assume where a fresh reader stands.
            self._piece_pos = -1
        return self._piece

    def _close_piece(self) -> None:
        piece, self._piece, self._index = self._piece, None, -1
        if piece is not None:
            piece.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed payload")
