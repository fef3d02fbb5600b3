"""Reading what the gateway needs from a stored DICOM Part 10 object (PS3.10 §7).

One pass over the header (everything before Pixel Data) gives the identifying UIDs, the
attributes the index searches on, the DICOM JSON metadata (PS3.18 Annex F) with bulk data
replaced by instance-relative BulkDataURIs, and where Pixel Data starts in the file, so
frames can later be read by range without parsing the object again.

Two routes give the same header. The raw route reads the first bytes of the file once and
encodes the JSON straight from the encoded elements (``app.dicom.json_encoding``); it takes
well-formed objects in the common encodings, several times faster. Anything it declines,
and every object that is to be refused, takes the pydicom route
(``read_instance_header_with_pydicom``), which decides and words the failure reason.
Both check that the whole file is there (``app.dicom.structure``).

Blocking: call from a worker thread.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from app.dicom.json_encoding import DatasetEncoder, JsonDataset, NeedMore, bulk_path
from app.dicom.media import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from app.dicom.status import FailureReason
from app.dicom.structure import (
    LONG_VRS,
    PIXEL_DATA_TAGS,
    SHORT_VRS,
    UNDEFINED_LENGTH,
    Encoding,
    InvalidInstance,
    PixelDataLocation,
    StructureWalker,
)
from app.dicom.uids import is_valid_uid

__all__ = [
    "INDEXED_KEYWORDS",
    "InstanceHeader",
    "InvalidInstance",
    "PixelDataLocation",
    "bulk_path",
    "dataset_to_json",
    "read_from_raw_elements",
    "read_instance_header",
    "read_instance_header_with_pydicom",
]

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


def read_instance_header(fp: IO[bytes], threshold: int) -> InstanceHeader:
    """Parse and validate a Part 10 object; raise ``InvalidInstance`` with the failure reason."""
    header = read_from_raw_elements(fp, threshold)
    if header is not None:
        return header
    return read_instance_header_with_pydicom(fp, threshold)


def read_instance_header_with_pydicom(fp: IO[bytes], threshold: int) -> InstanceHeader:
    """``read_instance_header`` by pydicom alone: slower, and the judge of every oddity."""
    try:
        fp.seek(0)
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
    pixel = StructureWalker(fp, size).walk(transfer_syntax)

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
    attributes = {k: _attribute(ds, k) for k in INDEXED_KEYWORDS}
    return _header(uids, transfer_syntax, attributes, metadata, pixel)


def _header(
    uids: dict[str, str],
    transfer_syntax: str,
    attributes: dict[str, Any],
    metadata: dict[str, Any],
    pixel: PixelDataLocation | None,
) -> InstanceHeader:
    """The header either parse arrives at; Pixel Data is listed by a BulkDataURI."""
    if pixel is not None:
        metadata[f"{pixel.tag:08X}"] = {"vr": pixel.vr, "BulkDataURI": bulk_path((pixel.tag,))}
    frames = attributes["NumberOfFrames"]
    return InstanceHeader(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax=transfer_syntax,
        attributes=attributes,
        metadata=orjson.dumps(dict(sorted(metadata.items()))),
        pixel_data=pixel,
        number_of_frames=frames if isinstance(frames, int) and frames > 0 else 1,
    )


def _has_image_pixel_module(ds: Dataset) -> bool:
    # Attributes that only describe how pixels are encoded (PS3.3 C.7.6.3).
    encoding = ("SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated")
    return any(k in ds for k in encoding) and "PixelDataProviderURL" not in ds


# -- the raw route ---------------------------------------------------------------------------

#: The first read holds the header of nearly every object; a longer header is read on up to
#: ``MAX_RAW_HEADER`` bytes, beyond which pydicom takes the object.
FIRST_READ = 64 * 1024
MAX_RAW_HEADER = 16 * 1024 * 1024
_TRANSFER_SYNTAX_UID = 0x0010
_UID_KEYS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
}
#: Each indexed attribute's JSON key and the VR it must have for the raw route to index it.
_INDEXED = {k: (f"{tag_for_keyword(k):08X}", str(dictionary_VR(k))) for k in INDEXED_KEYWORDS}
#: The Image Pixel Module's encoding attributes and Pixel Data Provider URL (PS3.3 C.7.6.3).
_PIXEL_MODULE_KEYS = ("00280002", "00280004", "00280100")
_PIXEL_DATA_PROVIDER_URL = "00287FE0"


def read_from_raw_elements(fp: IO[bytes], threshold: int) -> InstanceHeader | None:
    """The header by the raw route, or ``None`` where pydicom is to decide: never a
    different header from ``read_instance_header_with_pydicom``, never an error."""
    try:
        size = fp.seek(0, 2)
        fp.seek(0)
        buf = fp.read(min(size, FIRST_READ))
        while True:
            try:
                return _header_from_bytes(fp, buf, size, threshold)
            except NeedMore as more:
                if not len(buf) < more.end <= min(size, MAX_RAW_HEADER):
                    return None
                fp.seek(len(buf))
                more_bytes = fp.read(min(size, max(more.end, 2 * len(buf))) - len(buf))
                if not more_bytes:
                    return None
                buf += more_bytes
    except Exception:  # whatever the raw route trips on, pydicom decides
        return None


def _header_from_bytes(
    fp: IO[bytes], buf: bytes, size: int, threshold: int
) -> InstanceHeader | None:
    """The header from ``buf``, the first bytes of ``fp``; ``None`` where pydicom decides."""
    if buf[128:132] != b"DICM":  # PS3.10 §7.1
        return None
    meta = _file_meta(buf)
    if meta is None:
        return None
    transfer_syntax, pos = meta
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return None
    encoding = _dataset_encoding(buf, pos, size, transfer_syntax)
    if encoding is None:
        return None
    encoder = DatasetEncoder(buf, size, not encoding.big_endian, threshold)
    metadata, stop = encoder.encode_top_level(pos, encoding.implicit)
    # The rest of the file, Pixel Data and any padding, is only checked to be whole.
    pixel = StructureWalker(fp, size).walk_dataset(stop, encoding)
    if pixel is None and _has_pixel_module_keys(metadata):
        return None
    uids = _uids(metadata)
    attributes = _indexed_attributes(metadata)
    if uids is None or attributes is None:
        return None
    return _header(uids, transfer_syntax, attributes, metadata, pixel)


def _file_meta(buf: bytes) -> tuple[str, int] | None:
    """The Transfer Syntax UID of the File Meta Information (PS3.10 §7.1, always explicit
    VR little endian) and where the data set starts."""
    pos = 132
    transfer_syntax = None
    while pos + 8 <= len(buf):
        group, element = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<L", buf, pos + 8)
            start = pos + 12
        elif vr in SHORT_VRS:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            start = pos + 8
        else:
            return None
        if length == UNDEFINED_LENGTH or start + length > len(buf):
            return None
        if element == _TRANSFER_SYNTAX_UID:
            if vr != b"UI":
                return None
            transfer_syntax = buf[start : start + length].decode("latin_1").rstrip("\x00 ").strip()
        pos = start + length
    else:
        return None
    if transfer_syntax is None or not is_valid_uid(transfer_syntax):
        return None
    return transfer_syntax, pos


def _dataset_encoding(buf: bytes, pos: int, size: int, transfer_syntax: str) -> Encoding | None:
    """The encoding the transfer syntax names (PS3.5 §10), when the first element agrees.

    pydicom and the structure check both believe the first element over the transfer
    syntax; a disagreement is pydicom's to handle.
    """
    encoding = Encoding(
        implicit=transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
        big_endian=transfer_syntax == EXPLICIT_VR_BIG_ENDIAN,
    )
    if size - pos < 8:
        return encoding
    vr = buf[pos + 4 : pos + 6]
    looks_explicit = vr in SHORT_VRS or vr in LONG_VRS
    if looks_explicit == encoding.implicit or looks_explicit != (
        0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B
    ):
        return None
    return encoding


def _has_pixel_module_keys(metadata: JsonDataset) -> bool:
    return (
        any(key in metadata for key in _PIXEL_MODULE_KEYS)
        and _PIXEL_DATA_PROVIDER_URL not in metadata
    )


def _uids(metadata: JsonDataset) -> dict[str, str] | None:
    """The four identifying UIDs, each present, single and valid (PS3.5 §9.1)."""
    uids = {}
    for keyword, key in _UID_KEYS.items():
        entry = metadata.get(key)
        if entry is None or entry["vr"] != "UI" or len(entry.get("Value", ())) != 1:
            return None
        value = entry["Value"][0].strip("\x00 ")
        if not is_valid_uid(value):
            return None
        uids[keyword] = value
    return uids


def _indexed_attributes(metadata: JsonDataset) -> dict[str, str | int | None] | None:
    """What ``_attribute`` gives for each indexed keyword, from the JSON; ``None`` for a
    value of another VR or several values, whose indexing pydicom decides."""
    attributes: dict[str, str | int | None] = {}
    for keyword, (key, vr) in _INDEXED.items():
        entry = metadata.get(key)
        values = entry.get("Value") if entry is not None else None
        if entry is not None and entry["vr"] != vr:
            return None
        if not values:
            attributes[keyword] = None
            continue
        if len(values) != 1:
            return None
        value = values[0]
        # A person name is indexed as its groups joined by "=" (PS3.5 §6.2.1.1).
        attributes[keyword] = "=".join(value.values()) if isinstance(value, dict) else value
    return attributes
