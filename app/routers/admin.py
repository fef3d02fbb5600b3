"""Administration over HTTP: reading the audit trail (``GET /audit``).

Trusts, tokens and partners are managed with the command line (``iex trust``, ``iex token``,
``iex partner``), which works on the security database directly.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from app.deps import Admin, ServicesDep
from app.routers.responses import json_response
from app.routers.routing import ResourceRoute
from app.services.audit import parse_time
from app.storage.security import AuditFilter

router = APIRouter(tags=["administration"], route_class=ResourceRoute)

MAX_AUDIT_RECORDS = 10_000
#: A record's ``seq`` is an SQLite INTEGER, at most 2**63 - 1: a larger ``after`` cannot even
#: be bound to the query, so it is refused as malformed.
MAX_SEQ = 2**63 - 1

_TIME = "ISO 8601 (`2024-05-01T10:00:00Z`), epoch seconds, or an age such as `24h`."


@router.get(
    "/audit",
    summary="Read the audit trail",
    description=(
        "Audit records (PS3.15 Annex A.5 fields as JSON, each with `seq`, `prev_hash` and "
        "`hash`), oldest first. An admin sees the records of its own trust; an admin of the "
        "operator trust sees every trust's and those of callers that never authenticated. "
        "Page with `after` (the last `seq` seen)."
    ),
    response_class=Response,
    responses={
        200: {"description": "A JSON array of audit records", "content": {"application/json": {}}},
        400: {"description": "A malformed filter"},
    },
)
async def read_audit(
    request: Request,
    services: ServicesDep,
    principal: Admin,
    since: Annotated[str | None, Query(description="From this time. " + _TIME)] = None,
    until: Annotated[str | None, Query(description="Before this time. " + _TIME)] = None,
    study: Annotated[str | None, Query(description="Study Instance UID")] = None,
    trust: Annotated[str | None, Query(description="Trust (operator admins only)")] = None,
    actor: Annotated[str | None, Query(description="Token id or partner:<name>")] = None,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ, description="Only records after this seq")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_RECORDS)] = 1000,
) -> Response:
    where = AuditFilter(
        since=parse_time(since) if since else None,
        until=parse_time(until) if until else None,
        trust=trust,
        actor=actor,
        study=study,
        after_seq=after,
        limit=limit,
    )
    records: list[dict[str, Any]] = await services.security.audit.read(where, principal)
    return await json_response(request, records, media_type="application/json")
