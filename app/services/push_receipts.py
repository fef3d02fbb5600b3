"""Waiting for a partner's receipt of a bundle sent, and verifying it: ``await_receipt``.

The last step of a push (``docs/EXCHANGE.md``, "Transport: pushing a bundle", 4 and 5). The
sender asks ``GET /exchange/receipts/<transfer>``:

- ``200``: the receipt document, verified here against the partner's signing keys on record
  before anything is recorded: ``stored`` delivers the transfer, ``refused`` fails it with
  the partner's reason, and one that does not verify fails it naming the key or the field;
- ``202``: still being verified or stored; asked again after its ``Retry-After``.

Each ask has the partner hold its answer (``?wait=``) until the receipt is there, so the
receipt comes back as soon as the partner stored the bundle, in one request;
- ``404``: the partner holds no bundle of that transfer for our trust (yet): the final
  upload's report says why. ``verifying`` or ``ingesting``: asked again later. ``failed``
  (before the bundle was identified: framing, an unknown key, a bad signature, misaddressed):
  the transfer fails with the partner's reason (``UploadFailed``). The upload gone: nothing
  was stored, and the bundle is sent again under a new final upload (``Resend``).

A lost receipt is only ever asked for again, never answered by sending the bundle again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from app.crypto.errors import SignatureInvalid, UnknownKey
from app.crypto.exchange import VerifyKey
from app.errors import IexError
from app.services.exchange_directory import ExchangeDirectory
from app.services.packaging import StagedBundle
from app.transfer.bundle import KeyLookup
from app.transfer.delivery import (
    Delivered,
    DeliveryOutcome,
    PermanentFailure,
    TransientFailure,
)
from app.transfer.jobs import TransferJob
from app.transfer.manifest import Endpoint
from app.transfer.receipts import MAX_RECEIPT_SIZE, ReceiptInvalid, verify_receipt
from app.transfer.tus_client import Fetched, TusClient, UploadGone, UploadRejected

RECEIPTS_PATH = "/exchange/receipts/"
#: How many reports in a row may say ``complete`` while the receipt is still missing (the
#: partner records the receipt before the report says so: a short race at most).
_COMPLETE_WITHOUT_RECEIPT = 5


@dataclass(frozen=True)
class Resend:
    """Send the bundle again: the partner no longer has the final upload and stored nothing."""


@dataclass(frozen=True)
class UploadFailed:
    """The partner's ingest of the final upload failed before it identified the bundle (so
    there is no receipt): ``reason`` is the partner's. The transfer fails; a retry sends
    the bundle again."""

    reason: str


@dataclass(frozen=True)
class ReceiptPolicy:
    #: Seconds between asks when the partner gives no ``Retry-After``.
    poll: float = 0.5
    #: The longest wait between two asks, whatever the partner says.
    max_wait: float = 30.0
    #: Seconds each ask has the partner hold its answer until the receipt is there
    #: (``?wait=``; a partner that does not know the parameter answers at once).
    hold: int = 20


async def await_receipt(
    client: TusClient,
    directory: ExchangeDirectory,
    job: TransferJob,
    bundle: StagedBundle,
    final: str,
    policy: ReceiptPolicy,
) -> DeliveryOutcome | Resend | UploadFailed:
    """Ask for the receipt of ``job`` (whose bundle went to the final upload ``final``)
    until the partner answers it, or says it never will."""
    partner = job.partner
    complete = 0
    while True:
        answer = await client.get(
            f"{RECEIPTS_PATH}{job.id}?wait={policy.hold}", max_bytes=MAX_RECEIPT_SIZE
        )
        if answer.status == 200:
            return await _verified(directory, job, bundle, answer.body)
        if answer.status == 202:
            await asyncio.sleep(_wait(answer, policy))
            continue
        if answer.status != 404:
            raise UploadRejected(
                f"asking partner {partner} for the receipt was refused ({answer.status}): "
                f"{answer.detail}",
                answer.status,
                answer.detail,
            )
        try:
            report = await client.report(final)
        except UploadGone:
            return Resend()
        if report.state == "failed":
            why = report.error or "no reason given"
            return UploadFailed(f"partner {partner} refused the bundle: {why}")
        if report.state == "complete":
            complete += 1
            if complete >= _COMPLETE_WITHOUT_RECEIPT:
                return TransientFailure(
                    f"partner {partner} reports the bundle's upload complete but has no "
                    f"receipt of transfer {job.id} for trust {job.partner_trust}"
                )
        await asyncio.sleep(policy.poll)


def _wait(answer: Fetched, policy: ReceiptPolicy) -> float:
    wanted = answer.retry_after if answer.retry_after is not None else policy.poll
    return max(min(wanted, policy.max_wait), min(policy.poll, 1.0))


async def _verified(
    directory: ExchangeDirectory, job: TransferJob, bundle: StagedBundle, document: bytes
) -> DeliveryOutcome:
    """Delivered with a receipt that verifies and says ``stored``; failed otherwise."""
    partner = job.partner
    lookup = await partner_keys(directory, partner)
    try:
        receipt = verify_receipt(
            document,
            lookup,
            expect_transfer=job.id,
            expect_manifest_sha256=bundle.manifest_sha256,
            # The key id is not compared: the receipt names the key that signed it.
            expect_receiver=Endpoint(partner, job.partner_trust, "any"),
        )
    except UnknownKey as exc:
        why = exc.detail
        if exc.gateway == partner:
            try:  # the directory says which keys it does have on record
                await directory.partner_signing_key(partner, exc.key_id)
            except IexError as known:
                why = known.detail
        return PermanentFailure(f"the receipt from partner {partner} cannot be verified: {why}")
    except (SignatureInvalid, ReceiptInvalid) as exc:
        return PermanentFailure(f"the receipt from partner {partner} is not valid: {exc.detail}")
    if receipt.result == "stored":
        return Delivered(document)
    return PermanentFailure(f"partner {partner} refused the transfer: {receipt.reason}")


async def partner_keys(directory: ExchangeDirectory, partner: str) -> KeyLookup:
    """The signing keys of ``partner`` on record (retired ones too), as a receipt or
    manifest verifier asks for them: ``LookupError`` for any other gateway or key id."""
    record = await directory.partner(partner)
    identity = record.identity

    def lookup(gateway: str, key_id: str) -> VerifyKey:
        key = identity.signing_key(key_id) if identity and gateway == partner else None
        if key is None:
            raise LookupError(key_id)
        return key.ed25519()

    return lookup
