"""The iex encrypted object format: segmented AES-256-GCM, streaming and seekable.

This is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015) as used by Tink's
streaming AEAD and by age: the plaintext is cut into fixed-size segments, each sealed on its
own with a nonce derived from a random per-object prefix and the segment counter, and with
associated data that binds the header, the object id, the segment index and whether the
segment is the last one. So truncation, reordering, appending, swapping segments between
objects and editing the header are all detected, and any byte range can be decrypted by
opening only the segments it touches. ``docs/ENCRYPTION.md`` specifies the bytes.

Pure code: no I/O, no HTTP. Callers feed bytes in and get bytes out.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.crypto.errors import IntegrityError

MAGIC = b"\x89IEXENC\n"
FORMAT_VERSION = 1
ALGORITHM_AES_256_GCM = 1
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 8
KEY_SIZE = 32
DEFAULT_SEGMENT_SIZE = 1024 * 1024
MIN_SEGMENT_SIZE = 4096
MAX_SEGMENT_SIZE = 64 * 1024 * 1024
MAX_SEGMENTS = 2**32
MAX_KEY_ID = 64
_FIXED = struct.Struct(">8sBBI8sB")  # magic, version, algorithm, segment size, prefix, key id len


@dataclass(frozen=True)
class Header:
    key_id: str
    segment_size: int
    nonce_prefix: bytes
    version: int = FORMAT_VERSION
    algorithm: int = ALGORITHM_AES_256_GCM

    def encode(self) -> bytes:
        kid = self.key_id.encode("ascii")
        return (
            _FIXED.pack(
                MAGIC,
                self.version,
                self.algorithm,
                self.segment_size,
                self.nonce_prefix,
                len(kid),
            )
            + kid
        )

    @property
    def size(self) -> int:
        return _FIXED.size + len(self.key_id)

    @staticmethod
    def decode(data: bytes, object_id: str) -> Header:
        """Parse a header from the first bytes of an object (at least ``MAX_HEADER_SIZE``
        or the whole object if shorter)."""
        if len(data) < _FIXED.size:
            raise IntegrityError(object_id, "shorter than the format header")
        magic, version, algorithm, segment_size, prefix, kid_len = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise IntegrityError(object_id, "not an iex encrypted object (bad magic)")
        if version != FORMAT_VERSION:
            raise IntegrityError(object_id, f"unsupported format version {version}")
        if algorithm != ALGORITHM_AES_256_GCM:
            raise IntegrityError(object_id, f"unsupported algorithm {algorithm}")
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise IntegrityError(object_id, f"implausible segment size {segment_size}")
        if not 1 <= kid_len <= MAX_KEY_ID or len(data) < _FIXED.size + kid_len:
            raise IntegrityError(object_id, "malformed key id")
        try:
            key_id = data[_FIXED.size : _FIXED.size + kid_len].decode("ascii")
        except UnicodeDecodeError as exc:
            raise IntegrityError(object_id, "malformed key id") from exc
        return Header(key_id, segment_size, prefix, version, algorithm)


MAX_HEADER_SIZE = _FIXED.size + MAX_KEY_ID


def _validate_key_id(key_id: str) -> None:
    if not 1 <= len(key_id) <= MAX_KEY_ID or not key_id.isascii() or not key_id.isprintable():
        raise ValueError("a key id is 1 to 64 printable ASCII characters")


class _Segments:
    """Nonce and associated data for one object: the part shared by sealing and opening."""

    def __init__(self, key: bytes, header: Header, object_id: str) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self.aead = AESGCM(key)
        self.header = header
        self.object_id = object_id
        oid = object_id.encode("utf-8")
        self._aad_prefix = header.encode() + struct.pack(">H", len(oid)) + oid

    def nonce(self, index: int) -> bytes:
        return self.header.nonce_prefix + struct.pack(">I", index)

    def aad(self, index: int, last: bool) -> bytes:
        return self._aad_prefix + struct.pack(">QB", index, 1 if last else 0)


class Sealer:
    """Encrypts a stream: ``header`` first, then whatever ``update`` and ``finish`` return.

    Only ``finish`` knows which segment is last, so one full segment is always held back.
    Whole segments are sealed straight from the caller's buffer, and the start of a segment
    is kept as a view of it: the only copy made is joining the pieces of a segment that
    arrived in several calls.
    """

    def __init__(
        self,
        key: bytes,
        key_id: str,
        object_id: str,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        nonce_prefix: bytes | None = None,
    ) -> None:
        _validate_key_id(key_id)
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(f"segment size must be {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}")
        prefix = nonce_prefix if nonce_prefix is not None else os.urandom(NONCE_PREFIX_SIZE)
        if len(prefix) != NONCE_PREFIX_SIZE:
            raise ValueError("the nonce prefix is 8 bytes")
        self._segments = _Segments(key, Header(key_id, segment_size, prefix), object_id)
        self._size = segment_size
        #: The start of the next segment, in the pieces it arrived in, and their length.
        self._partial: list[memoryview] = []
        self._partial_size = 0
        self._held: bytes | memoryview | None = None
        self._index = 0
        self._finished = False
        self.header = self._segments.header.encode()

    def _seal(self, plaintext: bytes | memoryview, last: bool) -> bytes:
        if self._index >= MAX_SEGMENTS:
            raise ValueError("object too large for this segment size")
        s = self._segments
        out = s.aead.encrypt(s.nonce(self._index), plaintext, s.aad(self._index, last))
        self._index += 1
        return out

    def _push(self, segment: bytes | memoryview, out: list[bytes]) -> None:
        if self._held is not None:
            out.append(self._seal(self._held, False))
        self._held = segment

    def _take_partial(self) -> bytes:
        joined = b"".join(self._partial)
        self._partial, self._partial_size = [], 0
        return joined

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Sealed segments that ``data`` completed, in order (often none)."""
        if self._finished:
            raise ValueError("update after finish")
        if not isinstance(data, bytes) and not (isinstance(data, memoryview) and data.readonly):
            data = bytes(data)  # what is kept must not change under us
        size = self._size
        view = memoryview(data)
        out: list[bytes] = []
        if self._partial:
            need = size - self._partial_size
            self._partial.append(view[:need])
            self._partial_size += len(self._partial[-1])
            view = view[need:]
            if self._partial_size < size:
                return out
            self._push(self._take_partial(), out)
        while len(view) >= size:
            self._push(view[:size], out)
            view = view[size:]
        if len(view):
            self._partial.append(view)
            self._partial_size = len(view)
        return out

    def finish(self) -> list[bytes]:
        """The sealed segments still held: at least the last one, which may be empty."""
        if self._finished:
            raise ValueError("finish called twice")
        self._finished = True
        out: list[bytes] = []
        if self._partial:
            self._push(self._take_partial(), out)
        held, self._held = self._held, None
        out.append(self._seal(held if held is not None else b"", True))
        return out


@dataclass(frozen=True)
class Layout:
    """Where segments sit in an encrypted object of a given total size."""

    header_size: int
    segment_size: int
    segments: int
    plaintext_size: int

    @property
    def stride(self) -> int:
        return self.segment_size + TAG_SIZE

    def segment_offset(self, index: int) -> int:
        return self.header_size + index * self.stride

    def segment_ciphertext_size(self, index: int) -> int:
        if index < self.segments - 1:
            return self.stride
        return self.plaintext_size - (self.segments - 1) * self.segment_size + TAG_SIZE

    def segments_for(self, start: int, end: int) -> range:
        """Indexes of the segments holding plaintext bytes [start, end)."""
        if end <= start:
            return range(0)
        return range(start // self.segment_size, (end - 1) // self.segment_size + 1)


def layout_for(header: Header, total_size: int, object_id: str) -> Layout:
    body = total_size - header.size
    if body < TAG_SIZE:
        raise IntegrityError(object_id, "truncated: no complete segment")
    stride = header.segment_size + TAG_SIZE
    segments = -(-body // stride)
    last = body - (segments - 1) * stride
    if last < TAG_SIZE:
        raise IntegrityError(object_id, "truncated inside a segment tag")
    plaintext = (segments - 1) * header.segment_size + last - TAG_SIZE
    return Layout(header.size, header.segment_size, segments, plaintext)


class Opener:
    """Decrypts segments of one object; the caller reads the ciphertext it needs."""

    def __init__(self, key: bytes, header: Header, object_id: str, total_size: int) -> None:
        self._segments = _Segments(key, header, object_id)
        self.layout = layout_for(header, total_size, object_id)
        self.object_id = object_id

    def open(self, index: int, ciphertext: bytes | bytearray | memoryview) -> bytes:
        layout = self.layout
        if not 0 <= index < layout.segments:
            raise IndexError(index)
        if len(ciphertext) != layout.segment_ciphertext_size(index):
            raise IntegrityError(self.object_id, f"segment {index} is truncated")
        last = index == layout.segments - 1
        s = self._segments
        try:
            return s.aead.decrypt(s.nonce(index), ciphertext, s.aad(index, last))
        except InvalidTag as exc:
            raise IntegrityError(self.object_id, f"segment {index} does not authenticate") from exc
