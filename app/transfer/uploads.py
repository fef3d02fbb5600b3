"""What a resumable upload is, and the tus 1.0.0 request headers that describe one.

The parsers here turn header text into values or raise ``BadRequest`` with a precise
message; nothing in this module knows HTTP frameworks, storage or the clock.

Sections cited are those of the tus 1.0.0 protocol (https://tus.io/protocols/resumable-upload).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass
from enum import Enum

from app.dicom.media import DICOM, MULTIPART_RELATED, is_dicom_multipart, parse_media_type
from app.dicom.multipart import validate_boundary
from app.errors import BadRequest, NotFound
from app.names import is_valid_name

TUS_VERSION = "1.0.0"
#: Extensions served (§ Protocol Extensions); ``creation-defer-length`` and
#: ``concatenation-unfinished`` are not, so ``Upload-Length`` is always known.
EXTENSIONS = (
    "creation",
    "creation-with-upload",
    "expiration",
    "checksum",
    "termination",
    "concatenation",
)
#: §Checksum: sha1 is required of every server; sha256 because the use case asks for it.
CHECKSUM_ALGORITHMS = ("sha1", "sha256")
#: §Core Protocol PATCH: the only request body media type.
OFFSET_OCTET_STREAM = "application/offset+octet-stream"

#: What an upload may carry (Upload-Metadata ``content-type``).
ZIP = "application/zip"
TAR = "application/x-tar"
DICOM_MULTIPART = f'{MULTIPART_RELATED}; type="{DICOM}"'
#: An exchange bundle from a partner gateway (``docs/EXCHANGE.md``): its head and data sent
#: as partial uploads, joined by a final upload of this type.
BUNDLE = "application/vnd.iex.bundle"

_ID = re.compile(r"[0-9a-f]{32}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DIGEST_SIZES = {"sha1": 20, "sha256": 32}


class UploadState(Enum):
    """Where an upload stands.

    ``receiving`` until the last byte is stored; then ``verifying`` (queued for ingest, the
    whole-payload sha256 being checked), ``ingesting``, and ``complete`` or ``failed``. A
    partial upload (§Concatenation) is never ingested on its own: it goes from ``receiving``
    straight to ``complete`` and waits to be joined.
    """

    RECEIVING = "receiving"
    VERIFYING = "verifying"
    INGESTING = "ingesting"
    COMPLETE = "complete"
    FAILED = "failed"

    @property
    def ingest_pending(self) -> bool:
        """Queued or running: such an upload is neither terminated nor swept meanwhile."""
        return self in (UploadState.VERIFYING, UploadState.INGESTING)


class Concat(Enum):
    """§Concatenation: a plain upload, a partial one, or the final one joining partials."""

    NONE = ""
    PARTIAL = "partial"
    FINAL = "final"


def new_upload_id() -> str:
    return secrets.token_hex(16)


def validate_upload_id(text: str) -> str:
    """Upload ids are ours: 32 lowercase hex digits. Anything else is simply not found."""
    if not _ID.fullmatch(text):
        raise NotFound("no such upload")
    return text


@dataclass(frozen=True)
class UploadMetadata:
    """§Creation ``Upload-Metadata``: the header as given and the keys iex understands."""

    raw: str
    content_type: str | None = None
    filename: str | None = None
    sha256: str | None = None
    trust: str | None = None
    #: The multipart boundary, when ``content-type`` is multipart and names one.
    boundary: str | None = None
    #: For a bundle: the sender's transfer id, which its receipt is asked for by.
    transfer: str | None = None


@dataclass(frozen=True)
class Upload:
    """One upload as its state store keeps it."""

    id: str
    trust: str
    length: int
    offset: int
    metadata: UploadMetadata
    concat: Concat
    #: For a final upload, the partial uploads it joins, in order.
    parts: tuple[str, ...]
    #: For a partial upload, the final upload that joined it.
    joined_to: str | None
    state: UploadState
    created_at: float
    expires_at: float
    #: Who created it (a token id or ``partner:<name>``), for the audit trail of its ingest.
    actor: str | None = None

    @property
    def complete(self) -> bool:
        return self.offset == self.length


@dataclass(frozen=True)
class Checksum:
    """§Checksum ``Upload-Checksum``: an algorithm and the digest the chunk must have."""

    algorithm: str
    digest: bytes


def parse_length(text: str | None, name: str) -> int:
    """A non-negative integer header (``Upload-Length``, ``Upload-Offset``)."""
    if text is None:
        raise BadRequest(f"the {name} header is required")
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(text)


def parse_metadata(text: str | None) -> UploadMetadata:
    """§Creation: ``key base64value`` pairs separated by commas; keys ASCII without spaces or
    commas and unique; a key may come without a value. ``content-type``, when given, is one
    of the three payload kinds; ``sha256`` is 64 hex digits; ``filename`` is only ever a
    label, never a path. Unknown keys are kept in ``raw`` and otherwise ignored."""
    if text is None or not text.strip():
        return UploadMetadata(raw="")
    values: dict[str, str] = {}
    for pair in text.split(","):
        pieces = pair.strip().split(" ")
        if len(pieces) > 2 or not pieces[0]:
            raise BadRequest(f"Upload-Metadata pair {pair.strip()[:60]!r} is not 'key base64'")
        key = pieces[0]
        if not key.isascii() or not key.isprintable():
            raise BadRequest("Upload-Metadata keys must be printable ASCII")
        if key in values:
            raise BadRequest(f"Upload-Metadata key {key!r} is repeated")
        values[key] = _decode_value(key, pieces[1]) if len(pieces) == 2 else ""
    content_type = values.get("content-type")
    sha256 = values.get("sha256") or None
    if sha256 is not None and not _SHA256_HEX.fullmatch(sha256.lower()):
        raise BadRequest("Upload-Metadata sha256 must be 64 hexadecimal digits")
    kind, boundary = _payload_type(content_type) if content_type else (None, None)
    # ``transfer`` means something only for a bundle; other uploads may carry it unread.
    transfer = (values.get("transfer") or None) if kind == BUNDLE else None
    if kind == BUNDLE and (transfer is None or not is_valid_name(transfer)):
        raise BadRequest(
            f"a {BUNDLE} upload needs Upload-Metadata transfer: its transfer id, 1-64 "
            "letters, digits, '.', '_' or '-'"
        )
    return UploadMetadata(
        raw=text.strip(),
        content_type=kind,
        boundary=boundary,
        filename=values.get("filename") or None,
        sha256=sha256.lower() if sha256 else None,
        trust=values.get("trust") or None,
        transfer=transfer,
    )


def _decode_value(key: str, value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"Upload-Metadata value of {key!r} is not base64 of UTF-8") from exc


def _payload_type(text: str) -> tuple[str, str | None]:
    """The payload kind and, for multipart, the boundary if the uploader gave one (without
    it, ingest takes the delimiter from the payload's first line)."""
    media = parse_media_type(text)
    if media is not None and media.mime in (ZIP, TAR, BUNDLE) and not media.params:
        return media.mime, None
    if media is not None and is_dicom_multipart(media):
        boundary = media.params.get("boundary")
        if boundary is not None:
            try:
                validate_boundary(boundary)
            except BadRequest as exc:
                raise BadRequest(f"Upload-Metadata content-type: {exc.detail}") from exc
        return DICOM_MULTIPART, boundary
    raise BadRequest(
        f"Upload-Metadata content-type {text[:100]!r} is not supported; "
        f"use {ZIP}, {TAR} or {DICOM_MULTIPART} (or {BUNDLE} between gateways)"
    )


def parse_checksum(text: str | None) -> Checksum | None:
    """§Checksum: ``Upload-Checksum: <algorithm> <base64 digest>``; an algorithm not in
    ``Tus-Checksum-Algorithm`` is a 400."""
    if text is None:
        return None
    pieces = text.strip().split(" ")
    if len(pieces) != 2:
        raise BadRequest("Upload-Checksum must be '<algorithm> <base64 digest>'")
    algorithm, encoded = pieces[0].lower(), pieces[1]
    if algorithm not in _DIGEST_SIZES:
        raise BadRequest(
            f"checksum algorithm {algorithm[:20]!r} is not supported; "
            f"use one of {', '.join(CHECKSUM_ALGORITHMS)}"
        )
    try:
        digest = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise BadRequest("the Upload-Checksum digest is not base64") from exc
    if len(digest) != _DIGEST_SIZES[algorithm]:
        raise BadRequest(f"an {algorithm} digest has {_DIGEST_SIZES[algorithm]} bytes")
    return Checksum(algorithm, digest)


def parse_concat(text: str | None, prefix: str) -> tuple[Concat, tuple[str, ...]]:
    """§Concatenation ``Upload-Concat``: ``partial``, or ``final;<url> <url> …`` where each
    URL (absolute or a path) names a partial upload under ``prefix``."""
    if text is None:
        return Concat.NONE, ()
    text = text.strip()
    if text == "partial":
        return Concat.PARTIAL, ()
    if not text.startswith("final;"):
        raise BadRequest("Upload-Concat must be 'partial' or 'final;<upload URLs>'")
    parts: list[str] = []
    for url in text[len("final;") :].split():
        head, sep, tail = url.rpartition(prefix)
        if not sep or (head and "://" not in head) or not _ID.fullmatch(tail):
            raise BadRequest(f"Upload-Concat names {url[:100]!r}, which is not an upload URL")
        parts.append(tail)
    if not parts:
        raise BadRequest("Upload-Concat final names no partial uploads")
    if len(set(parts)) != len(parts):
        raise BadRequest("Upload-Concat final names a partial upload twice")
    return Concat.FINAL, tuple(parts)


def format_concat(upload: Upload, prefix: str) -> str | None:
    """The ``Upload-Concat`` of a HEAD response (§Concatenation), URLs as paths."""
    if upload.concat is Concat.PARTIAL:
        return "partial"
    if upload.concat is Concat.FINAL:
        return "final;" + " ".join(prefix + part for part in upload.parts)
    return None
