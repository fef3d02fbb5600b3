"""Content negotiation for WADO-RS (PS3.18 §8.7.3 and §8.7.4).

A retrieve answers with one *representation* per object: a part media type and the transfer
syntax of its bytes. The resource lists what it can produce (``Representation``); the
``Accept`` ranges, best first, pick the first one they admit. Nothing here knows HTTP
beyond the parsed ranges.

How a range admits a representation:

* ``*/*`` (also a missing ``Accept``) admits the default representation.
* ``multipart/related`` or ``multipart/*``: its ``type`` parameter is itself a media range
  (absent: any) that must match the part media type; its ``transfer-syntax`` parameter
  selects the transfer syntax: absent means the default (PS3.18 §8.7.3.5.2: Explicit VR
  Little Endian for ``application/dicom`` and ``application/octet-stream``, as stored for
  compressed image and video types), ``*`` means "as stored" (PS3.18 §8.7.3.5.1), a UID must
  equal the representation's. ``type="application/octet-stream"; transfer-syntax=*`` also
  admits compressed frames as stored, as viewers such as OHIF ask for frames that way.
* Single-part types (``application/dicom``, ``image/jpeg``...) are not offered: the
  resources served here are always ``multipart/related`` (PS3.18 §10.4.1.1.3 and
  §8.7.3.3), so they admit nothing and lead to 406.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.uid import UID

from app.dicom.media import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    MULTIPART_RELATED,
    OCTET_STREAM,
    UNCOMPRESSED_SYNTAXES,
    MediaType,
    parse_media_type,
)

ANY_TRANSFER_SYNTAX = "*"

#: Media types of compressed pixel data by transfer syntax (PS3.18 Table 8.7.3-5 and
#: Table 8.7.3-6). RLE uses the IANA-registered ``image/dicom-rle``; the older
#: ``image/x-dicom-rle`` and ``image/x-jls`` are understood in ``Accept`` (see ALIASES).
COMPRESSED_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}

#: Names clients use for the same media type.
ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}


def syntax_name(uid: str) -> str:
    """``"JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)"`` for messages."""
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def is_compressed(transfer_syntax: str) -> bool:
    """True for every syntax whose pixel data is encapsulated (PS3.5 §A.4)."""
    return transfer_syntax not in UNCOMPRESSED_SYNTAXES


@dataclass(frozen=True)
class Representation:
    """One way a resource can be sent: part media type and transfer syntax of its bytes."""

    media_type: str
    transfer_syntax: str
    #: Chosen when the request names no transfer syntax for this media type.
    default: bool
    #: Chosen by ``transfer-syntax=*``: the bytes as stored, without transcoding.
    as_stored: bool

    @property
    def content_type(self) -> str:
        """The part's Content-Type (PS3.18 §8.7.3.3: with its transfer-syntax parameter)."""
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"

    def describe(self) -> str:
        media = f'{MULTIPART_RELATED}; type="{self.media_type}"'
        return f"{media}; transfer-syntax={self.transfer_syntax}"


def _admits(media_range: MediaType, rep: Representation) -> bool:
    if media_range.mime == "*/*":
        return rep.default
    if media_range.mime not in (MULTIPART_RELATED, "multipart/*"):
        return False
    inner = parse_media_type(media_range.params.get("type", "*/*"))
    if inner is None:
        return False
    inner_mime = ALIASES.get(inner.mime, inner.mime)
    syntax = media_range.params.get("transfer-syntax")
    if not MediaType(inner_mime).matches(rep.media_type):
        # transfer-syntax=* lets the server pick any syntax, compressed ones included.
        return (
            inner_mime == OCTET_STREAM
            and syntax == ANY_TRANSFER_SYNTAX
            and rep.as_stored
            and rep.media_type.startswith(("image/", "video/"))
        )
    if syntax is None:
        return rep.default
    if syntax == ANY_TRANSFER_SYNTAX:
        return rep.as_stored
    return syntax == rep.transfer_syntax


def choose(ranges: Sequence[MediaType], offered: Iterable[Representation]) -> Representation | None:
    """The first offered representation admitted by the best ``Accept`` range, if any."""
    candidates = list(offered)
    for media_range in ranges:
        for rep in candidates:
            if _admits(media_range, rep):
                return rep
    return None


def describe_accept(ranges: Sequence[MediaType]) -> str:
    text = ", ".join(str(r) for r in ranges) or "(nothing acceptable)"
    return text if len(text) <= 300 else text[:300] + "..."


# -- what each resource offers -------------------------------------------------------------


def instance_representations(stored_syntax: str) -> list[Representation]:
    """Part 10 objects (PS3.18 §10.4.1.1.3): as stored, or transcoded to Explicit VR LE.

    Transcoding is offered from every uncompressed syntax (implicit VR LE, explicit VR big
    endian, deflated); compressed data is never decompressed here.
    """
    dicom = "application/dicom"
    if stored_syntax == EXPLICIT_VR_LITTLE_ENDIAN:
        return [Representation(dicom, stored_syntax, default=True, as_stored=True)]
    offered = [Representation(dicom, stored_syntax, default=False, as_stored=True)]
    if stored_syntax in UNCOMPRESSED_SYNTAXES:
        offered.append(
            Representation(dicom, EXPLICIT_VR_LITTLE_ENDIAN, default=True, as_stored=False)
        )
    return offered


def pixel_representations(stored_syntax: str) -> list[Representation]:
    """Frames and Pixel Data bulk data (PS3.18 §8.7.3.3.2, §10.4.1.1.5).

    Native pixel data is always sent little endian as ``application/octet-stream`` labelled
    Explicit VR Little Endian (the bytes of a frame are the same in every little-endian
    syntax; big-endian and deflated data are converted). Compressed frames go as stored
    with the media type of their syntax, or as ``application/octet-stream`` when the
    syntax has no registered media type.
    """
    if not is_compressed(stored_syntax):
        return [Representation(OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, True, True)]
    media = COMPRESSED_MEDIA_TYPES.get(stored_syntax, OCTET_STREAM)
    return [Representation(media, stored_syntax, default=True, as_stored=True)]


def bulk_representations() -> list[Representation]:
    """Bulk data other than Pixel Data: the value bytes, little endian (PS3.18 §8.7.3.3)."""
    return [Representation(OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, True, True)]


#: Media types accepted for metadata (PS3.18 §10.4.1.1.2); XML is not offered.
METADATA_TYPES = ("application/dicom+json", "application/json")


def accepts_metadata_json(ranges: Sequence[MediaType]) -> bool:
    return any(r.matches(t) for r in ranges for t in METADATA_TYPES)
