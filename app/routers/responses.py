"""Response helpers shared by the DICOMweb routers."""

from __future__ import annotations

import asyncio
import gzip
import re
from typing import Any

import orjson
from fastapi import Request, Response

from app.dicom.media import DICOM_JSON

#: Smaller JSON bodies are not worth compressing.
GZIP_MIN_BYTES = 1024
#: Above this size compression moves off the event loop.
GZIP_THREAD_BYTES = 256 * 1024


#: A weight (RFC 9110 §12.4.2): 0 to 1 with at most three decimals.
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
#: What names gzip in Accept-Encoding; "x-gzip" is the same coding (RFC 9110 §8.4.1.3).
_GZIP = frozenset({"gzip", "x-gzip"})


def _weight(params: list[str]) -> float:
    """The ``q`` of one Accept-Encoding member, 1 when absent; a malformed one is 0, so the
    member is not taken for acceptance."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            value = value.strip()
            return float(value) if _QVALUE.fullmatch(value) else 0.0
    return 1.0


def gzip_weight(accept_encoding: str) -> float:
    """How much the client wants gzip, per RFC 9110 §12.5.3: its own member's weight, else
    that of ``*`` (any coding not listed), else 0 (a client that names no coding is sent
    none). ``gzip;q=0`` means not gzip."""
    named: float | None = None
    wildcard: float | None = None
    for member in accept_encoding.split(","):
        coding, *params = member.split(";")
        coding = coding.strip().lower()
        if coding in _GZIP:
            named = max(named or 0.0, _weight(params))
        elif coding == "*":
            wildcard = max(wildcard or 0.0, _weight(params))
    if named is not None:
        return named
    return wildcard or 0.0


def accepts_gzip(request: Request) -> bool:
    return gzip_weight(request.headers.get("accept-encoding", "")) > 0


async def json_response(
    request: Request,
    content: Any,
    status_code: int = 200,
    media_type: str = DICOM_JSON,
    headers: dict[str, str] | None = None,
) -> Response:
    """Serialise with orjson; gzip when the client accepts it and the body is large enough."""
    body = content if isinstance(content, bytes) else orjson.dumps(content)
    out_headers = dict(headers or {})
    out_headers["Vary"] = "Accept-Encoding"
    if len(body) >= GZIP_MIN_BYTES and accepts_gzip(request):
        if len(body) >= GZIP_THREAD_BYTES:
            body = await asyncio.to_thread(gzip.compress, body, 5)
        else:
            body = gzip.compress(body, 5)
        out_headers["Content-Encoding"] = "gzip"
    return Response(body, status_code=status_code, media_type=media_type, headers=out_headers)
