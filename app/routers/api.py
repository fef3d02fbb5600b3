"""The one place that assembles every router."""

from __future__ import annotations

from fastapi import APIRouter

from app.routers import admin, health, qido, stow, uploads, wado

api_router = APIRouter()
for module in (health, stow, wado, qido, uploads, admin):
    api_router.include_router(module.router)
