"""Pulls of priors from partner gateways: ``POST /pulls``, ``GET /pulls``, ``GET /pulls/{id}``.

A reader asks a partner trust for the studies matching a few QIDO-RS study keys; the
partner queues a transfer per match, and the studies arrive as inbound transfers. The
protocol between the gateways is in ``docs/EXCHANGE.md`` (Pulls).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from app.deps import Reader, ServicesDep
from app.errors import Forbidden
from app.routers.responses import json_response
from app.routers.routing import ResourceRoute
from app.services.pulls import MAX_LIST, MAX_PULL_STUDIES, PULL_KEYS, PullOrder

router = APIRouter(tags=["pulls"], route_class=ResourceRoute)


class PullBody(BaseModel):
    """What to pull, and from where."""

    model_config = ConfigDict(extra="forbid", strict=True)

    partner: str = Field(description="The partner gateway, by its name")
    partner_trust: str = Field(description="The partner's trust whose studies are pulled")
    query: dict[str, str] = Field(
        description="QIDO-RS study matching keys by keyword, with their values as in a "
        f"QIDO-RS query (e.g. `StudyDate` `20200101-`): {', '.join(PULL_KEYS)}. At least "
        "one value must match something in particular.",
        examples=[{"PatientID": "12345", "StudyDate": "20200101-", "ModalitiesInStudy": "CT"}],
    )
    limit: int = Field(
        default=MAX_PULL_STUDIES,
        ge=1,
        le=MAX_PULL_STUDIES,
        description="The most studies to pull (the partner may cap it lower)",
    )
    priority: Literal["routine", "urgent"] = Field(
        default="routine", description="The priority of the transfers the partner queues"
    )


_PULL_VIEW = (
    "The pull: `id`, `trust`, `partner`, `partner_trust`, `query`, `limit`, `priority`, "
    "`created`, `state` (`answered` or `failed`), `error`, and `studies`: each matched study "
    "with the id of the partner's `transfer` and its `state` here (`pending` until the "
    "transfer begins to arrive, then the inbound transfer's state) and `last_error`."
)


@router.post(
    "/pulls",
    summary="Pull studies from a partner",
    description="Asks the partner trust for the studies matching `query`, under an "
    "agreement of the caller's trust with it allowing `pull`. The partner queues one "
    "transfer per matching study; they arrive as inbound transfers. " + _PULL_VIEW,
    status_code=202,
    response_class=Response,
    responses={
        202: {
            "description": "The pull, answered by the partner; `Location` names it",
            "content": {"application/json": {}},
        },
        400: {"description": "A malformed body, partner name or query"},
        403: {"description": "No agreement of the caller's trust allows pulling from there"},
        409: {"description": "The partner has given this gateway no token yet"},
        502: {
            "description": "The partner could not be reached or failed; the pull is "
            "recorded as failed"
        },
    },  # fmt: skip
)
async def create_pull(
    body: PullBody, request: Request, services: ServicesDep, principal: Reader
) -> Response:
    order = PullOrder(body.partner, body.partner_trust, body.query, body.limit, body.priority)
    try:
        pull = await services.pulls.request(principal, order)
    except Forbidden as exc:
        request.state.audit_reason = exc.detail
        raise
    view = await services.pulls.view(pull)
    return await json_response(
        request,
        view,
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/pulls/{pull.id}"},
    )


@router.get(
    "/pulls",
    summary="List the trust's pulls",
    description="The pulls of the caller's trust, newest first, each with how many "
    "studies it matched.",
    response_class=Response,
    responses={
        200: {"description": "A JSON array of pulls", "content": {"application/json": {}}},
        400: {"description": "A malformed limit"},
    },
)
async def list_pulls(
    request: Request,
    services: ServicesDep,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST, description="The most pulls listed")] = 100,
) -> Response:
    pulls = await services.pulls.list(principal, limit)
    listing: list[dict[str, Any]] = [services.pulls.summary(p) for p in pulls]
    return await json_response(request, listing, media_type="application/json")


@router.get(
    "/pulls/{pull_id}",
    summary="Show a pull",
    description=_PULL_VIEW + " Another trust's pull reads as missing.",
    response_class=Response,
    responses={
        200: {"description": "The pull", "content": {"application/json": {}}},
        404: {"description": "No such pull in the caller's trust"},
    },
)
async def show_pull(
    pull_id: str, request: Request, services: ServicesDep, principal: Reader
) -> Response:
    pull = await services.pulls.get(principal, pull_id)
    view = await services.pulls.view(pull)
    return await json_response(request, view, media_type="application/json")
