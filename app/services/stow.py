"""STOW-RS: store instances streamed in a request (PS3.18 §10.5).

Every part flows through one pipeline: stream to a staged blob while hashing, parse the
header off the event loop, validate, then publish all good blobs and index them in one
transaction. A part's failure never stops the others; a broken request stores nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from app.dicom.instance import InstanceHeader, InvalidInstance, read_instance_header
from app.dicom.media import DICOM, parse_media_type
from app.dicom.multipart import PartData, PartEnd, PartStart, read_multipart
from app.dicom.status import FailureReason
from app.storage.base import AddOutcome, BlobWriter, InstanceRecord, InstanceStore, MetadataIndex

#: Parts parsed concurrently while the next ones stream in.
PARSE_CONCURRENCY = 4


@dataclass(frozen=True)
class StowLimits:
    max_instance_bytes: int
    bulk_data_threshold: int


@dataclass(frozen=True)
class StoredInstanceRef:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class FailedInstance:
    reason: FailureReason
    detail: str
    sop_uid: str | None = None
    sop_class_uid: str | None = None


@dataclass
class StoreResult:
    stored: list[StoredInstanceRef] = field(default_factory=list)
    failed: list[FailedInstance] = field(default_factory=list)
    bytes_stored: int = 0

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
    sha256: str
    header: InstanceHeader


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
        async def as_one_part() -> AsyncIterator[PartStart | PartData | PartEnd]:
            yield PartStart({"content-type": DICOM})
            async for chunk in chunks:
                yield PartData(chunk)
            yield PartEnd()

        return await self._run(trust, as_one_part(), study_uid)

    async def _run(
        self,
        trust: str,
        events: AsyncIterator[PartStart | PartData | PartEnd],
        study_uid: str | None,
    ) -> StoreResult:
        result = StoreResult()
        examined: list[asyncio.Task[_Staged | FailedInstance]] = []
        writer: BlobWriter | None = None
        hasher = hashlib.sha256()
        rejected: FailedInstance | None = None
        try:
            async for event in events:
                if isinstance(event, PartData):
                    if writer is None:
                        continue
                    if writer.size + len(event.data) > self._limits.max_instance_bytes:
                        await writer.abort()
                        writer = None
                        rejected = FailedInstance(
                            FailureReason.OUT_OF_RESOURCES,
                            f"the object exceeds the limit of {self._limits.max_instance_bytes}"
                            " bytes",
                        )
                        continue
                    hasher.update(event.data)
                    await writer.write(event.data)
                elif isinstance(event, PartStart):
                    rejected = _check_part_type(event.headers)
                    if rejected is None:
                        writer = await self._store.create()
                        hasher = hashlib.sha256()
                elif isinstance(event, PartEnd):
                    if writer is not None:
                        examined.append(
                            asyncio.create_task(
                                self._examine(writer, hasher.hexdigest(), study_uid)
                            )
                        )
                        writer = None
                        await _bound(examined)
                    elif rejected is not None:
                        result.failed.append(rejected)
                    rejected = None
            outcomes = await asyncio.gather(*examined)
        except BaseException:
            if writer is not None:
                await writer.abort()
            await _abort_all(examined)
            raise

        staged = [o for o in outcomes if isinstance(o, _Staged)]
        result.failed.extend(o for o in outcomes if isinstance(o, FailedInstance))
        # Failures above keep request order among themselves; stored parts keep theirs.
        try:
            for s in staged:
                await s.writer.commit()
            added = await self._index.add_instances(
                [
                    InstanceRecord(trust, s.header, s.writer.key, s.writer.size, s.sha256)
                    for s in staged
                ]
            )
        except BaseException:
            for s in staged:
                await self._store.delete(s.writer.key)
            raise
        for s, outcome in zip(staged, added, strict=True):
            h = s.header
            if outcome is AddOutcome.STORED:
                result.bytes_stored += s.writer.size
            else:
                await self._store.delete(s.writer.key)
            if outcome is AddOutcome.CONFLICT:
                result.failed.append(
                    FailedInstance(
                        FailureReason.DUPLICATE_SOP_INSTANCE,
                        "a different object is already stored under this SOP Instance UID",
                        h.sop_uid,
                        h.sop_class_uid,
                    )
                )
            else:
                result.stored.append(
                    StoredInstanceRef(h.study_uid, h.series_uid, h.sop_uid, h.sop_class_uid)
                )
        return result

    async def _examine(
        self, writer: BlobWriter, sha256: str, study_uid: str | None
    ) -> _Staged | FailedInstance:
        try:
            await writer.finish()
            header = await asyncio.to_thread(self._parse, writer)
        except InvalidInstance as exc:
            await writer.abort()
            return FailedInstance(exc.reason, exc.detail)
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
            )
        return _Staged(writer, sha256, header)

    def _parse(self, writer: BlobWriter) -> InstanceHeader:
        with writer.open_staged() as fp:
            return read_instance_header(fp, self._limits.bulk_data_threshold)


def _check_part_type(headers: dict[str, str]) -> FailedInstance | None:
    raw = headers.get("content-type")
    if raw is None:
        return None  # the root "type" parameter applies (RFC 2387 §3.1)
    media = parse_media_type(raw)
    if media is None or media.mime != DICOM:
        return FailedInstance(
            FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
            f"part media type {raw[:100]!r} is not {DICOM}",
        )
    return None


async def _bound(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for the oldest parses when too many are in flight, so staging stays bounded."""
    running = [t for t in tasks if not t.done()]
    if len(running) >= PARSE_CONCURRENCY:
        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)


async def _abort_all(tasks: list[asyncio.Task[_Staged | FailedInstance]]) -> None:
    for t in tasks:
        t.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, _Staged):
            await outcome.writer.abort()
