"""A trust asking to push one of its studies to a partner trust: ``PushService``.

Everything that can refuse a push is checked before anything is queued, so that a refused
push leaves nothing behind, not even a failed transfer, and not a byte leaves:

1. the request itself: the study's UID, the partner's and its trust's names, the priority
   (400, naming what is wrong);
2. the agreement: the trust must have one with the partner's trust allowing ``send``
   (403 saying what is missing; ``ExchangeDirectory.require``);
3. the study: it must be stored in the trust (404, the same answer as another trust's
   study, which the caller may not know exists).

Only then is the transfer queued (``TransferService.create``) for the runner to deliver.
Whether the partner can be reached (its URL, the token it gave us) is the delivery's
concern: a token added later still lets a queued or retried transfer go.
"""

from __future__ import annotations

from app.dicom.uids import validate_uid
from app.errors import NotFound
from app.names import check_name
from app.services.exchange_directory import ExchangeDirectory, Right
from app.services.transfers import TransferService
from app.storage.base import MetadataIndex
from app.transfer import jobs
from app.transfer.jobs import Priority, TransferJob


class PushService:
    def __init__(
        self, transfers: TransferService, index: MetadataIndex, directory: ExchangeDirectory
    ) -> None:
        self._transfers = transfers
        self._index = index
        self._directory = directory

    async def push(
        self,
        trust: str,
        *,
        study: str,
        partner: str,
        partner_trust: str,
        priority: str | Priority = Priority.ROUTINE,
    ) -> TransferJob:
        """Queue ``study`` of ``trust`` for ``partner_trust`` at ``partner``, once allowed."""
        study = validate_uid(study, "the study's Study Instance UID")
        partner = check_name(partner, "partner")
        partner_trust = check_name(partner_trust, "partner trust")
        if not isinstance(priority, Priority):
            priority = jobs.parse_priority(priority)
        await self._directory.require(trust, partner, partner_trust, Right.SEND)
        if not await self._index.get_instances(trust, study):
            raise NotFound(f"study {study} not found")
        return await self._transfers.create(
            trust, study=study, partner=partner, partner_trust=partner_trust, priority=priority
        )
