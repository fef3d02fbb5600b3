"""Signed requests between gateways as the services make and check them: ``GatewayRequests``.

Outbound, it signs a pull or search request with this gateway's active signing key.
Inbound, it checks one in this order: the document's form; the requester's signing key
among the partners' keys on record (403 naming the key id and the ids on record when
unknown); the signature; every field; the holder gateway (this one) and the time (at most
``MAX_CLOCK_SKEW`` away); and last that the holder trust is the trust of the token the
call came with, since a partner's token acts for one trust only. The agreement is the
caller's to check: what a refusal looks like differs between pulls and searches and the
partner must not learn from an error what it may not see.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from app.crypto.identity import SigningKey
from app.errors import Forbidden, IexError, NotFound
from app.services.audit import AuditTrail
from app.services.exchange_audit import ExchangeEvent, record_exchange
from app.services.exchange_directory import ExchangeDirectory
from app.services.security import Principal
from app.transfer import canonical_json as cj
from app.transfer.gateway_requests import (
    PULL_FORMAT,
    GatewayRequest,
    Holder,
    Kind,
    Priority,
    PullRequest,
    SearchRequest,
    read_request,
    sign_request,
    verify_request,
)
from app.transfer.manifest import Endpoint


class GatewayRequests:
    def __init__(
        self,
        directory: ExchangeDirectory,
        signing_key: Callable[[], SigningKey],
        gateway: str,
        audit: AuditTrail,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._directory = directory
        self._signing_key = signing_key
        #: This gateway's name (``IEX_NAME``), as its identity document gives it.
        self.gateway = gateway
        self._audit = audit
        self._clock = clock

    def _requester(self, trust: str) -> tuple[Endpoint, SigningKey]:
        key = self._signing_key()
        return Endpoint(self.gateway, trust, key.id), key

    def _now(self) -> str:
        return cj.timestamp(datetime.fromtimestamp(self._clock(), UTC))

    def pull(
        self,
        request_id: str,
        trust: str,
        holder: Holder,
        query: Mapping[str, str],
        limit: int,
        priority: Priority,
    ) -> bytes:
        """The signed document of a pull by ``trust`` of ``holder``'s studies."""
        requester, key = self._requester(trust)
        request = PullRequest(request_id, self._now(), requester, holder, query, limit, priority)
        return sign_request(request, key.private_key())

    def search(
        self, request_id: str, trust: str, holder: Holder, parameters: tuple[tuple[str, str], ...]
    ) -> bytes:
        """The signed document of a search by ``trust`` of ``holder``'s studies."""
        requester, key = self._requester(trust)
        request = SearchRequest(request_id, self._now(), requester, holder, parameters)
        return sign_request(request, key.private_key())

    async def open(
        self, document: bytes, kind: Kind, principal: Principal, route: str
    ) -> GatewayRequest:
        """The request ``document`` holds, once verified as above. A refusal is audited
        (a forged or replayed request is a security event), naming why."""
        try:
            return await self._open(document, kind, principal)
        except IexError as exc:
            noun = "pull" if kind == PULL_FORMAT else "search"
            what = f"{noun} request refused: {exc.detail}"
            event = ExchangeEvent(what, route, exc.status_code, refused=True)
            await record_exchange(self._audit, principal, event)
            raise

    async def _open(self, document: bytes, kind: Kind, principal: Principal) -> GatewayRequest:
        signed = read_request(document, kind)
        requester = signed.requester
        try:
            public = await self._directory.partner_signing_key(requester.gateway, requester.key)
        except NotFound:
            raise Forbidden(
                f"the request is signed by key {requester.key} of gateway "
                f"{requester.gateway}, which is not a partner of this gateway"
            ) from None
        request = verify_request(signed, public.ed25519(), gateway=self.gateway, now=self._clock())
        if request.holder.trust != principal.trust:
            raise Forbidden(
                f"the request is for trust {request.holder.trust}, but the token it came with "
                f"acts for trust {principal.trust}"
            )
        return request
