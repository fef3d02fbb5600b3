"""Transcoding between uncompressed transfer syntaxes (PS3.5 §A.1 to §A.5).

Only what a WADO-RS retrieve needs: any uncompressed syntax (implicit VR little endian,
explicit VR big endian, deflated explicit VR little endian) to Explicit VR Little Endian,
the syntax every DICOMweb client must understand (PS3.18 §8.7.3.5.2). Compressed pixel
data is never decoded here.

pydicom re-encodes numbers (US, SL, FD...) in the target byte order by itself but leaves
the raw values of OW, OF, OL, OD and OV untouched, so a big-endian source has those swapped
here first. UN values cannot be swapped (their structure is unknown) and are kept as is.

Blocking: call from a worker thread.
"""

from __future__ import annotations

import array
import io
from typing import IO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian

from app.dicom.media import EXPLICIT_VR_BIG_ENDIAN, UNCOMPRESSED_SYNTAXES

#: Byte width of the words a big-endian value must be swapped by, per VR (PS3.5 §7.3).
SWAP_WIDTHS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
PIXEL_DATA = 0x7FE00010
#: array typecodes by item size ("I" is 4 bytes on every platform CPython supports).
_TYPECODES = {2: "H", 4: "I", 8: "Q"}


def byteswap(data: bytes, width: int) -> bytes:
    """Reverse the byte order of each ``width``-byte word; a ragged tail is kept as is."""
    if width <= 1 or len(data) < width:
        return bytes(data)
    usable = len(data) - len(data) % width
    words = array.array(_TYPECODES[width])
    words.frombytes(data[:usable])
    words.byteswap()
    return words.tobytes() + bytes(data[usable:])


def pixel_swap_width(vr: str, bits_allocated: int | None) -> int:
    """How big-endian Pixel Data of this VR is swapped (PS3.5 §A.3, §8.1.1).

    OW holds 16-bit words, except that cells wider than 16 bits are swapped whole (as
    pydicom and the toolkits that wrote such files do); OB is a byte stream.
    """
    if vr != "OW":
        return SWAP_WIDTHS.get(vr, 1)
    bits = bits_allocated or 16
    return bits // 8 if bits > 16 else 2


def swap_to_little_endian(ds: Dataset, bits_allocated: int | None = None) -> None:
    """Swap the raw OW/OF/OL/OD/OV values of a dataset read from big-endian data, in place."""
    bits = ds.get("BitsAllocated", bits_allocated)
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                swap_to_little_endian(item, bits)
        elif elem.VR in SWAP_WIDTHS and elem.value:
            width = pixel_swap_width(elem.VR, bits) if elem.tag == PIXEL_DATA else 0
            elem.value = byteswap(elem.value, width or SWAP_WIDTHS[elem.VR])


def to_explicit_vr_little_endian(fp: IO[bytes]) -> bytes:
    """The Part 10 object in ``fp`` re-encoded as Explicit VR Little Endian."""
    ds = dcmread(fp)
    source = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if source not in UNCOMPRESSED_SYNTAXES:
        raise ValueError(f"cannot transcode {source} without decompressing")
    if source == EXPLICIT_VR_BIG_ENDIAN:
        swap_to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    # dcmwrite, unlike save_as, allows the byte order change prepared above.
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()
