"""Resumable uploads: the tus 1.0.0 protocol at ``/transfers/uploads``.

Core protocol plus creation, creation-with-upload, expiration, checksum (sha1, sha256),
termination and concatenation (https://tus.io/protocols/resumable-upload). The protocol
itself lives in ``app.transfer``; this module maps headers to it and back.

* Every response carries ``Tus-Resumable: 1.0.0``; every request but ``OPTIONS`` must send
  it, else 412 with ``Tus-Version`` (§Core Protocol, Tus-Resumable).
* ``OPTIONS`` needs no credentials: it only advertises capabilities (§Core Protocol,
  OPTIONS), as tus clients ask before they authenticate anything.
* Everything else needs the ``uploader`` role; an upload belongs to the caller's trust and
  another trust's upload answers exactly like a missing one (404).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from email.utils import formatdate
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from app.deps import RootUrlDep, ServicesDep, Uploader
from app.errors import BadRequest, IexError, PreconditionFailed, UnsupportedMediaType
from app.routers.routing import ResourceRoute
from app.transfer.uploads import (
    CHECKSUM_ALGORITHMS,
    EXTENSIONS,
    OFFSET_OCTET_STREAM,
    TUS_VERSION,
    Upload,
    format_concat,
    parse_checksum,
    parse_concat,
    parse_length,
    parse_metadata,
)

log = logging.getLogger(__name__)

PREFIX = "/transfers/uploads"
#: Response headers a browser client must be allowed to read (CORS).
TUS_EXPOSED_HEADERS = (
    "Location",
    "Tus-Resumable",
    "Tus-Version",
    "Tus-Extension",
    "Tus-Max-Size",
    "Tus-Checksum-Algorithm",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Metadata",
    "Upload-Expires",
    "Upload-Concat",
)


class TusRoute(ResourceRoute):
    """A route speaking tus: the version check before anything else, ``Tus-Resumable`` on
    every answer, errors included (so they are answered here, not by the app's handlers)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                if request.method != "OPTIONS":
                    version = request.headers.get("tus-resumable")
                    if version != TUS_VERSION:
                        raise PreconditionFailed(
                            f"Tus-Resumable {str(version)[:20]!r} is not supported; "
                            f"this server speaks tus {TUS_VERSION}"
                        )
                response = await handler(request)
            except IexError as exc:
                response = _error(request, exc)
            response.headers["Tus-Resumable"] = TUS_VERSION
            return response

        return run


def _error(request: Request, exc: IexError) -> Response:
    if exc.status_code >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
    headers = dict(exc.headers)
    if isinstance(exc, PreconditionFailed):
        headers["Tus-Version"] = TUS_VERSION
    # creation-with-upload: the upload exists even when its first chunk failed.
    location = getattr(request.state, "tus_location", None)
    if isinstance(location, str):
        headers["Location"] = location
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


router = APIRouter(prefix=PREFIX, tags=["Resumable uploads (tus)"], route_class=TusRoute)

_TUS_HEADER = {
    "name": "Tus-Resumable",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "enum": [TUS_VERSION]},
}


def _spec(*responses: tuple[int, str], body: bool = False) -> dict[str, Any]:
    # Every route but OPTIONS checks Tus-Resumable first (TusRoute).
    responses += ((412, "Tus-Resumable is missing or not 1.0.0"),)
    extra: dict[str, Any] = {
        "parameters": [_TUS_HEADER],
        "responses": {str(code): {"description": text} for code, text in sorted(responses)},
    }
    if body:
        extra["requestBody"] = {
            "content": {OFFSET_OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}
        }
    return extra


def _http_date(at: float) -> str:
    """RFC 9110 §5.6.7 IMF-fixdate, as §Expiration asks for ``Upload-Expires``."""
    return formatdate(at, usegmt=True)


def _content_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    return None if declared is None else parse_length(declared, "Content-Length")


def _has_body(request: Request) -> bool:
    declared = _content_length(request)
    return bool(declared) or (declared is None and "transfer-encoding" in request.headers)


def _require_offset_stream(request: Request) -> None:
    """§Core Protocol PATCH: chunks are ``application/offset+octet-stream``, else 415."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != OFFSET_OCTET_STREAM:
        raise UnsupportedMediaType(f"upload chunks must be sent as {OFFSET_OCTET_STREAM}")


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client going away just ends it (the engine keeps
    what arrived, see ``app.transfer.tus``). Never buffered whole."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        return


def _state_headers(upload: Upload) -> dict[str, str]:
    return {"Upload-Offset": str(upload.offset), "Upload-Expires": _http_date(upload.expires_at)}


@router.options(
    "",
    summary="Discover the tus capabilities (no credentials needed)",
    status_code=204,
    response_class=Response,
    responses={204: {"description": "Tus-Version, Tus-Extension, Tus-Max-Size, …"}},
)
async def upload_capabilities(services: ServicesDep) -> Response:
    """§Core Protocol OPTIONS, with §Creation ``Tus-Max-Size`` and §Checksum algorithms."""
    return Response(
        status_code=204,
        headers={
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": ",".join(EXTENSIONS),
            "Tus-Max-Size": str(services.uploads.limits.max_bytes),
            "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
        },
    )


@router.post(
    "",
    summary="Create an upload, optionally with its first chunk (tus creation)",
    status_code=201,
    response_class=Response,
    openapi_extra=_spec(
        (201, "Created; Location names the upload"),
        (400, "A malformed Upload-* header"),
        (413, "Upload-Length exceeds Tus-Max-Size"),
        (415, "A body that is not application/offset+octet-stream"),
        (460, "The first chunk does not match Upload-Checksum"),
        body=True,
    ),
)
async def create_upload(
    request: Request, services: ServicesDep, principal: Uploader, root: RootUrlDep
) -> Response:
    """§Creation, §Creation With Upload, §Concatenation (``Upload-Concat``)."""
    if "upload-defer-length" in request.headers:
        raise BadRequest("creation-defer-length is not offered; send Upload-Length")
    raw_length = request.headers.get("upload-length")
    length = None if raw_length is None else parse_length(raw_length, "Upload-Length")
    metadata = parse_metadata(request.headers.get("upload-metadata"))
    concat, parts = parse_concat(request.headers.get("upload-concat"), PREFIX + "/")
    with_body = _has_body(request)
    checksum = None
    if with_body:
        _require_offset_stream(request)
        checksum = parse_checksum(request.headers.get("upload-checksum"))
    upload = await services.uploads.create(
        principal.trust, length, metadata, concat, parts, actor=principal.actor
    )
    location = f"{root}{PREFIX}/{upload.id}"
    request.state.tus_location = location
    if with_body:
        upload = await services.uploads.append(
            principal.trust,
            upload.id,
            0,
            _body(request),
            declared=_content_length(request),
            checksum=checksum,
        )
    return Response(status_code=201, headers={"Location": location, **_state_headers(upload)})


@router.head(
    "/{upload_id}",
    summary="The offset and description of an upload",
    response_class=Response,
    openapi_extra=_spec(
        (200, "Upload-Offset, Upload-Length, Upload-Metadata, Upload-Expires"),
        (404, "No such upload (or terminated)"),
        (410, "The upload expired"),
    ),
)
async def upload_status(upload_id: str, services: ServicesDep, principal: Uploader) -> Response:
    """§Core Protocol HEAD: never cached (``Cache-Control: no-store``)."""
    upload = await services.uploads.get(principal.trust, upload_id)
    headers = {
        **_state_headers(upload),
        "Upload-Length": str(upload.length),
        "Cache-Control": "no-store",
    }
    if upload.metadata.raw:
        headers["Upload-Metadata"] = upload.metadata.raw
    concat = format_concat(upload, PREFIX + "/")
    if concat is not None:
        headers["Upload-Concat"] = concat
    return Response(status_code=200, headers=headers)


@router.patch(
    "/{upload_id}",
    summary="Append a chunk at Upload-Offset",
    status_code=204,
    response_class=Response,
    openapi_extra=_spec(
        (204, "Stored and fsynced; Upload-Offset is the new offset"),
        (400, "Upload-Offset or Upload-Checksum is missing or malformed"),
        (403, "A final upload cannot be patched"),
        (404, "No such upload (or terminated)"),
        (409, "Upload-Offset is not the upload's offset (the current one is returned)"),
        (410, "The upload expired"),
        (413, "The chunk runs past Upload-Length"),
        (415, "The body is not application/offset+octet-stream"),
        (460, "The chunk does not match Upload-Checksum; it was discarded"),
        body=True,
    ),
)
async def append_upload(
    upload_id: str, request: Request, services: ServicesDep, principal: Uploader
) -> Response:
    """§Core Protocol PATCH with §Checksum; 204 only once the chunk is durable."""
    _require_offset_stream(request)
    offset = parse_length(request.headers.get("upload-offset"), "Upload-Offset")
    checksum = parse_checksum(request.headers.get("upload-checksum"))
    upload = await services.uploads.append(
        principal.trust,
        upload_id,
        offset,
        _body(request),
        declared=_content_length(request),
        checksum=checksum,
    )
    return Response(status_code=204, headers=_state_headers(upload))


@router.delete(
    "/{upload_id}",
    summary="Terminate an upload and delete its bytes",
    status_code=204,
    response_class=Response,
    openapi_extra=_spec(
        (204, "Terminated; the upload now answers 404"),
        (404, "No such upload"),
        (409, "A partial upload joined by a final one; terminate the final upload"),
    ),
)
async def terminate_upload(upload_id: str, services: ServicesDep, principal: Uploader) -> Response:
    """§Termination."""
    await services.uploads.terminate(principal.trust, upload_id)
    return Response(status_code=204)
