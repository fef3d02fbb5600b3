"""Checking that a Part 10 object is whole (PS3.10 §7.1, PS3.5 §7.1 and §7.5).

Every element header is walked and every value seeked over, never read: each declared length
must fit in the file, each undefined-length sequence must be closed, and the data set must end
where the file does. A cut object then fails as "cannot understand" rather than as whatever
attribute the cut happened to drop. The walk also finds where top-level Pixel Data starts.

Blocking: call from a worker thread.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import IO

from app.dicom.media import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from app.dicom.status import FailureReason

PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
UNDEFINED_LENGTH = 0xFFFFFFFF
READ_CHUNK = 1024 * 1024
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
#: Deeper nesting than this is hostile rather than clinical.
MAX_SEQUENCE_DEPTH = 64
#: VRs with a 2-byte and with a 4-byte length in explicit VR (PS3.5 Table 7.1-1, 7.1-2).
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())


class InvalidInstance(Exception):
    """The object cannot be stored; ``reason`` is its STOW-RS Failure Reason."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PixelDataLocation:
    """Where the Pixel Data element sits in the stored file."""

    tag: int
    vr: str
    #: File offset of the value's first byte; ``None`` when the file is deflated.
    value_offset: int | None
    #: Value length in bytes, or ``None`` for undefined length (encapsulated).
    value_length: int | None


def truncated(detail: str) -> InvalidInstance:
    return InvalidInstance(FailureReason.CANNOT_UNDERSTAND, f"the object is truncated: {detail}")


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class Encoding:
    """A data set's encoding: implicit or explicit VR, byte order (PS3.5 §7.1, §7.3)."""

    implicit: bool
    big_endian: bool

    @property
    def endian(self) -> str:
        return ">" if self.big_endian else "<"


META_ENCODING = Encoding(implicit=False, big_endian=False)


class StructureWalker:
    """Walks every element header of a Part 10 file, seeking over values (PS3.5 §7.1, §7.5).

    pydicom reads a cut file without complaint when the cut falls in or after the last
    element it needs, so this checks that every declared length fits in the file, that
    every undefined-length sequence is closed, and that the data set ends where the file
    does. It reads a few bytes per element, never a value.
    """

    def __init__(self, fp: IO[bytes], size: int) -> None:
        self._fp = fp
        self._size = size

    def _read(self, pos: int, n: int, what: str) -> bytes:
        self._fp.seek(pos)
        data = self._fp.read(n)
        if len(data) < n:
            raise truncated(f"the file ends at byte {self._size}, inside {what} at {pos}")
        return data

    def header(self, pos: int, enc: Encoding) -> tuple[int, str, int, int]:
        """``(tag, vr, length, header_length)`` of the element at ``pos``."""
        head = self._read(pos, 8, "an element header")
        group, elem = struct.unpack(enc.endian + "HH", head[:4])
        tag = (group << 16) | elem
        if enc.implicit or group == 0xFFFE:
            (length,) = struct.unpack(enc.endian + "I", head[4:8])
            return tag, "", length, 8
        vr = head[4:6]
        if vr in LONG_VRS:
            (length,) = struct.unpack(enc.endian + "I", self._read(pos + 8, 4, "an element header"))
            return tag, vr.decode("ascii"), length, 12
        if vr in SHORT_VRS:
            (length,) = struct.unpack(enc.endian + "H", head[6:8])
            return tag, vr.decode("ascii"), length, 8
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND,
            f"element {tag_text(tag)} at byte {pos} has an unknown VR {vr!r}",
        )

    def skip_value(
        self, pos: int, tag: int, vr: str, length: int, enc: Encoding, depth: int
    ) -> int:
        """Position after the value that starts at ``pos``."""
        if length != UNDEFINED_LENGTH:
            end = pos + length
            if end > self._size:
                raise truncated(
                    f"element {tag_text(tag)} declares {length} bytes but the file ends "
                    f"{self._size - pos} bytes after its header"
                )
            return end
        # Undefined length: a sequence or encapsulated pixel data; items until the
        # Sequence Delimitation Item. UN of undefined length is Implicit VR LE (PS3.5 §6.2.2).
        if depth >= MAX_SEQUENCE_DEPTH:
            raise InvalidInstance(
                FailureReason.CANNOT_UNDERSTAND,
                f"sequences are nested deeper than {MAX_SEQUENCE_DEPTH} levels",
            )
        inner = Encoding(True, False) if vr == "UN" else enc
        while True:
            item, _, item_length, _ = self.header(pos, inner)
            pos += 8
            if item == _SEQUENCE_END:
                return pos
            if item != _ITEM:
                raise InvalidInstance(
                    FailureReason.CANNOT_UNDERSTAND,
                    f"sequence {tag_text(tag)} holds {tag_text(item)} at byte {pos - 8} "
                    "where an item or the end of the sequence belongs",
                )
            if item_length != UNDEFINED_LENGTH:
                pos = self.skip_value(pos, item, "", item_length, inner, depth + 1)
                continue
            while True:
                sub, sub_vr, sub_length, header_length = self.header(pos, inner)
                if sub == _ITEM_END:
                    pos += 8
                    break
                pos = self.skip_value(
                    pos + header_length, sub, sub_vr, sub_length, inner, depth + 1
                )

    def walk(self, transfer_syntax: str) -> PixelDataLocation | None:
        """Check the whole file; return where top-level Pixel Data is (``None`` if absent).

        Deflated objects are only checked to inflate completely; their pixel data has no
        file offset.
        """
        pos = 132  # preamble and "DICM" (PS3.10 §7.1); dcmread has checked them
        while self._size - pos >= 4:
            (group,) = struct.unpack("<H", self._read(pos, 2, "an element header"))
            if group != 0x0002:
                break
            tag, vr, length, header_length = self.header(pos, META_ENCODING)
            pos = self.skip_value(pos + header_length, tag, vr, length, META_ENCODING, 0)
        if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            self._check_inflates(pos)
            return None
        return self.walk_dataset(pos, self.dataset_encoding(pos, transfer_syntax))

    def walk_dataset(self, pos: int, enc: Encoding) -> PixelDataLocation | None:
        """Check the top-level data set from the element at ``pos`` to the end of the file;
        where top-level Pixel Data is, when it is at or after ``pos``."""
        pixel = None
        while pos < self._size:
            rest = self._size - pos
            if rest < 8 and not self._read(pos, rest, "the end").strip(b"\x00"):
                break  # a few bytes of zero padding after the data set are harmless
            tag, vr, length, header_length = self.header(pos, enc)
            if pixel is None and tag in PIXEL_DATA_TAGS:
                pixel = PixelDataLocation(
                    tag=tag,
                    vr=vr or "OW",
                    value_offset=pos + header_length,
                    value_length=None if length == UNDEFINED_LENGTH else length,
                )
            pos = self.skip_value(pos + header_length, tag, vr, length, enc, 0)
        return pixel

    def dataset_encoding(self, pos: int, transfer_syntax: str) -> Encoding:
        """How the data set at ``pos`` is encoded: as its first element shows (PS3.5 §7.1)."""
        big_endian = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
        implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        if self._size - pos >= 6:
            # Like pydicom, believe the first element's bytes over a wrong transfer syntax.
            looks_explicit = self._read(pos + 4, 2, "an element header") in (SHORT_VRS | LONG_VRS)
            implicit = not looks_explicit
        return Encoding(implicit, big_endian)

    def _check_inflates(self, pos: int) -> None:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._fp.seek(pos)
        try:
            while not inflater.eof:
                chunk = inflater.unconsumed_tail or self._fp.read(READ_CHUNK)
                if not chunk:
                    inflater.flush()
                    break
                inflater.decompress(chunk, READ_CHUNK)  # the output is not needed
        except zlib.error as exc:
            raise InvalidInstance(
                FailureReason.CANNOT_UNDERSTAND, f"the deflated data set is corrupt: {exc}"
            ) from exc
        if not inflater.eof:
            raise truncated("the deflated data set ends before its last block")
