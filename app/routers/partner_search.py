"""Federated search: ``GET /partners/{partner}/dicomweb/studies``, a QIDO-RS study search
run at a partner gateway on a trust the caller's trust may pull from.

The parameters are those of ``GET /dicomweb/studies`` (PS3.18 §10.6), and ``partner_trust``
when the caller's trust may pull from several trusts of the partner. The answer is the
partner's, as QIDO-RS gives it: its Retrieve URLs point at the partner.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.deps import Reader, ServicesDep
from app.dicom.media import DICOM_JSON
from app.dicom.query import QueryLevel
from app.errors import Forbidden
from app.routers.qido import negotiate, query_parameters
from app.routers.responses import json_response
from app.routers.routing import ResourceRoute

router = APIRouter(prefix="/partners", tags=["federated search"], route_class=ResourceRoute)

_PARTNER_TRUST = {
    "name": "partner_trust",
    "in": "query",
    "description": "The partner's trust to search, needed only when the caller's trust may "
    "pull from several of that partner's trusts.",
    "schema": {"type": "string"},
}


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The partner's matching studies (an empty array when none match)",
          "content": {DICOM_JSON: {}}},
    400: {"description": "A malformed partner name or query parameter, or several partner "
          "trusts to choose from"},
    403: {"description": "No agreement of the caller's trust allows pulling from the partner"},
    406: {"description": "The Accept header admits neither application/dicom+json nor JSON"},
    409: {"description": "The partner has given this gateway no token yet"},
    502: {"description": "The partner could not be reached, failed or answered malformed data"},
}  # fmt: skip


@router.get(
    "/{partner}/dicomweb/studies",
    summary="Search a partner's studies (federated QIDO-RS)",
    description="A QIDO-RS study search at the partner, within the agreement of the caller's "
    "trust with it (the `pull` right). The partner answers as QIDO-RS does.",
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra={"parameters": [_PARTNER_TRUST, *query_parameters(QueryLevel.STUDY)]},
)
async def search_partner_studies(
    partner: str, request: Request, services: ServicesDep, principal: Reader
) -> Response:
    media_type = negotiate(request.headers.get("accept"))
    try:
        result = await services.partner_search.search(
            principal, partner, request.query_params.multi_items()
        )
    except Forbidden as exc:
        request.state.audit_reason = exc.detail
        raise
    headers = {"Warning": result.warning} if result.warning else None
    return await json_response(request, result.body, media_type=media_type, headers=headers)
