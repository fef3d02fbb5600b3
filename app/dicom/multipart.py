"""Streaming ``multipart/related`` (RFC 2387 over RFC 2046 §5.1) reading and writing.

The reader turns an async stream of byte chunks into events (part start with headers,
part data, part end) without ever holding more than one chunk plus a delimiter's length,
so a 1 GB STOW-RS request passes with bounded memory. It reports truncation (no closing
delimiter) and malformed framing precisely instead of guessing.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator
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


#: RFC 2046 §5.1.1 ``bchars``: the characters a boundary may use (space not last).
_BOUNDARY_CHARS = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? "
)


def validate_boundary(boundary: str) -> None:
    """Raise ``MultipartError`` unless ``boundary`` is a valid RFC 2046 §5.1.1 boundary."""
    if not 1 <= len(boundary) <= 70:
        raise MultipartError(
            f"the multipart boundary is {len(boundary)} characters long; "
            "it must be 1 to 70 (RFC 2046 §5.1.1)"
        )
    if not _BOUNDARY_CHARS.issuperset(boundary) or boundary.endswith(" "):
        raise MultipartError(
            "the multipart boundary has characters that RFC 2046 §5.1.1 does not allow"
        )


async def read_multipart(chunks: AsyncIterator[bytes], boundary: str) -> AsyncGenerator[PartEvent]:
    """Yield part events from a ``multipart/*`` body with the given boundary.

    The body is read to its very end, epilogue included (and discarded), so that a body
    that stops early is reported rather than taken as complete.
    """
    validate_boundary(boundary)
    delimiter = b"\r\n--" + boundary.encode("ascii")
    # Pretend the body starts with CRLF so that a first delimiter at offset 0 matches.
    buf = bytearray(b"\r\n")
    source = chunks.__aiter__()
    eof = False
    received = 0

    async def take() -> bytes | None:
        """The next non-empty chunk, or ``None`` at the end of the body."""
        nonlocal eof, received
        while not eof:
            try:
                chunk = await source.__anext__()
            except StopAsyncIteration:
                eof = True
                break
            if chunk:
                received += len(chunk)
                return chunk
        return None

    async def fill() -> bool:
        chunk = await take()
        if chunk is None:
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
            if not received:
                raise MultipartError("the multipart body is empty")
            raise MultipartError(f"the body does not contain the multipart boundary {boundary!r}")

    parts = 0
    while True:
        # After a delimiter: "--" closes the body, otherwise optional padding then CRLF.
        while len(buf) < 2 and await fill():
            pass
        if buf[:2] == b"--":
            if parts == 0:
                raise MultipartError("the multipart body has no parts")
            # The epilogue is ignored (RFC 2046 §5.1.1), but the body must still end.
            buf.clear()
            while await fill():
                buf.clear()
            return
        while True:
            eol = buf.find(b"\r\n")
            if eol >= 0:
                break
            if len(buf) > MAX_PART_HEADER_BYTES:
                raise MultipartError("a multipart boundary line is not followed by CRLF")
            if not await fill():
                raise MultipartError(
                    "truncated multipart body: the stream ended on a boundary line, "
                    f"before the closing boundary '--{boundary}--'"
                )
        if buf[:eol].strip(b" \t"):
            raise MultipartError(
                f"unexpected characters after the multipart boundary: {bytes(buf[:eol][:40])!r}"
            )
        del buf[: eol + 2]

        # Part headers end at the first empty line.
        while True:
            if buf[:2] == b"\r\n":
                header_block = b""
                del buf[:2]
                break
            end = buf.find(b"\r\n\r\n")
            if end > MAX_PART_HEADER_BYTES or (end < 0 and len(buf) > MAX_PART_HEADER_BYTES):
                raise MultipartError(f"part headers exceed {MAX_PART_HEADER_BYTES} bytes")
            if end >= 0:
                header_block = bytes(buf[:end])
                del buf[: end + 4]
                break
            if not await fill():
                raise MultipartError(
                    f"truncated multipart body: the stream ended in the headers of part {parts + 1}"
                )
        parts += 1
        yield PartStart(_parse_headers(header_block))

        # Part body runs until the next delimiter. Bytes buffered are scanned there; after
        # that, a chunk that holds no delimiter (nearly all of a large part) is passed on as
        # it came, uncopied: only an end that could begin a delimiter is held back.
        while True:
            idx = buf.find(delimiter)
            if idx >= 0:
                if idx:
                    yield PartData(_split_off(buf, idx))
                del buf[: len(delimiter)]
                yield PartEnd()
                break
            cut = len(buf) - _delimiter_start(buf, delimiter)
            if cut:
                yield PartData(_split_off(buf, cut))
            chunk = await take()
            if chunk is None:
                raise MultipartError(
                    f"truncated multipart body: the stream ended inside part {parts}, "
                    f"before the closing boundary '--{boundary}--'"
                )
            if (
                len(chunk) < len(delimiter)
                or (buf and delimiter in bytes(buf) + chunk[: len(delimiter) - 1])
                or delimiter in chunk
            ):
                buf.extend(chunk)  # the part ends here (or may): the scan above finds where
                continue
            if buf:  # the start of a delimiter that this chunk does not complete: data
                yield PartData(_split_off(buf, len(buf)))
            keep = _delimiter_start(chunk, delimiter)
            yield PartData(chunk[: len(chunk) - keep] if keep else chunk)
            buf.extend(chunk[len(chunk) - keep :])


def _split_off(buf: bytearray, n: int) -> bytes:
    """The first ``n`` bytes of ``buf``, removed from it: one copy, not a slice and a copy."""
    with memoryview(buf) as view, view[:n] as head:
        data = bytes(head)
    del buf[:n]
    return data


def _delimiter_start(data: bytes | bytearray, delimiter: bytes) -> int:
    """How many bytes at the end of ``data`` could be the start of ``delimiter``."""
    # A delimiter starts with CR: only a CR near the end can begin one.
    at = data.find(b"\r", max(len(data) - len(delimiter) + 1, 0))
    while at >= 0:
        if delimiter.startswith(data[at:]):
            return len(data) - at
        at = data.find(b"\r", at + 1)
    return 0


def new_boundary() -> str:
    return "iex-" + os.urandom(16).hex()


def part_header(boundary: str, content_type: str, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def closing_delimiter(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("latin-1")
