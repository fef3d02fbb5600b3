"""Response helpers shared by the DICOMweb routers."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import orjson
from fastapi import Request, Response

from app.dicom.media import DICOM_JSON

#: Smaller JSON bodies are not worth compressing.
GZIP_MIN_BYTES = 1024
#: Above this size compression moves off the event loop.
GZIP_THREAD_BYTES = 256 * 1024


def accepts_gzip(request: Request) -> bool:
    encodings = request.headers.get("accept-encoding", "")
    return any(e.split(";")[0].strip().lower() == "gzip" for e in encodings.split(","))


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
