"""The application factory: ``create_app(settings)`` builds a fresh, self-contained app."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app import __version__
from app.deps import Services, declare_security
from app.errors import IexError
from app.filelock import FileLock
from app.http.audit import AuditMiddleware
from app.metrics import Metrics, MetricsMiddleware
from app.routers.api import api_router
from app.routers.uploads import TUS_EXPOSED_HEADERS
from app.services.housekeeping import Housekeeping
from app.services.ingest import IngestPolicy, UploadIngest
from app.services.keys import INDEX_FILE, key_lock, open_data_keys
from app.services.qido import QidoService
from app.services.security import RatePolicy, Security, SecurityPolicy
from app.services.stow import StowLimits, StowService
from app.services.wado import WadoService
from app.settings import Settings
from app.storage.encrypted import EncryptedInstanceStore
from app.storage.filesystem import FileInstanceStore
from app.storage.sqlite_index import SQLiteMetadataIndex
from app.transfer.archives import ArchiveLimits, NonDicomPolicy
from app.transfer.state import UPLOADS_FILE, SQLiteUploadState
from app.transfer.tus import ResumableUploads, UploadLimits

log = logging.getLogger(__name__)

#: Under the data directory: the locks by which the processes serving it take turns.
RUN_DIR = "run"


def _operation_id(route: APIRoute) -> str:
    # Stable ids keep the checked-in OpenAPI document diffable.
    return route.name


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _ingest_policy(settings: Settings) -> IngestPolicy:
    return IngestPolicy(
        ArchiveLimits(
            max_members=settings.archive_max_members,
            max_member_bytes=settings.max_instance_bytes,
            max_total_bytes=settings.archive_max_total_bytes,
            max_ratio=settings.archive_max_ratio,
        ),
        NonDicomPolicy(settings.non_dicom_members),
    )


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        data_dir = settings.data_dir
        kek = settings.kek.get_secret_value() if settings.kek else None
        async with AsyncExitStack() as running:
            # Every process serving the data directory holds this; key rotation waits.
            running.enter_context(key_lock(data_dir, "start the gateway", shared=True))
            # Processes get ready one at a time: keys, databases and the first admin token
            # are made once, by the first.
            startup = FileLock(data_dir / RUN_DIR / "startup.lock")
            await asyncio.to_thread(startup.acquire, wait=True)
            running.callback(startup.release)
            keys = await asyncio.to_thread(open_data_keys, data_dir, kek)
            files = FileInstanceStore(data_dir)
            running.callback(files.close)
            store = EncryptedInstanceStore(files, keys, settings.segment_size)
            index = SQLiteMetadataIndex(data_dir / INDEX_FILE, key=keys.index_key)
            await index.open()
            running.push_async_callback(index.close)
            upload_state = SQLiteUploadState(data_dir / UPLOADS_FILE, key=keys.index_key)
            await upload_state.open()
            running.push_async_callback(upload_state.close)
            uploads = ResumableUploads(
                store,
                upload_state,
                UploadLimits(settings.max_upload_bytes, settings.upload_expiry),
            )
            security = await Security.open(
                data_dir,
                SecurityPolicy(
                    auth=settings.auth,
                    rates=RatePolicy(settings.rate_limit_burst, settings.rate_limit_per_minute),
                ),
                keys.index_key,
                settings.name,
            )
            running.push_async_callback(security.close)
            stow = StowService(
                store, index, StowLimits(settings.max_instance_bytes, settings.bulk_data_threshold)
            )
            ingest = UploadIngest(
                uploads,
                stow,
                security.audit,
                _ingest_policy(settings),
                FileLock(data_dir / RUN_DIR / "ingest.lock"),
            )
            uploads.on_complete = ingest.submit
            await ingest.start()
            running.push_async_callback(ingest.close)
            housekeeping = Housekeeping(
                store, index, uploads, settings.upload_sweep_interval, shared=files.shared
            )
            housekeeping.start()
            running.push_async_callback(housekeeping.close)
            app.state.services = Services(
                settings=settings,
                store=store,
                index=index,
                stow=stow,
                wado=WadoService(store, index),
                qido=QidoService(index),
                uploads=uploads,
                ingest=ingest,
                metrics=metrics,
                security=security,
            )
            startup.release()
            log.info("iex %s ready; data in %s", __version__, data_dir)
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
    return app


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``iex serve --workers N``: settings from the
    environment."""
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return create_app(settings)
