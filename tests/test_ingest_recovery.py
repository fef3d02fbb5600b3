"""A gateway that stopped between storing an upload's last byte and finishing its ingest
takes the ingest up again at the next start, and reclaims what the interrupted run left.

The interrupted run is played by the upload engine alone, in this process, on the data
directory a real gateway then starts on: the state on disk is exactly what a crash at that
point leaves, without depending on when a kill lands.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from app.services.keys import open_data_keys
from app.storage.encrypted import EncryptedInstanceStore
from app.storage.filesystem import FileInstanceStore
from app.transfer.state import UPLOADS_FILE, SQLiteUploadState
from app.transfer.tus import ResumableUploads, UploadLimits
from app.transfer.uploads import UploadState, parse_metadata
from tests.helpers import IexServer, wait_until
from tests.transfer_helpers import (
    ZIP,
    metadata,
    source_digests,
    stored_digests,
    study_files,
    tus_client,
    wait_report,
    zip_of,
)


async def _interrupted(data_dir: Path, payload: bytes, *, mid_ingest: bool) -> tuple[str, str]:
    """Receive ``payload`` whole and stop before (or during) ingest; the upload id and the
    key of a blob published but never indexed, as a crash mid-commit leaves."""
    keys = open_data_keys(data_dir, None)
    files = FileInstanceStore(data_dir)
    store = EncryptedInstanceStore(files, keys, 64 * 1024)
    state = SQLiteUploadState(data_dir / UPLOADS_FILE, key=keys.index_key)
    await state.open()
    try:
        uploads = ResumableUploads(store, state, UploadLimits(10**9, 3600.0))
        upload = await uploads.create(
            "local", len(payload), parse_metadata(metadata(content_type=ZIP))
        )

        async def body() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 100_000):
                yield payload[i : i + 100_000]

        done = await uploads.append("local", upload.id, 0, body())
        assert done.state is UploadState.VERIFYING
        if mid_ingest:
            await uploads.begin_ingest(done)
        orphan = await store.create("local")
        await orphan.write(b"half of a commit")
        await orphan.commit()
        return upload.id, orphan.key
    finally:
        await state.close()
        files.close()  # as the process's end would: its staging lock goes with it


def _blob_files(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}


def _run(data_dir: Path, mid_ingest: bool) -> None:
    members = study_files(6)
    data_dir.mkdir()
    upload_id, orphan = asyncio.run(_interrupted(data_dir, zip_of(members), mid_ingest=mid_ingest))
    assert orphan in _blob_files(data_dir)
    server = IexServer(data_dir).start()
    try:
        with tus_client(server) as tus:
            report = wait_report(tus, f"{server.url}/transfers/uploads/{upload_id}")
        assert report["state"] == "complete", report
        [study] = report["studies"]
        assert stored_digests(server, study["study_uid"]) == source_digests(members)
        # The orphan is reclaimed and the payload's chunks are gone once ingested: one blob
        # per stored instance remains.
        wait_until(
            lambda: len(_blob_files(data_dir)) == len(members),
            message=lambda: f"one blob per instance, not {sorted(_blob_files(data_dir))}",
        )
        assert orphan not in _blob_files(data_dir)
    finally:
        server.stop()


def test_ingest_resumes_when_the_last_byte_was_stored(tmp_path: Path) -> None:
    _run(tmp_path / "data", mid_ingest=False)


def test_ingest_resumes_when_it_was_interrupted(tmp_path: Path) -> None:
    _run(tmp_path / "data", mid_ingest=True)
