"""Pushing a study to a partner trust: ``PartnerDelivery``, the ``Delivery`` of transfers.

``docs/EXCHANGE.md`` ("Transport: pushing a bundle") is the contract. A run of a transfer:

1. checks the agreement of the local trust with the partner trust (``send``, or ``pull``
   for a study a pull asked for) and finds how to call the partner (URL, the token it
   issued us, its TLS certificate's pin, the exchange key to seal to); nothing is sent
   without them, and their absence fails the transfer;
2. ``packaging``: stages the bundle in the outbox, its head in the checkpoint
   (``app.services.packaging``). A transfer found in ``packaging`` packages again from
   scratch, as does one whose staged file is gone before all of it was handed over;
3. ``sending``: the head and the data as partial uploads sent at once, then the final
   upload joining them (``app.services.push_parts``), its URL in the checkpoint;
4. ``awaiting-receipt``: asks for the receipt until the partner answers, and verifies it
   (``app.services.push_receipts``); a final upload the partner lost is sent again.

What a run records lets the next one resume where it stopped: the step, the checkpoint
(bundle head, parts, final upload), the bytes acknowledged.

Failures: the partner unreachable, failing (5xx) or slow is a ``TransientFailure`` (the
runner tries again after a backoff, until its retry window ends); a refusal that trying
again cannot change (no agreement, our token refused, a certificate that is not the pinned
one, the bundle or transfer refused, a receipt that does not verify) a ``PermanentFailure``
whose reason says what to do. The staged bundle is removed when the transfer is delivered
or fails here; the outbox sweep removes those of transfers cancelled or failed otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field

import httpx

from app.errors import IexError
from app.services.audit import AuditTrail
from app.services.exchange_directory import ExchangeDirectory, PartnerEndpoint, Right
from app.services.packaging import StagedBundle, StudyPackager
from app.services.push_parts import forget_parts, send_parts
from app.services.push_progress import PushRecorder
from app.services.push_receipts import ReceiptPolicy, Resend, UploadFailed, await_receipt
from app.services.transfer_audit import DELIVERED, FAILED, SENT, record_transfer, transfer_record
from app.transfer.delivery import (
    Delivered,
    DeliveryOutcome,
    JobProgress,
    JobStopped,
    PermanentFailure,
    TransientFailure,
)
from app.transfer.jobs import JobState, TransferJob
from app.transfer.outbox import Outbox
from app.transfer.pinning import PinMismatch, pinned_context
from app.transfer.sources import SourceError
from app.transfer.tus_client import (
    ProtocolError,
    RetriesExhausted,
    RetryPolicy,
    TusClient,
    UploadRejected,
)
from app.transfer.uploads import BUNDLE

log = logging.getLogger(__name__)

#: Final uploads one run makes for a bundle the partner keeps losing before it gives up.
_MAX_SENDS = 3


@dataclass(frozen=True)
class PushPolicy:
    #: Data parts sent at once, over as many connections (``IEX_EXCHANGE_STREAMS``).
    streams: int = 4
    #: Bytes per ``PATCH``; one is in memory per part being sent.
    chunk_size: int = 4 * 1024 * 1024
    #: How long the tus client keeps trying before a run ends in a transient failure (the
    #: runner's backoff and retry window take it from there).
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(attempts=4, initial_delay=0.5, max_delay=5.0)
    )
    timeout: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(60.0, connect=10.0))
    #: Seconds between records of the bytes acknowledged.
    report_every: float = 1.0
    receipts: ReceiptPolicy = field(default_factory=ReceiptPolicy)


class PartnerDelivery:
    """Delivers outbound transfers to partner gateways, as the gateway named ``gateway``."""

    def __init__(
        self,
        directory: ExchangeDirectory,
        packager: StudyPackager,
        outbox: Outbox,
        audit: AuditTrail,
        gateway: str,
        policy: PushPolicy | None = None,
    ) -> None:
        self._directory = directory
        self._packager = packager
        self._outbox = outbox
        self._audit = audit
        self._gateway = gateway
        self.policy = policy or PushPolicy()

    async def run(self, job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
        recorder = PushRecorder(progress)
        endpoint: PartnerEndpoint | None = None
        try:
            # What a pull asked for is sent as a push is, under the ``pull`` right.
            await self._directory.require_any(
                job.trust, job.partner, job.partner_trust, (Right.SEND, Right.PULL)
            )
            endpoint = await self._directory.endpoint(job.partner, job.partner_trust)
            outcome = await self._deliver(recorder, endpoint)
        except (JobStopped, asyncio.CancelledError):
            raise
        except Exception as exc:
            outcome = failure(job.partner, exc)
        if isinstance(outcome, TransientFailure):
            return outcome
        await asyncio.to_thread(self._outbox.remove, job.id)
        if isinstance(outcome, PermanentFailure):
            url = endpoint.url if endpoint else None
            await self._record(FAILED, recorder.job, url, reason=outcome.reason)
        return outcome

    async def _deliver(self, recorder: PushRecorder, endpoint: PartnerEndpoint) -> DeliveryOutcome:
        job = recorder.job
        bundle = StagedBundle.from_checkpoint(recorder.checkpoint.get("bundle"))
        final = recorder.checkpoint.get("final") if bundle is not None else None
        if not isinstance(final, str):
            final = None
        async with self._client(endpoint) as client:
            if bundle is None or job.state is JobState.PACKAGING:
                bundle, final = await self._package(recorder, endpoint), None
            for _ in range(_MAX_SENDS):
                if final is None:
                    if not await self._staged(job.id, bundle):
                        bundle = await self._package(recorder, endpoint)
                    final = await self._send(recorder, client, bundle, endpoint)
                else:
                    await recorder.advance(JobState.AWAITING_RECEIPT)
                answer = await await_receipt(
                    client, self._directory, recorder.job, bundle, final, self.policy.receipts
                )
                if isinstance(answer, UploadFailed):
                    # No receipt will ever come for this upload: a retry sends the bundle again.
                    recorder.checkpoint.pop("final", None)
                    await recorder.save()
                    return PermanentFailure(answer.reason)
                if not isinstance(answer, Resend):
                    if isinstance(answer, Delivered):
                        await self._record(DELIVERED, recorder.job, endpoint.url, bundle=bundle)
                    return answer
                log.info("transfer %s: the partner lost the bundle; sending it again", job.id)
                final = None
                recorder.checkpoint.pop("final", None)
                await recorder.save(bytes_sent=0)
        return TransientFailure(
            f"partner {job.partner} lost the bundle of transfer {job.id} {_MAX_SENDS} times"
        )

    # -- the steps --------------------------------------------------------------------------

    async def _package(self, recorder: PushRecorder, endpoint: PartnerEndpoint) -> StagedBundle:
        await recorder.advance(JobState.PACKAGING)
        bundle = await self._packager.package(recorder.job, endpoint.recipient)
        recorder.checkpoint = {"bundle": bundle.to_checkpoint()}
        await recorder.save(state=JobState.SENDING, bytes_sent=0, bytes_total=bundle.length)
        log.info("transfer %s: packaged (%d bytes)", recorder.job.id, bundle.length)
        return bundle

    async def _send(
        self,
        recorder: PushRecorder,
        client: TusClient,
        bundle: StagedBundle,
        endpoint: PartnerEndpoint,
    ) -> str:
        """Send the parts and make the final upload; its URL (recorded)."""
        job = recorder.job
        await recorder.advance(JobState.SENDING)
        metadata = {"content-type": BUNDLE, "transfer": job.id}
        for again in (False, True):
            urls = await send_parts(
                client,
                recorder,
                bundle,
                self._outbox.path(job.id),
                streams=self.policy.streams,
                report_every=self.policy.report_every,
            )
            try:
                final = await client.concatenate(urls, metadata)
                break
            except UploadRejected as exc:
                if exc.status != 400 or again:
                    raise
                # A part already joined: a final upload made by a run that stopped before
                # recording it. New parts make a new one (the same bundle again is answered
                # with the receipt of the first).
                forget_parts(recorder)
        recorder.checkpoint["final"] = final
        forget_parts(recorder)
        await recorder.save(state=JobState.AWAITING_RECEIPT, bytes_sent=bundle.length)
        await self._record(SENT, recorder.job, endpoint.url, bundle=bundle)
        return final

    # -- helpers ----------------------------------------------------------------------------

    async def _staged(self, job_id: str, bundle: StagedBundle) -> bool:
        """Whether the outbox holds the whole data section of ``bundle``."""

        def size() -> int | None:
            try:
                return self._outbox.path(job_id).stat().st_size
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(size) == bundle.data_length

    def _client(self, endpoint: PartnerEndpoint) -> TusClient:
        verify: ssl.SSLContext | bool = True
        if endpoint.tls_sha256 and endpoint.url.startswith("https://"):
            verify = pinned_context(endpoint.tls_sha256)
        return TusClient(
            endpoint.url,
            endpoint.token,
            chunk_size=self.policy.chunk_size,
            verify=verify,
            timeout=self.policy.timeout,
            retry=self.policy.retry,
        )

    async def _record(
        self,
        event: str,
        job: TransferJob,
        url: str | None,
        *,
        bundle: StagedBundle | None = None,
        reason: str | None = None,
    ) -> None:
        item = transfer_record(
            event,
            job,
            source=self._gateway,
            objects=bundle.instances() if bundle else (),
            partner_url=url,
            bytes_sent=bundle.length if bundle else None,
            reason=reason,
        )
        await record_transfer(self._audit, item)


def failure(partner: str, exc: BaseException) -> TransientFailure | PermanentFailure:
    """What a failure of a run means for the transfer, with a reason a person can act on."""
    pin = _cause(exc, PinMismatch)
    if pin is not None:
        return PermanentFailure(
            f"{pin}; if partner {partner} changed its certificate, import its current "
            f"identity: iex partner add {partner} --identity FILE"
        )
    if isinstance(exc, UploadRejected):
        if exc.status in (401, 403):
            return PermanentFailure(
                f"partner {partner} refused this gateway's token ({exc.status}: {exc.detail}); "
                f"is it expired or revoked? Add the new one it issues: "
                f"iex partner add {partner} --token-file FILE"
            )
        return PermanentFailure(f"partner {partner} refused the transfer: {exc}")
    if isinstance(exc, RetriesExhausted):
        return TransientFailure(f"partner {partner} is unreachable or failing: {exc}")
    if isinstance(exc, ProtocolError):
        return PermanentFailure(f"partner {partner} does not speak the exchange protocol: {exc}")
    if isinstance(exc, IexError):
        if exc.status_code < 500:
            return PermanentFailure(exc.detail)
        return TransientFailure(exc.detail)
    if isinstance(exc, SourceError):
        return TransientFailure(f"the staged bundle changed while it was sent: {exc}")
    if isinstance(exc, OSError):
        return TransientFailure(
            f"the bundle could not be staged or read: {exc.strerror or type(exc).__name__}"
        )
    if isinstance(exc, httpx.HTTPError):
        return TransientFailure(f"calling partner {partner} failed: {exc}")
    log.error("a transfer to %s failed unexpectedly", partner, exc_info=exc)
    return TransientFailure(f"the push failed unexpectedly ({type(exc).__name__})")


def _cause(exc: BaseException | None, kind: type[PinMismatch]) -> PinMismatch | None:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
