"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.deps import Operator, ServicesDep
from app.metrics import CONTENT_TYPE
from app.routers.routing import ResourceRoute

router = APIRouter(tags=["operations"], route_class=ResourceRoute)


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The audit trail, the store and the index are usable",
    description="The audit trail is checked with a durable write that adds no record: "
    "while it fails, patient data is not served (503) and neither is this.",
    responses={503: {"description": "The audit trail, the store or the index is not usable"}},
)
async def readyz(services: ServicesDep) -> dict[str, str]:
    await services.security.audit.check()
    await services.store.check()
    await services.index.check()
    return {"status": "ready"}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Gateway-wide counts, so only admins of the operator trust may read them "
    "(Prometheus: `authorization: {credentials_file: ...}`).",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}}},
)
async def metrics(services: ServicesDep, principal: Operator) -> Response:
    stats = await services.index.stats()
    services.metrics.instances.set(stats.instances)
    services.metrics.bytes.set(stats.bytes)
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
