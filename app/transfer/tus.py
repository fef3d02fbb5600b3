"""The tus 1.0.0 upload engine: creation, PATCH, HEAD, termination, expiration and
concatenation, over an ``InstanceStore`` (chunk bytes) and ``SQLiteUploadState`` (offsets).

Durability (§Core Protocol PATCH: the offset answered is what the server has *stored*):
each PATCH body streams into one new encrypted blob; the blob is committed (fsynced and
published) and only then are the chunk and the new offset recorded in one SQLite
transaction (``synchronous=FULL``), and only then does the caller answer 204. A crash at
any point before leaves an unreferenced blob at worst, never an acknowledged byte missing.

A body cut short (the client went away) keeps what arrived, as §Core Protocol allows:
those bytes are committed and recorded like any chunk, so a ``HEAD`` shows them and the
client resumes from there. With ``Upload-Checksum`` a short chunk cannot be verified and
is discarded instead.

One writer per upload: a PATCH to an upload another request in this process is writing
fails at once with 409 (the client HEADs and resumes). Across processes the offset moves
only by compare-and-set in SQL, so two writers can never both record a chunk at one offset.

Expiration (§Expiration): every upload expires ``expiry`` after its creation or its last
PATCH; a partial joined to a final takes the final's expiry. Expired uploads answer 410
until ``sweep`` removes them; termination works on them all the same. An upload queued for
or under ingest never expires meanwhile; once ingested, its report lives another ``expiry``.

Completion: when the last byte of a plain or final upload is recorded, the upload moves to
``verifying`` and ``on_complete`` is called with it; the ingest service (above this layer)
takes it from there and reports back through ``begin_ingest`` and ``end_ingest``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from app.errors import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    PayloadTooLarge,
)
from app.storage.base import BlobWriter, InstanceStore
from app.transfer.payload import ChunkedPayload
from app.transfer.state import Chunk, SQLiteUploadState, StaleOffset
from app.transfer.uploads import (
    Checksum,
    Concat,
    Upload,
    UploadMetadata,
    UploadState,
    new_upload_id,
    validate_upload_id,
)


class OffsetMismatch(Conflict):
    """§Core Protocol PATCH: 409 when ``Upload-Offset`` is not the upload's offset. The
    response tells the current offset so that the client need not HEAD first."""

    def __init__(self, detail: str, offset: int) -> None:
        super().__init__(detail)
        self.offset = offset

    @property
    def headers(self) -> dict[str, str]:
        return {"Upload-Offset": str(self.offset)}


@dataclass(frozen=True)
class UploadLimits:
    #: Largest upload (``Tus-Max-Size``).
    max_bytes: int
    #: Seconds an upload lives after its creation or its last PATCH.
    expiry: float


class ResumableUploads:
    def __init__(
        self,
        store: InstanceStore,
        state: SQLiteUploadState,
        limits: UploadLimits,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._state = state
        self.limits = limits
        self._clock = clock
        self._writing: set[str] = set()
        #: Called with each upload whose bytes are all there and that awaits ingest.
        self.on_complete: Callable[[Upload], None] = lambda upload: None

    # -- creation (§Creation, §Concatenation) ---------------------------------------------

    async def create(
        self,
        trust: str,
        length: int | None,
        metadata: UploadMetadata,
        concat: Concat = Concat.NONE,
        parts: tuple[str, ...] = (),
        actor: str | None = None,
    ) -> Upload:
        """A new upload of ``trust``. A final upload is complete at once: its partials must
        all be complete (``concatenation-unfinished`` is not offered)."""
        if metadata.trust is not None and metadata.trust != trust:
            raise Forbidden("an upload may only target the caller's own trust")
        if concat is not Concat.PARTIAL and metadata.content_type is None:
            raise BadRequest("Upload-Metadata must give content-type (what the upload holds)")
        if concat is Concat.FINAL:
            if length is not None:
                raise BadRequest("a final upload must not send Upload-Length (§Concatenation)")
            length = 0
            for part in parts:
                length += await self._joinable(trust, part)
        elif length is None:
            raise BadRequest("Upload-Length is required (creation-defer-length is not offered)")
        if length > self.limits.max_bytes:
            raise PayloadTooLarge(
                f"an upload of {length} bytes exceeds the limit of {self.limits.max_bytes}"
            )
        now = self._clock()
        final = concat is Concat.FINAL
        received = final or length == 0
        upload = Upload(
            id=new_upload_id(),
            trust=trust,
            length=length,
            offset=length if final else 0,
            metadata=metadata,
            concat=concat,
            parts=parts,
            joined_to=None,
            state=_received_state(concat) if received else UploadState.RECEIVING,
            created_at=now,
            expires_at=now + self.limits.expiry,
            actor=actor,
        )
        try:
            await self._state.insert(upload, joins=parts)
        except StaleOffset as exc:
            raise Conflict(f"partial upload {exc} was joined by another final upload") from exc
        if upload.state is UploadState.VERIFYING:
            self.on_complete(upload)
        return upload

    async def _joinable(self, trust: str, part: str) -> int:
        try:
            upload = await self.get(trust, part)
        except (NotFound, Gone) as exc:
            raise BadRequest(f"partial upload {part}: {exc.detail}") from exc
        if upload.concat is not Concat.PARTIAL:
            raise BadRequest(f"upload {part} was not created with Upload-Concat: partial")
        if not upload.complete:
            raise BadRequest(f"partial upload {part} is not complete yet")
        if upload.joined_to is not None:
            raise BadRequest(f"partial upload {part} already belongs to a final upload")
        return upload.length

    # -- reading state (§Core Protocol HEAD) ----------------------------------------------

    async def _find(self, trust: str, upload_id: str) -> Upload:
        upload = await self._state.get(validate_upload_id(upload_id))
        # Another trust's upload reads exactly like a missing one.
        if upload is None or upload.trust != trust:
            raise NotFound("no such upload")
        return upload

    async def get(self, trust: str, upload_id: str) -> Upload:
        """The upload, or 404 (unknown, another trust's, terminated) or 410 (expired)."""
        upload = await self._find(trust, upload_id)
        if self._clock() >= upload.expires_at and not upload.state.ingest_pending:
            raise Gone("the upload has expired")
        return upload

    # -- PATCH (§Core Protocol, §Checksum) ------------------------------------------------

    async def append(
        self,
        trust: str,
        upload_id: str,
        offset: int,
        body: AsyncIterator[bytes],
        *,
        declared: int | None = None,
        checksum: Checksum | None = None,
    ) -> Upload:
        """Store ``body`` at ``offset``; the upload as recorded afterwards. ``declared`` is
        the body length the client announced (Content-Length), if any."""
        upload = await self.get(trust, upload_id)
        if upload.concat is Concat.FINAL:
            raise Forbidden("a final upload cannot be patched (§Concatenation)")
        if upload.id in self._writing:
            raise OffsetMismatch("another request is writing to this upload", upload.offset)
        if offset != upload.offset:
            raise OffsetMismatch(
                f"Upload-Offset {offset} does not match the upload's offset {upload.offset}",
                upload.offset,
            )
        remaining = upload.length - offset
        if declared is not None and declared > remaining:
            raise PayloadTooLarge(
                f"a body of {declared} bytes at offset {offset} exceeds Upload-Length "
                f"{upload.length}"
            )
        self._writing.add(upload.id)
        try:
            return await self._append(upload, body, remaining, declared, checksum)
        finally:
            self._writing.discard(upload.id)

    async def _append(
        self,
        upload: Upload,
        body: AsyncIterator[bytes],
        remaining: int,
        declared: int | None,
        checksum: Checksum | None,
    ) -> Upload:
        # A sha256 checksum is computed by the writer, off the event loop.
        sha256 = checksum is not None and checksum.algorithm == "sha256"
        writer = await self._store.create(upload.trust, digest=sha256)
        try:
            digest = await _receive(writer, body, remaining, checksum)
        except BaseException:
            await writer.abort()
            raise
        received = writer.size
        short = declared is not None and received < declared
        if checksum is not None and (short or digest != checksum.digest):
            await writer.abort()
            if short:
                raise BadRequest(
                    f"the body ended after {received} of {declared} bytes; with "
                    "Upload-Checksum the chunk cannot be verified and was discarded"
                )
            raise ChecksumMismatch(f"the chunk does not match its {checksum.algorithm} checksum")
        if received == 0:
            await writer.abort()
            return upload
        try:
            await writer.commit()
        except BaseException:
            await writer.abort()
            raise
        updated = await self._record(upload, Chunk(upload.offset, received, writer.key))
        if short:
            raise BadRequest(
                f"the body ended after {received} of {declared} bytes; "
                f"those are stored (Upload-Offset {updated.offset})"
            )
        return updated

    async def _record(self, upload: Upload, chunk: Chunk) -> Upload:
        offset = chunk.start + chunk.length
        done = offset == upload.length
        state = _received_state(upload.concat) if done else UploadState.RECEIVING
        expires_at = self._clock() + self.limits.expiry
        try:
            await self._state.add_chunk(upload.id, chunk, state, expires_at)
        except StaleOffset:
            # Terminated, or moved on by a writer in another process, meanwhile.
            await self._store.delete(chunk.blob_key)
            current = await self._state.get(upload.id)
            if current is None:
                raise NotFound("no such upload") from None
            raise OffsetMismatch(
                "the upload moved on while this chunk was written", current.offset
            ) from None
        updated = dataclasses.replace(upload, offset=offset, state=state, expires_at=expires_at)
        if state is UploadState.VERIFYING:
            self.on_complete(updated)
        return updated

    # -- termination (§Termination) -------------------------------------------------------

    async def terminate(self, trust: str, upload_id: str) -> None:
        """Forget the upload and delete its bytes; a final upload takes its partials along."""
        upload = await self._find(trust, upload_id)
        if upload.joined_to is not None:
            raise Conflict(
                f"this partial upload belongs to final upload {upload.joined_to}; "
                "terminate that one"
            )
        if upload.state.ingest_pending:
            raise Conflict("the upload is being ingested; terminate it once its report is final")
        # State first: once it is gone nothing names the blobs, so deleting them is safe.
        for key in await self._state.delete([upload.id, *upload.parts]):
            await self._store.delete(key)

    # -- ingest (the service above drives it) --------------------------------------------

    async def pending_ingest(self) -> list[Upload]:
        """Uploads whose ingest was queued or running when the process stopped."""
        return await self._state.in_state(UploadState.VERIFYING, UploadState.INGESTING)

    async def begin_ingest(self, upload: Upload) -> Upload:
        await self._state.set_state(upload.id, UploadState.INGESTING)
        return dataclasses.replace(upload, state=UploadState.INGESTING)

    async def end_ingest(self, upload: Upload, state: UploadState, report: str) -> None:
        """Record the outcome and report of an ingest and delete the payload's chunks: what
        they held is now in the store, or was refused. The report lives ``expiry`` more."""
        expires_at = self._clock() + self.limits.expiry
        await self._state.set_state(upload.id, state, expires_at=expires_at, report=report)
        for key in await self._state.drop_chunks([upload.id, *upload.parts]):
            await self._store.delete(key)

    async def report(self, trust: str, upload_id: str) -> tuple[Upload, str | None]:
        """The upload and its stored ingest report (None before ingest ended)."""
        upload = await self.get(trust, upload_id)
        return upload, await self._state.report(upload.id)

    async def payload_pieces(self, upload: Upload) -> list[tuple[int, str]]:
        """(length, blob key) of each chunk in payload order: a final upload's partials in
        the order of its ``Upload-Concat``."""
        pieces: list[tuple[int, str]] = []
        for uid in upload.parts or (upload.id,):
            pieces += [(c.length, c.blob_key) for c in await self._state.chunks(uid)]
        return pieces

    async def open_payload(self, upload: Upload) -> ChunkedPayload:
        """The payload as one blocking, seekable file (for archive readers in worker
        threads); chunks are opened and decrypted only as reads reach them."""
        return ChunkedPayload(
            [
                (length, functools.partial(self._store.open_blocking, key))
                for length, key in await self.payload_pieces(upload)
            ]
        )

    async def read_payload(self, upload: Upload) -> AsyncIterator[bytes]:
        """The upload's bytes in order, decrypted chunk by chunk."""
        for _, key in await self.payload_pieces(upload):
            async for data in self._store.read(key):
                yield data

    # -- expiry (§Expiration) -------------------------------------------------------------

    async def sweep(self) -> int:
        """Remove expired uploads and their chunks; how many were removed."""
        removed = 0
        while expired := await self._state.expired(self._clock()):
            for upload in expired:
                for key in await self._state.delete([upload.id, *upload.parts]):
                    await self._store.delete(key)
            removed += len(expired)
        return removed

    async def blob_keys(self) -> set[str]:
        """Every blob an upload still needs."""
        return await self._state.blob_keys()


def _received_state(concat: Concat) -> UploadState:
    """Where an upload goes once all its bytes are stored: a partial waits to be joined,
    anything else awaits ingest."""
    return UploadState.COMPLETE if concat is Concat.PARTIAL else UploadState.VERIFYING


async def _receive(
    writer: BlobWriter, body: AsyncIterator[bytes], remaining: int, checksum: Checksum | None
) -> bytes | None:
    """Stream ``body`` into ``writer``, at most ``remaining`` bytes; the checksum digest."""
    # A writer asked for the SHA-256 computes it off the event loop.
    hasher = (
        hashlib.new(checksum.algorithm) if checksum and checksum.algorithm != "sha256" else None
    )
    async for data in body:
        if writer.size + len(data) > remaining:
            raise PayloadTooLarge(f"the body runs past Upload-Length ({remaining} bytes left)")
        if hasher is not None:
            hasher.update(data)
        await writer.write(data)
    if checksum is None:
        return None
    if hasher is not None:
        return hasher.digest()
    await writer.finish()
    return bytes.fromhex(writer.sha256)
