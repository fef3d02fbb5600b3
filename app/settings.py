"""Service configuration, read from arguments or ``IEX_*`` environment variables.

Never instantiated at import time: ``create_app`` and the CLI build a ``Settings``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IEX_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Path("./var")

    #: Largest STOW-RS request body accepted, in bytes (413 above it).
    max_request_bytes: int = Field(default=2 * 1024**3, gt=0)
    #: Largest single DICOM object accepted inside a request, in bytes.
    max_instance_bytes: int = Field(default=1024**3, gt=0)
    #: Largest ``limit`` a QIDO-RS query may ask for.
    max_query_limit: int = Field(default=10_000, gt=0)
    #: Results returned when a QIDO-RS query gives no ``limit``.
    default_query_limit: int = Field(default=1_000, gt=0)
    #: Binary values longer than this become BulkDataURIs in metadata (PS3.18 F.2.6).
    bulk_data_threshold: int = Field(default=1024, ge=0)
    #: The gateway's external URL (e.g. ``https://pacs-gw.trust.nhs.uk``) for Retrieve URLs and
    #: BulkDataURIs, when a proxy sits in front. Unset: taken from each request's Host.
    public_url: str | None = None
    #: Origins allowed by CORS, for browser viewers such as OHIF. Empty: CORS off.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: str = "info"

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("IEX_PUBLIC_URL must start with http:// or https://")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value
