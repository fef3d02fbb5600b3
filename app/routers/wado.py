"""WADO-RS routes (PS3.18 §10.4).

HTTP only: path segments are validated (UIDs per PS3.5 §9.1, frame lists, bulk data paths),
``Accept`` is parsed, and the service decides what to send. Retrieves stream
``multipart/related`` bodies; metadata is DICOM JSON.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from app.deps import BaseUrlDep, Reader, ServicesDep
from app.dicom.bulkdata import parse_bulk_path
from app.dicom.frames import parse_frame_list
from app.dicom.media import DICOM_JSON, parse_accept
from app.dicom.uids import validate_uid
from app.routers.responses import json_response
from app.routers.routing import ResourceRoute
from app.services.wado import Retrieval

router = APIRouter(prefix="/dicomweb", tags=["WADO-RS"], route_class=ResourceRoute)

AcceptHeader = Annotated[
    str | None,
    Header(
        description=(
            'e.g. multipart/related; type="application/dicom"; transfer-syntax=* '
            "(PS3.18 §8.7.3). Missing or */*: the default representation."
        )
    ),
]

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_DETAIL = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {"detail": {"type": "string"}},
            "required": ["detail"],
        }
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "A UID, frame list or bulk data path is malformed", "content": _DETAIL},
    404: {"description": "No such study, series, instance, frame or bulk data", "content": _DETAIL},
    406: {"description": "No acceptable representation can be produced", "content": _DETAIL},
}
_INSTANCES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The Part 10 objects, one part each (Content-Type: application/dicom; "
            "transfer-syntax=...). Default: Explicit VR Little Endian; transfer-syntax=* "
            "sends them as stored."
        ),
        "content": {
            'multipart/related; type="application/dicom"': _BINARY,
            'multipart/related; type="application/dicom"; transfer-syntax=*': _BINARY,
        },
    },
    **_ERRORS,
}
_METADATA: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A DICOM JSON array, one object per instance (PS3.18 Annex F.2)",
        "content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}},
    },
    **_ERRORS,
}
_PIXELS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "One part per frame (or one part for a bulk value). Native pixel data: "
            "application/octet-stream, little endian. Compressed: the frame as stored, with "
            "the media type of its transfer syntax (image/jpeg, image/jls, image/jp2, "
            "image/dicom-rle, ...)."
        ),
        "content": {
            'multipart/related; type="application/octet-stream"': _BINARY,
            'multipart/related; type="application/octet-stream"; transfer-syntax=*': _BINARY,
            'multipart/related; type="image/jpeg"': _BINARY,
            'multipart/related; type="image/jls"': _BINARY,
            'multipart/related; type="image/jp2"': _BINARY,
            'multipart/related; type="image/dicom-rle"': _BINARY,
        },
    },
    **_ERRORS,
}


def _stream(retrieval: Retrieval) -> StreamingResponse:
    headers = {"Vary": "Accept"}
    if retrieval.length is not None:
        # A known length spares the chunked coding, which copies every chunk once more.
        headers["Content-Length"] = str(retrieval.length)
    return StreamingResponse(retrieval.body, media_type=retrieval.media_type, headers=headers)


def _validate(study: str, series: str | None = None, instance: str | None = None) -> None:
    validate_uid(study, "Study Instance UID")
    if series is not None:
        validate_uid(series, "Series Instance UID")
    if instance is not None:
        validate_uid(instance, "SOP Instance UID")


# -- studies, series, instances (PS3.18 §10.4.1.1.3) --------------------------------------


@router.get(
    "/studies/{study}",
    summary="Retrieve a study (WADO-RS)",
    responses=_INSTANCES,
    response_class=Response,
)
async def retrieve_study(
    study: str,
    services: ServicesDep,
    principal: Reader,
    base_url: BaseUrlDep,
    accept: AcceptHeader = None,
) -> Response:
    _validate(study)
    ranges = parse_accept(accept)
    return _stream(
        await services.wado.retrieve(principal.trust, study, None, None, ranges, base_url)
    )


@router.get(
    "/studies/{study}/series/{series}",
    summary="Retrieve a series (WADO-RS)",
    responses=_INSTANCES,
    response_class=Response,
)
async def retrieve_series(
    study: str,
    series: str,
    services: ServicesDep,
    principal: Reader,
    base_url: BaseUrlDep,
    accept: AcceptHeader = None,
) -> Response:
    _validate(study, series)
    ranges = parse_accept(accept)
    return _stream(
        await services.wado.retrieve(principal.trust, study, series, None, ranges, base_url)
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}",
    summary="Retrieve an instance (WADO-RS)",
    responses=_INSTANCES,
    response_class=Response,
)
async def retrieve_instance(
    study: str,
    series: str,
    instance: str,
    services: ServicesDep,
    principal: Reader,
    base_url: BaseUrlDep,
    accept: AcceptHeader = None,
) -> Response:
    _validate(study, series, instance)
    ranges = parse_accept(accept)
    retrieval = await services.wado.retrieve(
        principal.trust, study, series, instance, ranges, base_url
    )
    return _stream(retrieval)


# -- metadata (PS3.18 §10.4.1.1.2) ----------------------------------------------------------


async def _metadata(
    request: Request,
    services: ServicesDep,
    trust: str,
    base_url: str,
    accept: str | None,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Response:
    _validate(study, series, instance)
    body = await services.wado.metadata(
        trust, study, series, instance, parse_accept(accept), base_url
    )
    return await json_response(request, body)


@router.get(
    "/studies/{study}/metadata",
    summary="Retrieve the metadata of a study (WADO-RS)",
    responses=_METADATA,
    response_class=Response,
)
async def retrieve_study_metadata(
    study: str,
    request: Request,
    services: ServicesDep,
    principal: Reader,
    base_url: BaseUrlDep,
    accept: AcceptHeader = None,
) -> Response:
    return await _metadata(request, services, principal.trust, base_url, accept, study)


@router.get(
    "/studies/{study}/series/{series}/metadata",
    summary="Retrieve the metadata of a series (WADO-RS)",
    responses=_METADATA,
    response_class=Response,
)
async def retrieve_series_metadata(
    study: str,
    series: str,
    request: Request,
    services: ServicesDep,
    principal: Reader,
    base_url: BaseUrlDep,
    accept: AcceptHeader = None,
) -> Response:
    return await _metadata(request, services, principal.trust, base_url, accept, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="Retrieve the metadata of an instance (WADO-RS)",
    responses=_METADATA,
    response_class=Response,
)
async def retrieve_instance_metadata(
    study: str,
    series: str,
    instance: str,
    request: Request,
    services: ServicesDep,
    principal: Reader,
    base_url: BaseUrlDep,
    accept: AcceptHeader = None,
) -> Response:
    return await _metadata(
        request, services, principal.trust, base_url, accept, study, series, instance
    )


# -- frames and bulk data (PS3.18 §10.4.1.1.4, §10.4.1.1.5) ---------------------------------


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="Retrieve frames of an instance (WADO-RS)",
    description="`frames` lists 1-based frame numbers separated by commas, e.g. `1,3,2`.",
    responses=_PIXELS,
    response_class=Response,
)
async def retrieve_frames(
    study: str,
    series: str,
    instance: str,
    frames: str,
    services: ServicesDep,
    principal: Reader,
    base_url: BaseUrlDep,
    accept: AcceptHeader = None,
) -> Response:
    _validate(study, series, instance)
    numbers = parse_frame_list(frames)
    retrieval = await services.wado.frames(
        principal.trust, study, series, instance, numbers, parse_accept(accept), base_url
    )
    return _stream(retrieval)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulk/{path:path}",
    summary="Retrieve bulk data of an instance (WADO-RS)",
    description=(
        "`path` is the element path of a BulkDataURI from the metadata: tags as 8 hex "
        "digits alternating with sequence item indexes, e.g. `7FE00010` or "
        "`00540016/0/00181072`. Values are sent little endian."
    ),
    responses=_PIXELS,
    response_class=Response,
)
async def retrieve_bulkdata(
    study: str,
    series: str,
    instance: str,
    path: str,
    services: ServicesDep,
    principal: Reader,
    base_url: BaseUrlDep,
    accept: AcceptHeader = None,
) -> Response:
    _validate(study, series, instance)
    bulk_path = parse_bulk_path(path)
    retrieval = await services.wado.bulkdata(
        principal.trust, study, series, instance, bulk_path, parse_accept(accept), base_url
    )
    return _stream(retrieval)
