"""Service configuration, read from arguments or ``IEX_*`` environment variables.

Never instantiated at import time: ``create_app`` and the CLI build a ``Settings``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.names import is_valid_name, name_from_host


def _host_name() -> str:
    return name_from_host(socket.gethostname())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IEX_", extra="ignore")

    #: This gateway's name: the audit source of its records (PS3.15 A.5.2.4
    #: ``AuditSourceID``), so that two gateways' records tell apart. Default: the host name.
    name: str = Field(default_factory=_host_name)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Path("./var")
    #: Processes serving requests (one event loop each, all on the same data directory).
    #: One process uses about one core; give a machine's cores to reach its throughput.
    workers: int = Field(default=1, ge=1, le=64)

    #: Largest STOW-RS request body accepted, in bytes (413 above it).
    max_request_bytes: int = Field(default=2 * 1024**3, gt=0)
    #: Largest single DICOM object accepted inside a request, in bytes.
    max_instance_bytes: int = Field(default=1024**3, gt=0)
    #: Largest resumable (tus) upload accepted, in bytes (``Tus-Max-Size``; 413 above it).
    max_upload_bytes: int = Field(default=1024**3, gt=0)
    #: Seconds a resumable upload lives after its creation or last PATCH (``Upload-Expires``).
    upload_expiry: float = Field(default=24 * 3600.0, gt=0)
    #: Seconds between sweeps that remove expired uploads and their chunks.
    upload_sweep_interval: float = Field(default=300.0, gt=0)
    #: Outbound transfers to one partner gateway running at once (routine ones; an urgent
    #: transfer may use one more, so it never waits behind routine ones).
    transfer_partner_concurrency: int = Field(default=2, ge=1, le=64)
    #: Seconds a transfer keeps being retried after transient failures (without progress in
    #: between) before it fails; ``POST /transfers/{id}/retry`` queues it again.
    transfer_retry_window: float = Field(default=6 * 3600.0, gt=0)
    #: Seconds a process's claim on a running transfer lasts without renewal: how soon
    #: another process takes over the transfers of one that died.
    transfer_lease: float = Field(default=30.0, gt=0)
    #: Parts of a bundle's data sent to a partner at once, over as many connections (each
    #: part at least 8 MiB, so a small bundle uses fewer).
    exchange_streams: int = Field(default=4, ge=1, le=16)
    #: Zip and tar uploads: the most entries, the largest total once unpacked, and the
    #: highest compression ratio accepted (beyond: refused as a zip bomb).
    archive_max_members: int = Field(default=100_000, gt=0)
    archive_max_total_bytes: int = Field(default=4 * 1024**3, gt=0)
    archive_max_ratio: float = Field(default=200.0, ge=1.0)
    #: What to do with archive members that are not DICOM files (README, viewer software):
    #: ``skip`` them and list them in the report, or ``refuse`` the whole upload.
    non_dicom_members: Literal["skip", "refuse"] = "skip"
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
    #: The key-encryption key as written by ``iex keys`` (JSON with id and base64 key).
    #: Unset: the key file ``<data-dir>/keys/kek``, created on the first start.
    kek: SecretStr | None = None
    #: Plaintext bytes per encrypted segment: the unit of random access and of integrity.
    segment_size: int = Field(default=1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    #: Authentication and authorisation. ``IEX_AUTH=off`` is for development only: every
    #: caller then acts as an admin of trust ``local`` (a warning is logged at start).
    auth: bool = True
    #: Expensive requests (searches without matching keys, exports) a token may make at once,
    #: and how many per minute refill its bucket (429 with Retry-After beyond).
    rate_limit_burst: int = Field(default=20, ge=1)
    rate_limit_per_minute: float = Field(default=60.0, gt=0)
    #: TLS: the server certificate and key (PEM); with a client CA, partner gateways may
    #: authenticate with a client certificate pinned by ``iex partner add``.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    log_level: str = "info"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError(
                f"IEX_NAME {value[:80]!r} is not a name: 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("kek", mode="before")
    @classmethod
    def _empty_kek_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

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
