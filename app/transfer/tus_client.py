"""A tus 1.0.0 client over httpx: create an upload, send it chunk by chunk, resume it.

Sections cited are those of the tus 1.0.0 protocol (https://tus.io/protocols/resumable-upload).

Every chunk is one ``PATCH`` with ``Upload-Checksum`` (§Checksum; sha256 where the server
offers it), so a corrupted chunk is refused with 460 and a chunk cut short is discarded
whole; the server's ``Upload-Offset`` is then always the end of the last chunk it verified.
After anything that can pass (a transport error or timeout, 5xx, 423, 429, a 409 offset
mismatch, a 460) the client takes the server's offset (from the 409 itself, else ``HEAD``,
§Core Protocol) and continues from there, waiting between attempts with capped exponential
backoff. Attempts are counted only while the server's offset does not move, so a long upload
over a poor link is not abandoned as long as it progresses. Other 4xx are final.

Only one chunk is in memory at a time: its checksum has to be sent before its bytes.

A payload may also travel as several partial uploads sent at once, over as many connections,
and be joined by a final upload (§Concatenation): ``upload(source, partial=True)`` for each
part (each resumable on its own), then ``concatenate(part URLs, metadata)``.

The token goes into the ``Authorization`` header and nowhere else: not into messages, logs,
reprs or exceptions. Redirects are not followed, so it is never sent to another host.

Exceptions::

    TusError                 the client gave up; the message says why
     ├── UploadRejected      the server refused a request for good (4xx); ``status``, ``detail``
     │    └── UploadGone     404 or 410: the URL names no upload (terminated, expired, unknown)
     ├── UploadMismatch      the upload at a URL is not the one of the source (another length)
     ├── RetriesExhausted    the server stayed unreachable or failing without progress
     └── ProtocolError       an answer tus 1.0.0 (or the report contract) does not allow

``app.transfer.sources.SourceError`` passes through: a source that changed is not retried.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx

from app.transfer.sources import SourceChanged, UploadSource
from app.transfer.uploads import OFFSET_OCTET_STREAM, TUS_VERSION

log = logging.getLogger(__name__)

UPLOADS_PATH = "/transfers/uploads"
CONCATENATION = "concatenation"
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
#: Answers after which a retry can succeed: locked, rate limited, or the server's fault.
_TRANSIENT_STATUS = frozenset({408, 423, 429})
_CHECKSUM_MISMATCH = 460
#: Report states after which nothing changes any more.
FINAL_STATES = frozenset({"complete", "failed"})

ProgressCallback = Callable[[int, int], None]


class TusError(Exception):
    pass


class UploadRejected(TusError):
    def __init__(self, message: str, status: int, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class UploadGone(UploadRejected):
    pass


class UploadMismatch(TusError):
    pass


class RetriesExhausted(TusError):
    pass


class ProtocolError(TusError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying. ``attempts`` failures in a row without the server's offset
    moving end the upload; the n-th waits ``initial_delay * multiplier ** (n - 1)`` seconds,
    at most ``max_delay``, less a random part of up to ``jitter`` of it (so that clients cut
    off together do not return together)."""

    attempts: int = 10
    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.25

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        backoff = min(self.max_delay, self.initial_delay * self.multiplier ** (failures - 1))
        backoff *= 1.0 - self.jitter * random.random()
        if retry_after is not None:
            backoff = max(backoff, min(retry_after, self.max_delay))
        return backoff


@dataclass(frozen=True)
class UploadStatus:
    """§Core Protocol HEAD: the bytes stored of an upload's length."""

    offset: int
    length: int


@dataclass(frozen=True)
class Capabilities:
    """§Core Protocol OPTIONS: what the server offers."""

    versions: tuple[str, ...]
    extensions: frozenset[str]
    max_size: int | None
    checksum_algorithms: tuple[str, ...]


@dataclass(frozen=True)
class StudyReport:
    study_uid: str
    instances: tuple[str, ...]


@dataclass(frozen=True)
class MemberProblem:
    """A payload member that failed or was skipped, and why."""

    member: str
    reason: str
    sop_uid: str | None = None


@dataclass(frozen=True)
class IngestReport:
    """``GET {upload}/report``: what the gateway made of a received upload."""

    state: str
    counts: Mapping[str, int]
    studies: tuple[StudyReport, ...]
    failures: tuple[MemberProblem, ...]
    skipped: tuple[MemberProblem, ...]
    error: str | None
    bytes_read: int
    bytes_total: int
    raw: Mapping[str, Any] = field(repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def parse(cls, body: Any) -> IngestReport:
        try:
            progress = body.get("progress") or {}
            return cls(
                state=str(body["state"]),
                counts={str(k): int(v) for k, v in (body.get("counts") or {}).items()},
                studies=tuple(
                    StudyReport(str(s["study_uid"]), tuple(str(i) for i in s["instances"]))
                    for s in body.get("studies") or ()
                ),
                failures=tuple(_problem(p) for p in body.get("failures") or ()),
                skipped=tuple(_problem(p) for p in body.get("skipped") or ()),
                error=None if body.get("error") is None else str(body["error"]),
                bytes_read=int(progress.get("bytes_read", 0)),
                bytes_total=int(progress.get("bytes_total", 0)),
                raw=body,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"the upload report is malformed: {exc!r}") from None


def _problem(item: Any) -> MemberProblem:
    sop_uid = item.get("sop_uid")
    return MemberProblem(str(item["member"]), str(item["reason"]), sop_uid and str(sop_uid))


@dataclass(frozen=True)
class Fetched:
    """An answer to ``TusClient.get``: its status and body as read, the server's detail when
    it is an error, and ``Retry-After`` in seconds when given."""

    status: int
    body: bytes = field(repr=False)
    content_type: str
    detail: str
    retry_after: float | None


def encode_metadata(values: Mapping[str, str]) -> str:
    """§Creation ``Upload-Metadata``: ``key base64(value)`` pairs, comma separated."""
    pairs = []
    for key, value in values.items():
        if not key or not key.isascii() or " " in key or "," in key:
            raise ValueError(f"{key!r} cannot be an Upload-Metadata key")
        pairs.append(f"{key} {base64.b64encode(value.encode()).decode()}")
    return ",".join(pairs)


class _Retry(Exception):
    """A failure worth another attempt; ``offset`` is the server's if the answer told it."""

    def __init__(self, reason: str, offset: int | None = None, after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset
        self.after = after


class TusClient:
    """A tus 1.0.0 client of one gateway (``base_url``, its root), as one caller (``token``).

    Use as ``async with TusClient(...) as client``. ``verify`` is ``True`` (the system's CAs)
    or an ``ssl.SSLContext`` (e.g. one trusting a private CA).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        verify: bool | ssl.SSLContext = True,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.base_url = base_url.rstrip("/")
        self.endpoint = self.base_url + UPLOADS_PATH
        self.chunk_size = chunk_size
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"},
            verify=verify,
            timeout=timeout,
            follow_redirects=False,
            transport=transport,
        )
        self._capabilities: Capabilities | None = None

    def __repr__(self) -> str:
        return f"TusClient({self.base_url!r}, chunk_size={self.chunk_size})"

    async def __aenter__(self) -> TusClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the requests -----------------------------------------------------------------------

    async def capabilities(self) -> Capabilities:
        """§Core Protocol OPTIONS, asked once. Not retried: a server that cannot be reached
        before anything started is better reported at once."""
        if self._capabilities is None:
            try:
                response = await self._once("OPTIONS", self.endpoint)
            except UploadRejected as exc:
                raise ProtocolError(
                    f"{self.endpoint} does not offer tus uploads ({exc.status}: {exc.detail})"
                ) from None
            versions = _split(response.headers.get("tus-version", TUS_VERSION))
            if TUS_VERSION not in versions:
                raise ProtocolError(
                    f"{self.endpoint} speaks tus {', '.join(versions)}, not {TUS_VERSION}"
                )
            max_size = response.headers.get("tus-max-size")
            self._capabilities = Capabilities(
                versions=tuple(versions),
                extensions=frozenset(_split(response.headers.get("tus-extension", ""))),
                max_size=_integer(max_size, "Tus-Max-Size") if max_size else None,
                checksum_algorithms=tuple(
                    _split(response.headers.get("tus-checksum-algorithm", ""))
                ),
            )
        return self._capabilities

    async def create(
        self, length: int, metadata: Mapping[str, str], *, partial: bool = False
    ) -> str:
        """§Creation: a new upload of ``length`` bytes; its URL. A ``partial`` one
        (§Concatenation) is only ever a piece of a final upload (``concatenate``)."""
        capabilities = await self.capabilities()
        if capabilities.max_size is not None and length > capabilities.max_size:
            raise UploadRejected(
                f"{length} bytes exceed the server's largest upload ({capabilities.max_size})",
                413,
                "Tus-Max-Size exceeded",
            )
        headers = {"Upload-Length": str(length)}
        if partial:
            self._require(capabilities, CONCATENATION)
            headers["Upload-Concat"] = "partial"
        if metadata:
            headers["Upload-Metadata"] = encode_metadata(metadata)
        return await self._created(headers)

    async def concatenate(self, parts: Sequence[str], metadata: Mapping[str, str]) -> str:
        """§Concatenation: the final upload joining the complete partial uploads ``parts``
        in that order, described by ``metadata``; its URL. It has every byte at once (no
        ``Upload-Length``: the server adds up the parts)."""
        if not parts:
            raise ValueError("a final upload joins at least one partial upload")
        self._require(await self.capabilities(), CONCATENATION)
        headers = {"Upload-Concat": "final;" + " ".join(parts)}
        if metadata:
            headers["Upload-Metadata"] = encode_metadata(metadata)
        return await self._created(headers)

    async def _created(self, headers: Mapping[str, str]) -> str:
        response = await self._retrying("POST", self.endpoint, headers=headers)
        location: str | None = response.headers.get("location")
        if response.status_code != 201 or not location:
            raise ProtocolError(f"creating an upload answered {response.status_code} without a URL")
        return urljoin(str(response.url), location)

    def _require(self, capabilities: Capabilities, extension: str) -> None:
        if extension not in capabilities.extensions:
            raise ProtocolError(f"{self.endpoint} does not offer the tus {extension} extension")

    async def offset(self, url: str) -> int:
        """§Core Protocol HEAD: how many bytes of the upload the server has stored."""
        return (await self.status(url)).offset

    async def status(self, url: str) -> UploadStatus:
        """§Core Protocol HEAD: the upload's offset and length."""
        response = await self._retrying("HEAD", url)
        offset = _integer(response.headers.get("upload-offset"), "Upload-Offset")
        length = _integer(response.headers.get("upload-length"), "Upload-Length")
        if offset > length:
            raise ProtocolError(f"HEAD {url} answered offset {offset} beyond length {length}")
        return UploadStatus(offset, length)

    async def upload(
        self,
        source: UploadSource,
        url: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
        partial: bool = False,
    ) -> str:
        """Send ``source``: to a new upload (with ``filename``, ``content-type`` and any
        ``metadata`` given), or the rest of it to the upload at ``url``. Returns the URL once
        the server has every byte. ``on_progress(offset, length)`` is called with the
        server's offset when the upload starts and after each chunk.

        A new ``partial`` upload (§Concatenation) carries only the ``metadata`` given: what
        the payload is, the final upload says."""
        capabilities = await self.capabilities()
        algorithm = next(
            (a for a in ("sha256", "sha1") if a in capabilities.checksum_algorithms), None
        )
        if url is None:
            if partial:
                url = await self.create(source.length, metadata or {}, partial=True)
            else:
                values = {"filename": source.filename, "content-type": source.content_type}
                url = await self.create(source.length, {**values, **(metadata or {})})
            offset = 0
        else:
            status = await self.status(url)
            if status.length != source.length:
                raise UploadMismatch(
                    f"the upload at {url} is {status.length} bytes long, the source {source.length}"
                )
            offset = status.offset
        await _Sender(self, url, source, algorithm, on_progress).run(offset)
        return url

    async def report(self, url: str) -> IngestReport:
        """The gateway's report on the upload (its ingest state, what was stored)."""
        response = await self._retrying("GET", url + "/report", tus=False)
        try:
            body = response.json()
        except ValueError:
            raise ProtocolError("the upload report is not JSON") from None
        return IngestReport.parse(body)

    async def wait_for_ingest(
        self,
        url: str,
        poll: float = 1.0,
        *,
        on_report: Callable[[IngestReport], None] | None = None,
    ) -> IngestReport:
        """Poll the report every ``poll`` seconds until the ingest is complete or failed."""
        while True:
            report = await self.report(url)
            if on_report is not None:
                on_report(report)
            if report.finished:
                return report
            await asyncio.sleep(poll)

    async def terminate(self, url: str) -> None:
        """§Termination: the server forgets the upload and deletes its bytes."""
        await self._retrying("DELETE", url)

    async def get(self, path: str, *, max_bytes: int = 1024 * 1024) -> Fetched:
        """``GET`` a resource of the same gateway beside its uploads (``path`` from its root:
        a partner's receipts, say), as the same caller. Transport errors, 5xx, 408, 423 and
        429 are retried like every request; any other answer is returned whatever its
        status. A body over ``max_bytes`` is a ``ProtocolError`` (never read whole)."""
        url = self.base_url + path
        failures = 0
        while True:
            try:
                fetched = await self._bounded_get(url, max_bytes)
            except httpx.TransportError as exc:
                retry = _Retry(_transport_reason(exc))
            else:
                if fetched.status < 500 and fetched.status not in _TRANSIENT_STATUS:
                    return fetched
                retry = _Retry(f"{fetched.status}: {fetched.detail}", after=fetched.retry_after)
            failures = self._failed(failures, f"GET {url}", retry)
            await asyncio.sleep(self.retry.delay(failures, retry.after))

    async def _bounded_get(self, url: str, max_bytes: int) -> Fetched:
        # Tus-Resumable too: a partner's routes beside its uploads speak the same version.
        headers = {"Tus-Resumable": TUS_VERSION}
        async with self._http.stream("GET", url, headers=headers) as response:
            body = bytearray()
            async for data in response.aiter_bytes():
                body += data
                if len(body) > max_bytes:
                    raise ProtocolError(f"GET {url} answered more than {max_bytes} bytes")
            fetched = httpx.Response(response.status_code, content=bytes(body))
            return Fetched(
                response.status_code,
                bytes(body),
                response.headers.get("content-type", ""),
                _detail(fetched) if not response.is_success else "",
                _retry_after(response),
            )

    # -- plumbing -----------------------------------------------------------------------------

    async def _once(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._request(method, url, **kwargs)
        except _Retry as exc:
            raise RetriesExhausted(f"{method} {url} failed: {exc.reason}") from exc

    async def _retrying(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        failures = 0
        while True:
            try:
                return await self._request(method, url, **kwargs)
            except _Retry as exc:
                failures = self._failed(failures, f"{method} {url}", exc)
                await asyncio.sleep(self.retry.delay(failures, exc.after))

    def _failed(self, failures: int, what: str, exc: _Retry) -> int:
        """Count one more failure in a row: give up past the policy, else say we retry."""
        failures += 1
        if failures >= self.retry.attempts:
            raise RetriesExhausted(
                f"{what} failed {failures} times in a row; last: {exc.reason}"
            ) from exc
        log.warning("%s: %s; retrying (%d of %d)", what, exc.reason, failures, self.retry.attempts)
        return failures

    async def _request(
        self,
        method: str,
        url: str,
        *,
        tus: bool = True,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """One request; 2xx is returned, what may pass raises ``_Retry``, the rest is fatal."""
        sent = {**({"Tus-Resumable": TUS_VERSION} if tus else {}), **(headers or {})}
        try:
            response = await self._http.request(method, url, headers=sent, content=content)
        except httpx.TransportError as exc:
            raise _Retry(_transport_reason(exc)) from exc
        status = response.status_code
        if response.is_success:
            return response
        detail = _detail(response)
        if status == 409:
            told = response.headers.get("upload-offset")
            offset = int(told) if told is not None and told.isdigit() else None
            raise _Retry(f"offset conflict (409): {detail}", offset)
        if status == _CHECKSUM_MISMATCH:
            raise _Retry(f"the chunk did not match its checksum ({status}): {detail}")
        if status >= 500 or status in _TRANSIENT_STATUS:
            raise _Retry(f"{status}: {detail}", after=_retry_after(response))
        message = f"{method} {url} was refused ({status}): {detail}"
        if status in (404, 410):
            raise UploadGone(message, status, detail)
        raise UploadRejected(message, status, detail)


class _Sender:
    """The PATCH loop of one upload (§Core Protocol PATCH, §Checksum)."""

    def __init__(
        self,
        client: TusClient,
        url: str,
        source: UploadSource,
        algorithm: str | None,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.client = client
        self.url = url
        self.source = source
        self.algorithm = algorithm
        self.on_progress = on_progress
        self._pieces: Iterator[bytes] | None = None
        self._pieces_at = -1
        #: The last chunk read, kept to be sent again after a 460 or a cut connection.
        self._last: tuple[int, bytes, str | None] | None = None

    async def run(self, offset: int) -> None:
        length = self.source.length
        best = offset
        failures = 0
        self._progress(offset)
        try:
            while offset < length:
                try:
                    offset = await self._send_chunk(offset)
                except _Retry as exc:
                    failures = self.client._failed(failures, f"PATCH {self.url}", exc)
                    await asyncio.sleep(self.client.retry.delay(failures, exc.after))
                    offset = exc.offset if exc.offset is not None else await self._head()
                if offset > best:
                    best, failures = offset, 0
                    self._progress(offset)
        finally:
            self._close_pieces()

    async def _send_chunk(self, offset: int) -> int:
        piece, checksum = await asyncio.to_thread(self._next_piece, offset)
        headers = {"Content-Type": OFFSET_OCTET_STREAM, "Upload-Offset": str(offset)}
        if checksum is not None:
            headers["Upload-Checksum"] = checksum
        response = await self.client._request("PATCH", self.url, headers=headers, content=piece)
        new = _integer(response.headers.get("upload-offset"), "Upload-Offset")
        if not offset < new <= self.source.length:
            raise ProtocolError(f"PATCH at {offset} answered offset {new}")
        if new < offset + len(piece):
            # Without checksums a server may keep part of a chunk; go on from there.
            self._close_pieces()
        return new

    def _next_piece(self, offset: int) -> tuple[bytes, str | None]:
        """The chunk at ``offset`` and its ``Upload-Checksum``; blocking (file reads)."""
        if self._last is not None and self._last[0] == offset:
            return self._last[1], self._last[2]
        if self._pieces is None or self._pieces_at != offset:
            # The server's offset is not where reading stopped: read again from there (the
            # source is deterministic, so these are the same bytes as before).
            self._close_pieces()
            self._pieces = self.source.chunks(offset, self.client.chunk_size)
            self._pieces_at = offset
        piece = next(self._pieces, None)
        if piece is None:
            raise SourceChanged(f"the source ended at {offset} of {self.source.length} bytes")
        self._pieces_at = offset + len(piece)
        checksum = None
        if self.algorithm is not None:
            digest = hashlib.new(self.algorithm, piece).digest()
            checksum = f"{self.algorithm} {base64.b64encode(digest).decode()}"
        self._last = (offset, piece, checksum)
        return piece, checksum

    def _close_pieces(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()
        self._pieces = None
        self._pieces_at = -1

    async def _head(self) -> int:
        return await self.client.offset(self.url)

    def _progress(self, offset: int) -> None:
        if self.on_progress is not None:
            self.on_progress(offset, self.source.length)


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _integer(value: str | None, name: str) -> int:
    if value is None or not value.isdigit():
        raise ProtocolError(f"the server sent no valid {name} header")
    return int(value)


def _detail(response: httpx.Response) -> str:
    """The server's own explanation: ``detail`` of a JSON problem, else the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])[:500]
    return response.text.strip()[:500] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _transport_reason(exc: httpx.TransportError) -> str:
    kind = {
        httpx.ConnectError: "cannot connect",
        httpx.ConnectTimeout: "connection timed out",
        httpx.TimeoutException: "timed out",
        httpx.RemoteProtocolError: "the connection broke",
        httpx.NetworkError: "network error",
    }
    name = next((text for cls, text in kind.items() if isinstance(exc, cls)), "transport error")
    detail = str(exc).strip().rstrip(".")
    return f"{name}: {detail}" if detail else name
