"""The position bookkeeping of the read-only, seekable raw files iex builds over stored
bytes (a decrypting view of one object, a payload joined from chunks): one implementation of
``seek`` and ``tell`` for all of them. Pure ``io``; any layer may use it."""

from __future__ import annotations

import io


class SeekableReader(io.RawIOBase):
    """A readable, seekable ``RawIOBase`` of ``size`` bytes; subclasses give ``size`` and
    ``readinto``, reading from ``self._pos`` and advancing it."""

    _pos: int = 0

    @property
    def size(self) -> int:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        # A plain attribute read: progress reporting may call it from another thread.
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos
