"""The application factory: ``create_app(settings)`` builds a fresh, self-contained app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app import __version__
from app.deps import Services
from app.errors import IexError
from app.metrics import Metrics, MetricsMiddleware
from app.routers.api import api_router
from app.services.qido import QidoService
from app.services.stow import StowLimits, StowService
from app.services.wado import WadoService
from app.settings import Settings
from app.storage.filesystem import FileInstanceStore
from app.storage.sqlite_index import SQLiteMetadataIndex

log = logging.getLogger(__name__)


def _operation_id(route: APIRoute) -> str:
    # Stable ids keep the checked-in OpenAPI document diffable.
    return route.name


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = FileInstanceStore(settings.data_dir)
        index = SQLiteMetadataIndex(settings.data_dir / "index.sqlite3")
        await index.open()
        app.state.services = Services(
            settings=settings,
            store=store,
            index=index,
            stow=StowService(
                store,
                index,
                StowLimits(settings.max_instance_bytes, settings.bulk_data_threshold),
            ),
            wado=WadoService(store, index),
            qido=QidoService(index),
            metrics=metrics,
        )
        log.info("iex %s ready; data in %s", __version__, settings.data_dir)
        try:
            yield
        finally:
            await index.close()

    app = FastAPI(
        title="iex",
        summary="The imaging exchange gateway: DICOMweb between hospital trusts.",
        version=__version__,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    app.include_router(api_router)

    @app.exception_handler(IexError)
    async def _iex_error(request: Request, exc: IexError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
        return _error(exc.status_code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return _error(400, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(ClientDisconnect)
    async def _disconnect(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody is listening; the status only shows in metrics and logs.
        return _error(400, "the client disconnected before the request body was complete")

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Content-Type", "Content-Length", "Warning"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
