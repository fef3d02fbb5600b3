"""Packaging a stored study for a partner trust: the bundle staged in the outbox from the
encrypted store, read back by the recipient (its private key, our signing key) byte for byte,
and nothing of the patient readable in the staging file. And the outbox sweep.

The gateway's services are the real ones (``build_services`` on a data directory); the
study is stored through STOW-RS's service from pydicom's test files (several transfer
syntaxes, native and encapsulated) and a generated instance of a few megabytes.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydicom.uid import generate_uid

from app.errors import NotFound
from app.services.keys import read_data_keys
from app.services.packaging import StagedBundle, StudyPackager
from app.services.wiring import Services, build_services
from app.settings import Settings
from app.transfer import bundle
from app.transfer.jobs import Direction, JobState, Priority, TransferJob, moved, new_job
from app.transfer.manifest import Compression, Endpoint
from app.transfer.outbox import Outbox
from app.transfer.sqlite_jobs import SQLiteTransferJobs
from tests.bundle_helpers import RECIPIENT_EXCHANGE as RECIPIENT
from tests.bundle_helpers import RECIPIENT_KEY, TEST_FILES
from tests.helpers import make_instance
from tests.transfer_jobs_helpers import KEY

FILES = [
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "JPEG2000.dcm",  # encapsulated
    "MR_small_RLE.dcm",  # encapsulated
    "rtplan.dcm",  # no pixel data
]


def _in_study(path: Path, study: str) -> bytes:
    """The file moved into ``study``, under a SOP Instance UID of its own (some of pydicom's
    files are one instance in several transfer syntaxes)."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 256 * 1024):
        yield data[start : start + 256 * 1024]


async def _store(services: Services, trust: str, objects: list[bytes]) -> None:
    for data in objects:
        result = await services.stow.store_single(trust, _chunks(data), None)
        assert not result.failed, result.failed


def _job(study: str, trust: str = "local") -> TransferJob:
    return new_job(
        direction=Direction.OUT,
        trust=trust,
        partner="gw-b",
        partner_trust="rad-b",
        study=study,
        priority=Priority.ROUTINE,
        now=time.time(),
    )


def _read_back(staged: StagedBundle, data: bytes, signer: Ed25519PublicKey) -> dict[str, bytes]:
    """What the recipient reads: every instance by SOP Instance UID, each read to its end."""

    def lookup(gateway: str, key_id: str) -> Ed25519PublicKey:
        assert gateway == "gw-a"
        return signer

    f = io.BytesIO(staged.head + data)
    verified = bundle.verify(bundle.read_head(f), lookup, gateway="gw-b", trust="rad-b")
    assert verified.manifest_sha256 == staged.manifest_sha256
    return {
        reader.entry.meta.sop_instance_uid: b"".join(reader.chunks())
        for reader in bundle.open_instances(f, verified, RECIPIENT_KEY)
    }


async def test_a_stored_study_is_staged_sealed_and_reads_back_byte_for_byte(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "gw-a"
    study = generate_uid()
    objects = [_in_study(TEST_FILES / name, study) for name in FILES]
    # A few megabytes: read from the store and sealed a chunk at a time.
    objects.append(make_instance(study_uid=study, rows=1024, columns=1024, patient_name="Doe^Jane"))
    by_sop = {str(pydicom.dcmread(io.BytesIO(o)).SOPInstanceUID): o for o in objects}
    names = {str(pydicom.dcmread(io.BytesIO(o)).PatientName) for o in objects} - {""}

    async with build_services(Settings(data_dir=data_dir, name="gw-a")) as services:
        await _store(services, "local", objects)
        keys = read_data_keys(data_dir, None, "read the signing key")
        outbox = Outbox(data_dir)
        packager = StudyPackager(services.store, services.index, keys, outbox, "gw-a")
        job = _job(study)
        staged = await packager.package(job, RECIPIENT)

    signing = keys.signing_key()
    signer = Ed25519PublicKey.from_public_bytes(signing.public)
    staging = outbox.path(job.id)
    assert staging == data_dir / "exchange" / "outbox" / job.id
    data = staging.read_bytes()
    assert len(data) == staged.data_length and staged.length == len(staged.head) + len(data)
    assert staging.stat().st_mode & 0o777 == 0o600

    assert _read_back(staged, data, signer) == by_sop

    manifest = staged.manifest()
    assert manifest.transfer == job.id and manifest.study == study
    assert manifest.sender == Endpoint("gw-a", "local", signing.id)
    assert manifest.recipient == Endpoint("gw-b", "rad-b", RECIPIENT.id)
    compression = {e.meta.sop_instance_uid: e.compression for e in manifest.instances}
    syntaxes = {e.meta.sop_instance_uid: e.meta.transfer_syntax_uid for e in manifest.instances}
    for sop, syntax in syntaxes.items():
        native = syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
        assert compression[sop] is (Compression.ZSTD if native else Compression.NONE)
    assert {ref.sop_uid for ref in staged.instances()} == set(by_sop)

    # Ciphertext only: no patient's name (nor an instance's bytes) on the disk in the clear.
    assert names and not [n for n in names if n.encode() in data]
    assert not [sop for sop, obj in by_sop.items() if obj[132:1024] in data]

    # The checkpoint holds the head and what the receipt must name.
    assert StagedBundle.from_checkpoint(staged.to_checkpoint()) == staged
    assert StagedBundle.from_checkpoint({"head": "not base64!"}) is None


async def test_packaging_again_starts_from_scratch(tmp_path: Path) -> None:
    data_dir = tmp_path / "gw-a"
    study = generate_uid()
    async with build_services(Settings(data_dir=data_dir, name="gw-a")) as services:
        await _store(services, "local", [make_instance(study_uid=study)])
        keys = read_data_keys(data_dir, None, "read the signing key")
        outbox = Outbox(data_dir)
        packager = StudyPackager(services.store, services.index, keys, outbox, "gw-a")
        job = _job(study)
        first = await packager.package(job, RECIPIENT)
        second = await packager.package(job, RECIPIENT)
    # A new ephemeral key, so a new manifest; the staging file is the new bundle's.
    assert first.manifest_sha256 != second.manifest_sha256
    signer = Ed25519PublicKey.from_public_bytes(keys.signing_key().public)
    assert len(_read_back(second, outbox.path(job.id).read_bytes(), signer)) == 1


async def test_a_study_without_instances_in_the_trust_is_not_packaged(tmp_path: Path) -> None:
    data_dir = tmp_path / "gw-a"
    study = generate_uid()
    async with build_services(Settings(data_dir=data_dir, name="gw-a")) as services:
        await _store(services, "local", [make_instance(study_uid=study)])
        keys = read_data_keys(data_dir, None, "read the signing key")
        packager = StudyPackager(services.store, services.index, keys, Outbox(data_dir), "gw-a")
        missing = generate_uid()
        with pytest.raises(NotFound, match=f"study {missing} has no instances in trust local"):
            await packager.package(_job(missing), RECIPIENT)
        # Another trust's study is not this trust's to send.
        with pytest.raises(NotFound, match=f"study {study} has no instances in trust other"):
            await packager.package(_job(study, trust="other"), RECIPIENT)


async def test_the_sweep_removes_staged_bundles_of_transfers_that_ended(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    jobs = SQLiteTransferJobs(tmp_path / "transfers.sqlite3", key=KEY)
    await jobs.open()
    try:
        running, cancelled = _job(generate_uid()), _job(generate_uid())
        await jobs.insert(running)
        await jobs.insert(cancelled)
        stored = await jobs.get(cancelled.id)
        assert stored is not None
        assert (
            await jobs.replace(stored, moved(stored, JobState.CANCELLED, time.time())) is not None
        )
        unknown = _job(generate_uid())
        outbox.prepare()
        for job in (running, cancelled, unknown):
            outbox.path(job.id).write_bytes(b"sealed")
        (outbox.directory / "not-a-transfer").write_bytes(b"kept")

        assert await outbox.sweep(jobs) == 2
        assert outbox.staged() == [running.id]
        assert (outbox.directory / "not-a-transfer").exists()
        assert await asyncio.to_thread(outbox.remove, running.id)
        assert not await asyncio.to_thread(outbox.remove, running.id)
    finally:
        await jobs.close()
