"""Streaming ``multipart/related`` (RFC 2387 over RFC 2046 §5.1) reading and writing.

The reader turns an async stream of byte chunks into events (part start with headers,
part data, part end) without ever holding more than one chunk plus a delimiter's length,
so a 1 GB STOW-RS request passes with bounded memory. It reports truncation (no closing
delimiter) and malformed framing precisely instead of guessing.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from app.errors import BadRequest

MAX_PART_HEADER_BYTES = 16 * 1024
MAX_PREAMBLE_BYTES = 64 * 1024


class MultipartError(BadRequest):
    pass


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


PartEvent = PartStart | PartData | PartEnd


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    for raw in block.split(b"\r\n"):
        if raw[:1] in (b" ", b"\t") and headers:
            raise MultipartError("folded part header lines are not supported")
        name, colon, value = raw.partition(b":")
        if not colon or not name.strip():
            raise MultipartError(f"malformed part header line {raw[:80]!r}")
        try:
            headers[name.strip().decode("ascii").lower()] = value.strip().decode("latin-1")
        except UnicodeDecodeError as exc:
            raise MultipartError("part header name is not ASCII") from exc
    return headers


async def read_multipart(chunks: AsyncIterator[bytes], boundary: str) -> AsyncIterator[PartEvent]:
    """Yield part events from a ``multipart/*`` body with the given boundary."""
    if not boundary or len(boundary) > 70:
        raise MultipartError("the multipart boundary must be 1 to 70 characters (RFC 2046 §5.1.1)")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    keep = len(delimiter) + 1
    # Pretend the body starts with CRLF so that a first delimiter at offset 0 matches.
    buf = bytearray(b"\r\n")
    source = chunks.__aiter__()
    eof = False

    async def fill() -> bool:
        nonlocal eof
        if eof:
            return False
        try:
            chunk = await source.__anext__()
        except StopAsyncIteration:
            eof = True
            return False
        buf.extend(chunk)
        return True

    # Preamble: everything before the first delimiter is ignored (RFC 2046 §5.1.1).
    while True:
        idx = buf.find(delimiter)
        if idx >= 0:
            del buf[: idx + len(delimiter)]
            break
        if len(buf) > MAX_PREAMBLE_BYTES:
            raise MultipartError(
                f"no multipart boundary {boundary!r} found in the first {MAX_PREAMBLE_BYTES} bytes"
            )
        if not await fill():
            raise MultipartError(f"the body does not contain the multipart boundary {boundary!r}")

    parts = 0
    while True:
        # After a delimiter: "--" closes the body, otherwise optional padding then CRLF.
        while len(buf) < 2 and await fill():
            pass
        if buf[:2] == b"--":
            if parts == 0:
                raise MultipartError("the multipart body has no parts")
            return
        while True:
            eol = buf.find(b"\r\n")
            if eol >= 0:
                break
            if len(buf) > MAX_PART_HEADER_BYTES or not await fill():
                raise MultipartError("truncated multipart body: a boundary line is incomplete")
        if buf[:eol].strip(b" \t"):
            raise MultipartError("unexpected characters after a multipart boundary")
        del buf[: eol + 2]

        # Part headers end at the first empty line.
        while True:
            if buf[:2] == b"\r\n":
                header_block = b""
                del buf[:2]
                break
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                header_block = bytes(buf[:end])
                del buf[: end + 4]
                break
            if len(buf) > MAX_PART_HEADER_BYTES:
                raise MultipartError(f"part headers exceed {MAX_PART_HEADER_BYTES} bytes")
            if not await fill():
                raise MultipartError("truncated multipart body: part headers are incomplete")
        parts += 1
        yield PartStart(_parse_headers(header_block))

        # Part body runs until the next delimiter.
        while True:
            idx = buf.find(delimiter)
            if idx >= 0:
                if idx:
                    yield PartData(bytes(buf[:idx]))
                del buf[: idx + len(delimiter)]
                yield PartEnd()
                break
            if len(buf) > keep:
                # The tail may hold the start of a delimiter split across chunks.
                cut = len(buf) - keep
                yield PartData(bytes(buf[:cut]))
                del buf[:cut]
            if not await fill():
                raise MultipartError(
                    "truncated multipart body: the stream ended inside a part, "
                    f"before the closing boundary '--{boundary}--'"
                )


def new_boundary() -> str:
    return "iex-" + os.urandom(16).hex()


def part_header(boundary: str, content_type: str, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def closing_delimiter(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("latin-1")
