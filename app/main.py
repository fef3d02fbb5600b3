"""The application factory: ``create_app(settings)`` builds a fresh, self-contained app.

The app is routes, error handlers and middleware; its lifespan enters ``build_services``
(``app.services.wiring``), which builds and tears down everything behind the routes.
"""

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
from app.allocator import tune_allocator
from app.deps import declare_security
from app.errors import IexError
from app.http.audit import AuditMiddleware
from app.http.metrics import MetricsMiddleware
from app.metrics import Metrics
from app.routers.api import api_router
from app.routers.uploads import TUS_EXPOSED_HEADERS
from app.services.wiring import build_services
from app.settings import Settings

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
        tune_allocator()  # in each process serving, before any payload crosses it
        async with build_services(settings, metrics=metrics) as services:
            app.state.services = services
            log.info("iex %s ready; data in %s", __version__, settings.data_dir)
            yield

    app = FastAPI(
        title="iex",
        summary="The imaging exchange gateway: DICOMweb between hospital trusts.",
        version=__version__,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    app.include_router(api_router)
    declare_security(app)
    _handle_errors(app)
    _add_middleware(app, settings, metrics)
    return app


def _handle_errors(app: FastAPI) -> None:
    """Every error answers ``{"detail": ...}`` with its status and headers."""

    @app.exception_handler(IexError)
    async def _iex_error(request: Request, exc: IexError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
        return _error(exc.status_code, exc.detail, exc.headers or None)

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


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    # Each one added wraps those added before it: the metrics, added last, time everything.
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS", "HEAD", "PATCH", "DELETE"],
            allow_headers=["*"],
            expose_headers=["Content-Type", "Content-Length", "Warning", *TUS_EXPOSED_HEADERS],
        )
    app.add_middleware(AuditMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``iex serve --workers N``: settings from the
    environment."""
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return create_app(settings)
