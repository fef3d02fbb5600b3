"""Media types and content negotiation for DICOMweb (PS3.18 §8.7).

One parser for ``Content-Type`` and ``Accept`` values, so that quoting, case and parameters
are handled in one place rather than by ad-hoc string tests in handlers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.errors import BadRequest

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: Transfer syntaxes whose pixel data is native (not encapsulated).
UNCOMPRESSED_SYNTAXES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
    }
)


@dataclass(frozen=True)
class MediaType:
    """A parsed media type: lower-cased ``type/subtype`` and parameters (names lower-cased)."""

    mime: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def quality(self) -> float:
        try:
            return float(self.params.get("q", "1"))
        except ValueError:
            return 0.0

    def matches(self, mime: str) -> bool:
        """True if this (possibly wildcard) range admits the concrete ``mime``."""
        if self.mime in ("*/*", mime):
            return True
        major, _, minor = self.mime.partition("/")
        return minor == "*" and mime.partition("/")[0] == major

    def __str__(self) -> str:
        extra = "".join(
            f'; {k}="{v}"' if _needs_quotes(v) else f"; {k}={v}" for k, v in self.params.items()
        )
        return self.mime + extra


def _needs_quotes(value: str) -> bool:
    return any(c in value for c in ' ;,/="\\()<>@:?[]{}')


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double-quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


class MalformedMediaType(BadRequest):
    """A ``Content-Type`` or ``Accept`` value that is not ``type/subtype[; name=value]...``."""


def _param_value(name: str, raw: str) -> str:
    """A parameter value, unquoted: a quoted-string (RFC 9110 §5.6.4) or a bare value.

    A bare value may hold characters a token may not (``type=application/dicom`` is sent
    unquoted by many clients, and means only one thing); a stray quote does not, since it
    leaves open where the value ends.
    """
    value = raw.strip()
    if not value.startswith('"'):
        if '"' in value:
            raise MalformedMediaType(f"the value of parameter {name!r} has a stray quote")
        return value
    out: list[str] = []
    escaped = False
    for i, ch in enumerate(value[1:], 1):
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            if i != len(value) - 1:
                raise MalformedMediaType(
                    f"the value of parameter {name!r} has text after its closing quote"
                )
            return "".join(out)
        else:
            out.append(ch)
    raise MalformedMediaType(f"the value of parameter {name!r} has no closing quote")


def read_media_type(text: str) -> MediaType:
    """Parse one media type (RFC 9110 §8.3.1), or raise ``MalformedMediaType`` saying why.

    Type, subtype and parameter names are case-insensitive and come back lower-cased;
    whitespace around ``;`` and ``=`` and an empty parameter (``a/b;``) are allowed. A
    parameter given twice is refused: which of the two values counts would be a guess.
    """
    pieces = _split(text, ";")
    mime = pieces[0].strip().lower()
    major, slash, minor = mime.partition("/")
    if not slash or not major or not minor or any(c in mime for c in ' \t"'):
        raise MalformedMediaType(f"{text[:100]!r} is not a media type (type/subtype)")
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        if not piece.strip():
            continue
        name, eq, value = piece.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise MalformedMediaType(
                f"media type parameter {piece.strip()[:60]!r} is not name=value"
            )
        if name in params:
            raise MalformedMediaType(f"media type parameter {name!r} is given twice")
        params[name] = _param_value(name, value)
    return MediaType(mime, params)


def parse_media_type(text: str) -> MediaType | None:
    """Parse one media type; ``None`` when it is not ``type/subtype[; params]``."""
    try:
        return read_media_type(text)
    except MalformedMediaType:
        return None


def is_dicom_multipart(media: MediaType) -> bool:
    """True for ``multipart/related`` whose parts are DICOM objects (PS3.18 §8.6).

    The root ``type`` parameter must name ``application/dicom``, or be absent: PS3.18 asks
    for it, but senders omit it, and a body of DICOM objects is the only thing a
    ``multipart/related`` request to iex can mean (each part's own Content-Type is still
    checked). Other parameters (``start``, ``start-info``, ``charset``...) change nothing
    for a body whose parts are all alike, and are ignored.
    """
    if media.mime != MULTIPART_RELATED:
        return False
    root = media.params.get("type")
    if root is None:
        return True
    root_media = parse_media_type(root)
    return root_media is not None and root_media.mime == DICOM


def parse_accept(header: str | None) -> list[MediaType]:
    """Parse an ``Accept`` header into media ranges, best first (stable for equal quality).

    A missing or empty header accepts anything (RFC 9110 §12.5.1). Unparseable ranges
    are ignored, as a tolerant server should.
    """
    if header is None or not header.strip():
        return [MediaType("*/*")]
    ranges = [m for m in (parse_media_type(p) for p in _split(header, ",") if p.strip()) if m]
    ranges = [m for m in ranges if m.quality > 0]
    return sorted(ranges, key=lambda m: -m.quality)
