"""The one place that assembles every router."""

from __future__ import annotations

from fastapi import APIRouter

from app.routers import admin, health, qido, stow, transfers, upload_reports, uploads, wado

api_router = APIRouter()
# The tus routes come before the transfers' ones, which share their prefix.
for module in (health, stow, wado, qido, uploads, upload_reports, transfers, admin):
    api_router.include_router(module.router)
