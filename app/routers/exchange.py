"""Exchange between gateways, the recipient's side: ``GET /exchange/receipts/{transfer}``.

A partner that pushed a bundle here (``docs/EXCHANGE.md``, "Transport: pushing a bundle")
asks for its receipt by the transfer id until it has one: the signed receipt itself once
the bundle was stored or refused, 202 while it is being received, 404 when this gateway
holds no bundle of that id for the caller's trust (another trust's reads like a missing
one, as everywhere). A receipt lost on the way is only ever asked for again: it never
changes once given.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import JSONResponse

from app.deps import ServicesDep, Uploader
from app.errors import BadRequest, NotFound
from app.names import is_valid_name
from app.routers.routing import ResourceRoute

router = APIRouter(
    prefix="/exchange", tags=["Exchange between gateways"], route_class=ResourceRoute
)

#: Seconds a sender is asked to wait before asking again for a receipt still to come.
RETRY_AFTER = 1
#: The longest a request may ask to be held for its receipt (``?wait=``): under common
#: proxies' idle timeouts.
MAX_WAIT = 30

_RECEIPT_EXAMPLE = {
    "receipt": (
        '{"format":"iex-receipt/1","instances":2,"manifest_sha256":"9f86d081884c7d659a2feaa0'
        'c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","receiver":{"gateway":"gw-b","key":'
        '"sig-692bd532a30d15ec","trust":"rad-b"},"result":"stored","time":'
        '"2026-12-02T10:00:05Z","transfer":"8c1d0e2b5f6a4d7e9b3c2a1f0e9d8c7b"}'
    ),
    "signature": 'base64 of the 64-byte Ed25519 signature over "iex-receipt/1\\n" and the text',
}


@router.get(
    "/receipts/{transfer}",
    summary="The signed receipt of a bundle pushed to the caller's trust",
    description=(
        "The receipt this gateway gave the bundle of transfer `transfer` (the id in its "
        "manifest and in the final upload's `Upload-Metadata`), byte for byte as signed: "
        "`result` is `stored` (every instance stored) or `refused` (nothing stored; "
        "`reason` says why). Verify it against this gateway's signing key before trusting "
        "it (docs/EXCHANGE.md, Receipts). While the bundle is being verified or stored the "
        "answer is 202 with `Retry-After`; ask again then. A bundle refused before it was "
        "identified (framing, an unknown key, a bad signature, misaddressed) has no receipt: "
        "its upload's report says why. With `wait=N` the answer is held up to N seconds "
        "(at most 30) until the receipt is there, so that a sender learns of it at once "
        "without asking again and again; a 202 or 404 then comes only once that time is up."
    ),
    response_class=Response,
    responses={
        200: {
            "description": "The receipt document: its canonical text and the signature",
            "content": {"application/json": {"example": _RECEIPT_EXAMPLE}},
        },
        202: {
            "description": "The bundle is being received; ask again after `Retry-After` s",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            "content": {"application/json": {"example": {"state": "sending"}}},
        },
        400: {"description": "`transfer` is not a transfer id"},
        404: {"description": "No bundle of that transfer id for the caller's trust"},
    },
)
async def exchange_receipt(
    transfer: Annotated[
        str,
        Path(
            description="The transfer id: 1-64 letters, digits, `.`, `_` or `-`, starting "
            "with a letter or digit (iex's are 32 lower-case hex digits)"
        ),
    ],
    services: ServicesDep,
    principal: Uploader,
    wait: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_WAIT,
            description="Seconds to hold the answer until the receipt is there (0-30)",
        ),
    ] = 0,
) -> Response:
    if not is_valid_name(transfer):
        raise BadRequest(
            "a transfer id is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit"
        )
    # Held by polling the record: the bundle may be received by another process serving
    # the same data directory (or, scaled out, another host), so no in-process signal
    # would do. A read every quarter second at most is cheap beside a bundle's ingest.
    deadline = time.monotonic() + wait
    pause = 0.02
    while True:
        try:
            job = await services.transfers.arrival(principal.trust, transfer)
        except NotFound:
            if time.monotonic() >= deadline:
                raise
        else:
            if job.receipt is not None or time.monotonic() >= deadline:
                break
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.25)
    no_store = {"Cache-Control": "no-store"}
    if job.receipt is not None:
        return Response(job.receipt, media_type="application/json", headers=no_store)
    if not job.state.final:
        return JSONResponse(
            {"state": job.state.value},
            status_code=202,
            headers={**no_store, "Retry-After": str(RETRY_AFTER)},
        )
    raise NotFound(f"transfer {transfer} ended without a receipt: it was {job.state.value} here")
