"""QIDO-RS routes (PS3.18 §10.6): search for studies, series and instances.

Arbitrary DICOM attributes are accepted as query keys, so the parameters are declared in
the OpenAPI document by hand (the main matching keys of PS3.18 Table 10.6.1-5) and the
handlers read ``request.query_params`` themselves.

A search without matches answers 200 with ``[]``: PS3.18 §8.3.4.4.1 names 204, but common
clients (dicomweb-client, OHIF) expect a JSON array, and an empty array is a valid one.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.deps import BaseUrlDep, Reader, ServicesDep
from app.dicom.media import DICOM_JSON, JSON, parse_accept
from app.dicom.query import MATCHING_KEYS, QueryLevel
from app.errors import NotAcceptable
from app.routers.responses import json_response
from app.routers.routing import ResourceRoute
from app.services.security import Principal

router = APIRouter(prefix="/dicomweb", tags=["QIDO-RS"], route_class=ResourceRoute)


def query_parameters(level: QueryLevel) -> list[dict[str, Any]]:
    common: list[dict[str, Any]] = [
        {
            "name": "limit",
            "in": "query",
            "description": "Largest number of matches to return (capped by the server; "
            "a Warning header says when more exist).",
            "schema": {"type": "integer", "minimum": 0},
        },
        {
            "name": "offset",
            "in": "query",
            "description": "Number of matches to skip.",
            "schema": {"type": "integer", "minimum": 0, "default": 0},
        },
        {
            "name": "fuzzymatching",
            "in": "query",
            "description": "Match person names case- and accent-insensitively, as prefixes.",
            "schema": {"type": "boolean", "default": False},
        },
        {
            "name": "includefield",
            "in": "query",
            "description": "Attributes to return as well: keywords or tags, comma-separated "
            "or repeated, or `all`.",
            "schema": {"type": "array", "items": {"type": "string"}},
            "style": "form",
            "explode": True,
        },
    ]
    keys = [
        {
            "name": key.keyword,
            "in": "query",
            "description": f"Match {key.keyword} ({key.tag >> 16:04X},{key.tag & 0xFFFF:04X}), "
            f"VR {key.vr}; also accepted as the tag {key.tag:08X}.",
            "schema": {"type": "string"},
        }
        for key in MATCHING_KEYS.values()
        if key.level.value <= level.value
    ]
    return common + keys


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Matching datasets (an empty array when none match)"},
    400: {"description": "An unknown or malformed query parameter"},
    429: {"description": "Too many searches without matching keys; see Retry-After"},
    406: {"description": "The Accept header admits neither application/dicom+json nor JSON"},
}


def _route(level: QueryLevel, summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "response_class": Response,
        "responses": {**_RESPONSES, 200: {**_RESPONSES[200], "content": {DICOM_JSON: {}}}},
        "openapi_extra": {"parameters": query_parameters(level)},
    }


def negotiate(accept: str | None) -> str:
    """The response media type (PS3.18 §8.7.3): DICOM JSON unless only plain JSON fits."""
    for media in parse_accept(accept):
        if media.matches(DICOM_JSON):
            return DICOM_JSON
        if media.matches(JSON):
            return JSON
    raise NotAcceptable(
        f"cannot answer a search as {(accept or '')[:100]!r}; accept {DICOM_JSON} or {JSON}"
    )


async def _search(
    request: Request,
    services: ServicesDep,
    principal: Principal,
    base_url: str,
    level: QueryLevel,
    study: str | None = None,
    series: str | None = None,
) -> Response:
    media_type = negotiate(request.headers.get("accept"))
    result = await services.qido.search(
        principal,
        level,
        request.query_params.multi_items(),
        base_url,
        study_uid=study,
        series_uid=series,
    )
    headers = {"Warning": f'299 iex "{result.warning}"'} if result.warning else None
    return await json_response(request, result.datasets, media_type=media_type, headers=headers)


@router.get("/studies", **_route(QueryLevel.STUDY, "Search for studies (QIDO-RS)"))
async def search_studies(
    request: Request, services: ServicesDep, principal: Reader, base_url: BaseUrlDep
) -> Response:
    return await _search(request, services, principal, base_url, QueryLevel.STUDY)


@router.get("/series", **_route(QueryLevel.SERIES, "Search for series (QIDO-RS)"))
async def search_series(
    request: Request, services: ServicesDep, principal: Reader, base_url: BaseUrlDep
) -> Response:
    return await _search(request, services, principal, base_url, QueryLevel.SERIES)


@router.get("/instances", **_route(QueryLevel.INSTANCE, "Search for instances (QIDO-RS)"))
async def search_instances(
    request: Request, services: ServicesDep, principal: Reader, base_url: BaseUrlDep
) -> Response:
    return await _search(request, services, principal, base_url, QueryLevel.INSTANCE)


@router.get(
    "/studies/{study}/series",
    **_route(QueryLevel.SERIES, "Search for the series of a study (QIDO-RS)"),
)
async def search_study_series(
    study: str, request: Request, services: ServicesDep, principal: Reader, base_url: BaseUrlDep
) -> Response:
    return await _search(request, services, principal, base_url, QueryLevel.SERIES, study)


@router.get(
    "/studies/{study}/instances",
    **_route(QueryLevel.INSTANCE, "Search for the instances of a study (QIDO-RS)"),
)
async def search_study_instances(
    study: str, request: Request, services: ServicesDep, principal: Reader, base_url: BaseUrlDep
) -> Response:
    return await _search(request, services, principal, base_url, QueryLevel.INSTANCE, study)


@router.get(
    "/studies/{study}/series/{series}/instances",
    **_route(QueryLevel.INSTANCE, "Search for the instances of a series (QIDO-RS)"),
)
async def search_series_instances(
    study: str,
    series: str,
    request: Request,
    services: ServicesDep,
    principal: Reader,
    base_url: BaseUrlDep,
) -> Response:
    return await _search(request, services, principal, base_url, QueryLevel.INSTANCE, study, series)
