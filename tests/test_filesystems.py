"""A data directory on the file systems hospitals put image stores on: tmpfs, overlayfs and a
loop-mounted ext4, each really mounted. The whole storage round trip through a real gateway
gives back the bytes stored; where the file system can read from the page cache alone
(``RWF_NOWAIT``: ext4 here) retrieval still opens on the event loop, and where it cannot
(tmpfs, overlayfs) it is learned once and every opening goes to a worker thread.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from app.crypto.reader import DecryptingReader, NotCached
from app.durable import fsync_dir
from app.filesystems import NOWAIT_READS
from app.services.keys import open_data_keys
from app.storage.encrypted import EncryptedInstanceStore
from app.storage.filesystem import FileInstanceStore
from tests.helpers import IexServer, make_instance, multipart_related
from tests.mounts import KINDS, drop_cached_pages, mounted
from tests.transfer_helpers import (
    AS_STORED,
    ZIP,
    metadata,
    source_digests,
    split_multipart,
    stored_digests,
    study_files,
    tus_client,
    upload,
    wait_report,
    zip_of,
)

#: Whether each kind honours ``preadv(..., RWF_NOWAIT)`` on Linux.
NOWAIT = {"tmpfs": False, "overlayfs": False, "ext4-loop": True}
FRAMES, ROWS = 12, 256  # 1.5 MiB of pixels: an object of two segments


@pytest.fixture(scope="module", params=KINDS)
def volume(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    kind: str = request.param
    with mounted(kind, tmp_path_factory.mktemp(kind)) as target:
        yield kind, target


@pytest.fixture(scope="module")
def gateway(volume: tuple[str, Path]) -> Iterator[IexServer]:
    srv = IexServer(volume[1] / "data").start()
    try:
        yield srv
    finally:
        srv.stop()


def _study() -> tuple[str, dict[str, bytes]]:
    """A study of three single-frame instances and one multi-frame, by SOP Instance UID."""
    study, series = generate_uid(), generate_uid()
    objects = [
        make_instance(study_uid=study, series_uid=series, instance_number=n) for n in (1, 2, 3)
    ]
    objects.append(
        make_instance(
            study_uid=study,
            series_uid=series,
            instance_number=4,
            frames=FRAMES,
            rows=ROWS,
            columns=ROWS,
        )
    )
    return study, {dcmread(io.BytesIO(o)).SOPInstanceUID: o for o in objects}


def _store(c: httpx.Client, objects: dict[str, bytes]) -> None:
    body, ctype = multipart_related(objects.values())
    r = c.post("/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text


def _retrieved(c: httpx.Client, path: str, accept: str = AS_STORED) -> list[bytes]:
    r = c.get(path, headers={"Accept": accept})
    assert r.status_code == 200, r.text
    return split_multipart(r)


def _assert_study_intact(c: httpx.Client, study: str, objects: dict[str, bytes]) -> None:
    """Every retrieval of the study gives back exactly what was stored."""
    assert sorted(_retrieved(c, f"/studies/{study}")) == sorted(objects.values())
    for sop, data in objects.items():
        ds = dcmread(io.BytesIO(data))
        path = f"/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{sop}"
        assert _retrieved(c, path) == [data]
        frames = getattr(ds, "NumberOfFrames", 1)
        size = len(ds.PixelData) // frames
        wanted = [frames, 1, (frames + 1) // 2]
        got = _retrieved(c, f"{path}/frames/{','.join(map(str, wanted))}", "multipart/related")
        assert got == [ds.PixelData[(n - 1) * size : n * size] for n in wanted]


def test_stored_study_comes_back_byte_identical(gateway: IexServer) -> None:
    study, objects = _study()
    with gateway.client() as c:
        _store(c, objects)
        _assert_study_intact(c, study, objects)
        r = c.get(f"/studies/{study}/metadata")
        assert r.status_code == 200, r.text
        assert sorted(m["00080018"]["Value"][0] for m in r.json()) == sorted(objects)
        r = c.get("/studies", params={"StudyInstanceUID": study})
        assert r.status_code == 200, r.text
        assert [s["00201208"]["Value"] for s in r.json()] == [[len(objects)]]
        r = c.get(f"/studies/{study}/instances")
        assert sorted(i["00080018"]["Value"][0] for i in r.json()) == sorted(objects)


def test_retrieval_after_the_pages_left_the_cache(gateway: IexServer) -> None:
    """Blobs whose pages are not cached any more (on ext4, where they can be dropped) are
    opened in a worker thread and still come back whole; so do all of them after a restart."""
    study, objects = _study()
    with gateway.client() as c:
        _store(c, objects)
    drop_cached_pages(gateway.data_dir / "blobs")
    with gateway.client() as c:
        _assert_study_intact(c, study, objects)
    gateway.stop()
    gateway.start()
    with gateway.client() as c:
        _assert_study_intact(c, study, objects)


def test_resumable_upload_is_ingested(gateway: IexServer) -> None:
    members = study_files(5)
    with tus_client(gateway) as tus:
        url, _ = upload(tus, zip_of(members), metadata(content_type=ZIP), chunk=64 * 1024)
        report = wait_report(tus, url)
    assert report["state"] == "complete", report
    [study] = report["studies"]
    assert stored_digests(gateway, study["study_uid"]) == source_digests(members)


async def test_the_cache_only_opening_is_kept_where_the_file_system_has_it(
    volume: tuple[str, Path],
) -> None:
    """The decision is the kernel's answer, learned on the first opening: on ext4 objects are
    still opened from the page cache alone (no worker thread); on tmpfs and overlayfs every
    opening takes the plain path, and gives back the same bytes."""
    kind, target = volume
    data_dir = target / "in-process"
    data_dir.mkdir()
    files = FileInstanceStore(data_dir)
    try:
        store = EncryptedInstanceStore(files, open_data_keys(data_dir, None), 64 * 1024)
        payload = os.urandom(200_000)
        writer = await store.create("local")
        await writer.write(payload)
        await writer.commit()
        assert b"".join([chunk async for chunk in store.read(writer.key)]) == payload
        assert NOWAIT_READS.supported(files.device) is NOWAIT[kind]
        assert (
            b"".join([chunk async for chunk in store.read(writer.key, 1000, 150_000)])
            == (payload[1000:150_000])
        )
        keys = open_data_keys(data_dir, None)
        with files.open_blocking(writer.key) as raw:
            if NOWAIT[kind]:  # just read: all in the page cache
                with DecryptingReader(raw, keys.key, writer.key, cached_only=True) as reader:
                    assert reader.read() == payload
            else:
                with pytest.raises(NotCached):
                    DecryptingReader(raw, keys.key, writer.key, cached_only=True)
    finally:
        files.close()


def test_a_directory_that_cannot_be_synced_is_not_an_error() -> None:
    """procfs refuses ``fsync`` of a directory (EINVAL), as some network and FUSE file
    systems do: publishing a name there goes on without it."""
    fd = os.open("/proc/self", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as refused:
            os.fsync(fd)
    finally:
        os.close(fd)
    assert refused.value.errno == errno.EINVAL
    fsync_dir(Path("/proc/self"))
