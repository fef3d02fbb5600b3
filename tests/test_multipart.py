"""The streaming ``multipart/related`` reader (RFC 2046 §5.1), fed chunk by chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import pytest

from app.dicom.multipart import (
    MAX_BOUNDARY_LENGTH,
    MAX_PART_HEADER_BYTES,
    MAX_PREAMBLE_BYTES,
    MultipartError,
    PartData,
    PartEnd,
    PartEvent,
    PartStart,
    closing_delimiter,
    new_boundary,
    part_header,
    read_multipart,
)

BOUNDARY = "b0und4ry"
#: Data that looks like a delimiter but is not one: a wrong last character, LF or CR alone
#: before "--", one dash, a prefix of the boundary, other case, stray CRs and dashes.
TRICKY = (
    b"\r\n--b0und4rX\n--b0und4ry\r--b0und4ry\r\n-b0und4ry\r\n--b0und\r\n--B0UND4RY\r\r\n-\r\n--\r\n"
)


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def _parts(
    body: bytes, size: int, boundary: str = BOUNDARY
) -> list[tuple[dict[str, str], bytes]]:
    """Parse ``body`` fed in ``size``-byte chunks into (headers, data) per part."""
    parts: list[tuple[dict[str, str], bytes]] = []
    data = bytearray()
    headers: dict[str, str] | None = None
    async for event in read_multipart(_chunks(body, size), boundary):
        if isinstance(event, PartStart):
            assert headers is None, "a part started before the previous one ended"
            headers, data = event.headers, bytearray()
        elif isinstance(event, PartData):
            assert headers is not None
            assert event.data, "empty PartData events are noise"
            data += event.data
        else:
            assert isinstance(event, PartEnd)
            assert headers is not None
            parts.append((headers, bytes(data)))
            headers = None
    assert headers is None
    return parts


def _body(
    parts: Iterable[bytes],
    *,
    boundary: str = BOUNDARY,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    padding: bytes = b"",
    headers: bytes = b"Content-Type: application/dicom\r\n",
) -> bytes:
    out = bytearray(preamble)
    for i, part in enumerate(parts):
        out += b"\r\n" if (i or preamble) else b""
        out += b"--" + boundary.encode() + padding + b"\r\n" + headers + b"\r\n" + part
    out += b"\r\n--" + boundary.encode() + b"--" + epilogue
    return bytes(out)


async def _error(body: bytes, size: int, boundary: str = BOUNDARY) -> str:
    with pytest.raises(MultipartError) as info:
        await _parts(body, size, boundary)
    return info.value.detail


# -- framing ------------------------------------------------------------------------------


async def test_every_chunk_size_gives_the_same_parts() -> None:
    payloads = [b"first part", TRICKY, b"", b"\r\n", b"-" * 100, bytes(range(256)) * 3]
    body = _body(payloads, preamble=b"ignored preamble\r\n", epilogue=b"\r\nignored epilogue")
    expected = [({"content-type": "application/dicom"}, p) for p in payloads]
    for size in range(1, len(body) + 1):
        assert await _parts(body, size) == expected, f"chunk size {size}"


async def test_delimiter_split_at_every_position_of_a_two_chunk_body() -> None:
    body = _body([b"A" * 50, b"B" * 50])
    for cut in range(len(body) + 1):

        async def two(cut: int = cut) -> AsyncIterator[bytes]:
            yield body[:cut]
            yield body[cut:]

        events = [e async for e in read_multipart(two(), BOUNDARY)]
        data = b"".join(e.data for e in events if isinstance(e, PartData))
        assert data == b"A" * 50 + b"B" * 50, f"cut at {cut}"
        assert sum(isinstance(e, PartStart) for e in events) == 2


async def test_data_resembling_the_delimiter_is_kept_verbatim() -> None:
    parts = await _parts(_body([TRICKY, TRICKY + b"\r\n--b0und4r"]), 7)
    assert [p[1] for p in parts] == [TRICKY, TRICKY + b"\r\n--b0und4r"]


async def test_preamble_and_epilogue_are_ignored() -> None:
    body = _body([b"x"], preamble=b"This is a preamble.\r\n--not-it\r\n", epilogue=b"\r\nbye\r\n")
    assert await _parts(body, 3) == [({"content-type": "application/dicom"}, b"x")]


async def test_first_boundary_at_offset_zero_and_after_crlf() -> None:
    assert len(await _parts(_body([b"x"]), 1)) == 1
    assert len(await _parts(b"\r\n" + _body([b"x"]), 1)) == 1


@pytest.mark.parametrize("padding", [b" ", b"\t", b" \t  \t"])
async def test_transport_padding_after_a_boundary(padding: bytes) -> None:
    body = _body([b"one", b"two"], padding=padding)
    assert [p[1] for p in await _parts(body, 2)] == [b"one", b"two"]


async def test_closing_delimiter_may_be_followed_by_padding_and_crlf() -> None:
    body = _body([b"one"]) + b"  \r\n"
    assert [p[1] for p in await _parts(body, 4)] == [b"one"]


# -- line endings: a bare LF where it is unambiguous, CRLF before every boundary ---------


@pytest.mark.parametrize(
    ("line_end", "empty_line"),
    [(b"\n", b"\n"), (b"\r\n", b"\n"), (b"\n", b"\r\n"), (b"  \n", b"\n")],
)
async def test_bare_lf_ends_boundary_and_header_lines(line_end: bytes, empty_line: bytes) -> None:
    payloads = [b"\n\r\nstarts with line ends", b"", b"\r\n"]
    body = b"".join(
        b"\r\n--" + BOUNDARY.encode() + line_end + b"Content-Type: application/dicom"
        + line_end + b"X-Two: 2" + line_end + empty_line + p
        for p in payloads
    ) + b"\r\n--" + BOUNDARY.encode() + b"--\n"  # fmt: skip
    expected = [({"content-type": "application/dicom", "x-two": "2"}, p) for p in payloads]
    for size in (1, 2, 3, 64):
        assert await _parts(body, size) == expected, size


async def test_part_without_headers_after_a_bare_lf() -> None:
    body = f"--{BOUNDARY}\n\ndata\r\n--{BOUNDARY}--".encode()
    assert await _parts(body, 1) == [({}, b"data")]


async def test_lf_before_a_boundary_is_data_not_a_delimiter() -> None:
    """Only CRLF--boundary ends a part: LF--boundary in binary data is data, and a CR that
    ends a part's data stays in it."""
    payloads = [
        b"x\n--" + BOUNDARY.encode() + b"\r\nContent-Type: text/plain\r\n\r\nnot a part",
        b"ends with CR\r",
        b"ends with LF\n",
        b"\r",
    ]
    for size in (1, 5, 1000):
        assert [p[1] for p in await _parts(_body(payloads), size)] == payloads, size


async def test_a_body_with_bare_lf_before_boundaries_is_refused_with_the_reason() -> None:
    body = f"--{BOUNDARY}\nContent-Type: application/dicom\n\none\n--{BOUNDARY}--\n".encode()
    for size in (1, 7, len(body)):
        assert await _error(body, size) == (
            "truncated multipart body: the stream ended inside part 1, before the closing "
            f"boundary '--{BOUNDARY}--'; its boundary lines end with LF alone: every boundary "
            "must follow a CRLF (RFC 2046 §5.1.1)"
        )


async def test_part_headers_are_parsed_case_insensitively() -> None:
    headers = (
        b"Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n"
        b"CONTENT-LOCATION:  http://x/y  \r\n"
        b"X-Empty:\r\n"
    )
    (part,) = await _parts(_body([b"d"], headers=headers), 5)
    assert part[0] == {
        "content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
        "content-location": "http://x/y",
        "x-empty": "",
    }


async def test_parts_without_headers_and_empty_parts() -> None:
    body = _body([b"", b"data", b""], headers=b"")
    assert await _parts(body, 1) == [({}, b""), ({}, b"data"), ({}, b"")]


async def test_empty_chunks_in_the_stream_are_harmless() -> None:
    body = _body([b"one", b"two"])

    async def with_gaps() -> AsyncIterator[bytes]:
        for byte in body:
            yield b""
            yield bytes([byte])
        yield b""

    events = [e async for e in read_multipart(with_gaps(), BOUNDARY)]
    assert b"".join(e.data for e in events if isinstance(e, PartData)) == b"onetwo"


async def test_writer_helpers_round_trip() -> None:
    boundary = new_boundary()
    body = (
        part_header(boundary, "application/dicom", {"Content-Location": "a"})
        + b"payload\r\n"
        + part_header(boundary, "application/octet-stream")
        + b"second\r\n"
        + closing_delimiter(boundary)
    )
    parts = await _parts(body, 11, boundary)
    assert parts == [
        ({"content-type": "application/dicom", "content-location": "a"}, b"payload"),
        ({"content-type": "application/octet-stream"}, b"second"),
    ]


async def test_memory_stays_bounded_for_a_large_part() -> None:
    """No PartData holds much more than one chunk plus a delimiter's length."""
    size = 64 * 1024
    body = _body([b"\r\n-" * (3 * 1024 * 1024)])
    largest = 0
    async for event in read_multipart(_chunks(body, size), BOUNDARY):
        if isinstance(event, PartData):
            largest = max(largest, len(event.data))
    assert 0 < largest <= size + len(BOUNDARY) + 4


# -- errors -------------------------------------------------------------------------------


async def test_truncation_inside_a_part_at_every_position() -> None:
    body = _body([b"complete part", b"cut part"])
    second = body.index(b"cut part")
    for end in range(second, len(body) - 2):
        for size in (1, 5, 1000):
            detail = await _error(body[:end], size)
            assert detail == (
                "truncated multipart body: the stream ended inside part 2, "
                f"before the closing boundary '--{BOUNDARY}--'"
            ), (end, size)


async def test_truncation_in_part_headers() -> None:
    body = _body([b"one", b"two"])
    start = body.index(b"Content-Type", 20)
    for end in range(start, body.index(b"two")):
        detail = await _error(body[:end], 3)
        assert detail == "truncated multipart body: the stream ended in the headers of part 2"


@pytest.mark.parametrize(
    "body",
    [
        f"--{BOUNDARY}".encode(),
        f"--{BOUNDARY}  ".encode(),
        f"--{BOUNDARY}\r\n\r\none\r\n--{BOUNDARY}".encode(),
        f"--{BOUNDARY}\r\n\r\none\r\n--{BOUNDARY}-".encode(),
    ],
)
async def test_truncation_on_a_boundary_line(body: bytes) -> None:
    for size in (1, 2, len(body)):
        assert await _error(body, size) == (
            "truncated multipart body: the stream ended on a boundary line, "
            f"before the closing boundary '--{BOUNDARY}--'"
        )


async def test_no_closing_delimiter_after_complete_parts() -> None:
    body = _body([b"one", b"two"])
    without_close = body[: body.rindex(b"\r\n--")] + b"\r\n"
    detail = await _error(without_close, 4)
    assert "ended inside part 2" in detail


async def test_empty_body() -> None:
    assert await _error(b"", 1) == "the multipart body is empty"


async def test_body_without_the_boundary() -> None:
    detail = await _error(_body([b"x"], boundary="other"), 16)
    assert detail == f"the body does not contain the multipart boundary {BOUNDARY!r}"


async def test_boundary_not_found_within_the_preamble_limit() -> None:
    detail = await _error(b"x" * (MAX_PREAMBLE_BYTES + 10), 4096)
    assert detail == (
        f"no multipart boundary {BOUNDARY!r} found in the first {MAX_PREAMBLE_BYTES} bytes"
    )


async def test_body_with_only_a_closing_delimiter_has_no_parts() -> None:
    assert await _error(f"--{BOUNDARY}--\r\n".encode(), 3) == "the multipart body has no parts"


async def test_characters_after_a_boundary() -> None:
    body = _body([b"x"]).replace(f"--{BOUNDARY}\r\n".encode(), f"--{BOUNDARY}junk\r\n".encode())
    detail = await _error(body, 3)
    assert detail == "unexpected characters after the multipart boundary: b'junk'"


async def test_oversized_part_headers() -> None:
    body = _body([b"x"], headers=b"X-Big: " + b"a" * MAX_PART_HEADER_BYTES + b"\r\n")
    assert await _error(body, 1024) == f"part headers exceed {MAX_PART_HEADER_BYTES} bytes"


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        (b"no colon here\r\n", "malformed part header line b'no colon here'"),
        (b": no name\r\n", "malformed part header line b': no name'"),
        (b"A: b\r\n folded\r\n", "folded part header lines are not supported"),
        (b"N\xe4me: v\r\n", "part header name is not ASCII"),
    ],
)
async def test_malformed_part_headers(headers: bytes, detail: str) -> None:
    assert await _error(_body([b"x"], headers=headers), 5) == detail


@pytest.mark.parametrize(
    ("boundary", "detail"),
    [
        ("", "the multipart boundary is empty"),
        (
            "b" * (MAX_BOUNDARY_LENGTH + 1),
            f"the multipart boundary is {MAX_BOUNDARY_LENGTH + 1} characters long; iex accepts "
            f"up to {MAX_BOUNDARY_LENGTH} (RFC 2046 §5.1.1 asks for at most 70)",
        ),
        *(
            (
                boundary,
                "the multipart boundary has a control or non-ASCII character; "
                "it must be printable ASCII (RFC 2046 §5.1.1)",
            )
            for boundary in ("a\r\nb", "a\nb", "tab\there", "nul\x00", "del\x7f", "ünïcode")
        ),
        (
            "trailing ",
            "the multipart boundary ends with a space, which reads as transport padding "
            "(RFC 2046 §5.1.1)",
        ),
    ],
)
async def test_invalid_boundaries_are_refused_before_reading(boundary: str, detail: str) -> None:
    async def untouchable() -> AsyncIterator[bytes]:
        raise AssertionError("the body must not be read")
        yield b""  # pragma: no cover

    with pytest.raises(MultipartError) as info:
        async for _ in read_multipart(untouchable(), boundary):
            pass
    assert info.value.detail == detail


async def test_seventy_character_boundary_with_every_allowed_character() -> None:
    boundary = ("aZ09'()+_,-./:=? " * 5)[:69] + "x"
    assert len(boundary) == 70
    assert len(await _parts(_body([b"x", b"y"], boundary=boundary), 9, boundary)) == 2


@pytest.mark.parametrize(
    "boundary",
    [
        # Orthanc's DICOMweb client: a UUID, "-", the same UUID (73 characters).
        "c511d8f6-f5c2-487b-a8d6-81c21d4be285-c511d8f6-f5c2-487b-a8d6-81c21d4be285",
        "b" * 71,
        "x" * MAX_BOUNDARY_LENGTH,
    ],
)
async def test_boundaries_longer_than_rfc_2046_allows_are_accepted(boundary: str) -> None:
    payloads = [TRICKY, b"\r\n--" + boundary.encode()[:-1], b"y" * 5000]
    body = _body(payloads, boundary=boundary, preamble=b"pre\r\n", epilogue=b"\r\nepi")
    for size in (1, 7, len(boundary) + 3, 4096):
        assert [p[1] for p in await _parts(body, size, boundary)] == payloads, size


async def test_printable_ascii_outside_bchars_frames_parts() -> None:
    """Characters RFC 2046 leaves out of ``bchars`` are still matched byte for byte."""
    boundary = '!#$%&*;<>@[\\]^`{|}~"x y'
    payloads = [b"one", b"--" + boundary.encode()[:-1] + b"\r\n", b"three"]
    assert [p[1] for p in await _parts(_body(payloads, boundary=boundary), 3, boundary)] == payloads


async def test_the_epilogue_is_read_to_the_end() -> None:
    """A body is complete only when the stream ends, so a short read is never taken as done."""
    consumed: list[bytes] = []

    async def tracked() -> AsyncIterator[bytes]:
        for chunk in (_body([b"x"]), b"\r\nepilogue 1", b"epilogue 2"):
            consumed.append(chunk)
            yield chunk

    events: list[PartEvent] = [e async for e in read_multipart(tracked(), BOUNDARY)]
    assert len(consumed) == 3
    assert isinstance(events[-1], PartEnd)


async def test_an_error_from_the_source_propagates() -> None:
    class Gone(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield _body([b"x"])[:20]
        raise Gone

    with pytest.raises(Gone):
        async for _ in read_multipart(failing(), BOUNDARY):
            pass


async def test_chunks_inside_a_large_part_pass_through_uncopied() -> None:
    """The reader's speed: a chunk holding no delimiter is handed on as the same object."""
    size = 64 * 1024
    body = _body([bytes(range(14, 256)) * 1000])
    sent: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in _chunks(body, size):
            sent.append(chunk)
            yield chunk

    data = [e.data async for e in read_multipart(chunks(), BOUNDARY) if isinstance(e, PartData)]
    assert b"".join(data) == bytes(range(14, 256)) * 1000
    middle = data[1:-1]
    assert len(middle) >= 2
    assert all(any(d is c for c in sent) for d in middle)
