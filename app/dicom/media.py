"""Media types and content negotiation for DICOMweb (PS3.18 §8.7).

One parser for ``Content-Type`` and ``Accept`` values, so that quoting, case and parameters
are handled in one place rather than by ad-hoc string tests in handlers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        out: list[str] = []
        it = iter(value[1:-1])
        for ch in it:
            out.append(next(it, "") if ch == "\\" else ch)
        return "".join(out)
    return value


def parse_media_type(text: str) -> MediaType | None:
    """Parse one media type; ``None`` when it is not ``type/subtype[; params]``."""
    pieces = _split(text, ";")
    mime = pieces[0].strip().lower()
    major, slash, minor = mime.partition("/")
    if not slash or not major or not minor or " " in mime:
        return None
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        if not piece.strip():
            continue
        name, eq, value = piece.partition("=")
        if not eq or not name.strip():
            return None
        params[name.strip().lower()] = _unquote(value)
    return MediaType(mime, params)


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
