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
    assert final.complete and final.state is UploadState.COMPLETE
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
