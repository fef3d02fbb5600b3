"""Answering a partner's pull, on the holding side: ``PullAnswers``.

The request is verified first (``GatewayRequests.open``: signature, time, holder trust of
the token). Then the agreement of the holder trust with the requester's gateway and trust
must allow ``pull``; without it the answer is exactly that of a pull matching nothing
(``{"studies": []}``), so a partner learns nothing of what it may not pull, and the refusal
goes to the audit trail. Otherwise the query runs on the holder trust (at most
``MAX_ANSWER_STUDIES`` studies, whatever was asked) and one outbound transfer per matching
study is queued to the requester's trust, routine unless the pull says urgent.

The same request id from the same requester gets the same answer and queues nothing again:
the answer is claimed in the pull store before anything is queued and completed after, so
two copies of a request arriving at once do not both queue. A copy that finds the answer
still being made is told to ask again (409). A claim never completed (the process stopped
between the two) is taken over by a copy arriving ``STALE_CLAIM`` seconds later, which
queues again: transfers the stopped process had queued may then send a study twice, which
the recipient stores once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.dicom.query import PagingLimits, QueryLevel
from app.errors import Conflict, Forbidden
from app.services.audit import AuditTrail
from app.services.exchange_audit import ExchangeEvent, record_exchange
from app.services.exchange_directory import ExchangeDirectory, Right
from app.services.gateway_requests import GatewayRequests
from app.services.pulls import check_pull_query
from app.services.qido import QidoService
from app.services.security import Principal
from app.services.transfers import TransferService
from app.transfer.gateway_requests import PULL_FORMAT, PullRequest
from app.transfer.pull_store import PulledStudy, PullStore

#: The most studies one answer queues, whatever the pull's limit.
MAX_ANSWER_STUDIES = 100
#: Seconds after which a claimed answer never completed may be made again.
STALE_CLAIM = 120.0
_ROUTE = "POST /exchange/pulls"
_STUDY_INSTANCE_UID = "0020000D"


class PullAnswers:
    def __init__(
        self,
        *,
        directory: ExchangeDirectory,
        requests: GatewayRequests,
        store: PullStore,
        transfers: TransferService,
        qido: QidoService,
        paging: PagingLimits,
        audit: AuditTrail,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._directory = directory
        self._requests = requests
        self._store = store
        self._transfers = transfers
        self._qido = qido
        self._paging = paging
        self._audit = audit
        self._clock = clock

    async def answer(
        self, principal: Principal, document: bytes, base_url: str
    ) -> tuple[PulledStudy, ...]:
        """The studies matched for the pull in ``document``, each with the id of the
        outbound transfer queued for it (none without an agreement)."""
        request = await self._requests.open(document, PULL_FORMAT, principal, _ROUTE)
        assert isinstance(request, PullRequest)
        requester = request.requester
        who = f"trust {requester.trust} at {requester.gateway}"
        query = list(request.query.items())
        try:
            await self._directory.require(
                principal.trust, requester.gateway, requester.trust, Right.PULL
            )
        except Forbidden as exc:
            await self._record(
                principal,
                f"pull by {who} refused, answered as no match: {exc.detail}",
                query,
                refused=True,
            )
            return ()
        params = check_pull_query(request.query, self._paging)
        now = self._clock()
        digest = request.digest()
        claim = await self._store.claim_answer(
            requester.gateway, request.id, digest, now, now - STALE_CLAIM
        )
        if claim.answer.digest != digest:
            raise Conflict(
                f"request id {request.id} of gateway {requester.gateway} was used for another "
                "pull: a request id names one pull"
            )
        if not claim.claimed:
            if claim.answer.studies is None:
                raise Conflict(
                    f"pull request {request.id} of gateway {requester.gateway} is being "
                    "answered; ask again in a moment"
                )
            await self._record(
                principal,
                f"pull by {who} asked again (request {request.id}): the same "
                f"{len(claim.answer.studies)} studies, nothing queued again",
                query,
                [s.study for s in claim.answer.studies],
            )
            return claim.answer.studies
        queued: list[PulledStudy] = []
        try:
            studies = await self._match(principal, request, params, base_url)
            for study in studies:
                job = await self._transfers.create(
                    principal.trust,
                    study=study,
                    partner=requester.gateway,
                    partner_trust=requester.trust,
                    priority=request.priority,
                )
                queued.append(PulledStudy(study, job.id))
        except Exception:
            # Nothing of a failed answer stands: a copy sent again starts afresh.
            await self._withdraw(principal, queued)
            await self._store.release_answer(claim.answer)
            raise
        done = await self._store.complete_answer(claim.answer, tuple(queued))
        if done is None:
            # Another copy took the claim over meanwhile and answers in its own right.
            await self._withdraw(principal, queued)
            raise Conflict(
                f"pull request {request.id} of gateway {requester.gateway} is being "
                "answered; ask again in a moment"
            )
        await self._record(
            principal,
            f"pull by {who} answered (request {request.id}): {len(queued)} studies queued "
            f"to send to it",
            query,
            studies,
        )
        return tuple(queued)

    async def _withdraw(self, principal: Principal, queued: list[PulledStudy]) -> None:
        for pulled in queued:
            await self._transfers.cancel(principal.trust, pulled.transfer)

    async def _match(
        self,
        principal: Principal,
        request: PullRequest,
        params: list[tuple[str, str]],
        base_url: str,
    ) -> list[str]:
        limit = min(request.limit, MAX_ANSWER_STUDIES)
        result = await self._qido.search(
            principal, QueryLevel.STUDY, [*params, ("limit", str(limit))], base_url
        )
        return [d[_STUDY_INSTANCE_UID]["Value"][0] for d in result.datasets]

    async def _record(
        self,
        principal: Principal,
        what: str,
        query: list[tuple[str, str]],
        studies: list[str] | None = None,
        *,
        refused: bool = False,
    ) -> None:
        event = ExchangeEvent(what, _ROUTE, 200, studies or [], query, refused=refused)
        await record_exchange(self._audit, principal, event)
