"""The one place that assembles every router."""

from __future__ import annotations

from fastapi import APIRouter

from app.routers import (
    admin,
    exchange,
    exchange_requests,
    health,
    partner_search,
    pulls,
    qido,
    stow,
    transfers,
    upload_reports,
    uploads,
    wado,
)

api_router = APIRouter()
for module in (
    health,
    stow,
    wado,
    qido,
    uploads,
    upload_reports,
    # The tus routes come before the transfers' ones, which share their prefix.
    transfers,
    exchange,
    admin,
    pulls,
    partner_search,
    exchange_requests,
):
    api_router.include_router(module.router)
