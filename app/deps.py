"""The one wiring point between HTTP handlers and the services built in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.metrics import Metrics
from app.services.qido import QidoService
from app.services.stow import StowService
from app.services.wado import WadoService
from app.settings import Settings
from app.storage.base import InstanceStore, MetadataIndex

#: Until trusts and authentication arrive, every request acts for the embedded trust.
DEFAULT_TRUST = "local"


@dataclass
class Services:
    """Everything the lifespan builds, kept on ``app.state.services``."""

    settings: Settings
    store: InstanceStore
    index: MetadataIndex
    stow: StowService
    wado: WadoService
    qido: QidoService
    metrics: Metrics


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_trust() -> str:
    return DEFAULT_TRUST


def get_base_url(request: Request) -> str:
    """Absolute URL of the DICOMweb root for Retrieve URLs and BulkDataURIs: the configured
    public URL, else the URL the client reached."""
    public: str | None = request.app.state.services.settings.public_url
    root = public if public else str(request.base_url).rstrip("/")
    return root + "/dicomweb"


ServicesDep = Annotated[Services, Depends(get_services)]
TrustDep = Annotated[str, Depends(get_trust)]
BaseUrlDep = Annotated[str, Depends(get_base_url)]
