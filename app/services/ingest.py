"""Ingest of completed resumable uploads: each payload becomes stored instances, all or nothing.

When the last byte of an upload is stored the tus engine hands the upload here. One worker
takes uploads in the order they completed and moves each through the states of its report:

* ``verifying``: queued; when ``Upload-Metadata`` gave the payload's ``sha256``, the whole
  payload is read back once and must match it;
* ``ingesting``: the payload (zip, tar or multipart/related) is unpacked as a stream, never
  to plaintext on disk, and every DICOM object goes through the STOW-RS pipeline: staged
  encrypted, parsed, validated. A partner's exchange bundle is checked and decrypted as a
  stream into the same pipeline, and answered with a signed receipt (``BundleIngest``);
* ``complete``: every object was stored (or was already there byte for byte) in one index
  transaction, so the study appears in QIDO-RS whole or not at all;
* ``failed``: nothing was stored; the report says which object failed and why, or what was
  wrong with the payload as a whole.

Either way the payload's chunks are then deleted and the report kept until the upload
expires. A crash during ingest leaves the upload ``verifying`` or ``ingesting``; it is
ingested again at the next start, which is safe because storing is idempotent and the
commit is a single transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.crypto.errors import IntegrityError
from app.dicom.multipart import (
    MAX_BOUNDARY_LENGTH,
    PartEnd,
    PartEvent,
    PartStart,
    read_multipart,
)
from app.dicom.status import DESCRIPTIONS
from app.errors import AuditUnavailable, BadRequest, IexError
from app.filelock import FileLock
from app.services.audit import AccessFacts, AuditTrail
from app.services.bundle_ingest import BundleIngest, BundleOutcome
from app.services.ingest_progress import IngestProgress
from app.services.stow import FailedInstance, StoreResult, StowService
from app.transfer.archives import ArchiveLimits, NonDicomPolicy, SkippedMember, archive_events
from app.transfer.tus import ResumableUploads
from app.transfer.uploads import BUNDLE, DICOM_MULTIPART, Upload, UploadState

log = logging.getLogger(__name__)

#: Seconds between looks for uploads that another process of the gateway received.
INGEST_POLL = 1.0

#: Bytes read at the start of a multipart payload to find its boundary when none was given:
#: the longest boundary line accepted, with room for transport padding.
_BOUNDARY_SNIFF = MAX_BOUNDARY_LENGTH + 64


@dataclass(frozen=True)
class IngestPolicy:
    archive: ArchiveLimits
    non_dicom: NonDicomPolicy


@dataclass
class _Outcome:
    state: UploadState
    error: str | None = None
    result: StoreResult = field(default_factory=StoreResult)
    skipped: list[SkippedMember] = field(default_factory=list)
    #: What became of a bundle, which its audit record tells in words.
    bundle: BundleOutcome | None = None

    def to_json(self) -> str:
        result = self.result
        studies: dict[str, list[str | None]] = {}
        for ref in result.stored:
            studies.setdefault(ref.study_uid, []).append(ref.sop_uid)
        return json.dumps(
            {
                "finished_at": time.time(),
                "error": self.error,
                "counts": {
                    "stored": len(result.stored) - result.already_stored,
                    "already_stored": result.already_stored,
                    "failed": len(result.failed),
                    "skipped": len(self.skipped),
                },
                "studies": [{"study_uid": s, "instances": i} for s, i in studies.items()],
                "failures": [_failure(f) for f in result.failed],
                "skipped": [{"member": s.name, "reason": s.reason} for s in self.skipped],
            }
        )


def _failure(f: FailedInstance) -> dict[str, Any]:
    return {
        "member": f.source,
        "reason": DESCRIPTIONS[f.reason],
        "code": int(f.reason),
        "detail": f.detail,
        "sop_uid": f.sop_uid,
    }


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class UploadIngest:
    def __init__(
        self,
        uploads: ResumableUploads,
        stow: StowService,
        audit: AuditTrail,
        policy: IngestPolicy,
        turn: FileLock,
        bundles: BundleIngest,
    ) -> None:
        self._uploads = uploads
        self._stow = stow
        self._audit = audit
        self._policy = policy
        self._turn = turn
        self._bundles = bundles
        self._queue: asyncio.Queue[Upload] = asyncio.Queue()
        self._queued: set[str] = set()
        self._progress: dict[str, IngestProgress] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- running --------------------------------------------------------------------------

    async def start(self) -> None:
        """Ingest in the background, in whichever process of the gateway holds ``turn``.

        The ingesting process takes up uploads a previous run left queued or half-ingested,
        and those that other processes received. The others wait for their turn, which
        comes when the ingesting process is gone (however it ended).
        """
        self._tasks = [
            asyncio.create_task(self._work(), name="upload-ingest"),
            asyncio.create_task(self._watch(), name="upload-ingest-watch"),
        ]

    def submit(self, upload: Upload) -> None:
        """Ingest ``upload`` soon: at once here when this process ingests, else when the
        process that does next looks for pending uploads."""
        if self._turn.held and upload.id not in self._queued:
            self._queued.add(upload.id)
            self._queue.put_nowait(upload)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._turn.release()

    async def _watch(self) -> None:
        while True:
            try:
                if self._turn.held or await asyncio.to_thread(self._turn.acquire):
                    for upload in await self._uploads.pending_ingest():
                        self.submit(upload)
            except Exception:
                log.exception("looking for uploads to ingest failed")
            await asyncio.sleep(INGEST_POLL)

    async def _work(self) -> None:
        while True:
            upload = await self._queue.get()
            try:
                if await self._still_pending(upload):
                    await self._ingest(upload)
            except Exception:
                # Not even the failure could be recorded (the state database is down): the
                # upload stays pending and is taken up again at the next start.
                log.exception("ingest of upload %s could not be recorded", upload.id)
            finally:
                self._queued.discard(upload.id)

    async def _still_pending(self, upload: Upload) -> bool:
        """Whether ``upload`` awaits ingest now: a list of pending uploads read a moment
        ago may name one that has been ingested since."""
        try:
            current = await self._uploads.get(upload.trust, upload.id)
        except IexError:
            return False  # terminated or gone meanwhile
        return current.state.ingest_pending

    # -- one upload -----------------------------------------------------------------------

    async def _ingest(self, upload: Upload) -> None:
        progress = self._progress[upload.id] = IngestProgress()
        try:
            outcome = await self._outcome(upload, progress)
        finally:
            del self._progress[upload.id]
        # The record is durable before the outcome is: no report says complete (or failed)
        # of an ingest that the trail does not hold.
        await self._record(_access(upload, outcome))
        await self._uploads.end_ingest(upload, outcome.state, outcome.to_json())
        if outcome.state is UploadState.COMPLETE:
            log.info("upload %s ingested: %d objects stored", upload.id, len(outcome.result.stored))
        else:
            log.info("upload %s failed: %s", upload.id, outcome.error)

    async def _outcome(self, upload: Upload, progress: IngestProgress) -> _Outcome:
        try:
            if upload.metadata.sha256 is not None:
                digest = await self._digest(upload, progress)
                if digest != upload.metadata.sha256:
                    return _Outcome(
                        UploadState.FAILED,
                        f"the payload's sha256 is {digest}, but Upload-Metadata gave "
                        f"{upload.metadata.sha256}; nothing was stored",
                    )
            upload = await self._uploads.begin_ingest(upload)
            return await self._store(upload, progress)
        except IntegrityError:
            log.error("upload %s: a stored chunk failed its integrity check", upload.id)
            return _Outcome(
                UploadState.FAILED,
                "a stored chunk of this upload failed its integrity check (altered on the "
                "gateway's disk); nothing was stored, upload it again",
            )
        except IexError as exc:
            if exc.status_code >= 500:
                log.error("upload %s: ingest failed: %s", upload.id, exc.detail)
                return _Outcome(
                    UploadState.FAILED, f"the gateway could not ingest the upload: {exc.detail}"
                )
            return _Outcome(UploadState.FAILED, f"{exc.detail}; nothing was stored")
        except Exception as exc:
            log.exception("upload %s: ingest failed", upload.id)
            return _Outcome(
                UploadState.FAILED,
                f"the gateway could not ingest the upload ({type(exc).__name__}); "
                "nothing was stored",
            )

    async def _digest(self, upload: Upload, progress: IngestProgress) -> str:
        hasher = hashlib.sha256()
        done = 0
        progress.position = lambda: done
        async for data in self._uploads.read_payload(upload):
            # Hashing a megabyte holds the GIL for about a millisecond: fine on the loop.
            hasher.update(data)
            done += len(data)
        return hasher.hexdigest()

    async def _store(self, upload: Upload, progress: IngestProgress) -> _Outcome:
        skipped: list[SkippedMember] = []
        kind = upload.metadata.content_type
        if kind == BUNDLE:
            received = await self._bundles.ingest(upload, progress)
            state = UploadState.COMPLETE if received.stored else UploadState.FAILED
            return _Outcome(state, received.error, received.result, bundle=received)
        if kind == DICOM_MULTIPART:
            events = self._multipart_events(upload, progress)
            staging = await self._stow.stage(upload.trust, _observed(events, progress))
        else:
            assert kind is not None  # creation refuses an upload without one
            fp = await self._uploads.open_payload(upload)
            try:
                progress.position = fp.tell
                events = archive_events(
                    fp, kind, self._policy.archive, self._policy.non_dicom, skipped
                )
                staging = await self._stow.stage(upload.trust, _observed(events, progress))
            finally:
                await asyncio.to_thread(fp.close)
        result = await self._stow.commit(upload.trust, staging, all_or_nothing=True)
        if result.failed:
            count = len(result.failed)
            return _Outcome(
                UploadState.FAILED,
                f"{count} object{'s' if count > 1 else ''} of the upload cannot be stored "
                "(see failures); nothing was stored",
                result,
                skipped,
            )
        if not result.stored:
            return _Outcome(
                UploadState.FAILED, "the upload holds no DICOM objects", result, skipped
            )
        return _Outcome(UploadState.COMPLETE, None, result, skipped)

    async def _multipart_events(
        self, upload: Upload, progress: IngestProgress
    ) -> AsyncGenerator[PartEvent]:
        read = 0
        progress.position = lambda: read

        async def counted() -> AsyncIterator[bytes]:
            nonlocal read
            async for data in self._uploads.read_payload(upload):
                read += len(data)
                yield data

        chunks = counted()
        boundary = upload.metadata.boundary
        if boundary is None:
            boundary, chunks = await _sniff_boundary(chunks)
        async for event in read_multipart(chunks, boundary):
            yield event

    async def _record(self, facts: AccessFacts) -> None:
        """Append the ingest's record, waiting for the trail while it cannot be written.

        Nobody is waiting for an answer, so the ingest waits rather than fails: the upload
        stays ``ingesting`` meanwhile, and is ingested again at the next start if the
        gateway stops first (storing again is a safe retry).
        """
        waited = False
        while True:
            try:
                await self._audit.record(facts)
            except AuditUnavailable as exc:
                if not waited:
                    log.warning("ingest waits for the audit trail: %s", exc.detail)
                    waited = True
                await asyncio.sleep(INGEST_POLL)
            else:
                return

    # -- reports --------------------------------------------------------------------------

    async def report(self, trust: str, upload_id: str) -> dict[str, Any]:
        """What the upload is and what became of it (``GET …/report``)."""
        upload, stored = await self._uploads.report(trust, upload_id)
        view: dict[str, Any] = {
            "id": upload.id,
            "state": upload.state.value,
            "trust": upload.trust,
            "filename": upload.metadata.filename,
            "content_type": upload.metadata.content_type,
            "concat": upload.concat.value or None,
            "length": upload.length,
            "offset": upload.offset,
            "created_at": _iso(upload.created_at),
            "expires_at": _iso(upload.expires_at),
        }
        progress = self._progress.get(upload.id)
        view["progress"] = {
            "bytes_read": (
                upload.length
                if upload.state in (UploadState.COMPLETE, UploadState.FAILED)
                else (progress.position() if progress else 0)
            ),
            "bytes_total": upload.length,
            "objects_seen": progress.objects if progress else None,
        }
        outcome: dict[str, Any] = json.loads(stored) if stored else {}
        view["finished_at"] = _iso(outcome["finished_at"]) if "finished_at" in outcome else None
        view["counts"] = outcome.get(
            "counts", {"stored": 0, "already_stored": 0, "failed": 0, "skipped": 0}
        )
        for key in ("studies", "failures", "skipped"):
            view[key] = outcome.get(key, [])
        view["error"] = outcome.get("error")
        return view


def _access(upload: Upload, outcome: _Outcome) -> AccessFacts:
    """One record per ingest: DICOM Instances Transferred into the trust (PS3.15 A.5.3), by
    whoever created the upload; a failure is a serious failure with the reason. A bundle's
    record says in words from which partner it came and what became of it."""
    bundle = outcome.bundle
    if bundle is not None:
        return AccessFacts(
            at=time.time(),
            method="INGEST",
            route="/transfers/uploads/{upload_id}",
            status=bundle.status,
            client=None,
            actor=upload.actor,
            trust=upload.trust,
            kind="store",
            objects=bundle.objects,
            bytes_received=upload.length,
            reason=outcome.error,
            description=bundle.event,
        )
    return AccessFacts(
        at=time.time(),
        method="INGEST",
        route="/transfers/uploads/{upload_id}",
        status=200 if outcome.state is UploadState.COMPLETE else 409,
        client=None,
        actor=upload.actor,
        trust=upload.trust,
        kind="store",
        objects=outcome.result.stored,
        bytes_received=upload.length,
        reason=outcome.error,
    )


async def _observed(
    events: AsyncGenerator[PartEvent], progress: IngestProgress
) -> AsyncGenerator[PartEvent]:
    """Count objects, and name each part that has no Content-Location by its position, so a
    report can always say which object failed."""
    parts = 0
    try:
        async for event in events:
            if isinstance(event, PartStart):
                parts += 1
                if "content-location" not in event.headers:
                    event = PartStart({**event.headers, "content-location": f"part {parts}"})
            elif isinstance(event, PartEnd):
                progress.objects += 1
            yield event
    finally:
        await events.aclose()


async def _sniff_boundary(
    chunks: AsyncIterator[bytes],
) -> tuple[str, AsyncIterator[bytes]]:
    """The boundary from the first delimiter line (RFC 2046 §5.1.1: ``--boundary CRLF``; a
    bare LF ends it too, as it does for the reader), and the stream with what was read put
    back."""
    head = b""
    async for data in chunks:
        head += data
        if b"\n" in head[:_BOUNDARY_SNIFF] or len(head) >= _BOUNDARY_SNIFF:
            break
    line, lf, _ = head[:_BOUNDARY_SNIFF].partition(b"\n")
    line = line.removesuffix(b"\r")
    if not lf or not line.startswith(b"--") or not line[2:].strip():
        raise BadRequest(
            "the multipart payload does not start with a boundary delimiter line; give the "
            "boundary in Upload-Metadata content-type"
        )
    boundary = line[2:].rstrip(b" \t").decode("latin-1")

    async def rest() -> AsyncIterator[bytes]:
        yield head
        async for data in chunks:
            yield data

    return boundary, rest()
