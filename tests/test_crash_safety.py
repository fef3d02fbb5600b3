"""A STOW-RS request is stored whole or not at all, through crashes and failures.

The server is SIGKILLed mid-request and restarted on the same data directory; the service
is driven in-process with failing indexes, failing publishes and cancellation.
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from app.errors import ServiceUnavailable
from app.services.keys import open_data_keys
from app.services.stow import StowLimits, StowService
from app.storage.base import AlreadyIndexed, InstanceRecord
from app.storage.encrypted import EncryptedInstanceStore
from app.storage.filesystem import FileBlobWriter, FileInstanceStore
from app.storage.sqlite_index import SQLiteMetadataIndex
from tests.helpers import IexServer, make_instance, multipart_related, open_db, wait_until

BOUNDARY = "iex-test-boundary"


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.rglob("*") if p.is_file()}


def _staged(staging: Path) -> set[str]:
    """Staged blobs, not the locks of the processes staging them."""
    return {name for name in _files(staging) if not name.endswith(".lock")}


def _indexed_blob_keys(data_dir: Path) -> set[str]:
    conn = open_db(data_dir, "index.sqlite3")
    try:
        return {row[0] for row in conn.execute("SELECT blob_key FROM instances")}
    finally:
        conn.close()


# -- SIGKILL mid-request -------------------------------------------------------------------


def test_sigkill_mid_request_leaves_no_trace_after_restart(
    make_server: Callable[..., IexServer],
) -> None:
    srv = make_server()
    kept = [make_instance() for _ in range(3)]
    body, ctype = multipart_related(kept)
    r = httpx.post(
        srv.dicomweb + "/studies", content=body, headers={"Content-Type": ctype, **srv.headers}
    )
    assert r.status_code == 200, r.text
    kept_keys = _indexed_blob_keys(srv.data_dir)
    assert len(kept_keys) == 3

    parts = [make_instance(rows=256, columns=256, instance_number=i) for i in range(16)]
    body, ctype = multipart_related(parts)
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
        f"Authorization: Bearer {srv.token}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    staging = srv.data_dir / "staging"
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    try:
        # Most of the parts, then nothing: the server is left mid-request with staged blobs.
        sock.sendall(head + body[: len(body) * 3 // 4])
        wait_until(
            lambda: len(_staged(staging)) >= 2,
            timeout=60,
            interval=0.02,
            message="parts to be staged",
        )
        srv.kill()
    finally:
        sock.close()
    assert _staged(staging), "the crash should have left staged files behind"

    srv.start()
    assert _staged(staging) == set()
    assert _indexed_blob_keys(srv.data_dir) == kept_keys
    # Every blob on disk is referenced by the index, and every referenced blob exists.
    assert _files(srv.data_dir / "blobs") == kept_keys
    metrics = httpx.get(srv.url + "/metrics", headers=srv.headers).text
    assert "iex_instances_stored 3.0" in metrics.splitlines()
    # And the interrupted request can simply be sent again.
    r = httpx.post(
        srv.dicomweb + "/studies",
        content=body,
        headers={"Content-Type": ctype, **srv.headers},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert len(_indexed_blob_keys(srv.data_dir)) == 3 + len(parts)


# -- the service with failures injected ----------------------------------------------------


class FailingIndex:
    """A ``MetadataIndex`` whose commit always fails."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    async def add_instances(
        self, records: Sequence[InstanceRecord], *, all_or_nothing: bool = False
    ) -> list[AlreadyIndexed | None]:
        self.calls += 1
        raise self.error


@pytest.fixture
async def store(tmp_path: Path) -> FileInstanceStore:
    """The files under the encrypting store that the service writes through."""
    open_data_keys(tmp_path / "data", None)  # a new gateway's keys, made before any data
    return FileInstanceStore(tmp_path / "data")


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SQLiteMetadataIndex]:
    idx = SQLiteMetadataIndex(tmp_path / "data" / "index.sqlite3")
    await idx.open()
    yield idx
    await idx.close()


def _service(store: FileInstanceStore, index: Any) -> StowService:
    encrypting = EncryptedInstanceStore(store, open_data_keys(store.root, None), 4096)
    return StowService(
        encrypting, index, StowLimits(max_instance_bytes=1 << 30, bulk_data_threshold=1024)
    )


async def _chunks(body: bytes, size: int = 8192) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]
        await asyncio.sleep(0)


def _assert_empty(store: FileInstanceStore) -> None:
    assert _files(store.staging_dir) == set()
    assert _files(store.blob_dir) == set()


async def test_failed_index_commit_leaves_no_published_blob(store: FileInstanceStore) -> None:
    index = FailingIndex(ServiceUnavailable("the index is not usable: disk I/O error"))
    body, _ = multipart_related([make_instance() for _ in range(5)])
    with pytest.raises(ServiceUnavailable):
        await _service(store, index).store_multipart("local", _chunks(body), BOUNDARY, None)
    assert index.calls == 1  # the blobs were published, then the commit failed
    _assert_empty(store)


async def test_failed_publish_removes_the_blobs_already_published(
    store: FileInstanceStore, index: SQLiteMetadataIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = 0
    real_commit = FileBlobWriter.commit

    async def flaky_commit(self: FileBlobWriter) -> None:
        nonlocal commits
        commits += 1
        if commits == 3:
            raise ServiceUnavailable("the blob store cannot be written: No space left on device")
        await real_commit(self)

    monkeypatch.setattr(FileBlobWriter, "commit", flaky_commit)
    body, _ = multipart_related([make_instance() for _ in range(5)])
    with pytest.raises(ServiceUnavailable):
        await _service(store, index).store_multipart("local", _chunks(body), BOUNDARY, None)
    assert commits == 5
    _assert_empty(store)
    assert (await index.stats()).instances == 0


@pytest.mark.parametrize("after_parts", [0, 1, 3])
async def test_cancellation_mid_stream_discards_everything(
    store: FileInstanceStore, index: SQLiteMetadataIndex, after_parts: int
) -> None:
    parts = [make_instance() for _ in range(4)]
    body, _ = multipart_related(parts)
    stalled = asyncio.Event()
    cut = sum(len(p) + 64 for p in parts[:after_parts]) + 100

    async def stalling() -> AsyncIterator[bytes]:
        yield body[:cut]
        stalled.set()
        await asyncio.Event().wait()  # the client never sends the rest
        yield b""  # pragma: no cover

    task = asyncio.create_task(
        _service(store, index).store_multipart("local", stalling(), BOUNDARY, None)
    )
    await stalled.wait()
    for _ in range(20):  # let the staged parts get examined, or not
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    _assert_empty(store)
    assert (await index.stats()).instances == 0


async def test_body_error_after_complete_parts_discards_them(
    store: FileInstanceStore, index: SQLiteMetadataIndex
) -> None:
    class Disconnected(Exception):
        pass

    body, _ = multipart_related([make_instance() for _ in range(3)])

    async def disconnecting() -> AsyncIterator[bytes]:
        yield body[: len(body) - 10]  # every part complete, closing delimiter missing
        raise Disconnected

    with pytest.raises(Disconnected):
        await _service(store, index).store_multipart("local", disconnecting(), BOUNDARY, None)
    _assert_empty(store)


async def test_duplicates_leave_exactly_one_blob_per_instance(
    store: FileInstanceStore, index: SQLiteMetadataIndex
) -> None:
    first = make_instance(patient_id="A")
    body, _ = multipart_related([first, first])
    result = await _service(store, index).store_multipart("local", _chunks(body), BOUNDARY, None)
    assert result.http_status == 200
    assert len(result.stored) == 2  # the second copy is a safe retry
    blobs = _files(store.blob_dir)
    assert len(blobs) == 1
    assert _files(store.staging_dir) == set()
    assert blobs == {r.blob_key for r in await index.get_instances("local", _study(first))}


def _study(data: bytes) -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)


def test_staging_is_emptied_when_the_store_opens(tmp_path: Path) -> None:
    staging = tmp_path / "data" / "staging"
    staging.mkdir(parents=True)
    (staging / "0123456789abcdef0123456789abcdef").write_bytes(b"half a blob")
    store = FileInstanceStore(tmp_path / "data")
    assert _files(store.staging_dir) == set()
