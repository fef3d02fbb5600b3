"""Streaming ``multipart/related`` (RFC 2387 over RFC 2046 §5.1) reading and writing.

The reader turns an async stream of byte chunks into events (part start with headers,
part data, part end) without ever holding more than one chunk plus a delimiter's length,
so a 1 GB STOW-RS request passes with bounded memory. It reports truncation (no closing
delimiter) and malformed framing precisely instead of guessing.

It is lenient where what real senders do is unambiguous, and strict where leniency would
be a guess (each choice and its reason: ``docs/CONFORMANCE.md``): boundaries up to
``MAX_BOUNDARY_LENGTH`` characters of printable ASCII, and a bare LF ending a boundary or
header line, are accepted; a delimiter must still follow a CRLF.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
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
    """Header fields of one part; lines end with CRLF or a bare LF (see ``_headers_end``)."""
    headers: dict[str, str] = {}
    if not block:
        return headers
    for raw in block.split(b"\n"):
        raw = raw.removesuffix(b"\r")
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


def _headers_end(buf: bytearray) -> tuple[int, int] | None:
    """Where the header block in ``buf`` ends and the part's data starts, if it is complete.

    The block ends at the first empty line. A line may end with a bare LF as well as CRLF
    (RFC 9112 §2.2 lets a recipient take LF alone as a line end): header lines are text,
    so an LF in them can only be a line end. Delimiters, which sit in binary data, keep
    their CRLF (see ``read_multipart``).
    """
    if buf[:1] == b"\n":
        return 0, 1
    if buf[:2] == b"\r\n":
        return 0, 2
    lf_lf = buf.find(b"\n\n")
    lf_crlf = buf.find(b"\n\r\n")
    if lf_crlf >= 0 and (lf_lf < 0 or lf_crlf < lf_lf):
        return lf_crlf, lf_crlf + 3
    if lf_lf >= 0:
        return lf_lf, lf_lf + 2
    return None


#: The longest boundary accepted. RFC 2046 §5.1.1 says 70, but widely deployed senders go
#: beyond (Orthanc's DICOMweb client sends 73 characters: a UUID, "-", the UUID again), and a
#: longer boundary is no less unambiguous. The cap only bounds what a delimiter costs to
#: search for and to hold back between chunks.
MAX_BOUNDARY_LENGTH = 256


def validate_boundary(boundary: str) -> None:
    """Raise ``MultipartError`` unless ``boundary`` can frame a body unambiguously.

    Wider than RFC 2046 §5.1.1 ``bchars``: any printable ASCII character, since the
    delimiter is matched byte for byte and none of them can break a line. Refused: control
    characters (a CR or LF would split the delimiter line), non-ASCII (its bytes depend on
    an encoding the header does not name) and a trailing space (it could not be told apart
    from transport padding).
    """
    if not boundary:
        raise MultipartError("the multipart boundary is empty")
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise MultipartError(
            f"the multipart boundary is {len(boundary)} characters long; iex accepts up to "
            f"{MAX_BOUNDARY_LENGTH} (RFC 2046 §5.1.1 asks for at most 70)"
        )
    if not (boundary.isascii() and boundary.isprintable()):
        raise MultipartError(
            "the multipart boundary has a control or non-ASCII character; "
            "it must be printable ASCII (RFC 2046 §5.1.1)"
        )
    if boundary.endswith(" "):
        raise MultipartError(
            "the multipart boundary ends with a space, which reads as transport padding "
            "(RFC 2046 §5.1.1)"
        )


class _Body:
    """A ``multipart/*`` body being read: the source of chunks and the bytes held back.

    Each method reads one element of RFC 2046 §5.1.1's grammar and leaves ``buf`` just
    after it. ``buf`` starts with a CRLF that is not in the body, so that a first
    delimiter at offset 0 matches like any other.
    """

    def __init__(self, chunks: AsyncIterator[bytes], boundary: str) -> None:
        self.boundary = boundary
        self.delimiter = b"\r\n--" + boundary.encode("ascii")
        self.buf = bytearray(b"\r\n")
        self.source = chunks.__aiter__()
        self.eof = False
        self.received = 0
        #: A boundary line ended with LF alone: a sender that does that before boundaries
        #: too gets a hint when its body seems to end inside a part.
        self.bare_lf = False

    async def take(self) -> bytes | None:
        """The next non-empty chunk, or ``None`` at the end of the body."""
        while not self.eof:
            try:
                chunk = await self.source.__anext__()
            except StopAsyncIteration:
                self.eof = True
                break
            if chunk:
                self.received += len(chunk)
                return chunk
        return None

    async def fill(self) -> bool:
        chunk = await self.take()
        if chunk is None:
            return False
        self.buf.extend(chunk)
        return True

    async def skip_preamble(self) -> None:
        """Up to and including the first delimiter; the preamble is ignored (§5.1.1)."""
        buf = self.buf
        while True:
            idx = buf.find(self.delimiter)
            if idx >= 0:
                del buf[: idx + len(self.delimiter)]
                return
            if len(buf) > MAX_PREAMBLE_BYTES:
                raise MultipartError(
                    f"no multipart boundary {self.boundary!r} found in the first "
                    f"{MAX_PREAMBLE_BYTES} bytes"
                )
            if not await self.fill():
                if not self.received:
                    raise MultipartError("the multipart body is empty")
                raise MultipartError(
                    f"the body does not contain the multipart boundary {self.boundary!r}"
                )

    async def boundary_line(self) -> bool:
        """The rest of a boundary line after its delimiter: ``True`` if it closes the body
        (``--``), else after its transport padding and line end."""
        buf = self.buf
        while len(buf) < 2 and await self.fill():
            pass
        if buf[:2] == b"--":
            return True
        while True:
            eol = buf.find(b"\n")
            if eol >= 0:
                break
            if len(buf) > MAX_PART_HEADER_BYTES:
                raise MultipartError("a multipart boundary line does not end")
            if not await self.fill():
                raise MultipartError(
                    "truncated multipart body: the stream ended on a boundary line, "
                    f"before the closing boundary '--{self.boundary}--'"
                )
        rest = bytes(buf[:eol])
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        else:
            self.bare_lf = True
        if rest.strip(b" \t"):
            raise MultipartError(
                f"unexpected characters after the multipart boundary: {rest[:40]!r}"
            )
        del buf[: eol + 1]
        return False

    async def headers(self, part: int) -> dict[str, str]:
        """The header fields of a part, up to and including the empty line that ends them."""
        buf = self.buf
        while True:
            end = _headers_end(buf)
            if end is not None:
                block_end, data_start = end
                if block_end > MAX_PART_HEADER_BYTES:
                    break
                block = bytes(buf[:block_end])
                del buf[:data_start]
                return _parse_headers(block)
            if len(buf) > MAX_PART_HEADER_BYTES:
                break
            if not await self.fill():
                raise MultipartError(
                    f"truncated multipart body: the stream ended in the headers of part {part}"
                )
        raise MultipartError(f"part headers exceed {MAX_PART_HEADER_BYTES} bytes")

    async def data(self, part: int) -> AsyncGenerator[bytes]:
        """A part's data, up to and including the delimiter that ends it.

        Bytes already buffered are scanned in place; after that, a chunk that holds no
        delimiter (nearly all of a large part) is passed on as it came, uncopied: only an
        end that could begin a delimiter is held back.
        """
        buf, delimiter = self.buf, self.delimiter
        while True:
            idx = buf.find(delimiter)
            if idx >= 0:
                if idx:
                    yield _split_off(buf, idx)
                del buf[: len(delimiter)]
                return
            cut = len(buf) - _delimiter_start(buf, delimiter)
            if cut:
                yield _split_off(buf, cut)
            chunk = await self.take()
            if chunk is None:
                raise MultipartError(self._ended_inside(part))
            if (
                len(chunk) < len(delimiter)
                or (buf and delimiter in bytes(buf) + chunk[: len(delimiter) - 1])
                or delimiter in chunk
            ):
                buf.extend(chunk)  # the part ends here (or may): the scan above finds where
                continue
            if buf:  # the start of a delimiter that this chunk does not complete: data
                yield _split_off(buf, len(buf))
            keep = _delimiter_start(chunk, delimiter)
            yield chunk[: len(chunk) - keep] if keep else chunk
            buf.extend(chunk[len(chunk) - keep :])

    def _ended_inside(self, part: int) -> str:
        detail = (
            f"truncated multipart body: the stream ended inside part {part}, "
            f"before the closing boundary '--{self.boundary}--'"
        )
        if self.bare_lf:
            detail += (
                "; its boundary lines end with LF alone: every boundary must follow a CRLF "
                "(RFC 2046 §5.1.1)"
            )
        return detail

    async def epilogue(self) -> None:
        """Read the body to its end: the epilogue is ignored (§5.1.1), but a body that stops
        early must be seen to stop."""
        self.buf.clear()
        while await self.fill():
            self.buf.clear()


async def read_multipart(chunks: AsyncIterator[bytes], boundary: str) -> AsyncGenerator[PartEvent]:
    """Yield part events from a ``multipart/*`` body with the given boundary.

    Every delimiter must follow a CRLF, as RFC 2046 §5.1.1 has it. A bare LF before a
    boundary is not taken as a delimiter: it would make a CR ending a part's binary data
    read as part of the delimiter, and ``LF--boundary`` inside binary data end the part.
    The body is read to its very end, epilogue included (and discarded), so that a body
    that stops early is reported rather than taken as complete.
    """
    validate_boundary(boundary)
    body = _Body(chunks, boundary)
    await body.skip_preamble()
    parts = 0
    while not await body.boundary_line():
        parts += 1
        yield PartStart(await body.headers(parts))
        async with aclosing(body.data(parts)) as data:
            async for chunk in data:
                yield PartData(chunk)
        yield PartEnd()
    if parts == 0:
        raise MultipartError("the multipart body has no parts")
    await body.epilogue()


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
