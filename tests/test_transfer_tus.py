"""The tus engine in process: the assembled payload of a final upload, and expiry by clock."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.errors import Gone, NotFound
from app.services.keys import open_data_keys
from app.storage.encrypted import EncryptedInstanceStore
from app.storage.filesystem import FileInstanceStore
from app.transfer.state import UPLOADS_FILE, SQLiteUploadState
from app.transfer.tus import ResumableUploads, UploadLimits
from app.transfer.uploads import Concat, UploadMetadata, UploadState, parse_metadata

ZIP = parse_metadata("content-type YXBwbGljYXRpb24vemlw")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[ResumableUploads, Clock]]:
    keys = open_data_keys(tmp_path, None)
    store = EncryptedInstanceStore(FileInstanceStore(tmp_path), keys, 4096)
    state = SQLiteUploadState(tmp_path / UPLOADS_FILE, key=keys.index_key)
    await state.open()
    clock = Clock()
    yield ResumableUploads(store, state, UploadLimits(10**9, 60.0), clock), clock
    await state.close()


async def test_final_upload_payload_is_the_partials_in_order(
    engine: tuple[ResumableUploads, Clock],
) -> None:
    uploads, _ = engine
    pieces = [os.urandom(10_000 + 1_000 * i) for i in range(4)]
    ids = []
    for piece in pieces:
        partial = await uploads.create("t", len(piece), UploadMetadata(""), Concat.PARTIAL)
        half = len(piece) // 2
        await uploads.append("t", partial.id, 0, chunks(piece[:half], 3000))
        done = await uploads.append("t", partial.id, half, chunks(piece[half:], 777))
        assert done.state is UploadState.COMPLETE
        ids.append(partial.id)
    # Joined in another order than created: the final's order decides.
    order = [3, 0, 2, 1]
    final = await uploads.create("t", None, ZIP, Concat.FINAL, tuple(ids[i] for i in order))
    # All there: a final upload awaits ingest at once; its partials never do on their own.
    assert final.complete and final.state is UploadState.VERIFYING
    payload = b"".join([data async for data in uploads.read_payload(final)])
    assert payload == b"".join(pieces[i] for i in order)


async def test_expiry_follows_the_clock_and_each_patch(
    engine: tuple[ResumableUploads, Clock],
) -> None:
    uploads, clock = engine
    upload = await uploads.create("t", 10, ZIP)
    clock.now += 50
    await uploads.append("t", upload.id, 0, chunks(b"abc", 3))
    clock.now += 50  # 100 s after creation, 50 s after the PATCH: still alive
    assert (await uploads.get("t", upload.id)).offset == 3
    clock.now += 10
    with pytest.raises(Gone):
        await uploads.get("t", upload.id)
    with pytest.raises(Gone):
        await uploads.append("t", upload.id, 3, chunks(b"def", 3))
    await uploads.terminate("t", upload.id)
    with pytest.raises(NotFound):
        await uploads.get("t", upload.id)


def blob_files(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").rglob("*") if p.is_file()}


async def test_sweep_removes_expired_uploads_and_their_chunks(
    engine: tuple[ResumableUploads, Clock], tmp_path: Path
) -> None:
    uploads, clock = engine
    stale = await uploads.create("t", 10, ZIP)
    await uploads.append("t", stale.id, 0, chunks(b"abcd", 2))
    clock.now += 30
    fresh = await uploads.create("t", 10, ZIP)
    await uploads.append("t", fresh.id, 0, chunks(b"efgh", 4))
    assert len(blob_files(tmp_path)) == 2
    clock.now += 31  # the stale one is 61 s past its last PATCH, the fresh one 31 s
    assert await uploads.sweep() == 1
    with pytest.raises(NotFound):
        await uploads.get("t", stale.id)
    assert (await uploads.get("t", fresh.id)).offset == 4
    assert len(blob_files(tmp_path)) == 1
    assert await uploads.sweep() == 0


async def test_sweep_spares_uploads_awaiting_ingest_and_takes_partials_with_finals(
    engine: tuple[ResumableUploads, Clock], tmp_path: Path
) -> None:
    uploads, clock = engine
    waiting = await uploads.create("t", 3, ZIP)
    waiting = await uploads.append("t", waiting.id, 0, chunks(b"xyz", 3))
    assert waiting.state is UploadState.VERIFYING
    partial = await uploads.create("t", 2, UploadMetadata(""), Concat.PARTIAL)
    await uploads.append("t", partial.id, 0, chunks(b"pq", 2))
    final = await uploads.create("t", None, ZIP, Concat.FINAL, (partial.id,))
    await uploads.end_ingest(final, UploadState.FAILED, '{"error": "x"}')
    clock.now += 61
    # The final goes with its partial; the upload queued for ingest stays.
    assert await uploads.sweep() == 1
    for gone in (partial.id, final.id):
        with pytest.raises(NotFound):
            await uploads.get("t", gone)
    # Past its expiry, but kept (and readable) until its ingest ends.
    assert (await uploads.get("t", waiting.id)).state is UploadState.VERIFYING
    assert len(blob_files(tmp_path)) == 1
    await uploads.end_ingest(waiting, UploadState.COMPLETE, "{}")
    assert blob_files(tmp_path) == set()  # ingested: the chunks are no longer needed
    clock.now += 61
    assert await uploads.sweep() == 1
