"""The audit records of a push, on the sending gateway: sent, delivered, failed.

Each is a DICOM Instances Transferred event (PS3.15 A.5.3.2, action ``R``: the instances
were read to be sent) in which this gateway is the source and the partner gateway the
destination, with the study, its series and instances, the partner's trust (Data
Destination) and the transfer (Job) as participant objects, as the record of the request
that created it names them, and ``EventOutcomeDescription`` saying what happened to which
transfer. The request that created the transfer has a record of its own, made when it was
answered.

A push runs in the background, so nobody waits for an answer that its record could hold
back; ``record_transfer`` waits for the trail instead, while it cannot be written (the
transfer holds its step meanwhile, and is run again from it if the gateway stops first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from app.dicom.uids import InstanceRef
from app.errors import AuditUnavailable
from app.services.audit import (
    DESTINATION_ROLE,
    INSTANCES_TRANSFERRED,
    SOURCE_ROLE,
    AuditTrail,
    TransferSubject,
    event_time,
    study_objects,
    transfer_objects,
)
from app.storage.security import AuditAppend
from app.transfer.jobs import TransferJob

log = logging.getLogger(__name__)

#: Seconds between attempts at a record while the trail cannot be written.
RETRY = 1.0

SENT = "transfer sent"
DELIVERED = "transfer delivered"
FAILED = "transfer failed"


def transfer_record(
    event: str,
    job: TransferJob,
    *,
    source: str,
    objects: Sequence[InstanceRef] = (),
    partner_url: str | None = None,
    bytes_sent: int | None = None,
    reason: str | None = None,
    at: float | None = None,
) -> AuditAppend:
    """The record of ``event`` (``SENT``, ``DELIVERED`` or ``FAILED``) of outbound ``job``,
    made by the gateway named ``source``; a failure is a serious one (``8``) with its
    ``reason``."""
    at = time.time() if at is None else at
    description = (
        f"{event}: transfer {job.id} of trust {job.trust} to trust {job.partner_trust} at "
        f"partner {job.partner}"
    )
    if reason:
        description += f": {reason}"
    partner: dict[str, Any] = {
        "UserID": f"partner:{job.partner}",
        "AlternativeUserID": job.partner_trust,
        "UserIsRequestor": False,
        "RoleIDCode": [DESTINATION_ROLE],
    }
    host = urlsplit(partner_url).hostname if partner_url else None
    if host:
        partner["NetworkAccessPointID"] = host
        partner["NetworkAccessPointTypeCode"] = "1"  # machine name or address as written
    record: dict[str, Any] = {
        "EventIdentification": {
            "EventID": INSTANCES_TRANSFERRED,
            "EventActionCode": "R",
            "EventDateTime": event_time(at),
            "EventOutcomeIndicator": "8" if event == FAILED else "0",
            "EventOutcomeDescription": description,
        },
        "ActiveParticipant": [
            {
                "UserID": source,
                "AlternativeUserID": job.trust,
                "UserIsRequestor": True,
                "RoleIDCode": [SOURCE_ROLE],
            },
            partner,
        ],
        "AuditSourceIdentification": {"AuditSourceID": source, "AuditSourceTypeCode": "4"},
        "ParticipantObjectIdentification": [
            *study_objects(objects or [InstanceRef(job.study)]),
            *transfer_objects(TransferSubject(job.partner, job.partner_trust, job.id)),
        ],
        "iex": {
            # Not an HTTP route: the push this gateway makes, and to whom.
            "route": f"PUSH partner:{job.partner}/{job.partner_trust}",
            "transfer": job.id,
            "trust": job.trust,
            "partner": job.partner,
            "partnerTrust": job.partner_trust,
            "bytesSent": bytes_sent,
        },
    }
    return AuditAppend(record, at, job.trust, source, (job.study,))


async def record_transfer(audit: AuditTrail, item: AuditAppend) -> None:
    """Append ``item``, waiting while the trail cannot be written (until cancelled)."""
    waited = False
    while True:
        try:
            await audit.append(item)
            return
        except AuditUnavailable as exc:
            if not waited:
                log.warning("a transfer waits for the audit trail: %s", exc.detail)
                waited = True
            await asyncio.sleep(RETRY)
