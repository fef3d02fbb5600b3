"""Exchange bundles pushed by partner gateways: checked, stored all or nothing, and answered
with a signed receipt (``docs/EXCHANGE.md``: "Receiving: the order of checks", "Receipts",
"Transport: pushing a bundle").

``UploadIngest`` hands over every completed upload of content type
``application/vnd.iex.bundle`` (a partner's head and data parts, joined by a final upload).
It is received in this order and refused at the first failure:

1. *identification*: the head's framing, the sender's signing key among the partners' keys
   on record, the signature, the manifest's fields, and that the bundle is for this gateway
   and the uploading trust. Until the bundle is identified nothing is recorded: the
   upload's report alone says why it was refused;
2. the agreement of the recipient trust with the sender's trust, with the ``receive`` right
   (or ``pull``: what a pull asked for comes back as a push);
3. the transfer id: the one the upload was created for, and the id of this gateway's
   inbound record of the transfer. The same bundle again (same sender, same manifest) is
   not stored again and its receipt stands; another bundle under a recorded id is refused,
   the record and its receipt staying those of the first, unless the first was refused
   (nothing of it stored) and this one comes in a new upload: the sender's retry, received
   afresh;
4. every instance decrypted as a stream, never to plaintext on disk, staged through the
   STOW-RS pipeline, then committed all or nothing into the recipient trust only.

From step 2 on, a refusal is answered with a signed ``refused`` receipt kept on the record
like a ``stored`` one, so the sender learns why by asking for it
(``GET /exchange/receipts/{transfer}``).

Crash safety: the record is made (``sending``) before anything is stored and the receipt
recorded after the commit. A gateway stopped in between finds the upload still ingesting at
its next start and receives it again: the record matches, the commit finds every instance
stored already (a safe retry), and the ``stored`` receipt counts them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, cast

from app.crypto.errors import KeyUnavailable, SignatureInvalid, UnknownKey
from app.crypto.exchange import AgreementPrivateKey, VerifyKey
from app.crypto.keystore import DataKeys
from app.dicom.media import DICOM
from app.dicom.multipart import PartData, PartEnd, PartEvent, PartStart
from app.dicom.uids import InstanceRef
from app.errors import BadRequest, Conflict, Forbidden, IexError, NotFound
from app.services.exchange_directory import ExchangeDirectory, Right
from app.services.ingest_progress import IngestProgress
from app.services.stow import FailedInstance, StoreResult, StowService
from app.services.transfers import TransferService
from app.transfer import canonical_json as cj
from app.transfer.bundle import (
    CHUNK,
    SignedManifest,
    VerifiedBundle,
    open_instances,
    read_head,
    verify,
)
from app.transfer.jobs import JobExists, JobState, TransferJob
from app.transfer.manifest import BundleError, BundleMisaddressed, Endpoint, Manifest
from app.transfer.receipts import MAX_REASON, Receipt, Result, sign_receipt
from app.transfer.threads import in_thread
from app.transfer.tus import ResumableUploads
from app.transfer.uploads import Upload

log = logging.getLogger(__name__)

#: Where an inbound record keeps the SHA-256 of the manifest it was made for, by which a
#: bundle arriving again is told from another one under the same transfer id.
MANIFEST_SHA256 = "manifest_sha256"
#: Where it keeps the upload that brought the bundle, for whoever looks into a record.
UPLOAD = "upload"

#: What identification refuses: the sender's mistakes, or an outsider's.
_UNIDENTIFIED = (BundleError, UnknownKey, SignatureInvalid)


@dataclass(frozen=True)
class BundleOutcome:
    """What became of a bundle, for the upload's report and the audit record."""

    stored: bool
    #: Why nothing was stored (``None`` when stored), for the upload's report.
    error: str | None
    #: For the upload's report: what the store made of the instances.
    result: StoreResult
    #: What the audit record rates the event as: 200 stored, 4xx refused, 5xx failed here.
    status: int
    #: The audit record's words: the bundle, its sender as far as known, what became of it.
    event: str
    #: The instances the event is about: those stored, or those a refused bundle listed.
    objects: tuple[InstanceRef, ...] = ()


@dataclass
class _Context:
    """A bundle once identified: what refusals and receipts need."""

    upload: Upload
    bundle: VerifiedBundle

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def trust(self) -> str:
        return self.upload.trust

    @property
    def what(self) -> str:
        sender = self.manifest.sender
        return (
            f"bundle {self.manifest.transfer} from trust {sender.trust} at partner {sender.gateway}"
        )

    @property
    def listed(self) -> tuple[InstanceRef, ...]:
        """The instances the manifest lists, as the audit trail names them."""
        study = self.manifest.study
        return tuple(
            InstanceRef(
                study,
                e.meta.series_instance_uid,
                e.meta.sop_instance_uid,
                e.meta.sop_class_uid,
            )
            for e in self.manifest.instances
        )


class BundleIngest:
    """Receives bundles into the uploading trust. ``gateway``: this gateway's name
    (``IEX_NAME``), which a bundle must be addressed to and a receipt names."""

    def __init__(
        self,
        uploads: ResumableUploads,
        stow: StowService,
        transfers: TransferService,
        directory: ExchangeDirectory,
        keys: DataKeys,
        gateway: str,
    ) -> None:
        self._uploads = uploads
        self._stow = stow
        self._transfers = transfers
        self._directory = directory
        self._keys = keys
        self._gateway = gateway

    async def ingest(self, upload: Upload, progress: IngestProgress) -> BundleOutcome:
        """Receive the bundle ``upload`` holds. Failures of this gateway while the bundle is
        not yet identified (its payload unreadable, say) raise; every other ending is an
        outcome."""
        payload = await self._uploads.open_payload(upload)
        progress.position = payload.tell
        try:
            # A raw file whose reads may come up short, which the bundle readers allow for.
            return await self._receive(upload, cast(IO[bytes], payload), progress)
        finally:
            await asyncio.to_thread(payload.close)

    async def _receive(
        self, upload: Upload, fp: IO[bytes], progress: IngestProgress
    ) -> BundleOutcome:
        try:
            signed = await in_thread(read_head, fp)
        except BundleError as exc:
            return _unidentified(exc, None)
        try:
            bundle = await self._identify(signed, upload.trust)
        except _UNIDENTIFIED as exc:
            return _unidentified(exc, signed)
        context = _Context(upload, bundle)
        sender = bundle.manifest.sender
        forbidden: Forbidden | None = None
        try:
            # What a pull asked for comes back as a push: ``pull`` admits it as ``receive``.
            await self._directory.require_any(
                upload.trust, sender.gateway, sender.trust, (Right.RECEIVE, Right.PULL)
            )
        except Forbidden as exc:
            forbidden = exc
        try:
            job = await self._arrival(context)
        except (BadRequest, Conflict) as exc:
            # No record can carry a receipt: the report says why (the first failure).
            return _unrecorded(context, forbidden or exc)
        if job.state.final:
            return _again(context, job)
        if forbidden is not None:
            return await self._refuse(context, forbidden.detail, forbidden.status_code)
        try:
            result = await self._store(context, fp, progress)
        except BundleError as exc:
            return await self._refuse(context, exc.detail, exc.status_code)
        except IexError as exc:
            if exc.status_code < 500:
                return await self._refuse(context, exc.detail, exc.status_code)
            log.error("%s: storing failed: %s", context.what, exc.detail)
            reason = f"the receiving gateway could not store the bundle: {exc.detail}"
            return await self._refuse(context, reason, exc.status_code)
        except Exception as exc:
            log.exception("%s: storing failed", context.what)
            reason = f"the receiving gateway could not store the bundle ({type(exc).__name__})"
            return await self._refuse(context, reason, 500)
        if result.failed:
            return await self._refuse(context, _failures(result.failed), 409, result)
        if not result.stored:
            return await self._refuse(context, "the bundle holds no instances", 400, result)
        return await self._deliver(context, job, result)

    # -- the steps ------------------------------------------------------------------------

    async def _identify(self, signed: SignedManifest, trust: str) -> VerifiedBundle:
        """The bundle once its signature verified against the key on record for the
        gateway it claims, and it is addressed to ``trust`` here."""
        claimed = signed.sender
        try:
            key: VerifyKey | None = (
                await self._directory.partner_signing_key(claimed.gateway, claimed.key)
            ).ed25519()
        except (Forbidden, NotFound):
            key = None  # no such partner, identity or key id: verify says UnknownKey

        def lookup(gateway: str, key_id: str) -> VerifyKey:
            if key is None or (gateway, key_id) != (claimed.gateway, claimed.key):
                raise LookupError(key_id)
            return key

        return await in_thread(verify, signed, lookup, gateway=self._gateway, trust=trust)

    async def _arrival(self, context: _Context) -> TransferJob:
        """The inbound record of the transfer: made now, or the one this bundle made when it
        arrived before. ``BadRequest``/``Conflict`` when the transfer id cannot be this
        bundle's record."""
        manifest = context.manifest
        transfer = manifest.transfer
        named = context.upload.metadata.transfer
        if transfer != named:
            raise BadRequest(
                f"bundle {transfer} was uploaded as transfer {named} (Upload-Metadata "
                "transfer): the two must be the same"
            )
        sender = manifest.sender
        try:
            return await self._transfers.record_arrival(
                context.trust,
                job_id=transfer,
                partner=sender.gateway,
                partner_trust=sender.trust,
                study=manifest.study,
                bytes_total=context.upload.length,
                checkpoint={
                    MANIFEST_SHA256: context.bundle.manifest_sha256,
                    UPLOAD: context.upload.id,
                },
            )
        except JobExists:
            pass
        taken = Conflict(f"transfer id {transfer} is already used by another transfer")
        try:
            job = await self._transfers.arrival(context.trust, transfer)
        except NotFound:
            raise taken from None  # another trust's, or an outbound one
        if (job.partner, job.partner_trust) != (sender.gateway, sender.trust):
            raise taken
        if job.state is JobState.FAILED and job.checkpoint.get(UPLOAD) != context.upload.id:
            # Refused before, so nothing of it is stored: the sender's retry, sent again in a
            # new upload once the cause was fixed, is received afresh.
            return await self._transfers.record_arrival_again(
                context.trust,
                transfer,
                checkpoint={
                    MANIFEST_SHA256: context.bundle.manifest_sha256,
                    UPLOAD: context.upload.id,
                },
                bytes_total=context.upload.length,
            )
        recorded = job.checkpoint.get(MANIFEST_SHA256)
        if recorded != context.bundle.manifest_sha256:
            raise Conflict(
                f"transfer {transfer} was received already with another manifest (SHA-256 "
                f"{recorded}): a transfer id names one bundle, sent again byte for byte"
            )
        return job

    async def _store(
        self, context: _Context, fp: IO[bytes], progress: IngestProgress
    ) -> StoreResult:
        private = await self._recipient_key(context)
        events = _instance_events(fp, context.bundle, private, progress)
        staging = await self._stow.stage(context.trust, events)
        return await self._stow.commit(context.trust, staging, all_or_nothing=True)

    async def _recipient_key(self, context: _Context) -> AgreementPrivateKey:
        """The private exchange key the bundle names, retired ones too (a bundle may have
        been sealed before a rotation), when it is the recipient trust's."""
        key_id = context.manifest.recipient.key
        try:
            key = await in_thread(self._keys.exchange_key_by_id, key_id)
        except KeyUnavailable:
            key = None
        if key is None or key.trust != context.trust:
            raise BundleMisaddressed(
                f"bundle {context.manifest.transfer} is sealed to exchange key {key_id!r}, "
                f"which is not a key of trust {context.trust!r}"
            )
        return key.private_key()

    async def _deliver(
        self, context: _Context, job: TransferJob, result: StoreResult
    ) -> BundleOutcome:
        count = len(result.stored)
        receipt = await self._receipt(context, "stored", count)
        await self._transfers.record_arrived(context.trust, job.id, receipt)
        again = f", {result.already_stored} of them stored already" if result.already_stored else ""
        event = f"{context.what} stored: {count} instances{again}; receipt sent"
        log.info("%s", event)
        return BundleOutcome(True, None, result, 200, event, tuple(result.stored))

    async def _refuse(
        self,
        context: _Context,
        reason: str,
        status: int,
        result: StoreResult | None = None,
    ) -> BundleOutcome:
        """Record the transfer refused with a signed ``refused`` receipt."""
        receipt = await self._receipt(context, "refused", 0, reason)
        await self._transfers.record_refused(
            context.trust, context.manifest.transfer, reason, receipt
        )
        event = f"{context.what} refused, receipt sent: {reason}"
        log.info("%s", event)
        return BundleOutcome(
            False,
            f"{reason}; nothing was stored",
            result or StoreResult(),
            status,
            event,
            context.listed,
        )

    async def _receipt(
        self, context: _Context, result: Result, instances: int, reason: str | None = None
    ) -> bytes:
        """The signed receipt for the bundle, from the recipient trust here."""
        signing = await asyncio.to_thread(self._keys.signing_key)
        receipt = Receipt(
            transfer=context.manifest.transfer,
            manifest_sha256=context.bundle.manifest_sha256,
            result=result,
            instances=instances,
            time=cj.timestamp(datetime.now(UTC)),
            receiver=Endpoint(self._gateway, context.trust, signing.id),
            reason=None if reason is None else reason[:MAX_REASON],
        )
        return sign_receipt(receipt, signing.private_key())


async def _instance_events(
    fp: IO[bytes], bundle: VerifiedBundle, private: AgreementPrivateKey, progress: IngestProgress
) -> AsyncGenerator[PartEvent]:
    """Each instance as the STOW-RS pipeline takes a part: ``PartStart``, its plaintext in
    ``PartData`` chunks, ``PartEnd``. An instance ends only once its reader returned the end
    without an error (its size and SHA-256 matched); a reader's error ends the stream, and
    staging then discards every instance staged."""
    readers = open_instances(fp, bundle, private)
    while (reader := await in_thread(lambda: next(readers, None))) is not None:
        sop = reader.entry.meta.sop_instance_uid
        location = f"instance {reader.index} ({sop})"
        yield PartStart({"content-type": DICOM, "content-location": location})
        while data := await in_thread(reader.read, CHUNK):
            yield PartData(data)
        progress.objects += 1
        yield PartEnd()


def _failures(failed: list[FailedInstance]) -> str:
    """Why the store refused instances, each named as the bundle lists it."""
    shown = [f"{f.source or f.sop_uid} cannot be stored: {f.detail}" for f in failed]
    text = "; ".join(shown)
    if len(text) <= MAX_REASON or len(shown) == 1:
        return text
    return f"{shown[0]} (and {len(shown) - 1} more)"


def _unidentified(exc: IexError, signed: SignedManifest | None) -> BundleOutcome:
    """A bundle refused before it was identified: the report says why, nothing else."""
    if signed is None:
        who = "a bundle"
    else:
        claimed = signed.sender
        who = (
            f"a bundle claiming to be from trust {claimed.trust} at gateway {claimed.gateway} "
            f"(key {claimed.key})"
        )
    event = f"{who} refused before it was identified: {exc.detail}"
    log.info("%s", event)
    return BundleOutcome(
        False, f"{exc.detail}; nothing was stored", StoreResult(), exc.status_code, event
    )


def _unrecorded(context: _Context, exc: IexError) -> BundleOutcome:
    """An identified bundle refused without a record (its transfer id cannot be one)."""
    event = f"{context.what} refused, no receipt: {exc.detail}"
    log.info("%s", event)
    return BundleOutcome(
        False,
        f"{exc.detail}; nothing was stored",
        StoreResult(),
        exc.status_code,
        event,
        context.listed,
    )


def _again(context: _Context, job: TransferJob) -> BundleOutcome:
    """The bundle arrived before and was received to the end: what was decided stands."""
    if job.state is JobState.DELIVERED:
        listed = context.listed
        result = StoreResult(stored=list(listed), already_stored=len(listed))
        event = f"{context.what} received again: stored before, its receipt stands"
        return BundleOutcome(True, None, result, 200, event, listed)
    why = job.last_error if job.state is JobState.FAILED else "it was cancelled here"
    event = f"{context.what} received again: refused before ({why}), its receipt stands"
    return BundleOutcome(
        False,
        f"transfer {job.id} was refused before: {why}; nothing was stored",
        StoreResult(),
        409,
        event,
        context.listed,
    )
