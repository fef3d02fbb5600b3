"""The audit middleware: no exchange that touches patient data, and no security failure, is
answered before its audit record is durable.

A pure ASGI middleware, like the metrics one, so streamed bodies pass through unbuffered.
It holds back ``http.response.start`` of every audited exchange until the trail has
committed and fsynced its record (``AuditTrail.record``). At that moment the status is
known, a store or upload has consumed its request body (bytes received), the route has
named what it touched (``request.state.audit_objects``), and the bytes to be sent are the
declared Content-Length; not one byte of the response has left. When the record cannot be
written, the client gets a 503 in place of the response, whose body is never read: the
exchange fails closed, never unaudited. While the trail stays unwritable, requests that
would change patient data (stores, upload chunks, deletions) are refused before they run:
a change made then would have no record.

What the exchange was comes from the matched route: POST stores, ``…/metadata`` reads
metadata, the search resources (``/studies``, ``/series``, ``/instances``) query and other
DICOMweb GETs retrieve. Resumable uploads (``/transfers/uploads``) record their POSTs and
PATCHes as uploads and DELETEs as deletions; HEAD and OPTIONS only describe an upload.
A route may name its own kind in ``request.state.audit_kind``, what came of it in
``audit_reason`` and the push it acted on in ``audit_transfer`` (``/transfers`` does).
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.dicom.uids import InstanceRef
from app.errors import AuditUnavailable
from app.services.audit import AccessFacts, AuditTrail, TransferSubject
from app.services.security import Principal

log = logging.getLogger(__name__)

#: Statuses recorded as security events on any route, patient data or not.
SECURITY_STATUSES = frozenset({401, 403, 429})


_UPLOAD_KINDS = {"POST": "upload", "PATCH": "upload", "DELETE": "delete"}

#: Where patient data lives (``/transfers`` itself too: a push sends a study away), and the
#: methods that change it.
_PATIENT_DATA = ("/dicomweb/", "/transfers/")
_PATIENT_DATA_EXACT = frozenset({"/transfers"})
_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_REFUSED_CHANGE = (
    "the audit trail cannot be written ({why}): patient data is not changed until it can; "
    "nothing was stored, try again later"
)


def _patient_data(scope: Scope) -> bool:
    path = str(scope.get("path", ""))
    return path.startswith(_PATIENT_DATA) or path in _PATIENT_DATA_EXACT


def _changes_patient_data(scope: Scope) -> bool:
    """Whether the request would change patient data. Told by its path, before routing: a
    request refused here has not touched anything."""
    return scope["method"] in _CHANGING and _patient_data(scope)


class _Refused(Exception):
    """Raised into the app from ``send`` once a 503 went out instead of its response, so
    that it stops producing a body nobody will read. No exception handler knows it."""


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


def _objects(scope: Scope, state: dict[str, Any]) -> list[InstanceRef]:
    declared = state.get("audit_objects")
    if isinstance(declared, list):
        return declared
    params = scope.get("path_params") or {}
    study = params.get("study")
    if not isinstance(study, str):
        return []
    return [InstanceRef(study, params.get("series"), params.get("instance"))]


def _declared_length(start: Message) -> int | None:
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-length":
            text = value.decode("latin-1")
            return int(text) if text.isdigit() else None
    return None


async def _refuse(send: Send, detail: str) -> None:
    body = orjson.dumps({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trail: AuditTrail = scope["app"].state.services.security.audit
        if not trail.healthy and _changes_patient_data(scope):
            # Its record could not be written either, and by then the change would be made.
            await _refuse(send, _REFUSED_CHANGE.format(why=trail.problem))
            return
        at = time.time()
        received = 0
        started = False
        expected = trail.expect() if _patient_data(scope) else None

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def record(status: int, sent: int | None) -> None:
            facts = _facts(scope, at, status, received, sent)
            if facts is not None:
                await trail.record(facts, expected)

        async def audited_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                try:
                    await record(message["status"], _declared_length(message))
                except AuditUnavailable as exc:
                    await _refuse(send, exc.detail)
                    raise _Refused from None
            await send(message)

        try:
            try:
                await self.app(scope, counting_receive, audited_send)
            except _Refused:
                return
            except Exception:
                if not started:
                    # The server answers 500: recorded first, like any answer.
                    started = True
                    try:
                        await record(500, None)
                    except AuditUnavailable:
                        log.error("a failed %s could not be audited either", scope["method"])
                raise
            if not started:
                await record(500, None)  # the app never answered; the server will, with a 500
        finally:
            if expected is not None:
                expected.settle()


def _facts(
    scope: Scope, at: float, status: int, received: int, sent: int | None
) -> AccessFacts | None:
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
    transfer = state.get("audit_transfer")
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
        transfer=transfer if isinstance(transfer, TransferSubject) else None,
    )


def _query(scope: Scope) -> list[tuple[str, str]]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return parse_qsl(raw, keep_blank_values=True)
