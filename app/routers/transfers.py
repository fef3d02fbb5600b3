"""Transfers to partner gateways: ``/transfers``.

::

    POST   /transfers                              push a study (uploader): 202 and Location
    GET    /transfers?direction=&state=&partner=&limit=     the trust's transfers (reader)
    GET    /transfers/{transfer_id}                one transfer (reader)
    DELETE /transfers/{transfer_id}                cancel it (uploader)
    POST   /transfers/{transfer_id}/pause|resume|retry      (uploader)

A trust sees only its own transfers: another trust's answers exactly like one that does not
exist (404). Cancelling a cancelled transfer changes nothing and answers its view again (so
a DELETE repeated after a lost answer is safe); a delivered transfer, or one awaiting its
receipt, cannot be cancelled (409, ``app.transfer.jobs``).

The tus endpoint shares the prefix (``/transfers/uploads``, included before this router):
``uploads`` is never taken for a transfer id (``TransferRoute``), so every method there is
answered as before, and an id that is not one, a ``/`` smuggled into it included, is
refused with 400 rather than read as another resource.

Every push asked for, every change to one (cancel, pause, resume, retry) and every refusal
is audited: the route names the study, the partner's trust and the transfer on
``request.state`` and what came of it, or why it was refused, as ``audit_reason``; the
audit middleware writes the record before the answer leaves (``app.http.audit``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.routing import Match
from starlette.types import Scope

from app.deps import Reader, RootUrlDep, ServicesDep, Uploader, authenticate
from app.dicom.media import MalformedMediaType, read_media_type
from app.dicom.uids import InstanceRef, validate_uid
from app.errors import BadRequest, IexError, PayloadTooLarge, UnsupportedMediaType
from app.names import check_name
from app.routers.responses import json_response
from app.routers.routing import ResourceRoute
from app.routers.transfer_schemas import (
    MAX_REQUEST_BYTES,
    PushRequest,
    TransferList,
    TransferView,
    read_push_request,
)
from app.services.audit import TransferSubject
from app.services.security import Principal
from app.services.streams import limit_stream
from app.services.transfers import MAX_LIST, view
from app.transfer.jobs import TransferJob, is_job_id

PREFIX = "/transfers"
#: The segment under the prefix that belongs to the tus endpoint (``app.routers.uploads``).
UPLOADS = "uploads"
JSON = "application/json"
_ACTIONS = ("pause", "resume", "retry")
_FILTERS = ("direction", "state", "partner", "limit")


class TransferRoute(ResourceRoute):
    """A route of this module: never a match for ``/transfers/uploads``, the tus endpoint."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE and child.get("path_params", {}).get("transfer_id") == UPLOADS:
            return Match.NONE, {}
        return match, child


router = APIRouter(prefix=PREFIX, tags=["Transfers to partners"], route_class=TransferRoute)

_VIEW = {"model": TransferView}
_NOT_FOUND = {"description": "No such transfer in the caller's trust"}
_BAD_ID = {"description": "Not a transfer id (32 lower-case hexadecimal digits)"}


def _transfer_id(value: str) -> str:
    if not is_job_id(value):
        raise BadRequest(
            f"{value[:64]!r} is not a transfer id: transfer ids are 32 lower-case hexadecimal "
            "digits"
        )
    return value


@contextmanager
def _audited(request: Request, kind: str) -> Iterator[None]:
    """Record the exchange as ``kind``, with the reason of any refusal."""
    request.state.audit_kind = kind
    try:
        yield
    except IexError as exc:
        request.state.audit_reason = exc.detail
        raise


def _subject(request: Request, job: TransferJob) -> None:
    request.state.audit_transfer = TransferSubject(job.partner, job.partner_trust, job.id)
    request.state.audit_objects = [InstanceRef(job.study)]


async def _answer(
    request: Request, job: TransferJob, status: int = 200, **headers: str
) -> Response:
    return await json_response(
        request,
        view(job),
        status,
        media_type=JSON,
        headers={"Cache-Control": "no-store", **headers},
    )


# -- pushing a study ---------------------------------------------------------------------------


async def _request_body(request: Request) -> bytes:
    """The body of a push: JSON (UTF-8), at most ``MAX_REQUEST_BYTES``, read as it arrives
    and never past the bound, whatever Content-Length says."""
    raw_type = request.headers.get("content-type", "")
    try:
        media = read_media_type(raw_type) if raw_type.strip() else None
    except MalformedMediaType as exc:
        raise UnsupportedMediaType(f"the Content-Type is malformed: {exc.detail}") from None
    if media is None or media.mime != JSON:
        raise UnsupportedMediaType(f"Content-Type {raw_type[:100]!r} is not supported; send {JSON}")
    charset = media.params.get("charset", "utf-8").lower()
    if charset != "utf-8":
        raise UnsupportedMediaType(f"charset {charset[:40]!r} is not supported; send UTF-8")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(declared) > MAX_REQUEST_BYTES:
            raise PayloadTooLarge(
                f"a transfer request of {declared} bytes exceeds {MAX_REQUEST_BYTES} bytes"
            )
    body = bytearray()
    async for chunk in limit_stream(request.stream(), MAX_REQUEST_BYTES):
        body += chunk
    return bytes(body)


@router.post(
    "",
    summary="Push a study to a partner trust",
    description=(
        "Queues the study for the partner's trust and answers at once with the transfer "
        "(202); `Location` names it, and `GET` follows it to `delivered` or `failed`. "
        "Nothing is queued unless the caller's trust holds the study and has an agreement "
        "with the partner's trust allowing `send` (`iex agreement add`)."
    ),
    status_code=202,
    response_class=Response,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": PushRequest.model_json_schema()}},
        }
    },
    responses={
        202: {
            **_VIEW,
            "description": "Queued; Location names the transfer",
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
        400: {"description": "A malformed request: the field and the rule are named"},
        403: {"description": "No agreement allows the caller's trust to send to that trust"},
        404: {"description": "The caller's trust holds no such study"},
        413: {"description": f"A body over {MAX_REQUEST_BYTES} bytes"},
        415: {"description": "The body is not application/json (UTF-8)"},
    },
)
async def push_study(
    request: Request, services: ServicesDep, principal: Uploader, root: RootUrlDep
) -> Response:
    with _audited(request, "push"):
        asked = read_push_request(await _request_body(request))
        study = validate_uid(asked.study, "the study's Study Instance UID")
        partner = check_name(asked.partner, "partner")
        partner_trust = check_name(asked.partner_trust, "partner trust")
        # Named before anything is decided, so that a refusal's record names it too.
        request.state.audit_transfer = TransferSubject(partner, partner_trust)
        request.state.audit_objects = [InstanceRef(study)]
        job = await services.pushes.push(
            principal.trust,
            study=study,
            partner=partner,
            partner_trust=partner_trust,
            priority=asked.priority,
        )
        _subject(request, job)
        request.state.audit_reason = f"push queued ({job.priority.value})"
    return await _answer(request, job, 202, Location=f"{root}{PREFIX}/{job.id}")


# -- reading -----------------------------------------------------------------------------------


def _only_filters(request: Request) -> None:
    """Unknown or repeated parameters are refused: a misspelt filter must not widen a list."""
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in _FILTERS:
            raise BadRequest(
                f"unknown parameter {name[:40]!r}; the filters are {', '.join(_FILTERS)}"
            )
        if name in seen:
            raise BadRequest(f"parameter {name!r} is given more than once")
        seen.add(name)


@router.get(
    "",
    summary="The caller's trust's transfers, newest first",
    response_class=Response,
    responses={
        200: {"model": TransferList, "description": "The transfers matching every filter"},
        400: {"description": "An unknown filter or value; the allowed ones are named"},
    },
)
async def list_transfers(
    request: Request,
    services: ServicesDep,
    principal: Reader,
    direction: Annotated[str | None, Query(description="`out` (pushed) or `in` (received)")] = None,
    state: Annotated[str | None, Query(description="One state, e.g. `failed`")] = None,
    partner: Annotated[str | None, Query(description="The partner gateway's name")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST, description="At most this many")] = 100,
) -> Response:
    _only_filters(request)
    found = await services.transfers.list(
        principal.trust, direction=direction, state=state, partner=partner, limit=limit
    )
    return await json_response(
        request,
        {"transfers": [view(job) for job in found]},
        media_type=JSON,
        headers={"Cache-Control": "no-store"},
    )


@router.get(
    "/{transfer_id}",
    summary="One transfer: its state and progress",
    response_class=Response,
    responses={200: {**_VIEW, "description": "The transfer"}, 400: _BAD_ID, 404: _NOT_FOUND},
)
async def get_transfer(
    transfer_id: str, request: Request, services: ServicesDep, principal: Reader
) -> Response:
    job = await services.transfers.get(principal.trust, _transfer_id(transfer_id))
    return await _answer(request, job)


# -- changing one --------------------------------------------------------------------------------

Change = Callable[[str, str], Awaitable[TransferJob]]


async def _change(
    request: Request,
    services: ServicesDep,
    principal: Principal,
    transfer_id: str,
    what: str,
    change: Change,
) -> Response:
    with _audited(request, "push-change"):
        job = await services.transfers.get(principal.trust, _transfer_id(transfer_id))
        _subject(request, job)
        job = await change(principal.trust, job.id)
        request.state.audit_reason = f"transfer {what}: now {job.state.value}" + (
            " (paused)" if job.paused else ""
        )
    return await _answer(request, job)


_CHANGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _BAD_ID,
    404: _NOT_FOUND,
    409: {"description": "The transfer's state does not allow it; the message says why"},
}


@router.delete(
    "/{transfer_id}",
    summary="Cancel a transfer",
    description=(
        "A running transfer stops at once. A transfer `delivered`, or `awaiting-receipt` "
        "(sent whole: the partner may hold it already), cannot be cancelled (409). "
        "Cancelling a cancelled transfer changes nothing and answers its view again."
    ),
    response_class=Response,
    responses={200: {**_VIEW, "description": "The transfer, cancelled"}, **_CHANGE_RESPONSES},
)
async def cancel_transfer(
    transfer_id: str, request: Request, services: ServicesDep, principal: Uploader
) -> Response:
    return await _change(
        request, services, principal, transfer_id, "cancelled", services.transfers.cancel
    )


@router.post(
    "/{transfer_id}/pause",
    summary="Pause a transfer where it is",
    description="It keeps its step and progress until resumed; 409 once it is final.",
    response_class=Response,
    responses={200: {**_VIEW, "description": "The transfer, paused"}, **_CHANGE_RESPONSES},
)
async def pause_transfer(
    transfer_id: str, request: Request, services: ServicesDep, principal: Uploader
) -> Response:
    return await _change(
        request, services, principal, transfer_id, "paused", services.transfers.pause
    )


@router.post(
    "/{transfer_id}/resume",
    summary="Resume a paused transfer",
    description="It continues from where it was paused, now; 409 once it is final.",
    response_class=Response,
    responses={200: {**_VIEW, "description": "The transfer, resumed"}, **_CHANGE_RESPONSES},
)
async def resume_transfer(
    transfer_id: str, request: Request, services: ServicesDep, principal: Uploader
) -> Response:
    return await _change(
        request, services, principal, transfer_id, "resumed", services.transfers.resume
    )


@router.post(
    "/{transfer_id}/retry",
    summary="Try a transfer again",
    description=(
        "A failed transfer is queued again with a new retry window; one waiting out a "
        "backoff runs now. 409 for a transfer delivered or cancelled."
    ),
    response_class=Response,
    responses={200: {**_VIEW, "description": "The transfer, queued again"}, **_CHANGE_RESPONSES},
)
async def retry_transfer(
    transfer_id: str, request: Request, services: ServicesDep, principal: Uploader
) -> Response:
    return await _change(
        request, services, principal, transfer_id, "retried", services.transfers.retry
    )


# -- what is not a transfer ------------------------------------------------------------------------


class _NotATransferRoute(TransferRoute):
    """Paths under the prefix that no route of this module or the tus one names: deeper
    than ``{id}`` and ``{id}/<action>``, typically a ``/`` decoded from ``%2F``. Without it
    they would read as a plain 404 of another kind; they get a 400 that says what a
    transfer's path is. Shapes the routes above name are left to them (and their 405s), and
    ``uploads/...`` to the tus routes."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        rest = str(child.get("path_params", {}).get("rest", ""))
        segments = rest.split("/")
        named = len(segments) == 1 or (len(segments) == 2 and segments[1] in _ACTIONS)
        if match is Match.NONE or segments[0] == UPLOADS or named:
            return Match.NONE, {}
        return match, child


async def not_a_transfer(
    rest: str, principal: Annotated[Principal, Depends(authenticate)]
) -> Response:
    raise BadRequest(
        f"{rest[:100]!r} is not a transfer resource: they are {PREFIX}/{{id}} and "
        f"{PREFIX}/{{id}}/{'|'.join(_ACTIONS)}, the id 32 lower-case hexadecimal digits"
    )


router.add_api_route(
    "/{rest:path}",
    not_a_transfer,
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
    response_class=Response,
    route_class_override=_NotATransferRoute,
)
