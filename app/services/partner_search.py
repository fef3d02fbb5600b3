"""Federated search: a QIDO-RS study search run at a partner, ``PartnerSearch``.

On the requesting side, a user of a trust searches the studies of a partner trust with
the QIDO-RS parameters of a study search (PS3.18 §10.6). The partner trust is the one
that the user's trust has an agreement allowing ``pull`` with at that partner, or, when it
has several, the one named by ``partner_trust``. The parameters are checked here as a local
search checks them, then sent in a signed search request (``docs/EXCHANGE.md``, Federated
search); the partner's DICOM JSON answer is checked to be a JSON array of datasets, read
up to ``MAX_RESULT_BYTES``, and passed on as it came.

On the holding side, the request is verified (``GatewayRequests.open``) and the agreement
of the holder trust with the requester's gateway and trust must allow ``pull``: without it
the answer is that of a search matching nothing (``[]``), and the refusal is audited.
Otherwise QIDO-RS runs on the holder trust as for any of its readers, rate limits included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from app.dicom.media import DICOM_JSON
from app.dicom.query import PagingLimits, QueryLevel, parse_query
from app.dicom.uids import is_valid_uid
from app.errors import BadGateway, BadRequest, Forbidden
from app.names import check_name
from app.services.audit import AuditTrail
from app.services.exchange_audit import ExchangeEvent, record_exchange
from app.services.exchange_directory import ExchangeDirectory, Right
from app.services.gateway_requests import GatewayRequests
from app.services.pulls import partner_detail
from app.services.qido import QidoService, SearchResult
from app.services.security import Principal
from app.transfer import jobs
from app.transfer.gateway_requests import MAX_KEYS, SEARCH_FORMAT, Holder, SearchRequest
from app.transfer.partner_http import PartnerClient

#: A partner's search answer is read up to this size (decompressed).
MAX_RESULT_BYTES = 16 * 1024 * 1024
SEARCH_PATH = "/exchange/search"
#: The parameter that names the partner trust; never sent to the partner.
PARTNER_TRUST = "partner_trust"
_STUDY_INSTANCE_UID = "0020000D"
_TAG = re.compile(r"[0-9A-F]{8}")
_WARNING = re.compile(r"[ -~]{1,400}")


@dataclass(frozen=True)
class PartnerResult:
    """The partner's answer as received (a DICOM JSON array), and its Warning if any."""

    body: bytes
    count: int
    warning: str | None


class PartnerSearch:
    def __init__(
        self,
        *,
        directory: ExchangeDirectory,
        requests: GatewayRequests,
        client: PartnerClient,
        qido: QidoService,
        paging: PagingLimits,
        audit: AuditTrail,
    ) -> None:
        self._directory = directory
        self._requests = requests
        self._client = client
        self._qido = qido
        self._paging = paging
        self._audit = audit

    async def search(
        self, principal: Principal, partner: str, params: Sequence[tuple[str, str]]
    ) -> PartnerResult:
        """Search the studies of the partner trust with ``params`` (QIDO-RS parameters,
        ``partner_trust`` among them when needed)."""
        partner = check_name(partner, "partner")
        named = [value for name, value in params if name == PARTNER_TRUST]
        forwarded = tuple((name, value) for name, value in params if name != PARTNER_TRUST)
        if len(named) > 1:
            raise BadRequest(f"{PARTNER_TRUST} is given more than once")
        if len(forwarded) > MAX_KEYS:
            raise BadRequest(
                f"a search at a partner takes at most {MAX_KEYS} parameters, not {len(forwarded)}"
            )
        parse_query(forwarded, QueryLevel.STUDY, self._paging)
        partner_trust = await self._partner_trust(principal.trust, partner, named)
        endpoint = await self._directory.endpoint(partner, partner_trust)
        document = self._requests.search(
            jobs.new_job_id(), principal.trust, Holder(partner, partner_trust), forwarded
        )
        where = f"trust {partner_trust} at {partner}"
        try:
            answer = await self._client.post(
                endpoint, SEARCH_PATH, document, accept=DICOM_JSON, max_bytes=MAX_RESULT_BYTES
            )
            if answer.status != 200:
                raise BadGateway(
                    f"partner {partner} refused the search with {answer.status}: "
                    f"{partner_detail(answer)}"
                )
            studies = _studies_of(answer.body, partner)
        except BadGateway as exc:
            await self._record(principal, f"search of {where} failed: {exc.detail}", 502, forwarded)
            raise
        warning = answer.headers.get("warning")
        if warning is not None and _WARNING.fullmatch(warning) is None:
            warning = None
        await self._record(
            principal, f"search of {where}: {len(studies)} studies", 200, forwarded, studies
        )
        return PartnerResult(answer.body, len(studies), warning)

    async def _partner_trust(self, trust: str, partner: str, named: list[str]) -> str:
        if named:
            partner_trust = check_name(named[0], "partner trust")
            await self._directory.require(trust, partner, partner_trust, Right.PULL)
            return partner_trust
        trusts = await self._directory.partner_trusts(trust, partner, Right.PULL)
        if not trusts:
            raise Forbidden(
                f"trust {trust} has no agreement allowing pull with any trust at partner "
                f"{partner}: nothing crosses without one (iex agreement add)"
            )
        if len(trusts) > 1:
            raise BadRequest(
                f"trust {trust} may pull from several trusts at partner {partner} "
                f"({', '.join(trusts)}): name one with the {PARTNER_TRUST} parameter"
            )
        return trusts[0]

    async def answer(self, principal: Principal, document: bytes, base_url: str) -> SearchResult:
        """The holder's side: the study search of ``document`` on the holder trust."""
        route = "POST /exchange/search"
        request = await self._requests.open(document, SEARCH_FORMAT, principal, route)
        assert isinstance(request, SearchRequest)
        requester = request.requester
        who = f"trust {requester.trust} at {requester.gateway}"
        try:
            await self._directory.require(
                principal.trust, requester.gateway, requester.trust, Right.PULL
            )
        except Forbidden as exc:
            what = f"search by {who} refused, answered as no match: {exc.detail}"
            event = ExchangeEvent(what, route, 200, (), request.parameters, refused=True)
            await record_exchange(self._audit, principal, event)
            return SearchResult([])
        result = await self._qido.search(principal, QueryLevel.STUDY, request.parameters, base_url)
        studies = [d[_STUDY_INSTANCE_UID]["Value"][0] for d in result.datasets]
        what = f"search by {who} answered (request {request.id}): {len(studies)} studies"
        event = ExchangeEvent(what, route, 200, studies, request.parameters)
        await record_exchange(self._audit, principal, event)
        return result

    async def _record(
        self,
        principal: Principal,
        what: str,
        status: int,
        query: Sequence[tuple[str, str]],
        studies: Sequence[str] = (),
    ) -> None:
        route = "GET /partners/{partner}/dicomweb/studies"
        event = ExchangeEvent(what, route, status, studies, query)
        await record_exchange(self._audit, principal, event)


def _studies_of(body: bytes, partner: str) -> list[str]:
    """The Study Instance UIDs of the partner's answer, once it is a DICOM JSON array
    (PS3.18 F.2): objects keyed by eight hexadecimal digits, each element an object with a
    VR."""
    bad = f"partner {partner} answered the search with"
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadGateway(f"{bad} something that is not JSON") from None
    if not isinstance(document, list):
        raise BadGateway(f"{bad} no JSON array of datasets")
    for i, dataset in enumerate(document):
        if not isinstance(dataset, dict):
            raise BadGateway(f"{bad} item {i} that is not a dataset")
        for tag, element in dataset.items():
            if _TAG.fullmatch(tag) is None or not isinstance(element, dict) or "vr" not in element:
                raise BadGateway(f"{bad} item {i} holding {tag[:20]!r}, not a DICOM JSON element")
    studies = []
    for dataset in document:
        value = dataset.get(_STUDY_INSTANCE_UID, {}).get("Value")
        if (
            isinstance(value, list)
            and value
            and isinstance(value[0], str)
            and is_valid_uid(value[0])
        ):
            studies.append(value[0])
    return studies
