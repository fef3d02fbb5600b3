"""The gateway's parts, built from the settings and torn down together: ``build_services``.

This is the one place that picks the backends (the encrypted file store, the SQLite index,
upload state and security store) and hands them to the services, which know only the
Protocols of ``app.storage``. The app's lifespan enters it; so can a test or a command that
wants the gateway's services without HTTP.

Several processes may serve one data directory (``iex serve --workers N``); the file locks
taken here are how they share it (see ``build_services``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from app.crypto.keystore import DataKeys
from app.dicom.query import PagingLimits
from app.filelock import FileLock
from app.metrics import Metrics
from app.services.bundle_ingest import BundleIngest
from app.services.exchange_directory import ExchangeDirectory
from app.services.gateway_requests import GatewayRequests
from app.services.housekeeping import Housekeeping
from app.services.ingest import IngestPolicy, UploadIngest
from app.services.keys import INDEX_FILE, key_lock, open_data_keys
from app.services.packaging import StudyPackager
from app.services.partner_search import PartnerSearch
from app.services.pull_answers import PullAnswers
from app.services.pulls import PullService
from app.services.push import PartnerDelivery, PushPolicy
from app.services.pushes import PushService
from app.services.qido import QidoService
from app.services.security import (
    ADMIN_TOKEN_FILE,
    SECURITY_FILE,
    RatePolicy,
    Security,
    SecurityPolicy,
)
from app.services.stow import StowLimits, StowService
from app.services.transfer_runner import RunnerPolicy, TransferRunner
from app.services.transfers import TransferService
from app.services.wado import WadoService
from app.settings import Settings
from app.storage.base import InstanceStore, MetadataIndex
from app.storage.encrypted import EncryptedInstanceStore
from app.storage.filesystem import FileInstanceStore
from app.storage.sqlite_index import SQLiteMetadataIndex
from app.storage.sqlite_security import SQLiteSecurityStore
from app.transfer.archives import ArchiveLimits, NonDicomPolicy
from app.transfer.delivery import Delivery
from app.transfer.jobs import Backoff
from app.transfer.outbox import Outbox
from app.transfer.partner_http import PartnerClient
from app.transfer.sqlite_jobs import TRANSFERS_FILE, SQLiteTransferJobs
from app.transfer.sqlite_pulls import PULLS_FILE, SQLitePulls
from app.transfer.state import UPLOADS_FILE, SQLiteUploadState
from app.transfer.tus import ResumableUploads, UploadLimits

#: Under the data directory: the locks by which the processes serving it take turns.
RUN_DIR = "run"


@dataclass
class Services:
    """Everything ``build_services`` builds; the app keeps it on ``app.state.services``."""

    settings: Settings
    store: InstanceStore
    index: MetadataIndex
    stow: StowService
    wado: WadoService
    qido: QidoService
    uploads: ResumableUploads
    ingest: UploadIngest
    metrics: Metrics
    security: Security
    transfers: TransferService
    pulls: PullService
    pull_answers: PullAnswers
    partner_search: PartnerSearch
    pushes: PushService


@asynccontextmanager
async def build_services(
    settings: Settings, *, metrics: Metrics | None = None, delivery: Delivery | None = None
) -> AsyncIterator[Services]:
    """The services of one process serving ``settings.data_dir``, running until the context
    exits (background tasks stopped, databases and files closed, in reverse order).

    ``delivery`` does the sending of outbound transfers; by default, pushes to partner
    gateways (``PartnerDelivery``). Tests may give another.

    While it runs the process holds the keys' lock shared, so key rotation waits for every
    serving process to stop. Processes get ready one at a time, under the startup lock:
    keys, databases and the first admin token are made once, by the first.
    """
    data_dir = settings.data_dir
    async with AsyncExitStack() as running:
        running.enter_context(key_lock(data_dir, "start the gateway", shared=True))
        startup = FileLock(data_dir / RUN_DIR / "startup.lock")
        await asyncio.to_thread(startup.acquire, wait=True)
        running.callback(startup.release)
        kek = settings.kek.get_secret_value() if settings.kek else None
        keys = await asyncio.to_thread(open_data_keys, data_dir, kek)
        services = await _build(settings, keys, metrics or Metrics(), delivery, running)
        startup.release()
        yield services


async def _build(
    settings: Settings,
    keys: DataKeys,
    metrics: Metrics,
    delivery: Delivery | None,
    running: AsyncExitStack,
) -> Services:
    """The parts, each one's shutdown pushed on ``running`` as soon as it is started."""
    data_dir = settings.data_dir
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
        store, upload_state, UploadLimits(settings.max_upload_bytes, settings.upload_expiry)
    )
    security = await _security(settings, keys, running)
    # The identity partners import: made at the first start, and for a trust added since.
    trusts = [name for name, _ in await security.store.trusts()]
    await asyncio.to_thread(keys.ensure_identity, trusts)
    stow = StowService(
        store, index, StowLimits(settings.max_instance_bytes, settings.bulk_data_threshold)
    )
    transfers = await _transfers(
        settings,
        keys,
        delivery or _partner_delivery(settings, keys, store, index, security),
        running,
    )
    bundles = BundleIngest(
        uploads, stow, transfers, ExchangeDirectory(security.store), keys, settings.name
    )
    ingest = UploadIngest(
        uploads,
        stow,
        security.audit,
        _ingest_policy(settings),
        FileLock(data_dir / RUN_DIR / "ingest.lock"),
        bundles,
    )
    uploads.on_complete = ingest.submit
    await ingest.start()
    running.push_async_callback(ingest.close)
    housekeeping = Housekeeping(
        store, index, uploads, settings.upload_sweep_interval, shared=files.shared
    )
    housekeeping.start()
    running.push_async_callback(housekeeping.close)
    paging = PagingLimits(settings.default_query_limit, settings.max_query_limit)
    qido = QidoService(index, paging, security.gate)
    pulls = await _pulls(settings, keys, security, qido, transfers, running)
    return Services(
        settings=settings,
        store=store,
        index=index,
        stow=stow,
        wado=WadoService(store, index),
        qido=qido,
        uploads=uploads,
        ingest=ingest,
        metrics=metrics,
        security=security,
        transfers=transfers,
        pulls=pulls[0],
        pull_answers=pulls[1],
        partner_search=pulls[2],
        pushes=PushService(transfers, index, ExchangeDirectory(security.store)),
    )


async def _security(settings: Settings, keys: DataKeys, running: AsyncExitStack) -> Security:
    data_dir = settings.data_dir
    store = SQLiteSecurityStore(data_dir / SECURITY_FILE, key=keys.index_key)
    await store.open()
    running.push_async_callback(store.close)
    security = await Security.start(
        store,
        SecurityPolicy(
            auth=settings.auth,
            rates=RatePolicy(settings.rate_limit_burst, settings.rate_limit_per_minute),
        ),
        data_dir / ADMIN_TOKEN_FILE,
        settings.name,
    )
    running.push_async_callback(security.close)
    return security


async def _transfers(
    settings: Settings, keys: DataKeys, delivery: Delivery, running: AsyncExitStack
) -> TransferService:
    """Transfer jobs and this process's runner of them (stopped before its store closes)."""
    store = SQLiteTransferJobs(settings.data_dir / TRANSFERS_FILE, key=keys.index_key)
    await store.open()
    running.push_async_callback(store.close)
    policy = RunnerPolicy(
        partner_limit=settings.transfer_partner_concurrency,
        backoff=Backoff(window=settings.transfer_retry_window),
        lease=settings.transfer_lease,
    )
    runner = TransferRunner(store, delivery, policy)
    runner.start()
    running.push_async_callback(runner.close)
    sweeper = asyncio.create_task(
        Outbox(settings.data_dir).sweep_every(store, settings.upload_sweep_interval),
        name="outbox-sweep",
    )
    running.push_async_callback(_cancelled, sweeper)
    return TransferService(store, runner)


def _partner_delivery(
    settings: Settings,
    keys: DataKeys,
    store: InstanceStore,
    index: MetadataIndex,
    security: Security,
) -> PartnerDelivery:
    """Pushes to partners: studies packaged from this process's store and index, partners
    and agreements read from the security store at every run."""
    outbox = Outbox(settings.data_dir)
    return PartnerDelivery(
        ExchangeDirectory(security.store),
        StudyPackager(store, index, keys, outbox, settings.name),
        outbox,
        security.audit,
        settings.name,
        PushPolicy(streams=settings.exchange_streams),
    )


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _pulls(
    settings: Settings,
    keys: DataKeys,
    security: Security,
    qido: QidoService,
    transfers: TransferService,
    running: AsyncExitStack,
) -> tuple[PullService, PullAnswers, PartnerSearch]:
    """Pulls and federated searches, both sides, over one client of partners."""
    store = SQLitePulls(settings.data_dir / PULLS_FILE, key=keys.index_key)
    await store.open()
    running.push_async_callback(store.close)
    directory = ExchangeDirectory(security.store)
    requests = GatewayRequests(directory, keys.signing_key, settings.name, security.audit)
    client = PartnerClient()
    paging = PagingLimits(settings.default_query_limit, settings.max_query_limit)
    audit = security.audit
    return (
        PullService(
            directory=directory,
            requests=requests,
            client=client,
            store=store,
            transfers=transfers,
            paging=paging,
            audit=audit,
        ),
        PullAnswers(
            directory=directory,
            requests=requests,
            store=store,
            transfers=transfers,
            qido=qido,
            paging=paging,
            audit=audit,
        ),
        PartnerSearch(
            directory=directory,
            requests=requests,
            client=client,
            qido=qido,
            paging=paging,
            audit=audit,
        ),
    )


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
