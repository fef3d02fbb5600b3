"""A gateway stopped while receiving a bundle receives it again at its next start, and the
sender gets its receipt: after the commit and before the receipt was recorded, the commit
finds every instance stored already and the ``stored`` receipt counts them; before the
commit, the instances are stored then. Either way each instance is stored once.

The interrupted run is played in this process on the receiver's data directory, while the
gateway is stopped, with the same parts the gateway uses: the upload engine leaves the
bundle's upload mid-ingest and the transfer service records the arrival, exactly what a
crash at that point leaves, without depending on when a kill lands.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.services.bundle_ingest import MANIFEST_SHA256
from app.services.keys import open_data_keys
from app.services.transfers import TransferService
from app.storage.encrypted import EncryptedInstanceStore
from app.storage.filesystem import FileInstanceStore
from app.transfer.sqlite_jobs import TRANSFERS_FILE, SQLiteTransferJobs
from app.transfer.state import UPLOADS_FILE, SQLiteUploadState
from app.transfer.tus import ResumableUploads, UploadLimits
from app.transfer.uploads import UploadState, parse_metadata
from tests.bundle_sending import (
    BUNDLE,
    Built,
    build,
    digests,
    identity_of,
    instance_count,
    make_sender,
    pair,
    receipt_response,
    study_instances,
    verified_receipt,
)
from tests.helpers import IexServer, multipart_related
from tests.transfer_helpers import metadata, stored_digests, tus_client, wait_report


async def _interrupted(data_dir: Path, built: Built) -> str:
    """The bundle received whole, its arrival recorded, its ingest begun and never ended;
    the upload's id."""
    keys = open_data_keys(data_dir, None)
    files = FileInstanceStore(data_dir)
    state = SQLiteUploadState(data_dir / UPLOADS_FILE, key=keys.index_key)
    jobs = SQLiteTransferJobs(data_dir / TRANSFERS_FILE, key=keys.index_key)
    await state.open()
    await jobs.open()
    try:
        uploads = ResumableUploads(
            EncryptedInstanceStore(files, keys, 64 * 1024), state, UploadLimits(10**9, 3600.0)
        )
        payload = built.whole
        upload = await uploads.create(
            "rad-b",
            len(payload),
            parse_metadata(metadata(content_type=BUNDLE, transfer=built.transfer)),
        )

        async def body() -> AsyncIterator[bytes]:
            yield payload

        done = await uploads.append("rad-b", upload.id, 0, body())
        assert done.state is UploadState.VERIFYING
        await uploads.begin_ingest(done)
        await TransferService(jobs).record_arrival(
            "rad-b",
            job_id=built.transfer,
            partner="gw-a",
            partner_trust="rad-a",
            study=built.study,
            bytes_total=len(payload),
            checkpoint={MANIFEST_SHA256: built.manifest_sha256},
        )
        return upload.id
    finally:
        await jobs.close()
        await state.close()
        files.close()


@pytest.mark.parametrize("committed", [True, False], ids=["after-commit", "before-commit"])
def test_an_interrupted_bundle_is_received_at_the_next_start(
    tmp_path: Path, committed: bool
) -> None:
    sender = make_sender(tmp_path / "gw-a", "gw-a", "rad-a")
    receiver = IexServer(tmp_path / "gw-b", env={"IEX_NAME": "gw-b"}).start()
    try:
        receiver.iex("trust", "add", "rad-b")
        pair(receiver, sender, "rad-b", tmp_path)
        receiver.iex(
            "agreement", "add", "--trust", "rad-b", "--partner", "gw-a",
            "--partner-trust", "rad-a", "--allow", "receive",
        )  # fmt: skip
        token = receiver.issue_token("rad-b", "uploader", "reader")
        identity = identity_of(receiver)
        instances = study_instances(3)
        built = build(sender, "rad-a", identity, "rad-b", instances)
        if committed:
            # What the interrupted commit stored, through the same pipeline.
            body, content_type = multipart_related(instances.values())
            with receiver.client(token) as c:
                r = c.post("/studies", content=body, headers={"Content-Type": content_type})
                assert r.status_code == 200, r.text
    finally:
        receiver.stop()

    upload_id = asyncio.run(_interrupted(receiver.data_dir, built))
    receiver.start()
    try:
        with tus_client(receiver, token) as tus:
            report = wait_report(tus, f"{receiver.url}/transfers/uploads/{upload_id}")
        assert report["state"] == "complete", report
        expected = (
            {"stored": 0, "already_stored": 4} if committed else {"stored": 4, "already_stored": 0}
        )
        assert {k: report["counts"][k] for k in expected} == expected
        r = receipt_response(receiver, token, built.transfer)
        assert r.status_code == 200, r.text
        receipt = verified_receipt(r.content, identity, built, "rad-b")
        assert (receipt.result, receipt.instances) == ("stored", 4)
        assert instance_count(receiver, token, built.study) == 4
        assert stored_digests(receiver, built.study, token) == digests(instances)
    finally:
        receiver.stop()
