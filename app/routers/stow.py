"""STOW-RS routes (PS3.18 §10.5)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from app.deps import BaseUrlDep, ServicesDep, Uploader
from app.dicom.media import (
    DICOM,
    DICOM_JSON,
    MULTIPART_RELATED,
    MalformedMediaType,
    is_dicom_multipart,
    read_media_type,
)
from app.dicom.uids import validate_uid
from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from app.routers.responses import json_response
from app.routers.routing import ResourceRoute
from app.services.stow import StoreResult
from app.services.streams import limit_stream

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["STOW-RS"], route_class=ResourceRoute)

_BODY = {
    "required": True,
    "content": {
        'multipart/related; type="application/dicom"': {
            "schema": {"type": "string", "format": "binary"}
        },
        DICOM: {"schema": {"type": "string", "format": "binary"}},
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "All instances stored", "content": {DICOM_JSON: {}}},
    202: {"description": "Some instances stored, some failed", "content": {DICOM_JSON: {}}},
    400: {"description": "The request could not be parsed"},
    409: {"description": "No instance was stored", "content": {DICOM_JSON: {}}},
    413: {"description": "The request exceeds the configured size limit"},
    415: {"description": "The Content-Type is not a supported DICOM media type"},
}


async def _store(
    request: Request, services: ServicesDep, trust: str, base_url: str, study: str | None
) -> Response:
    if study is not None:
        validate_uid(study, "Study Instance UID")
    limit = services.settings.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"the request body of {declared} bytes exceeds {limit} bytes")
    raw_type = request.headers.get("content-type", "")
    try:
        media = read_media_type(raw_type) if raw_type.strip() else None
    except MalformedMediaType as exc:
        raise BadRequest(f"the Content-Type is malformed: {exc.detail}") from exc
    body = limit_stream(request.stream(), limit)
    if media is not None and media.mime == MULTIPART_RELATED:
        if not is_dicom_multipart(media):
            raise UnsupportedMediaType(
                f"multipart/related type {media.params.get('type')!r} is not supported; "
                f'send type="{DICOM}"'
            )
        boundary = media.params.get("boundary")
        if not boundary:
            raise BadRequest("the multipart/related Content-Type has no boundary parameter")
        result = await services.stow.store_multipart(trust, body, boundary, study)
    elif media is not None and media.mime == DICOM:
        result = await services.stow.store_single(trust, body, study)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {raw_type[:100]!r} is not supported; send "
            f'multipart/related; type="{DICOM}" or {DICOM}'
        )
    # The audit trail names what was stored (PS3.15 A.5.3.x Instances Transferred).
    request.state.audit_objects = result.stored
    return await _answer(request, result, base_url, study)


async def _answer(
    request: Request, result: StoreResult, base_url: str, study: str | None
) -> Response:
    headers: dict[str, str] = {}
    if result.failed:
        for f in result.failed:
            # Identifiers only: a parser's message may quote attribute values.
            log.info("STOW-RS part failed: 0x%04X SOP Instance %s", f.reason, f.sop_uid or "-")
        # PS3.18 §8.4.3 Warning header: a human-readable reason for each failed part.
        headers["Warning"] = ", ".join(
            f'299 iex "{_header_safe(f.detail)}"' for f in result.failed[:20]
        )
    return await json_response(
        request, result.to_dicom_json(base_url, study), result.http_status, headers=headers
    )


@router.post(
    "/studies",
    summary="Store instances (STOW-RS)",
    openapi_extra={"requestBody": _BODY},
    responses=_RESPONSES,
    response_class=Response,
)
async def store_instances(
    request: Request, services: ServicesDep, principal: Uploader, base_url: BaseUrlDep
) -> Response:
    return await _store(request, services, principal.trust, base_url, None)


@router.post(
    "/studies/{study}",
    summary="Store instances of one study (STOW-RS)",
    openapi_extra={"requestBody": _BODY},
    responses=_RESPONSES,
    response_class=Response,
)
async def store_study_instances(
    study: str, request: Request, services: ServicesDep, principal: Uploader, base_url: BaseUrlDep
) -> Response:
    return await _store(request, services, principal.trust, base_url, study)


class _PostOnlyRoute(APIRoute):
    """A route that does not exist for other methods, so it never turns a 404 into a 405."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope.get("method") != "POST":
            return Match.NONE, {}
        return super().matches(scope)


async def store_bad_study_path(study: str, principal: Uploader) -> Response:
    """Answer a hostile or malformed study path (``..%2F``, extra segments) with a 400.

    Without this, a decoded ``/`` in the UID misses every route and reads as a plain 404.
    """
    validate_uid(study, "Study Instance UID")
    raise BadRequest(f"{_header_safe(study)!r} is not a Store Instances resource (PS3.18 §10.5)")


router.add_api_route(
    "/studies/{study:path}",
    store_bad_study_path,
    methods=["POST"],
    include_in_schema=False,
    response_class=Response,
    route_class_override=_PostOnlyRoute,
)


def _header_safe(text: str, limit: int = 200) -> str:
    """Printable ASCII only: details quote client bytes, which must not break the header."""
    text = text[:limit].encode("ascii", "replace").decode("ascii")
    return "".join(c if " " <= c <= "~" else "?" for c in text).replace('"', "'")
