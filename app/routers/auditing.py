"""The audit middleware: turns every exchange that touches patient data, and every security
failure, into ``AccessFacts`` for the audit trail.

A pure ASGI middleware, like the metrics one, so streamed bodies pass through unbuffered and
are only counted. The record is queued just before the last body message goes out, so a
client that has read a complete response can rely on its record being queued (and on
``GET /audit``, which flushes the queue, to show it).

What the exchange was comes from the matched route: POST stores, ``…/metadata`` reads
metadata, the search resources (``/studies``, ``/series``, ``/instances``) query and other
DICOMweb GETs retrieve. Resumable uploads (``/transfers/uploads``) record their POSTs and
PATCHes as uploads and DELETEs as deletions; HEAD and OPTIONS only describe an upload.
A route may name its own kind in ``request.state.audit_kind``.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.services.audit import AccessFacts, AuditTrail, ObjectRef
from app.services.security import Principal

#: Statuses recorded as security events on any route, patient data or not.
SECURITY_STATUSES = frozenset({401, 403, 429})


_UPLOAD_KINDS = {"POST": "upload", "PATCH": "upload", "DELETE": "delete"}


def _kind(method: str, template: str | None, state: dict[str, Any]) -> str | None:
    declared = state.get("audit_kind")
    if isinstance(declared, str):
        return declared
    if template is None:
        return None
    if template == "/audit":
        return "audit"
    if template.startswith("/transfers/uploads"):
        return _UPLOAD_KINDS.get(method)
    if not template.startswith("/dicomweb/"):
        return None
    if method == "POST":
        return "store"
    if method == "DELETE":
        return "delete"
    last = template.rsplit("/", 1)[-1]
    if last == "metadata":
        return "metadata"
    if last in ("studies", "series", "instances"):
        return "query"
    return "retrieve"


def _objects(scope: Scope, state: dict[str, Any]) -> list[ObjectRef]:
    declared = state.get("audit_objects")
    if isinstance(declared, list):
        return declared
    params = scope.get("path_params") or {}
    study = params.get("study")
    if not isinstance(study, str):
        return []
    return [ObjectRef(study, params.get("series"), params.get("instance"))]


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        at = time.time()
        received = sent = status = 0
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            facts = _facts(scope, at, status or 500, received, sent)
            if facts is not None:
                trail: AuditTrail = scope["app"].state.services.security.audit
                trail.submit(facts)

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def recording_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    record()
            await send(message)

        try:
            await self.app(scope, counting_receive, recording_send)
        finally:
            record()  # an exchange cut short (disconnect, error) is recorded as it stood


def _facts(scope: Scope, at: float, status: int, received: int, sent: int) -> AccessFacts | None:
    state: dict[str, Any] = scope.get("state") or {}
    route = scope.get("route")
    template = getattr(route, "path", None)
    method = scope["method"]
    kind = _kind(method, template if isinstance(template, str) else None, state)
    if kind is None and status not in SECURITY_STATUSES:
        return None
    principal = state.get("principal")
    client = scope.get("client")
    reason = state.get("audit_reason")
    if status == 429:
        reason = "rate limited"
    return AccessFacts(
        at=at,
        method=method,
        route=template if isinstance(template, str) else scope.get("path", ""),
        status=status,
        client=client[0] if client else None,
        actor=principal.actor if isinstance(principal, Principal) else state.get("audit_actor"),
        trust=principal.trust if isinstance(principal, Principal) else None,
        kind=kind or "other",
        objects=_objects(scope, state) if kind else [],
        query=_query(scope) if kind == "query" else (),
        bytes_received=received,
        bytes_sent=sent,
        reason=reason if isinstance(reason, str) else None,
    )


def _query(scope: Scope) -> list[tuple[str, str]]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return parse_qsl(raw, keep_blank_values=True)
