"""What became of a resumable upload: ``GET /transfers/uploads/{upload_id}/report``.

A plain JSON route beside the tus ones (no ``Tus-Resumable`` needed): scripts poll it after
the last byte until ``state`` is ``complete`` or ``failed``. The same visibility rules as the
upload itself apply: another trust's upload answers 404 like a missing one.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import ServicesDep, Uploader
from app.routers.responses import json_response
from app.routers.routing import ResourceRoute
from app.routers.uploads import PREFIX

router = APIRouter(prefix=PREFIX, tags=["Resumable uploads (tus)"], route_class=ResourceRoute)

_EXAMPLE = {
    "id": "8c1d0e2b5f6a4d7e9b3c2a1f0e9d8c7b",
    "state": "complete",
    "trust": "rxh",
    "filename": "ct-head.zip",
    "content_type": "application/zip",
    "concat": None,
    "length": 52428800,
    "offset": 52428800,
    "created_at": "2026-11-26T10:00:00Z",
    "expires_at": "2026-11-27T10:02:00Z",
    "finished_at": "2026-11-26T10:02:00Z",
    "progress": {"bytes_read": 52428800, "bytes_total": 52428800, "objects_seen": None},
    "counts": {"stored": 2, "already_stored": 0, "failed": 0, "skipped": 1},
    "studies": [{"study_uid": "1.2.826.0.1.3680043.8.498.1", "instances": ["1.2.3.4", "1.2.3.5"]}],
    "failures": [],
    "skipped": [{"member": "README.txt", "reason": "not a DICOM file (no DICM prefix)"}],
    "error": None,
}


@router.get(
    "/{upload_id}/report",
    summary="The state of an upload and what its ingest stored or refused",
    description=(
        "`state` is `receiving` (bytes still arriving), `verifying` (queued; the whole-payload "
        "sha256 being checked), `ingesting`, `complete` (every object stored: `studies` lists "
        "the Study and SOP Instance UIDs) or `failed` (nothing stored: `error` says why and "
        "`failures` which objects, by archive member or multipart part). `progress` tells "
        "how far ingest has read. Kept until the upload expires."
    ),
    response_class=Response,
    responses={
        200: {
            "description": "The report",
            "content": {"application/json": {"example": _EXAMPLE}},
        },
        404: {"description": "No such upload (or terminated)"},
        410: {"description": "The upload expired"},
    },
)
async def upload_report(
    upload_id: str, request: Request, services: ServicesDep, principal: Uploader
) -> Response:
    report = await services.ingest.report(principal.trust, upload_id)
    return await json_response(
        request, report, media_type="application/json", headers={"Cache-Control": "no-store"}
    )
