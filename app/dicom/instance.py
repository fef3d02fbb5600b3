"""Reading what the gateway needs from a stored DICOM Part 10 object (PS3.10 §7).

One pass over the header (everything before Pixel Data) gives the identifying UIDs, the
attributes the index searches on, the DICOM JSON metadata (PS3.18 Annex F) with bulk data
replaced by instance-relative BulkDataURIs, and where Pixel Data starts in the file, so
frames can later be read by range without parsing the object again.

Blocking: call from a worker thread.
"""

from __future__ import annotations

import struct
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
        out[key] = elem.to_json_dict(_bulk_handler((*prefix, tag)), threshold)
    return out


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


def _locate_pixel_data(fp: IO[bytes], transfer_syntax: str) -> PixelDataLocation | None:
    """Read the Pixel Data element header at the current position, if there is one."""
    big_endian = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return None
    group, elem = struct.unpack(">HH" if big_endian else "<HH", head[:4])
    tag = (group << 16) | elem
    if tag not in PIXEL_DATA_TAGS:
        return None
    endian = ">" if big_endian else "<"
    if implicit:
        (length,) = struct.unpack(endian + "I", head[4:8])
        vr, header_len = "OW", 8
    else:
        vr_bytes = head[4:6]
        vr = vr_bytes.decode("ascii", "replace")
        if vr_bytes in _LONG_VRS:
            if len(head) < 12:
                return None
            (length,) = struct.unpack(endian + "I", head[8:12])
            header_len = 12
        else:
            (length,) = struct.unpack(endian + "H", head[6:8])
            header_len = 8
    return PixelDataLocation(
        tag=tag,
        vr=vr,
        value_offset=start + header_len,
        value_length=None if length == UNDEFINED_LENGTH else length,
    )


def read_instance_header(fp: IO[bytes], threshold: int) -> InstanceHeader:
    """Parse and validate a Part 10 object; raise ``InvalidInstance`` with the failure reason."""
    try:
        ds = dcmread(fp, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND, f"not a DICOM Part 10 object: {exc}"
        ) from exc
    except Exception as exc:  # pydicom raises many things on hostile input
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND, f"the object could not be parsed: {type(exc).__name__}"
        ) from exc

    meta = ds.file_meta
    transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not is_valid_uid(transfer_syntax):
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND,
            "the File Meta Information has no valid Transfer Syntax UID (0002,0010)",
        )

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
    media_sop = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip("\x00 ")
    if media_sop and media_sop != uids["SOPInstanceUID"]:
        raise InvalidInstance(
            FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "Media Storage SOP Instance UID (0002,0003) differs from SOP Instance UID (0008,0018)",
        )

    pixel = None
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        # pydicom inflated the dataset in memory, so file positions mean nothing here; read
        # the whole (compact) object once to learn whether it has pixel data.
        fp.seek(0)
        full = dcmread(fp)
        for tag in PIXEL_DATA_TAGS:
            if tag in full:
                pixel = PixelDataLocation(tag, full[tag].VR, None, None)
                break
    else:
        pixel = _locate_pixel_data(fp, transfer_syntax)

    try:
        metadata = dataset_to_json(ds, threshold)
    except Exception as exc:  # invalid values that pydicom cannot encode
        raise InvalidInstance(
            FailureReason.CANNOT_UNDERSTAND, f"attributes could not be encoded: {exc}"
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
