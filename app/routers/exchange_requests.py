"""Gateway-to-gateway requests, the holder's side: ``POST /exchange/pulls`` and
``POST /exchange/search``.

Only partner gateways call these, with the token this gateway issued for them and a
request document signed by their signing key (``docs/EXCHANGE.md``: Pulls, Federated
search). Without an agreement allowing ``pull`` the answer is the one of a request that
matched nothing.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.deps import BaseUrlDep, Reader, ServicesDep
from app.dicom.media import DICOM_JSON, JSON
from app.errors import PayloadTooLarge, UnsupportedMediaType
from app.routers.responses import json_response
from app.routers.routing import ResourceRoute
from app.transfer.gateway_requests import MAX_REQUEST_SIZE

router = APIRouter(prefix="/exchange", tags=["gateway to gateway"], route_class=ResourceRoute)

_GATEWAY_ONLY = (
    "Gateway to gateway: called by partner gateways, not by users. "
    "Authenticated by the token this gateway issued for the partner, and by the request "
    "document, signed by the partner gateway's signing key (see docs/EXCHANGE.md)."
)
_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["request", "signature"],
                    "properties": {
                        "request": {
                            "type": "string",
                            "description": "The request, as canonical JSON text",
                        },
                        "signature": {
                            "type": "string",
                            "description": "Base64 of the Ed25519 signature of the request",
                        },
                    },
                    "additionalProperties": False,
                }
            }
        },
    }
}
_REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"description": "A malformed, stale or misaddressed request, or a bad signature"},
    403: {"description": "The signing key is unknown, or the request is for another trust "
          "than the token's"},
    413: {"description": "A request document over 64 KiB"},
    415: {"description": "Not application/json"},
}  # fmt: skip


async def _document(request: Request) -> bytes:
    """The request document, read up to its size limit."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != JSON:
        raise UnsupportedMediaType(
            f"a gateway request is {JSON}, not {media[:100] or 'without a Content-Type'}"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_SIZE:
            raise PayloadTooLarge(f"a gateway request document is at most {MAX_REQUEST_SIZE} bytes")
    return bytes(body)


@router.post(
    "/pulls",
    summary="Answer a partner's pull (gateway to gateway)",
    description=_GATEWAY_ONLY
    + " Queues one outbound transfer per matching study to the requester's trust and "
    'answers `{"studies": [{"study": UID, "transfer": id}, ...]}`; the same request id '
    "again gets the same answer and queues nothing more.",
    response_class=Response,
    responses={
        200: {"description": "The matched studies and their transfers", "content": {JSON: {}}},
        **_REFUSALS,
    },  # fmt: skip
    openapi_extra=_REQUEST_BODY,
)
async def answer_pull(
    request: Request, services: ServicesDep, principal: Reader, base_url: BaseUrlDep
) -> Response:
    document = await _document(request)
    studies = await services.pull_answers.answer(principal, document, base_url)
    answer = {"studies": [{"study": s.study, "transfer": s.transfer} for s in studies]}
    return await json_response(request, answer, media_type=JSON)


@router.post(
    "/search",
    summary="Answer a partner's study search (gateway to gateway)",
    description=_GATEWAY_ONLY
    + " Runs the QIDO-RS study search of the request on the trust and answers as QIDO-RS "
    "does (PS3.18 §10.6.3), a Warning header included when more matches exist.",
    response_class=Response,
    responses={
        200: {
            "description": "Matching studies (an empty array when none match)",
            "content": {DICOM_JSON: {}},
        },
        **_REFUSALS,
        429: {"description": "Too many searches without matching keys; see Retry-After"},
    },  # fmt: skip
    openapi_extra=_REQUEST_BODY,
)
async def answer_search(
    request: Request, services: ServicesDep, principal: Reader, base_url: BaseUrlDep
) -> Response:
    document = await _document(request)
    result = await services.partner_search.answer(principal, document, base_url)
    headers = {"Warning": f'299 iex "{result.warning}"'} if result.warning else None
    return await json_response(request, result.datasets, media_type=DICOM_JSON, headers=headers)
