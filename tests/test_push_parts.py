"""How a bundle is cut into partial uploads, which recorded parts a resumed push trusts, and
the parts sent to a real gateway: at once, joined into the bundle, resumed."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydicom.uid import generate_uid

from app.services.keys import read_data_keys
from app.services.packaging import StagedBundle, StudyPackager
from app.services.push_parts import MIN_PART, layout, recorded_parts, send_parts
from app.services.push_progress import PushRecorder
from app.services.wiring import Services, build_services
from app.settings import Settings
from app.transfer import bundle as bundle_format
from app.transfer.delivery import DeliveryOutcome, JobProgress, PermanentFailure
from app.transfer.jobs import JobState, TransferJob
from app.transfer.outbox import Outbox
from app.transfer.tus_client import TusClient
from tests.bundle_helpers import RECIPIENT_EXCHANGE as RECIPIENT
from tests.bundle_helpers import RECIPIENT_KEY
from tests.helpers import IexServer, make_instance
from tests.transfer_jobs_helpers import StandIn, eventually

MIB = 1024 * 1024


def _spans(parts: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(p["offset"], p["length"]) for p in parts]


@pytest.mark.parametrize(
    ("data", "streams", "lengths"),
    [
        (1000, 4, [1000]),  # small: one data part, however many streams
        (2 * MIN_PART - 1, 4, [2 * MIN_PART - 1]),
        (2 * MIN_PART, 4, [MIN_PART, MIN_PART]),
        (100 * MIB + 3, 4, [25 * MIB, 25 * MIB, 25 * MIB, 25 * MIB + 3]),
        (100 * MIB, 1, [100 * MIB]),
        (0, 4, [0]),
    ],
)
def test_the_head_then_consecutive_data_parts_of_at_least_the_minimum(
    data: int, streams: int, lengths: list[int]
) -> None:
    parts = layout(500, data, streams)
    assert _spans(parts)[0] == (0, 500)
    assert [length for _, length in _spans(parts)[1:]] == lengths
    position = 0
    for offset, length in _spans(parts):
        assert offset == position
        position += length
    assert position == 500 + data
    assert all(p["url"] is None for p in parts)


def test_recorded_parts_are_trusted_only_when_they_add_up_to_the_bundle() -> None:
    bundle = StagedBundle(b"h" * 500, "0" * 64, 20 * MIB)
    parts = layout(500, 20 * MIB, 4)
    parts[1]["url"] = "https://gw-b.example/transfers/uploads/" + "a" * 32
    assert recorded_parts({"parts": parts}, bundle) == parts
    assert recorded_parts({}, bundle) is None
    other = StagedBundle(b"h" * 501, "0" * 64, 20 * MIB)  # packaged again: another head
    assert recorded_parts({"parts": parts}, other) is None
    gap = [dict(p) for p in parts]
    gap[2]["offset"] += 1
    assert recorded_parts({"parts": gap}, bundle) is None
    assert recorded_parts({"parts": [{"offset": 0, "length": "500"}]}, bundle) is None


# -- the parts sent to a real gateway --------------------------------------------------------


async def test_parts_sent_at_once_join_into_the_bundle_and_resume_after_one_is_lost(
    make_server: Callable[..., IexServer], tmp_path: Path
) -> None:
    """The sending step of a push, run by a real runner of gateway A's services against a
    real gateway B: the head and two data parts reach B, and read back in order they are
    the bundle, which the recipient's key opens byte for byte. Run again (the transfer
    retried) with one part forgotten at B, only that part is sent again."""
    partner = make_server("gw-b")
    study = generate_uid()
    objects = [make_instance(study_uid=study, rows=1024, columns=1024) for _ in range(11)]
    runs: list[list[str]] = []
    ready: dict[str, Any] = {}

    async def step(job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
        recorder = PushRecorder(progress)
        staged = StagedBundle.from_checkpoint(recorder.checkpoint.get("bundle"))
        if staged is None:
            staged = await ready["packager"].package(job, RECIPIENT)
            recorder.checkpoint = {"bundle": staged.to_checkpoint()}
            await recorder.save(state=JobState.SENDING, bytes_total=staged.length)
        else:
            await recorder.advance(JobState.SENDING)
        async with TusClient(partner.url, partner.token, chunk_size=MIB) as client:
            urls = await send_parts(
                client, recorder, staged, ready["outbox"].path(job.id), streams=4, report_every=0.01
            )
        runs.append(urls)
        ready["bundle"] = staged
        return PermanentFailure("the parts are sent; the test looks at them")

    settings = Settings(data_dir=tmp_path / "gw-a", name="gw-a")
    async with build_services(settings, delivery=StandIn(step, hold=False)) as services:
        for data in objects:
            assert not (await services.stow.store_single("local", _chunks(data), None)).failed
        keys = read_data_keys(settings.data_dir, None, "read the signing key")
        outbox = Outbox(settings.data_dir)
        ready.update(
            outbox=outbox,
            packager=StudyPackager(services.store, services.index, keys, outbox, "gw-a"),
        )
        job = await services.transfers.create(
            "local", study=study, partner="gw-b", partner_trust="rad-b"
        )
        first = await _ended(services, job.id)
        assert len(runs) == 1 and len(runs[0]) == 3  # the head and two data parts
        bundle: StagedBundle = ready["bundle"]
        assert first.bytes_sent == first.bytes_total == bundle.length
        assert [p["url"] for p in first.checkpoint["parts"]] == runs[0]

        # The second data part expires at B: a retry sends it alone again.
        async with TusClient(partner.url, partner.token) as client:
            await client.terminate(runs[0][2])
        await services.transfers.retry("local", job.id)
        await _ended(services, job.id, attempts=2)
        assert runs[1][:2] == runs[0][:2] and runs[1][2] != runs[0][2]

    signer = Ed25519PublicKey.from_public_bytes(keys.signing_key().public)
    received = tmp_path / "received.iexb"
    await _read_parts(partner, runs[1], received)
    assert received.stat().st_size == bundle.length

    def lookup(gateway: str, key_id: str) -> Ed25519PublicKey:
        return signer

    with received.open("rb") as f:
        verified = bundle_format.verify(
            bundle_format.read_head(f), lookup, gateway="gw-b", trust="rad-b"
        )
        opened = [
            hashlib.sha256(b"".join(r.chunks())).hexdigest()
            for r in bundle_format.open_instances(f, verified, RECIPIENT_KEY)
        ]
    assert sorted(opened) == sorted(hashlib.sha256(o).hexdigest() for o in objects)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _ended(services: Services, job_id: str, attempts: int = 1) -> TransferJob:
    async def check() -> TransferJob | None:
        job = await services.transfers.get("local", job_id)
        return job if job.state is JobState.FAILED and job.attempts == attempts else None

    return await eventually(check, "the sending step to end", timeout=180)


async def _read_parts(partner: IexServer, urls: list[str], into: Path) -> None:
    """The bytes of B's partial uploads, in order, read from its own store (a process of
    B's of our own: tus has no way to read an upload back)."""
    async with build_services(Settings(data_dir=partner.data_dir, name="gw-b")) as services:
        with into.open("wb") as out:
            for url in urls:
                upload = await services.uploads.get("local", url.rsplit("/", 1)[1])
                assert upload.complete and upload.concat.value == "partial"
                payload = await services.uploads.open_payload(upload)
                try:
                    await asyncio.to_thread(shutil.copyfileobj, payload, out, MIB)
                finally:
                    payload.close()
