"""Audit records of requests between gateways: pulls and federated searches, on both sides.

These are queries over patient data made for another gateway, or by this gateway on a
user's behalf, so each is a Query event (PS3.15 A.5.3.12, EventID 110112) with the studies
it matched as participant objects and the query itself (redacted as QIDO-RS queries are:
identifiers kept, other values ``*``). A refusal (no agreement) is a Security Alert of Use
of Restricted Function, as a 403 is, even where the partner is answered as if nothing
matched. ``EventOutcomeDescription`` says in words what happened and with whom
(``pull answered: 2 studies queued for trust rad-a at gw-a``).

The records go through the audit trail like every other: the caller answers only once its
record is durable.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from app.dicom.uids import InstanceRef
from app.services.audit import AccessFacts, AuditTrail, build_record
from app.services.security import Principal


@dataclass(frozen=True)
class ExchangeEvent:
    """What one pull or search did, as the service saw it."""

    what: str
    route: str
    #: The HTTP status the caller is answered with.
    status: int
    studies: Sequence[str] = ()
    query: Sequence[tuple[str, str]] = ()
    #: Refused for want of an agreement (whatever the status says).
    refused: bool = False


async def record_exchange(trail: AuditTrail, principal: Principal, event: ExchangeEvent) -> None:
    """Append the record of ``event`` made by ``principal``; return once it is durable."""
    method, _, route = event.route.partition(" ")
    facts = AccessFacts(
        at=time.time(),
        method=method,
        route=route,
        status=403 if event.refused else event.status,
        client=principal.client,
        actor=principal.actor,
        trust=principal.trust,
        kind="query",
        objects=[InstanceRef(study) for study in event.studies],
        query=list(event.query),
        reason=event.what,
    )
    item = build_record(facts, trail.source)
    identification = item.record["EventIdentification"]
    identification["EventOutcomeDescription"] = event.what
    if not event.refused and event.status < 300:
        # An accepted pull (202) succeeded: nothing of it was partial.
        identification["EventOutcomeIndicator"] = "0"
    item.record["iex"]["status"] = event.status
    await trail.append(item)
