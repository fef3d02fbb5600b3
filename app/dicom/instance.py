"""Reading what the gateway needs from a stored DICOM Part 10 object (PS3.10 §7).

One pass over the header (everything before Pixel Data) gives the identifying UIDs, the
attributes the index searches on, the DICOM JSON metadata (PS3.18 Annex F) with bulk data
replaced by instance-relative BulkDataURIs, and where Pixel Data starts in the file, so
frames can later be read by range without parsing the object again.

Blocking: call from a worker thread.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from app.dicom.media import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from app.dicom.status import FailureReason
from app.dicom.uids import is_valid_uid

PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
UNDEFINED_LENGTH = 0xFFFFFFFF
READ_CHUNK = 1024 * 1024
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
#: Deeper nesting than this is hostile rather than clinical.
MAX_SEQUENCE_DEPTH = 64
_SHORT_VRS = {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FL",
    b"FD",
    b"IS",
    b"LO",
    b"LT",
    b"PN",
    b"SH",
    b"SL",
    b"SS",
    b"ST",
    b"TM",
    b"UI",
    b"UL",
    b"US",
}
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"SV",
    b"UV",
}

#: Attributes copied into the index for matching and for QIDO-RS responses.
INDEXED_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "InstanceNumber",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
)


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


@dataclass(frozen=True)
class InstanceHeader:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    attributes: dict[str, str | int | None]
    #: DICOM JSON of the whole object but bulk data; BulkDataURIs are relative ("bulk/...").
    metadata: bytes
    pixel_data: PixelDataLocation | None = None
    number_of_frames: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def bulk_path(path: tuple[int | str, ...]) -> str:
    """The instance-relative BulkDataURI for an element path (tags and item indexes)."""
    return "bulk/" + "/".join(f"{p:08X}" if isinstance(p, int) else p for p in path)


def dataset_to_json(
    ds: Dataset, threshold: int, prefix: tuple[int | str, ...] = ()
) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of ``ds``; binary values over ``threshold`` become BulkDataURIs.

    Each element is encoded by pydicom; only the walk is ours, so that nested bulk data gets
    a path that names its sequence items.
    """
    out: dict[str, Any] = {}
    for elem in ds:
        tag = int(elem.tag)
        key = f"{tag:08X}"
        if elem.VR == "SQ":
            entry: dict[str, Any] = {"vr": "SQ"}
            items = [
                dataset_to_json(item, threshold, (*prefix, tag, str(i)))
                for i, item in enumerate(elem.value or [])
            ]
            if items:
                entry["Value"] = items
            out[key] = entry
            continue
        try:
            out[key] = elem.to_json_dict(_bulk_handler((*prefix, tag)), threshold)
        except (ValueError, TypeError, OverflowError):
            out[key] = _as_text(elem)
    return out


def _as_text(elem: DataElement) -> dict[str, Any]:
    """An element whose value does not fit its VR (an IS of "1A", say), kept as text.

    Real archives hold such values; refusing the whole object, or dropping the value, would
    lose data that the stored file still has. Values stay strings, split on backslashes.
    """
    raw = elem.value
    if isinstance(raw, bytes):
        text = raw.decode("latin-1", "replace")
    elif isinstance(raw, list | tuple):
        text = "\\".join(str(v) for v in raw)
    else:
        text = str(raw)
    values = [v.strip() for v in text.split("\\")]
    entry: dict[str, Any] = {"vr": elem.VR}
    if any(values):
        entry["Value"] = values
    return entry


def _bulk_handler(path: tuple[int | str, ...]) -> Callable[[DataElement], str]:
    uri = bulk_path(path)
    return lambda _elem: uri


def _attribute(ds: Dataset, keyword: str) -> str | int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    text = str(value)
    if keyword in ("SeriesNumber", "InstanceNumber", "NumberOfFrames", "Rows", "Columns"):
        try:
            return int(text)
        except ValueError:
            return None
    return text


@dataclass(frozen=True)
class _Encoding:
    implicit: bool
    big_endian: bool

    @property
    def endian(self) -> str:
        return ">" if self.big_endian else "<"


_META_ENCODING = _Encoding(implicit=False, big_endian=False)


def _truncated(detail: str) -> InvalidInstance:
    return InvalidInstance(FailureReason.CANNOT_UNDERSTAND, f"the object is truncated: {detail}")


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _StructureWalker:
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
            raise _truncated(f"the file ends at byte {self._size}, inside {what} at {pos}")
        return data

    def header(self, pos: int, enc: _Encoding) -> tuple[int, str, int, int]:
        """``(tag, vr, length, header_length)`` of the element at ``pos``."""
        head = self._read(pos, 8, "an element header")
        group, elem = struct.unpack(enc.endian + "HH", head[:4])
        tag = (group << 16) | elem
        if enc.implicit or group == 0xFFFE:
            (length,) = struct.unpack(enc.endian + "I", head[4:8])
            return tag, "", length, 8
        vr = head[4:6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack(enc.endian + "I", self._read(pos + 8, 4, "an element header"))
            return tag, vr.decode("ascii"), length, 12
        if vr in _SHORT_VRS:
            (length,) = struct.unpack(enc.endian + "H", head[6:8])
            return tag, vr.decode("ascii"), length, 8
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND,
            f"element {_tag_text(tag)} at byte {pos} has an unknown VR {vr!r}",
        )

    def skip_value(
        self, pos: int, tag: int, vr: str, length: int, enc: _Encoding, depth: int
    ) -> int:
        """Position after the value that starts at ``pos``."""
        if length != UNDEFINED_LENGTH:
            end = pos + length
            if end > self._size:
                raise _truncated(
                    f"element {_tag_text(tag)} declares {length} bytes but the file ends "
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
        inner = _Encoding(True, False) if vr == "UN" else enc
        while True:
            item, _, item_length, _ = self.header(pos, inner)
            pos += 8
            if item == _SEQUENCE_END:
                return pos
            if item != _ITEM:
                raise InvalidInstance(
                    FailureReason.CANNOT_UNDERSTAND,
                    f"sequence {_tag_text(tag)} holds {_tag_text(item)} at byte {pos - 8} "
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
            tag, vr, length, header_length = self.header(pos, _META_ENCODING)
            pos = self.skip_value(pos + header_length, tag, vr, length, _META_ENCODING, 0)
        if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            self._check_inflates(pos)
            return None
        enc = self._dataset_encoding(pos, transfer_syntax)
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

    def _dataset_encoding(self, pos: int, transfer_syntax: str) -> _Encoding:
        big_endian = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
        implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        if self._size - pos >= 6:
            # Like pydicom, believe the first element's bytes over a wrong transfer syntax.
            looks_explicit = self._read(pos + 4, 2, "an element header") in (_SHORT_VRS | _LONG_VRS)
            implicit = not looks_explicit
        return _Encoding(implicit, big_endian)

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
            raise _truncated("the deflated data set ends before its last block")


def read_instance_header(fp: IO[bytes], threshold: int) -> InstanceHeader:
    """Parse and validate a Part 10 object; raise ``InvalidInstance`` with the failure reason."""
    try:
        return _read_instance_header(fp, threshold)
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many things on hostile input, OSError included
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND,
            f"the object could not be parsed: {type(exc).__name__}: {str(exc)[:200]}",
        ) from exc


def _read_instance_header(fp: IO[bytes], threshold: int) -> InstanceHeader:
    try:
        ds = dcmread(fp, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND, f"not a DICOM Part 10 object: {str(exc)[:200]}"
        ) from exc

    meta = ds.file_meta
    transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not is_valid_uid(transfer_syntax):
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND,
            "the File Meta Information has no valid Transfer Syntax UID (0002,0010)",
        )
    # Completeness before content: a cut object fails as "cannot understand", not as a
    # missing attribute that happened to sit after the cut.
    size = fp.seek(0, 2)
    pixel = _StructureWalker(fp, size).walk(transfer_syntax)

    uids: dict[str, str] = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = str(ds.get(keyword, "") or "").strip("\x00 ")
        if not value:
            raise InvalidInstance(
                FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is missing"
            )
        if not is_valid_uid(value):
            raise InvalidInstance(
                FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"{keyword} {value[:70]!r} is not a valid UID",
            )
        uids[keyword] = value
    # A Media Storage SOP Instance UID (0002,0003) that differs from the dataset's is a
    # PS3.10 defect seen in real archives; the dataset's UID is the identity, and the file is
    # kept exactly as received, so such objects are stored rather than refused.

    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        # pydicom inflated the dataset in memory, so file positions mean nothing here; read
        # the whole (compact) object once to learn whether it has pixel data.
        fp.seek(0)
        full = dcmread(fp)
        for tag in PIXEL_DATA_TAGS:
            if tag in full:
                pixel = PixelDataLocation(tag, full[tag].VR, None, None)
                break
    if pixel is None and _has_image_pixel_module(ds):
        # PS3.3 C.7.6.3: Pixel Data is Type 1C, absent only with a Pixel Data Provider URL.
        # Most often the object was cut just before it.
        raise InvalidInstance(
            FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "the object has an Image Pixel Module but no Pixel Data (7FE0,0010); was it truncated?",
        )

    try:
        metadata = dataset_to_json(ds, threshold)
    except Exception as exc:  # invalid values that pydicom cannot encode
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND, f"attributes could not be encoded: {str(exc)[:200]}"
        ) from exc
    if pixel is not None:
        metadata[f"{pixel.tag:08X}"] = {"vr": pixel.vr, "BulkDataURI": bulk_path((pixel.tag,))}
    frames = _attribute(ds, "NumberOfFrames")
    return InstanceHeader(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax=transfer_syntax,
        attributes={k: _attribute(ds, k) for k in INDEXED_KEYWORDS},
        metadata=orjson.dumps(dict(sorted(metadata.items()))),
        pixel_data=pixel,
        number_of_frames=frames if isinstance(frames, int) and frames > 0 else 1,
    )


def _has_image_pixel_module(ds: Dataset) -> bool:
    # Attributes that only describe how pixels are encoded (PS3.3 C.7.6.3).
    encoding = ("SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated")
    return any(k in ds for k in encoding) and "PixelDataProviderURL" not in ds
