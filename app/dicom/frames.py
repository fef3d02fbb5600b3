"""Frames of stored pixel data (PS3.18 §10.4.1.1.5, PS3.5 §8.2 and Annex A.4).

Native (uncompressed) pixel data is a concatenation of equally sized frames, so frame *n*
is a byte range computed from the image pixel description and read without parsing the
file. Encapsulated (compressed) pixel data is a sequence of fragments that pydicom maps to
frames. The ``read_*`` functions are blocking: call them from a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from pydicom import dcmread
from pydicom.encaps import generate_frames, get_frame

from app.dicom.media import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN
from app.dicom.transcode import byteswap, pixel_swap_width
from app.errors import BadRequest, NotFound

#: More frame numbers than this in one request is surely a mistake (or an attack).
MAX_FRAMES_PER_REQUEST = 10_000
_FRAME_LIST = re.compile(r"[1-9][0-9]{0,8}(,[1-9][0-9]{0,8})*")

ROWS = "00280010"
COLUMNS = "00280011"
SAMPLES_PER_PIXEL = "00280002"
BITS_ALLOCATED = "00280100"
PHOTOMETRIC_INTERPRETATION = "00280004"


def parse_frame_list(text: str) -> list[int]:
    """Parse the ``{framelist}`` path segment: 1-based numbers, comma separated, in order.

    PS3.18 §10.4.1.1.5: frames are returned in the order listed; repeats are honoured.
    """
    if not _FRAME_LIST.fullmatch(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise BadRequest(
            f"frame list {shown!r} is malformed: give frame numbers from 1, separated by "
            "commas, e.g. 1,3,2 (PS3.18 §10.4.1.1.5)"
        )
    numbers = [int(n) for n in text.split(",")]
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise BadRequest(f"at most {MAX_FRAMES_PER_REQUEST} frames may be requested at once")
    return numbers


def check_frame_numbers(numbers: list[int], number_of_frames: int, sop_uid: str) -> None:
    for n in numbers:
        if n > number_of_frames:
            raise NotFound(
                f"frame {n} does not exist: instance {sop_uid} has {number_of_frames} "
                f"frame{'s' if number_of_frames != 1 else ''}"
            )


def _json_int(metadata: dict[str, Any], key: str) -> int | None:
    value = metadata.get(key, {}).get("Value")
    if isinstance(value, list) and value and isinstance(value[0], int):
        return value[0]
    return None


@dataclass(frozen=True)
class FrameLayout:
    """Size of one native frame, from the Image Pixel Module (PS3.3 §C.7.6.3)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    photometric: str

    @classmethod
    def from_dicom_json(cls, metadata: dict[str, Any], sop_uid: str) -> FrameLayout:
        rows = _json_int(metadata, ROWS)
        columns = _json_int(metadata, COLUMNS)
        samples = _json_int(metadata, SAMPLES_PER_PIXEL) or 1
        bits = _json_int(metadata, BITS_ALLOCATED)
        photometric = metadata.get(PHOTOMETRIC_INTERPRETATION, {}).get("Value", [""])[0]
        if not rows or not columns or bits not in (1, 8, 16, 32, 64):
            raise NotFound(
                f"instance {sop_uid} has no frames: Rows, Columns or Bits Allocated "
                "(0028,0010/0011/0100) are missing or unusable"
            )
        return cls(rows, columns, samples, bits, str(photometric or ""))

    @property
    def frame_bits(self) -> int:
        # YBR_FULL_422 native data holds two samples per pixel (PS3.3 §C.7.6.3.1.2).
        samples = 2 if self.photometric == "YBR_FULL_422" else self.samples_per_pixel
        return self.rows * self.columns * samples * self.bits_allocated

    def byte_span(self, index: int) -> tuple[int, int]:
        """Bytes [start, end) of the pixel data value that hold frame ``index`` (0-based)."""
        first = index * self.frame_bits
        return first // 8, (first + self.frame_bits + 7) // 8

    @property
    def whole_bytes(self) -> bool:
        """True when every frame is a plain byte range (always, except some 1-bit images)."""
        return self.frame_bits % 8 == 0

    def cut(self, covering: bytes, index: int) -> bytes:
        """Frame ``index`` from the bytes of its ``byte_span``.

        Only 1-bit frames can start or end inside a byte; such a frame is shifted to start
        at bit 0 of its first byte and padded with zero bits (bits are packed least
        significant first, PS3.5 §8.1.1), as a single-frame object of it would hold it.
        """
        if self.whole_bytes:
            return covering
        shift = (index * self.frame_bits) % 8
        bits = self.frame_bits
        value = (int.from_bytes(covering, "little") >> shift) & ((1 << bits) - 1)
        return value.to_bytes((bits + 7) // 8, "little")


def native_pixels_little_endian(
    fp: IO[bytes],
    transfer_syntax: str,
    pixel_tag: int,
    pixel_vr: str,
    offset: int | None,
    length: int | None,
    bits_allocated: int,
) -> bytes:
    """The whole native pixel data value, little endian, for data not readable by range.

    Big-endian data is read at its stored place and swapped; deflated data must be inflated
    by parsing the whole object.
    """
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN or offset is None or length is None:
        ds = dcmread(fp)
        data = bytes(ds[pixel_tag].value)
        if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
            data = byteswap(data, pixel_swap_width(ds[pixel_tag].VR, bits_allocated))
        return data
    fp.seek(offset)
    data = fp.read(length)
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        data = byteswap(data, pixel_swap_width(pixel_vr, bits_allocated))
    return data


def _seek_encapsulated(fp: IO[bytes], pixel_tag: int, offset: int | None) -> IO[bytes] | bytes:
    if offset is not None:
        fp.seek(offset)
        return fp
    # Deflated encapsulated data has no file offset: inflate and use the value.
    return bytes(dcmread(fp)[pixel_tag].value)


def read_encapsulated_frame(
    fp: IO[bytes], pixel_tag: int, offset: int | None, index: int, number_of_frames: int
) -> bytes:
    """Frame ``index`` (0-based) of encapsulated pixel data starting at ``offset``."""
    source = _seek_encapsulated(fp, pixel_tag, offset)
    try:
        return get_frame(source, index, number_of_frames=number_of_frames)
    except (ValueError, IndexError, KeyError) as exc:
        raise NotFound(f"frame {index + 1} cannot be found in the stored data: {exc}") from exc


def iter_encapsulated_frames(
    fp: IO[bytes], pixel_tag: int, offset: int | None, number_of_frames: int
) -> Iterator[bytes]:
    """Every frame of encapsulated pixel data, one at a time (for Pixel Data bulk data).

    Each step reads from ``fp``: advance it from one thread at a time.
    """
    source = _seek_encapsulated(fp, pixel_tag, offset)
    try:
        yield from generate_frames(source, number_of_frames=number_of_frames)
    except (ValueError, IndexError, KeyError) as exc:
        raise NotFound(f"the stored pixel data cannot be split into frames: {exc}") from exc
