"""WADO-RS: retrieve studies, series, instances, metadata, frames and bulk data (PS3.18 §10.4).

Every retrieve is decided before a byte is sent: the index says which instances exist
(404 otherwise) and content negotiation picks one representation per instance (406 when
any instance cannot be produced in an acceptable form, so a client never receives a
partial study with a 200). The body is then streamed part by part from the store;
transcoding and pydicom parsing run in worker threads, one instance at a time. An object
sent as stored is opened and decrypted while the one before it is sent, and when every
part is such an object the body's length is known, and announced, before it is read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import IO, TypeVar

import orjson

from app.dicom.bulkdata import BulkPath, read_bulk_value
from app.dicom.frames import (
    FrameLayout,
    check_frame_numbers,
    iter_encapsulated_frames,
    native_pixels_little_endian,
    read_encapsulated_frame,
)
from app.dicom.media import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MULTIPART_RELATED,
    MediaType,
)
from app.dicom.multipart import closing_delimiter, new_boundary, part_header
from app.dicom.negotiation import (
    Representation,
    accepts_metadata_json,
    bulk_representations,
    choose,
    describe_accept,
    instance_representations,
    is_compressed,
    pixel_representations,
    syntax_name,
)
from app.dicom.transcode import to_explicit_vr_little_endian
from app.errors import IexError, NotAcceptable, NotFound
from app.storage.base import InstanceStore, MetadataIndex, StoredInstance

T = TypeVar("T")

#: Transcoded objects are handed to the server in pieces of this size.
SEND_CHUNK = 1024 * 1024
#: Stored objects opened (and their first batch decrypted) ahead of the one being sent.
READ_AHEAD = 1
_BULK_DATA_URI = b'"BulkDataURI":"'


@dataclass(frozen=True)
class Retrieval:
    """A ``multipart/related`` body ready to stream, its Content-Type, and its length when
    that is known before the body is read (every part an object sent as stored)."""

    media_type: str
    body: AsyncIterator[bytes]
    length: int | None = None


@dataclass(frozen=True)
class _Part:
    content_type: str
    location: str
    body: AsyncIterator[bytes]


class _ReadAhead:
    """A part body whose first chunk is being read from now on, in the background.

    The next stored object is opened and decrypted (by the store: on the event loop when
    its bytes are in the page cache, else in a worker thread) while the one before it is
    sent, so the reading and the sending of a retrieval overlap.
    """

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        self._body = body
        self._first: asyncio.Future[bytes | None] = asyncio.ensure_future(anext(body, None))
        self._started = False

    def __aiter__(self) -> _ReadAhead:
        return self

    async def __anext__(self) -> bytes:
        if self._started:
            chunk = await anext(self._body, None)
        else:
            self._started = True
            chunk = await self._first
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        """Stop reading: the part will not be sent."""
        if not self._first.done():
            self._first.cancel()
        with suppress(BaseException):
            await self._first
        if isinstance(self._body, AsyncGenerator):
            await self._body.aclose()


async def _multipart(boundary: str, parts: AsyncIterator[_Part]) -> AsyncIterator[bytes]:
    """Frame parts as RFC 2387 ``multipart/related`` (the CRLF before a delimiter is its own).

    Each part's first bytes are read before its header goes out, so a stored object that
    fails to open (missing, or failing its integrity check) fails before it is announced.
    The CRLF ending a part goes out with the next delimiter: one write, not two.
    """
    separator = b""
    async for part in parts:
        first = await anext(part.body, None)
        yield separator + _part_header(boundary, part.content_type, part.location)
        if first is not None:
            yield first
        async for chunk in part.body:
            yield chunk
        separator = b"\r\n"
    yield separator + closing_delimiter(boundary)


def _part_header(boundary: str, content_type: str, location: str) -> bytes:
    return part_header(boundary, content_type, {"Content-Location": location})


def _multipart_length(boundary: str, parts: Sequence[tuple[str, str, int | None]]) -> int | None:
    """The exact length of ``_multipart``'s output for parts of (content type, location,
    body length), when every body's length is known."""
    total = len(closing_delimiter(boundary))
    for content_type, location, length in parts:
        if length is None:
            return None
        total += len(_part_header(boundary, content_type, location)) + length + 2
    return total


async def _exactly(body: AsyncIterator[bytes], length: int, what: str) -> AsyncIterator[bytes]:
    """``body``, checked to be the ``length`` bytes announced in Content-Length."""
    sent = 0
    try:
        async for chunk in body:
            sent += len(chunk)
            if sent > length:
                break
            yield chunk
    finally:
        if isinstance(body, AsyncGenerator):
            await body.aclose()
    if sent != length:
        raise IexError(f"{what}: the stored object does not hold the {length} bytes indexed")


async def _primed(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Run ``body`` up to its first chunk now, so that failures opening the first stored
    object become an error status rather than a response cut after its headers."""
    first = await anext(body, None)

    async def rest() -> AsyncIterator[bytes]:
        if first is not None:
            yield first
        async for chunk in body:
            yield chunk

    return rest()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), SEND_CHUNK):
        yield bytes(view[start : start + SEND_CHUNK])


async def _retrieval(
    root_type: str,
    parts: AsyncIterator[_Part],
    boundary: str | None = None,
    length: int | None = None,
) -> Retrieval:
    boundary = boundary or new_boundary()
    return Retrieval(
        f'{MULTIPART_RELATED}; type="{root_type}"; boundary={boundary}',
        await _primed(_multipart(boundary, parts)),
        length,
    )


def _missing(study: str, series: str | None, sop: str | None) -> NotFound:
    if sop is not None:
        return NotFound(f"instance {sop} of series {series} in study {study} not found")
    if series is not None:
        return NotFound(f"series {series} of study {study} not found")
    return NotFound(f"study {study} not found")


def _not_acceptable(
    what: str, stored_syntax: str, accept: Sequence[MediaType], offered: list[Representation]
) -> NotAcceptable:
    available = "; or ".join(r.describe() for r in offered)
    hint = ""
    if is_compressed(stored_syntax):
        hint = " (compressed data is not decompressed; ask for transfer-syntax=* to get it)"
    return NotAcceptable(
        f"{what} is stored as {syntax_name(stored_syntax)} and cannot be sent as any of "
        f"Accept: {describe_accept(accept)}{hint}. Available: {available}"
    )


def _negotiate(
    what: str, stored_syntax: str, accept: Sequence[MediaType], offered: list[Representation]
) -> Representation:
    chosen = choose(accept, offered)
    if chosen is None:
        raise _not_acceptable(what, stored_syntax, accept, offered)
    return chosen


def _instance_url(base_url: str, inst: StoredInstance) -> str:
    return f"{base_url}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"


def _readable_by_range(inst: StoredInstance) -> bool:
    """Native pixel data that can be sent straight from the file: little endian, not deflated."""
    return (
        inst.transfer_syntax in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
        and inst.pixel_offset is not None
        and inst.pixel_length is not None
    )


class WadoService:
    def __init__(self, store: InstanceStore, index: MetadataIndex) -> None:
        self._store = store
        self._index = index

    # -- helpers ----------------------------------------------------------------------------

    async def _instances(
        self, trust: str, study: str, series: str | None, sop: str | None
    ) -> list[StoredInstance]:
        found = await self._index.get_instances(trust, study, series, sop)
        if not found:
            raise _missing(study, series, sop)
        return found

    async def _in_thread(self, key: str, work: Callable[[IO[bytes]], T]) -> T:
        """Run blocking pydicom work on the stored object in a worker thread."""

        def run() -> T:
            with self._store.open_blocking(key) as fp:
                return work(fp)

        return await asyncio.to_thread(run)

    async def _thread_iter(
        self, key: str, make: Callable[[IO[bytes]], Iterator[bytes]]
    ) -> AsyncIterator[bytes]:
        """Pull a blocking iterator over an open stored object, each step in a thread."""
        fp = await asyncio.to_thread(self._store.open_blocking, key)
        try:
            items = make(fp)
            while (item := await asyncio.to_thread(next, items, None)) is not None:
                yield item
        finally:
            fp.close()

    # -- studies, series, instances (PS3.18 §10.4.1.1.3) ------------------------------------

    async def retrieve(
        self,
        trust: str,
        study: str,
        series: str | None,
        sop: str | None,
        accept: Sequence[MediaType],
        base_url: str,
    ) -> Retrieval:
        """Stream the Part 10 objects of a study, series or instance.

        Each instance is sent as stored when that is acceptable, else transcoded to
        Explicit VR Little Endian (the default, PS3.18 §8.7.3.5.2) when it is uncompressed.
        One instance that can be sent in no acceptable form makes the whole request 406.
        """
        plan: list[tuple[StoredInstance, Representation]] = []
        for inst in await self._instances(trust, study, series, sop):
            offered = instance_representations(inst.transfer_syntax)
            what = f"instance {inst.sop_uid}"
            plan.append((inst, _negotiate(what, inst.transfer_syntax, accept, offered)))
        boundary = new_boundary()
        length = _multipart_length(
            boundary,
            [
                (
                    rep.content_type,
                    _instance_url(base_url, inst),
                    inst.size if rep.as_stored else None,
                )
                for inst, rep in plan
            ],
        )

        def part(inst: StoredInstance, rep: Representation) -> _Part:
            if rep.as_stored:
                stored = self._store.read(inst.blob_key)
                body: AsyncIterator[bytes] = _ReadAhead(
                    _exactly(stored, inst.size, f"instance {inst.sop_uid}")
                )
            else:  # transcoded whole in memory: not ahead of time
                body = self._transcoded(inst.blob_key)
            return _Part(rep.content_type, _instance_url(base_url, inst), body)

        async def parts() -> AsyncIterator[_Part]:
            ahead: deque[_Part] = deque()
            try:
                for inst, rep in plan:
                    ahead.append(part(inst, rep))
                    if len(ahead) > READ_AHEAD:
                        yield ahead.popleft()
                while ahead:
                    yield ahead.popleft()
            finally:
                for unsent in ahead:
                    if isinstance(unsent.body, _ReadAhead):
                        await unsent.body.aclose()

        return await _retrieval("application/dicom", parts(), boundary, length)

    async def _transcoded(self, key: str) -> AsyncIterator[bytes]:
        data = await self._in_thread(key, to_explicit_vr_little_endian)
        async for chunk in _chunks(data):
            yield chunk

    # -- metadata (PS3.18 §10.4.1.1.2) ------------------------------------------------------

    async def metadata(
        self,
        trust: str,
        study: str,
        series: str | None,
        sop: str | None,
        accept: Sequence[MediaType],
        base_url: str,
    ) -> bytes:
        """The DICOM JSON array (PS3.18 Annex F.2) of every instance, as bytes.

        Stored BulkDataURIs are instance-relative; they become absolute here. Replacing the
        key text is exact because a JSON string value cannot contain an unescaped quote.
        """
        if not accepts_metadata_json(accept):
            raise NotAcceptable(
                f"metadata is available as application/dicom+json only, not as any of "
                f"Accept: {describe_accept(accept)}"
            )
        rows = await self._index.get_metadata(trust, study, series, sop)
        if not rows:
            raise _missing(study, series, sop)
        documents = []
        for inst, stored in rows:
            # The URL is JSON-escaped: the host part comes from the request.
            prefix = orjson.dumps(_instance_url(base_url, inst) + "/")[1:-1]
            documents.append(stored.replace(_BULK_DATA_URI, _BULK_DATA_URI + prefix))
        return b"[" + b",".join(documents) + b"]"

    # -- frames (PS3.18 §10.4.1.1.5) --------------------------------------------------------

    async def frames(
        self,
        trust: str,
        study: str,
        series: str,
        sop: str,
        numbers: list[int],
        accept: Sequence[MediaType],
        base_url: str,
    ) -> Retrieval:
        """Stream the listed frames, in the order listed, one part each."""
        rows = await self._index.get_metadata(trust, study, series, sop)
        if not rows:
            raise _missing(study, series, sop)
        inst, stored = rows[0]
        if inst.pixel_tag is None:
            raise NotFound(f"instance {sop} has no pixel data, so it has no frames")
        check_frame_numbers(numbers, inst.number_of_frames, sop)
        rep = _negotiate(
            f"frames of instance {sop}",
            inst.transfer_syntax,
            accept,
            pixel_representations(inst.transfer_syntax),
        )
        location = _instance_url(base_url, inst) + "/frames/"
        if is_compressed(inst.transfer_syntax):
            parts = self._compressed_frames(inst, numbers, rep, location)
            return await _retrieval(rep.media_type, parts)
        layout = FrameLayout.from_dicom_json(orjson.loads(stored), sop)
        parts = await self._native_frames(inst, layout, numbers, rep, location)
        # A native frame is (bits per frame + 7) // 8 bytes, so the length is known: the
        # audit record made before the body is sent holds the bytes it will send.
        boundary = new_boundary()
        size = (layout.frame_bits + 7) // 8
        length = _multipart_length(
            boundary, [(rep.content_type, f"{location}{n}", size) for n in numbers]
        )
        return await _retrieval(rep.media_type, parts, boundary, length)

    async def _native_frames(
        self,
        inst: StoredInstance,
        layout: FrameLayout,
        numbers: list[int],
        rep: Representation,
        location: str,
    ) -> AsyncIterator[_Part]:
        """Frames of native data: range reads when little endian at a known offset."""
        pixels: bytes | None = None
        if not _readable_by_range(inst):
            # Big-endian or deflated: one instance's pixel data, converted in a thread.
            pixels = await self._in_thread(inst.blob_key, lambda fp: self._le_pixels(fp, inst))
        available = len(pixels) if pixels is not None else inst.pixel_length or 0
        for n in numbers:
            if layout.byte_span(n - 1)[1] > available:
                raise NotFound(
                    f"frame {n} lies beyond the end of the stored Pixel Data ({available} bytes)"
                )
        return self._native_frame_parts(inst, layout, numbers, rep, location, pixels)

    @staticmethod
    def _le_pixels(fp: IO[bytes], inst: StoredInstance) -> bytes:
        assert inst.pixel_tag is not None and inst.pixel_vr is not None
        return native_pixels_little_endian(
            fp,
            inst.transfer_syntax,
            inst.pixel_tag,
            inst.pixel_vr,
            inst.pixel_offset,
            inst.pixel_length,
            inst.bits_allocated or 16,
        )

    async def _native_frame_parts(
        self,
        inst: StoredInstance,
        layout: FrameLayout,
        numbers: list[int],
        rep: Representation,
        location: str,
        pixels: bytes | None,
    ) -> AsyncIterator[_Part]:
        for n in numbers:
            start, end = layout.byte_span(n - 1)
            if pixels is not None:
                body = _chunks(layout.cut(pixels[start:end], n - 1))
            else:
                assert inst.pixel_offset is not None
                body = self._frame_range(inst, layout, n - 1, inst.pixel_offset)
            yield _Part(rep.content_type, f"{location}{n}", body)

    async def _frame_range(
        self, inst: StoredInstance, layout: FrameLayout, index: int, offset: int
    ) -> AsyncIterator[bytes]:
        start, end = layout.byte_span(index)
        chunks = self._store.read(inst.blob_key, offset + start, offset + end)
        if layout.whole_bytes:
            async for chunk in _exactly(chunks, end - start, f"frame {index + 1}"):
                yield chunk
            return
        covering = b"".join([chunk async for chunk in chunks])
        yield layout.cut(covering, index)

    async def _compressed_frames(
        self, inst: StoredInstance, numbers: list[int], rep: Representation, location: str
    ) -> AsyncIterator[_Part]:
        for n in numbers:
            read = partial(
                read_encapsulated_frame,
                pixel_tag=inst.pixel_tag or 0,
                offset=inst.pixel_offset,
                index=n - 1,
                number_of_frames=inst.number_of_frames,
            )
            frame = await self._in_thread(inst.blob_key, read)
            yield _Part(rep.content_type, f"{location}{n}", _chunks(frame))

    # -- bulk data (PS3.18 §10.4.1.1.4) -----------------------------------------------------

    async def bulkdata(
        self,
        trust: str,
        study: str,
        series: str,
        sop: str,
        path: BulkPath,
        accept: Sequence[MediaType],
        base_url: str,
    ) -> Retrieval:
        """Stream one bulk data value; encapsulated Pixel Data goes as one part per frame."""
        (inst,) = await self._instances(trust, study, series, sop)
        location = f"{_instance_url(base_url, inst)}/bulk/{path}"
        what = f"bulk data {path} of instance {sop}"
        if path.top_level and path.tags[0] == inst.pixel_tag:
            offered = pixel_representations(inst.transfer_syntax)
            rep = _negotiate(what, inst.transfer_syntax, accept, offered)
            return await _retrieval(rep.media_type, self._pixel_bulk(inst, rep, location))
        rep = _negotiate(what, inst.transfer_syntax, accept, bulk_representations())
        value = await self._in_thread(
            inst.blob_key, lambda fp: read_bulk_value(fp, path, inst.transfer_syntax)
        )
        return await _retrieval(
            rep.media_type, _single(_Part(rep.content_type, location, _chunks(value)))
        )

    async def _pixel_bulk(
        self, inst: StoredInstance, rep: Representation, location: str
    ) -> AsyncIterator[_Part]:
        if is_compressed(inst.transfer_syntax):
            frames = self._thread_iter(
                inst.blob_key,
                lambda fp: iter_encapsulated_frames(
                    fp, inst.pixel_tag or 0, inst.pixel_offset, inst.number_of_frames
                ),
            )
            async for frame in frames:
                yield _Part(rep.content_type, location, _chunks(frame))
            return
        if _readable_by_range(inst):
            assert inst.pixel_offset is not None and inst.pixel_length is not None
            end = inst.pixel_offset + inst.pixel_length
            yield _Part(
                rep.content_type, location, self._store.read(inst.blob_key, inst.pixel_offset, end)
            )
            return
        pixels = await self._in_thread(inst.blob_key, lambda fp: self._le_pixels(fp, inst))
        yield _Part(rep.content_type, location, _chunks(pixels))


async def _single(part: _Part) -> AsyncIterator[_Part]:
    yield part
