"""Small helpers for byte streams shared by the services."""

from __future__ import annotations

from collections.abc import AsyncIterator

from app.errors import PayloadTooLarge


async def limit_stream(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """Pass chunks through, failing with ``PayloadTooLarge`` once more than ``limit`` arrive.

    Guards bodies sent without Content-Length (chunked) or with a Content-Length that lies.
    """
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
        yield chunk
