"""STOW-RS: store instances streamed in a request (PS3.18 §10.5), and the same pipeline for
uploads ingested whole.

Every part flows through one pipeline: stream to a staged blob while hashing, parse the
header off the event loop, validate (``stage``), then publish all good blobs and index them
in one transaction (``commit``). In a STOW-RS request a part's failure never stops the
others; an ingested upload is all or nothing: one failure and nothing is kept. Either way a
broken stream stores nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any

from app.dicom.instance import InstanceHeader, InvalidInstance, read_instance_header
from app.dicom.media import DICOM, parse_media_type
from app.dicom.multipart import PartData, PartEnd, PartEvent, PartStart, read_multipart
from app.dicom.status import FailureReason
from app.dicom.uids import InstanceRef
from app.errors import BadRequest, IexError
from app.storage.base import (
    AlreadyIndexed,
    BlobWriter,
    InstanceRecord,
    InstanceStore,
    MetadataIndex,
)

log = logging.getLogger(__name__)

#: Parts parsed concurrently while the next ones stream in.
PARSE_CONCURRENCY = 4
#: Plaintext compared at a time when an instance arrives under a SOP Instance UID in use.
COMPARE_CHUNK = 1024 * 1024


class AddOutcome(Enum):
    STORED = "stored"
    #: The same bytes were already stored under this SOP Instance UID: a safe retry.
    ALREADY_STORED = "already-stored"
    #: Different bytes already hold this SOP Instance UID; the original is kept.
    CONFLICT = "conflict"


@dataclass(frozen=True)
class StowLimits:
    max_instance_bytes: int
    bulk_data_threshold: int


@dataclass(frozen=True)
class FailedInstance:
    reason: FailureReason
    detail: str
    sop_uid: str | None = None
    sop_class_uid: str | None = None
    #: Where the object came from: the part's Content-Location (an archive member's name).
    source: str | None = None


@dataclass
class StoreResult:
    stored: list[InstanceRef] = field(default_factory=list)
    failed: list[FailedInstance] = field(default_factory=list)
    bytes_stored: int = 0
    #: Of ``stored``, how many were already there byte for byte (a retried store).
    already_stored: int = 0

    @property
    def http_status(self) -> int:
        """PS3.18 §10.5.3: 200 all stored, 202 some failed, 409 none stored."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def to_dicom_json(self, base_url: str, study_uid: str | None) -> dict[str, Any]:
        """The Store Instances Response dataset (PS3.18 Table 10.5.3-2)."""
        out: dict[str, Any] = {}
        studies = {s.study_uid for s in self.stored}
        target = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
        if target is not None:
            out["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{target}"]}
        if self.failed:
            out["00081198"] = {"vr": "SQ", "Value": [_failed_item(f) for f in self.failed]}
        if self.stored:
            out["00081199"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": {"vr": "UI", "Value": [s.sop_class_uid]},
                        "00081155": {"vr": "UI", "Value": [s.sop_uid]},
                        "00081190": {
                            "vr": "UR",
                            "Value": [
                                f"{base_url}/studies/{s.study_uid}/series/{s.series_uid}"
                                f"/instances/{s.sop_uid}"
                            ],
                        },
                    }
                    for s in self.stored
                ],
            }
        return out


def _failed_item(f: FailedInstance) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if f.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [f.sop_class_uid]}
    if f.sop_uid:
        item["00081155"] = {"vr": "UI", "Value": [f.sop_uid]}
    item["00081197"] = {"vr": "US", "Value": [int(f.reason)]}
    return item


@dataclass
class _Staged:
    writer: BlobWriter
    header: InstanceHeader
    source: str | None


@dataclass
class _Examining:
    writer: BlobWriter
    task: asyncio.Task[_Staged | FailedInstance]


@dataclass
class Staging:
    """Parts received and examined but not yet stored: blobs staged, nothing published."""

    staged: list[_Staged]
    #: Parts that cannot be stored, in the order they arrived.
    failed: list[FailedInstance]


class StowService:
    def __init__(self, store: InstanceStore, index: MetadataIndex, limits: StowLimits) -> None:
        self._store = store
        self._index = index
        self._limits = limits

    async def store_multipart(
        self,
        trust: str,
        chunks: AsyncIterator[bytes],
        boundary: str,
        study_uid: str | None,
    ) -> StoreResult:
        return await self._run(trust, read_multipart(chunks, boundary), study_uid)

    async def store_single(
        self, trust: str, chunks: AsyncIterator[bytes], study_uid: str | None
    ) -> StoreResult:
        async def as_one_part() -> AsyncGenerator[PartEvent]:
            started = False
            async for chunk in chunks:
                if not chunk:
                    continue
                if not started:
                    started = True
                    yield PartStart({"content-type": DICOM})
                yield PartData(chunk)
            if not started:
                raise BadRequest("the request body is empty")
            yield PartEnd()

        return await self._run(trust, as_one_part(), study_uid)

    async def _run(
        self, trust: str, events: AsyncGenerator[PartEvent], study_uid: str | None
    ) -> StoreResult:
        return await self.commit(trust, await self.stage(trust, events, study_uid))

    async def stage(
        self, trust: str, events: AsyncGenerator[PartEvent], study_uid: str | None = None
    ) -> Staging:
        """Receive every part into a staged blob and examine it; publish nothing.

        Any exception (a broken body, a client that went away, a size limit, a disk
        error, cancellation) discards every staged blob before it propagates.
        """
        failed: list[FailedInstance] = []
        examined: list[_Examining] = []
        try:
            await self._receive(trust, events, study_uid, examined, failed)
            outcomes = await asyncio.gather(*(e.task for e in examined))
        except BaseException:
            await _abort_all(examined)
            raise
        finally:
            # Close the body now, not whenever the garbage collector gets to it.
            await events.aclose()
        # Failures above keep arrival order among themselves; staged parts keep theirs.
        failed.extend(o for o in outcomes if isinstance(o, FailedInstance))
        return Staging([o for o in outcomes if isinstance(o, _Staged)], failed)

    async def discard(self, staging: Staging) -> None:
        """Forget a staging that will not be committed."""
        await self._discard([s.writer for s in staging.staged])

    async def commit(
        self, trust: str, staging: Staging, *, all_or_nothing: bool = False
    ) -> StoreResult:
        """Publish the staged blobs and index them in one transaction.

        With ``all_or_nothing`` a single failure (staged or found while indexing, such as a
        conflicting SOP Instance UID) stores nothing: the result then lists the failures and
        no stored instance.
        """
        result = StoreResult(failed=list(staging.failed))
        staged = staging.staged
        if all_or_nothing and result.failed:
            await self.discard(staging)
            return result
        try:
            await self._publish(staged)
            outcomes = await self._add(trust, staged, all_or_nothing)
        except BaseException:
            # Published but never indexed: unreachable, so remove them again.
            await self._discard([s.writer for s in staged])
            raise
        if all_or_nothing and AddOutcome.CONFLICT in outcomes:
            # Nothing was indexed: the transaction rolled back.
            await self._discard([s.writer for s in staged])
            result.failed += [
                _conflict(s)
                for s, o in zip(staged, outcomes, strict=True)
                if o is AddOutcome.CONFLICT
            ]
            return result
        assert None not in outcomes  # every instance was indexed or found in place
        for s, outcome in zip(staged, outcomes, strict=True):
            h = s.header
            if outcome is AddOutcome.STORED:
                result.bytes_stored += s.writer.size
            else:
                await self._delete_unreferenced(s.writer.key)
            if outcome is AddOutcome.CONFLICT:
                result.failed.append(_conflict(s))
            else:
                result.already_stored += outcome is AddOutcome.ALREADY_STORED
                result.stored.append(
                    InstanceRef(h.study_uid, h.series_uid, h.sop_uid, h.sop_class_uid)
                )
        return result

    async def _add(
        self, trust: str, staged: list[_Staged], all_or_nothing: bool
    ) -> list[AddOutcome | None]:
        """Index the published blobs; an instance whose SOP Instance UID is in use is a
        retry when its bytes equal those stored, else a conflict.

        All or nothing, the index rolls back when any SOP Instance UID is in use; once those
        all turn out to be retries, the others are added again (which another request may
        have got to first meanwhile, so the same again). ``None``: not indexed, because
        another instance conflicted.
        """
        records = [InstanceRecord(trust, s.header, s.writer.key, s.writer.size) for s in staged]
        outcomes: list[AddOutcome | None] = [None] * len(staged)
        pending = list(range(len(staged)))
        while pending:
            found = await self._index.add_instances(
                [records[i] for i in pending], all_or_nothing=all_or_nothing
            )
            rolled_back = all_or_nothing and any(found)
            for i, existing in zip(pending, found, strict=True):
                if existing is not None:
                    outcomes[i] = await self._retry_or_conflict(staged[i], existing)
                elif not rolled_back:
                    outcomes[i] = AddOutcome.STORED
            if not rolled_back or AddOutcome.CONFLICT in outcomes:
                break
            pending = [i for i, existing in zip(pending, found, strict=True) if existing is None]
        return outcomes

    async def _retry_or_conflict(self, s: _Staged, existing: AlreadyIndexed) -> AddOutcome:
        """Compare, byte for byte, an instance with what is stored under its SOP Instance UID."""
        if s.writer.size != existing.size:
            return AddOutcome.CONFLICT
        try:
            same = await asyncio.to_thread(self._same_bytes, s.writer.key, existing.blob_key)
        except (IexError, OSError) as exc:
            log.warning(
                "SOP Instance UID %s: cannot compare with the object stored under it: %s",
                s.header.sop_uid,
                exc,
            )
            return AddOutcome.CONFLICT
        return AddOutcome.ALREADY_STORED if same else AddOutcome.CONFLICT

    def _same_bytes(self, key: str, other: str) -> bool:
        with self._store.open_blocking(key) as a, self._store.open_blocking(other) as b:
            while True:
                chunk = a.read(COMPARE_CHUNK)
                if chunk != b.read(COMPARE_CHUNK):
                    return False
                if not chunk:
                    return True

    async def _receive(
        self,
        trust: str,
        events: AsyncIterator[PartEvent],
        study_uid: str | None,
        examined: list[_Examining],
        failed: list[FailedInstance],
    ) -> None:
        """Stream each part to a staged blob and start examining it; fill ``examined``."""
        writer: BlobWriter | None = None
        rejected: FailedInstance | None = None
        source: str | None = None
        limit = self._limits.max_instance_bytes
        try:
            async for event in events:
                if isinstance(event, PartData):
                    if writer is None:
                        continue  # a rejected part: read past it
                    if writer.size + len(event.data) > limit:
                        await writer.abort()
                        writer = None
                        rejected = FailedInstance(
                            FailureReason.OUT_OF_RESOURCES,
                            f"the object exceeds the limit of {limit} bytes",
                            source=source,
                        )
                        continue
                    await writer.write(event.data)
                elif isinstance(event, PartStart):
                    source = event.headers.get("content-location")
                    rejected = _check_part_type(event.headers, source)
                    if rejected is None:
                        writer = await self._store.create(trust)
                elif writer is not None:  # PartEnd
                    task = asyncio.create_task(self._examine(writer, study_uid, source))
                    examined.append(_Examining(writer, task))
                    writer = None
                    await _bound([e.task for e in examined])
                else:
                    if rejected is not None:
                        failed.append(rejected)
                    rejected = None
        finally:
            if writer is not None:
                await writer.abort()

    async def _examine(
        self, writer: BlobWriter, study_uid: str | None, source: str | None
    ) -> _Staged | FailedInstance:
        try:
            header = await writer.finish_and_read(self._read_header)
        except InvalidInstance as exc:
            await writer.abort()
            return FailedInstance(exc.reason, exc.detail, source=source)
        except BaseException:
            await writer.abort()
            raise
        if study_uid is not None and header.study_uid != study_uid:
            await writer.abort()
            return FailedInstance(
                FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"Study Instance UID {header.study_uid} differs from {study_uid} in the URL",
                header.sop_uid,
                header.sop_class_uid,
                source,
            )
        return _Staged(writer, header, source)

    def _read_header(self, fp: IO[bytes]) -> InstanceHeader:
        return read_instance_header(fp, self._limits.bulk_data_threshold)

    async def _publish(self, staged: list[_Staged]) -> None:
        """Commit every blob; concurrently, so the filesystem can batch the fsyncs.

        Every commit settles before this returns or raises, even when cancelled, so that
        none is still renaming in a thread while the caller cleans up after a failure.
        """
        commits = [asyncio.create_task(s.writer.commit()) for s in staged]
        if not commits:
            return
        try:
            await asyncio.wait(commits)
        finally:
            pending = [c for c in commits if not c.done()]
            if pending:
                await asyncio.wait(pending)
        for c in commits:
            error = c.exception()
            if error is not None:
                raise error

    async def _discard(self, writers: list[BlobWriter]) -> None:
        for w in writers:
            try:
                await w.abort()
            except Exception:
                log.exception("could not remove staged blob %s", w.key)
            await self._delete_unreferenced(w.key)

    async def _delete_unreferenced(self, key: str) -> None:
        # Best effort: a blob the index does not reference is never served, only wasted.
        try:
            await self._store.delete(key)
        except Exception:
            log.exception("could not remove unreferenced blob %s", key)


def _check_part_type(headers: dict[str, str], source: str | None) -> FailedInstance | None:
    raw = headers.get("content-type")
    if raw is None:
        return None  # the root "type" parameter applies (RFC 2387 §3.1)
    media = parse_media_type(raw)
    if media is None or media.mime != DICOM:
        return FailedInstance(
            FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
            f"part media type {raw[:100]!r} is not {DICOM}",
            source=source,
        )
    return None


def _conflict(s: _Staged) -> FailedInstance:
    return FailedInstance(
        FailureReason.DUPLICATE_SOP_INSTANCE,
        "a different object is already stored under this SOP Instance UID",
        s.header.sop_uid,
        s.header.sop_class_uid,
        s.source,
    )


async def _bound(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for the oldest parses when too many are in flight, so staging stays bounded."""
    running = [t for t in tasks if not t.done()]
    if len(running) >= PARSE_CONCURRENCY:
        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)


async def _abort_all(examined: list[_Examining]) -> None:
    """Stop examining and discard every staged blob.

    The writers are aborted here rather than by the tasks: a task cancelled before it
    first ran never executes its own clean-up.
    """
    for e in examined:
        e.task.cancel()
    await asyncio.gather(*(e.task for e in examined), return_exceptions=True)
    for e in examined:
        try:
            await e.writer.abort()
        except Exception:
            log.exception("could not remove staged blob %s", e.writer.key)
