"""Pulling priors from a partner, on the requesting side: ``PullService``.

A user of a trust asks a partner trust for the studies matching a few QIDO-RS study keys
(``{"PatientID": "123"}``). The service checks the trust's own agreement (the ``pull``
right), sends the partner a signed pull request (``docs/EXCHANGE.md``, Pulls), and records
the pull with what the partner answered: each matched study and the id of the transfer the
partner queued to push it here. The studies then arrive as any pushed study does, and the
inbound transfer record of each bears that id, so the pull's view shows how far each got.

A partner that cannot be reached, or answers an error or something malformed, fails the
pull: it is recorded as ``failed`` with the reason (so the user's list says what became of
it) and the caller gets a 502. Nothing is retried: the partner may still have queued
transfers if only its answer was lost, and they arrive all the same.

Pulls of other trusts read as missing, like their transfers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from app.dicom.query import MATCHING_KEYS, PagingLimits, QueryLevel, parse_query
from app.dicom.uids import is_valid_uid
from app.errors import BadGateway, BadRequest, InvalidQuery, NotFound
from app.names import check_name, is_valid_name
from app.services.audit import AuditTrail
from app.services.exchange_audit import ExchangeEvent, record_exchange
from app.services.exchange_directory import ExchangeDirectory, Right
from app.services.gateway_requests import GatewayRequests
from app.services.security import Principal
from app.services.transfers import TransferService
from app.transfer import jobs
from app.transfer.gateway_requests import MAX_KEYS, Holder, Priority
from app.transfer.jobs import Direction
from app.transfer.partner_http import PartnerAnswer, PartnerClient
from app.transfer.pull_store import Pull, PulledStudy, PullStore

#: The most studies one pull asks for.
MAX_PULL_STUDIES = 100
#: The most pulls one listing returns.
MAX_LIST = 1000
#: A partner's answer to a pull is read up to this size.
MAX_ANSWER_BYTES = 1024 * 1024
#: The keys a pull may match studies by: QIDO-RS study matching keys (PS3.18 Table 10.6.1-5).
PULL_KEYS = tuple(k.keyword for k in MATCHING_KEYS.values() if k.level is QueryLevel.STUDY)
PULLS_PATH = "/exchange/pulls"


@dataclass(frozen=True)
class PullOrder:
    """What a user asks: studies of ``partner_trust`` at ``partner`` matching ``query``."""

    partner: str
    partner_trust: str
    query: Mapping[str, str]
    limit: int = MAX_PULL_STUDIES
    priority: Priority = "routine"


def check_pull_query(query: Mapping[str, str], paging: PagingLimits) -> list[tuple[str, str]]:
    """The query as QIDO-RS parameters, once every key is a study matching keyword, every
    value is one QIDO-RS accepts, and at least one value matches something in particular
    (a pull of every study of a trust is not a pull of priors)."""
    if not query:
        raise BadRequest(f"a pull's query names at least one of: {', '.join(PULL_KEYS)}")
    if len(query) > MAX_KEYS:
        raise BadRequest(f"a pull's query holds at most {MAX_KEYS} keys, not {len(query)}")
    for key in query:
        found = MATCHING_KEYS.get(key)
        if found is None:
            raise InvalidQuery(
                f"query key {key[:64]!r} is not a QIDO-RS study matching key; a pull matches "
                f"studies by: {', '.join(PULL_KEYS)}"
            )
        if found.level is not QueryLevel.STUDY:
            raise InvalidQuery(
                f"query key {key!r} is a {found.level.name.lower()}-level attribute; a pull "
                f"matches studies by: {', '.join(PULL_KEYS)}"
            )
    params = list(query.items())
    parsed = parse_query(params, QueryLevel.STUDY, paging)
    if not parsed.conditions:
        raise InvalidQuery(
            "every value of the pull's query matches everything (empty or only '*'): "
            "give at least one value to match, such as a PatientID"
        )
    return params


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PullService:
    def __init__(
        self,
        *,
        directory: ExchangeDirectory,
        requests: GatewayRequests,
        client: PartnerClient,
        store: PullStore,
        transfers: TransferService,
        paging: PagingLimits,
        audit: AuditTrail,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._directory = directory
        self._requests = requests
        self._client = client
        self._store = store
        self._transfers = transfers
        self._paging = paging
        self._audit = audit
        self._clock = clock

    async def request(self, principal: Principal, order: PullOrder) -> Pull:
        """Ask the partner for the studies ``order`` matches; the pull as recorded
        (``BadGateway`` when the partner did not answer it, recorded as failed)."""
        partner = check_name(order.partner, "partner")
        partner_trust = check_name(order.partner_trust, "partner trust")
        if not 1 <= order.limit <= MAX_PULL_STUDIES:
            raise BadRequest(f"limit is {order.limit}; a pull asks for 1 to {MAX_PULL_STUDIES}")
        query = check_pull_query(order.query, self._paging)
        await self._directory.require(principal.trust, partner, partner_trust, Right.PULL)
        endpoint = await self._directory.endpoint(partner, partner_trust)
        pull_id = jobs.new_job_id()
        document = self._requests.pull(
            pull_id,
            principal.trust,
            Holder(partner, partner_trust),
            order.query,
            order.limit,
            order.priority,
        )
        pull = Pull(
            id=pull_id,
            trust=principal.trust,
            partner=partner,
            partner_trust=partner_trust,
            query=dict(order.query),
            limit=order.limit,
            priority=order.priority,
            created_at=self._clock(),
            actor=principal.actor,
            state="answered",
        )
        where = f"trust {partner_trust} at {partner}"
        try:
            answer = await self._client.post(
                endpoint, PULLS_PATH, document, max_bytes=MAX_ANSWER_BYTES
            )
            studies = _studies(answer, partner, order.limit)
        except BadGateway as exc:
            failed = replace(pull, state="failed", error=exc.detail)
            await self._store.insert(failed)
            await self._record(principal, f"pull from {where} failed: {exc.detail}", 502, query)
            raise BadGateway(f"{exc.detail} (pull {pull_id} recorded as failed)") from None
        answered = replace(pull, studies=studies)
        await self._store.insert(answered)
        await self._record(
            principal,
            f"pull requested from {where}: {len(studies)} studies matched",
            202,
            query,
            [s.study for s in studies],
        )
        return answered

    async def _record(
        self,
        principal: Principal,
        what: str,
        status: int,
        query: list[tuple[str, str]],
        studies: list[str] | None = None,
    ) -> None:
        event = ExchangeEvent(what, "POST /pulls", status, studies or [], query)
        await record_exchange(self._audit, principal, event)

    async def get(self, principal: Principal, pull_id: str) -> Pull:
        pull = await self._store.get(pull_id) if jobs.is_job_id(pull_id) else None
        if pull is None or pull.trust != principal.trust:
            raise NotFound(f"no pull {pull_id[:64]!r}")
        return pull

    async def list(self, principal: Principal, limit: int = MAX_LIST) -> list[Pull]:
        """The trust's pulls, newest first."""
        return await self._store.find(principal.trust, max(1, min(limit, MAX_LIST)))

    async def view(self, pull: Pull) -> dict[str, Any]:
        """What ``GET /pulls/{id}`` shows: the pull, and each study with the state of its
        inbound transfer once it began to arrive (``pending`` before)."""
        return {
            "id": pull.id,
            "trust": pull.trust,
            "partner": pull.partner,
            "partner_trust": pull.partner_trust,
            "query": dict(pull.query),
            "limit": pull.limit,
            "priority": pull.priority,
            "created": _iso(pull.created_at),
            "state": pull.state,
            "error": pull.error,
            "studies": [await self._arrival(pull, s) for s in pull.studies],
        }

    def summary(self, pull: Pull) -> dict[str, Any]:
        """A pull in a listing: without the states of its transfers."""
        return {
            "id": pull.id,
            "partner": pull.partner,
            "partner_trust": pull.partner_trust,
            "query": dict(pull.query),
            "limit": pull.limit,
            "priority": pull.priority,
            "created": _iso(pull.created_at),
            "state": pull.state,
            "error": pull.error,
            "studies": len(pull.studies),
        }

    async def _arrival(self, pull: Pull, pulled: PulledStudy) -> dict[str, Any]:
        view: dict[str, Any] = {"study": pulled.study, "transfer": pulled.transfer}
        try:
            job = await self._transfers.get(pull.trust, pulled.transfer)
        except NotFound:
            job = None
        # Only the arrival from the partner asked counts, whatever else bears the id.
        if (
            job is None
            or job.direction is not Direction.IN
            or (job.partner, job.partner_trust, job.study)
            != (pull.partner, pull.partner_trust, pulled.study)
        ):
            return {**view, "state": "pending", "last_error": None}
        return {**view, "state": job.state.value, "last_error": job.last_error}


def _studies(answer: PartnerAnswer, partner: str, limit: int) -> tuple[PulledStudy, ...]:
    """The studies of the partner's answer, or ``BadGateway`` saying what is wrong."""
    if answer.status != 200:
        raise BadGateway(
            f"partner {partner} refused the pull request with {answer.status}: "
            f"{partner_detail(answer)}"
        )
    bad = f"partner {partner} answered the pull with"
    try:
        document = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise BadGateway(f"{bad} something that is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("studies"), list):
        raise BadGateway(f"{bad} no list of studies")
    items = document["studies"]
    if len(items) > limit:
        raise BadGateway(f"{bad} {len(items)} studies, more than the {limit} asked for")
    studies = []
    for i, item in enumerate(items):
        study = item.get("study") if isinstance(item, dict) else None
        transfer = item.get("transfer") if isinstance(item, dict) else None
        if not (isinstance(study, str) and is_valid_uid(study)):
            raise BadGateway(f"{bad} studies[{i}].study that is not a UID")
        if not (isinstance(transfer, str) and is_valid_name(transfer)):
            raise BadGateway(f"{bad} studies[{i}].transfer that is not a transfer id")
        studies.append(PulledStudy(study, transfer))
    if len({s.transfer for s in studies}) != len(studies):
        raise BadGateway(f"{bad} one transfer id for two studies")
    return tuple(studies)


def partner_detail(answer: PartnerAnswer) -> str:
    """What a partner said of an error: the ``detail`` of its JSON answer, shortened, or
    only its status when it said nothing readable."""
    try:
        detail = orjson.loads(answer.body).get("detail")
    except (orjson.JSONDecodeError, AttributeError):
        detail = None
    if not isinstance(detail, str):
        return "no detail given"
    return "".join(c if c.isprintable() else " " for c in detail[:300])
