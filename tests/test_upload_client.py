"""``iex upload`` and its parts against real gateways: the deterministic tar sources, the tus
client through faults (connections cut mid-chunk, a flipped byte, a gateway killed) and the
command itself (resuming after SIGKILL, usage errors).

Tests named ``*_ingested`` wait for the gateway's report (``GET {upload}/report``) and then
check what ingest stored, through QIDO-RS and WADO-RS: they need the server's ingest. Every
other test checks the transfer itself, through ``HEAD`` offsets.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from pydicom.uid import generate_uid

from app.transfer.sources import (
    FileSource,
    SourceChanged,
    SourceError,
    TarSource,
    open_source,
    payload_sha256,
)
from app.transfer.tus_client import (
    IngestReport,
    RetryPolicy,
    TusClient,
    UploadGone,
    UploadMismatch,
    UploadRejected,
)
from tests.helpers import IexServer, free_port, make_instance, wait_until
from tests.pki import server_tls
from tests.proxy import FaultProxy
from tests.transfer_helpers import split_multipart

CHUNK = 64 * 1024
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Patient enough for a gateway restart on a busy machine; short waits keep tests quick.
PATIENT = RetryPolicy(attempts=200, initial_delay=0.05, max_delay=0.5)
INGEST_TIMEOUT = 180.0


# -- test data --------------------------------------------------------------------------------


@dataclass
class Study:
    """A folder of generated DICOM files of one study; digests by SOP Instance UID."""

    folder: Path
    study_uid: str
    series_uid: str
    digests: dict[str, str] = field(default_factory=dict)


def study_folder(root: Path, count: int = 24, rows: int = 256) -> Study:
    """``count`` instances (``rows``² 16-bit pixels each: 24 of 256² are about 3 MB) in
    nested folders, as a CD would hold them."""
    study = Study(root, generate_uid(), generate_uid())
    for i in range(count):
        sop = generate_uid()
        data = make_instance(
            study_uid=study.study_uid,
            series_uid=study.series_uid,
            sop_uid=sop,
            instance_number=i + 1,
            rows=rows,
            columns=rows,
        )
        path = root / "DICOM" / f"S{i % 3}" / f"IM{i:04d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        study.digests[sop] = hashlib.sha256(data).hexdigest()
    return study


def tree(root: Path) -> dict[str, bytes]:
    """Files of awkward sizes and names: empty, around block boundaries, a name too long
    for ustar, non-ASCII, nested."""
    rng = random.Random(7)
    files = {
        "empty": b"",
        "one": b"x",
        "a/511": rng.randbytes(511),
        "a/512": rng.randbytes(512),
        "a/513": rng.randbytes(513),
        "a/b/big.bin": rng.randbytes(300_000),
        "n" * 120 + "/long-name.dcm": rng.randbytes(2000),
        "ünïcödé/файл.txt": "наименование".encode(),
        "z.dat": rng.randbytes(10_000),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def stream(source: FileSource | TarSource) -> bytes:
    return b"".join(source.chunks(0, 100_000))


# -- talking to the gateway -------------------------------------------------------------------


def direct(server: IexServer, url: str) -> str:
    """An upload URL as the gateway itself serves it (the client may have used a proxy)."""
    return server.url + urlsplit(url).path


def head(server: IexServer, url: str) -> tuple[int, int]:
    """The upload's offset and length, asked of the gateway directly."""
    r = httpx.head(direct(server, url), headers={**server.headers, "Tus-Resumable": "1.0.0"})
    assert r.status_code == 200, r.status_code
    return int(r.headers["upload-offset"]), int(r.headers["upload-length"])


def wait_for_report(server: IexServer, url: str) -> IngestReport:
    """The final report of the upload's ingest (needs the server's ingest)."""

    async def wait() -> IngestReport:
        async with TusClient(server.url, server.token) as client:
            return await asyncio.wait_for(
                client.wait_for_ingest(direct(server, url), poll=0.1), INGEST_TIMEOUT
            )

    try:
        return asyncio.run(wait())
    except UploadGone as exc:
        pytest.fail(f"no report for the upload ({exc.status}): is ingest available? {exc}")


def retrieved(server: IexServer, study: Study) -> dict[str, str]:
    """sha256 of each instance of the study as the gateway stored it (WADO-RS, one request
    per instance), by SOP Instance UID."""
    digests = {}
    with server.client() as c:
        for sop in study.digests:
            r = c.get(
                f"/studies/{study.study_uid}/series/{study.series_uid}/instances/{sop}",
                headers={"Accept": AS_STORED},
            )
            assert r.status_code == 200, r.text
            (part,) = split_multipart(r)
            digests[sop] = hashlib.sha256(part).hexdigest()
    return digests


def assert_ingested(server: IexServer, url: str, study: Study) -> None:
    """The upload's report is complete with exactly the study's instances, QIDO-RS finds
    them, and WADO-RS returns each byte-identical to its source file."""
    report = wait_for_report(server, url)
    assert report.state == "complete", report.raw
    assert report.counts["stored"] == len(study.digests), report.raw
    assert report.counts["failed"] == 0
    assert [s.study_uid for s in report.studies] == [study.study_uid]
    assert sorted(report.studies[0].instances) == sorted(study.digests)
    with server.client() as c:
        r = c.get("/studies", params={"StudyInstanceUID": study.study_uid})
        assert r.status_code == 200, r.text
        (found,) = r.json()
        assert found["00201208"]["Value"] == [len(study.digests)]
    assert retrieved(server, study) == study.digests


async def upload_with(
    base_url: str,
    token: str,
    source: FileSource | TarSource,
    offsets: list[int],
    retry: RetryPolicy = PATIENT,
) -> str:
    """Upload ``source`` with the real client, recording every offset it reports."""
    async with TusClient(base_url, token, chunk_size=CHUNK, retry=retry) as client:
        return await client.upload(
            source,
            metadata={"sha256": payload_sha256(source)},
            on_progress=lambda offset, _total: offsets.append(offset),
        )


class Retries(logging.Handler):
    """The client's retry warnings, collected."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Retries:
        logging.getLogger("app.transfer.tus_client").addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        logging.getLogger("app.transfer.tus_client").removeHandler(self)


# -- sources ----------------------------------------------------------------------------------


def test_folder_tar_reads_back_with_identical_members(tmp_path: Path) -> None:
    files = tree(tmp_path / "src")
    (tmp_path / "src" / "link").symlink_to("one")
    (tmp_path / "src" / "a" / "dirlink").symlink_to(tmp_path)
    source = open_source(tmp_path / "src")
    assert isinstance(source, TarSource)
    data = stream(source)
    assert len(data) == source.length
    assert source.content_type == "application/x-tar"
    assert source.filename == "src.tar"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(files)
        for m in members:
            assert m.isreg()
            assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o644, 0, 0, "", "")
            extracted = tar.extractfile(m)
            assert extracted is not None
            assert extracted.read() == files[m.name]
    # Links are reported, never followed (one points above the folder).
    assert [(s.name, s.reason) for s in source.skipped] == [
        ("a/dirlink", "symbolic link, not followed"),
        ("link", "symbolic link, not followed"),
    ]


@pytest.mark.slow  # a thousand offsets, each read to the end of the stream
def test_chunks_from_any_offset_are_the_stream_sliced(tmp_path: Path) -> None:
    tree(tmp_path / "src")
    source = open_source(tmp_path / "src")
    data = stream(source)
    rng = random.Random(11)
    # Every block boundary (headers, data, padding, trailer) and random points between.
    offsets = {0, 1, source.length - 1, source.length}
    offsets |= {b + d for b in range(0, source.length, 512) for d in (-1, 0, 1)}
    offsets |= {rng.randrange(source.length) for _ in range(300)}
    for offset in sorted(o for o in offsets if 0 <= o <= source.length):
        size = rng.choice([1, 511, 512, 4096, 65_536, 1_000_000])
        pieces = list(source.chunks(offset, size))
        assert b"".join(pieces) == data[offset:], offset
        assert all(len(p) == size for p in pieces[:-1])
        assert all(0 < len(p) <= size for p in pieces)


def test_the_same_folder_gives_the_same_bytes_and_a_touched_one_another(tmp_path: Path) -> None:
    tree(tmp_path / "src")
    first, second = open_source(tmp_path / "src"), open_source(tmp_path / "src")
    assert stream(first) == stream(second)
    assert first.fingerprint() == second.fingerprint()
    assert payload_sha256(first) == hashlib.sha256(stream(first)).hexdigest()
    touched = tmp_path / "src" / "a" / "512"
    info = touched.stat()
    os.utime(touched, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    assert open_source(tmp_path / "src").fingerprint() != first.fingerprint()
    # The scanned source notices: it would otherwise send bytes it did not announce.
    with pytest.raises(SourceChanged):
        stream(first)


def test_reading_from_an_offset_does_not_open_the_files_before_it(tmp_path: Path) -> None:
    files = tree(tmp_path / "src")
    source = open_source(tmp_path / "src")
    assert isinstance(source, TarSource)
    data = stream(source)
    # The second member's data starts after its header: the first member lies before.
    assert source.member_names[0] == "a/511"
    (tmp_path / "src" / "a" / "511").unlink()
    start = data.index(files["a/512"])
    assert b"".join(source.chunks(start, 4096)) == data[start:]
    with pytest.raises(SourceChanged, match="removed"):
        stream(source)


def test_archives_are_sent_as_they_are_and_single_files_as_a_tar(tmp_path: Path) -> None:
    archive = tmp_path / "scan.ZIP"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("IM1", b"DICM" * 1000)
    source = open_source(archive)
    assert isinstance(source, FileSource)
    assert (source.content_type, source.filename) == ("application/zip", "scan.ZIP")
    assert stream(source) == archive.read_bytes()
    assert b"".join(source.chunks(777, 100)) == archive.read_bytes()[777:]
    single = tmp_path / "image.dcm"
    single.write_bytes(b"x" * 1234)
    tar = open_source(single)
    assert (tar.content_type, tar.filename) == ("application/x-tar", "image.dcm.tar")
    with tarfile.open(fileobj=io.BytesIO(stream(tar))) as t:
        assert t.getnames() == ["image.dcm"]


def test_what_cannot_be_uploaded_is_said(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or directory"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "link").symlink_to("/etc/passwd")
    with pytest.raises(SourceError, match="no regular files"):
        open_source(tmp_path / "empty")


# -- the client -------------------------------------------------------------------------------


def test_client_creates_resumes_and_terminates(server: IexServer, tmp_path: Path) -> None:
    study = study_folder(tmp_path / "src", count=4, rows=64)
    source = open_source(study.folder)
    other = open_source(study_folder(tmp_path / "other", count=5, rows=64).folder)

    async def scenario() -> None:
        async with TusClient(server.url, server.token, chunk_size=CHUNK) as client:
            url = await client.create(source.length, {"content-type": source.content_type})
            assert await client.offset(url) == 0
            offsets: list[int] = []
            assert await client.upload(source, url, on_progress=lambda o, _: offsets.append(o))
            assert offsets[0] == 0 and offsets[-1] == source.length
            assert offsets == sorted(set(offsets))
            # A complete upload resumes as complete; another source is not mixed into it.
            assert await client.upload(source, url) == url
            with pytest.raises(UploadMismatch):
                await client.upload(other, url)
            await client.terminate(url)
            with pytest.raises(UploadGone):
                await client.offset(url)

    asyncio.run(scenario())


def test_client_refusals_carry_the_servers_detail(server: IexServer, tmp_path: Path) -> None:
    source = open_source(study_folder(tmp_path / "src", count=1, rows=16).folder)

    async def scenario() -> None:
        async with TusClient(server.url, "iex_0000_bogus") as client:
            with pytest.raises(UploadRejected) as refused:
                await client.upload(source)
            assert refused.value.status == 401
            assert refused.value.detail in str(refused.value)
        async with TusClient(server.url, server.token) as client:
            with pytest.raises(UploadRejected) as refused:
                await client.upload(source, metadata={"trust": "elsewhere"})
            assert refused.value.status == 403
            assert "own trust" in str(refused.value)

    asyncio.run(scenario())


# -- faults: connections cut mid-chunk ---------------------------------------------------------


@dataclass
class Outcome:
    """What a faulty upload left behind, for the tests that check it."""

    server: IexServer
    study: Study
    url: str
    #: Every offset the client reported, in order.
    offsets: list[int] = field(default_factory=list)
    #: The client's retry warnings.
    retries: list[str] = field(default_factory=list)
    proxy: FaultProxy | None = None
    #: The server's offset when the fault struck.
    acknowledged: int = 0
    #: The command run to resume.
    resumed: subprocess.CompletedProcess[str] | None = None


@pytest.fixture(scope="module")
def cut_upload(server: IexServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    """Every connection is cut after 200,000 bytes: three 64 KiB chunks get through, the
    fourth is cut in the middle of its body."""
    study = study_folder(tmp_path_factory.mktemp("cut"))
    offsets: list[int] = []
    with FaultProxy(server.port) as proxy, Retries() as retries:
        proxy.cut(after=200_000, every=True)
        url = asyncio.run(upload_with(proxy.url, server.token, open_source(study.folder), offsets))
    yield Outcome(server, study, url, offsets, retries.messages, proxy)


def test_cut_connections_resume_from_the_servers_offset(cut_upload: Outcome) -> None:
    out = cut_upload
    assert out.proxy is not None and out.proxy.cuts >= 5
    assert any("the connection broke" in m or "network error" in m for m in out.retries)
    # Never back to an earlier offset, never from zero again: only forward.
    assert out.offsets == sorted(set(out.offsets))
    length = open_source(out.study.folder).length
    assert out.offsets[-1] == length
    assert head(out.server, out.url) == (length, length)


def test_cut_connections_payload_ingested(cut_upload: Outcome) -> None:
    assert_ingested(cut_upload.server, cut_upload.url, cut_upload.study)


# -- faults: a byte flipped in transit ---------------------------------------------------------


@pytest.fixture(scope="module")
def flipped_upload(
    server: IexServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outcome]:
    """One byte of the second chunk's body is inverted on the way to the gateway."""
    study = study_folder(tmp_path_factory.mktemp("flip"))
    offsets: list[int] = []
    with FaultProxy(server.port) as proxy, Retries() as retries:
        proxy.flip(at=100_000)
        url = asyncio.run(upload_with(proxy.url, server.token, open_source(study.folder), offsets))
    yield Outcome(server, study, url, offsets, retries.messages, proxy)


def test_flipped_byte_is_refused_with_460_and_resent(flipped_upload: Outcome) -> None:
    out = flipped_upload
    assert out.proxy is not None and out.proxy.flips == 1
    (retry,) = out.retries
    assert "(460)" in retry and "checksum" in retry
    length = open_source(out.study.folder).length
    assert out.offsets == sorted(set(out.offsets))
    assert head(out.server, out.url) == (length, length)


def test_flipped_byte_payload_ingested(flipped_upload: Outcome) -> None:
    assert_ingested(flipped_upload.server, flipped_upload.url, flipped_upload.study)


# -- faults: the gateway killed mid-upload -----------------------------------------------------


@pytest.fixture(scope="module")
def killed_server_upload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    """The gateway is SIGKILLed right after it acknowledged a third of the upload and
    started again on the same data directory and port while the client retries."""
    root = tmp_path_factory.mktemp("killed")
    srv = IexServer(root / "data").start()
    try:
        study = study_folder(root / "src")
        source = open_source(study.folder)
        offsets: list[int] = []
        killed: list[int] = []

        async def scenario() -> str:
            restart = asyncio.Event()

            def progress(offset: int, total: int) -> None:
                offsets.append(offset)
                if offset >= total // 3 and not killed:
                    # In the callback, so that the kill falls between two known chunks.
                    srv.kill()
                    killed.append(offset)
                    restart.set()

            async def start_again() -> None:
                await restart.wait()
                await asyncio.to_thread(srv.start)

            restarting = asyncio.create_task(start_again())
            async with TusClient(srv.url, srv.token, chunk_size=CHUNK, retry=PATIENT) as client:
                url = await client.upload(
                    source, metadata={"sha256": payload_sha256(source)}, on_progress=progress
                )
            await restarting
            return url

        with Retries() as retries:
            url = asyncio.run(scenario())
        yield Outcome(srv, study, url, offsets, retries.messages, acknowledged=killed[0])
    finally:
        srv.stop()


def test_killed_server_upload_resumes_at_the_acknowledged_offset(
    killed_server_upload: Outcome,
) -> None:
    out = killed_server_upload
    acknowledged = out.acknowledged
    length = open_source(out.study.folder).length
    assert 0 < acknowledged < length
    assert any("cannot connect" in m for m in out.retries)
    assert out.offsets == sorted(set(out.offsets))
    after = out.offsets[out.offsets.index(acknowledged) + 1]
    assert acknowledged < after <= acknowledged + CHUNK
    assert head(out.server, out.url) == (length, length)


def test_killed_server_payload_ingested(killed_server_upload: Outcome) -> None:
    assert_ingested(
        killed_server_upload.server, killed_server_upload.url, killed_server_upload.study
    )


@pytest.fixture(scope="module")
def killed_mid_chunk_upload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    """The gateway is SIGKILLed while a chunk's body is half received (the proxy holds the
    rest back), then started again on the same data directory and port."""
    root = tmp_path_factory.mktemp("killed-mid-chunk")
    srv = IexServer(root / "data").start()
    try:
        study = study_folder(root / "src")
        source = open_source(study.folder)
        offsets: list[int] = []
        with FaultProxy(srv.port) as proxy, Retries() as retries:
            # Past three whole 64 KiB chunks and their headers, inside the fourth body.
            proxy.hold(after=3 * CHUNK + CHUNK // 2)

            def kill_while_held() -> None:
                assert proxy.held.wait(120), "the upload never reached the hold"
                srv.kill()
                srv.start()
                proxy.release()

            async def scenario() -> str:
                killer = asyncio.create_task(asyncio.to_thread(kill_while_held))
                url = await upload_with(proxy.url, srv.token, source, offsets)
                await killer
                return url

            url = asyncio.run(scenario())
        yield Outcome(srv, study, url, offsets, retries.messages, proxy)
    finally:
        srv.stop()


def test_killed_mid_chunk_resumes_at_the_last_whole_chunk(killed_mid_chunk_upload: Outcome) -> None:
    out = killed_mid_chunk_upload
    length = open_source(out.study.folder).length
    # The half-received chunk had a checksum, so none of it counts: the client went on from
    # the end of the third chunk, and every offset it saw was a chunk boundary.
    assert 3 * CHUNK in out.offsets
    assert all(o % CHUNK == 0 or o == length for o in out.offsets)
    assert out.offsets == sorted(set(out.offsets))
    assert out.retries, "the client never noticed the gateway going away"
    assert head(out.server, out.url) == (length, length)


def test_killed_mid_chunk_payload_ingested(killed_mid_chunk_upload: Outcome) -> None:
    out = killed_mid_chunk_upload
    assert_ingested(out.server, out.url, out.study)


# -- the command ------------------------------------------------------------------------------


def iex_upload(
    *args: str, token: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "upload", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=command_env(token, env),
    )


def command_env(token: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "IEX_TOKEN"}
    return {**env, **({"IEX_TOKEN": token} if token else {}), **(extra or {})}


def test_command_uploads_a_folder_ingested(server: IexServer, tmp_path: Path) -> None:
    study = study_folder(tmp_path / "src")
    (tmp_path / "src" / "README.txt").write_text("burnt by a viewer\n")
    cache = tmp_path / "cache"
    done = iex_upload(
        str(study.folder),
        "--server",
        server.url,
        "--chunk-size",
        "512K",
        token=server.token,
        env={"XDG_CACHE_HOME": str(cache)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{study.study_uid}\t{len(study.digests)} instances\n"
    assert "README.txt" in done.stderr
    assert "Traceback" not in done.stderr and server.token not in done.stderr
    state = cache / "iex" / "uploads.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["uploads"] == {}
    assert retrieved(server, study) == study.digests


@pytest.fixture(scope="module")
def resumed_command(
    server: IexServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outcome]:
    """``iex upload`` is SIGKILLed while a chunk is held up in a proxy, with part of the
    upload acknowledged; the same command is run again."""
    root = tmp_path_factory.mktemp("resume")
    study = study_folder(root / "src")
    state = root / "state" / "uploads.json"
    with FaultProxy(server.port) as proxy:
        command = [
            str(study.folder), "--server", proxy.url, "--chunk-size", "64K",
            "--state-file", str(state), "--no-wait",
        ]  # fmt: skip
        proxy.hold(after=1_000_000)
        log = (root / "first.log").open("w")
        first = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "upload", *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=command_env(server.token),
        )
        log.close()
        try:
            assert proxy.held.wait(120), (root / "first.log").read_text()

            def acknowledged_upload() -> str | None:
                uploads = json.loads(state.read_text())["uploads"] if state.exists() else {}
                url = next(iter(uploads.values()))["url"] if uploads else ""
                return url if url and head(server, url)[0] != 0 else None

            url = wait_until(acknowledged_upload, timeout=60, message="an acknowledged chunk")
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(30)
        # The held chunk dies with its client: forwarded after the kill, it could complete
        # its PATCH while the command asks where to resume, and the offset would move.
        proxy.release(drop=True)
        acknowledged = head(server, url)[0]
        kept = state.read_text()
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert server.token not in kept
        again = iex_upload(*command, token=server.token)
    yield Outcome(server, study, url, proxy=proxy, acknowledged=acknowledged, resumed=again)


def test_killed_command_resumes_where_the_server_stands(resumed_command: Outcome) -> None:
    out = resumed_command
    assert out.resumed is not None
    stderr = out.resumed.stderr
    length = open_source(out.study.folder).length
    assert out.resumed.returncode == 0, stderr
    assert 0 < out.acknowledged < length
    assert f"resuming at {out.acknowledged} of {length} bytes ({out.url})" in stderr
    assert "Traceback" not in stderr
    assert head(out.server, out.url) == (length, length)
    state = Path(out.study.folder).parent / "state" / "uploads.json"
    assert json.loads(state.read_text())["uploads"] == {}


def test_killed_command_payload_ingested(resumed_command: Outcome) -> None:
    assert_ingested(resumed_command.server, resumed_command.url, resumed_command.study)


def test_command_trusts_the_ca_it_is_given(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    srv = IexServer(tmp_path / "data", tls=server_tls(tmp_path / "pki")).start()
    try:
        study = study_folder(tmp_path / "src", count=2, rows=16)
        args = [str(study.folder), "--server", srv.url, "--no-wait"]
        args += ["--state-file", str(tmp_path / "state.json")]
        untrusted = iex_upload(*args, token=srv.token)
        assert untrusted.returncode == 2
        assert "cannot reach" in untrusted.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        ca = str(tmp_path / "pki" / "ca.pem")
        trusted = iex_upload(*args, "--ca-cert", ca, token=srv.token)
        assert trusted.returncode == 0, trusted.stderr
        url = trusted.stderr.split("uploading ")[1].split(" to ")[1].split()[0]
        length = str(open_source(study.folder).length)
        with httpx.Client(verify=srv.verify, headers=srv.headers) as c:
            r = c.head(url, headers={"Tus-Resumable": "1.0.0"})
        assert r.headers["upload-offset"] == r.headers["upload-length"] == length
    finally:
        srv.stop()


def test_usage_errors_are_said_without_a_traceback(server: IexServer, tmp_path: Path) -> None:
    folder = study_folder(tmp_path / "src", count=1, rows=16).folder
    state = ["--state-file", str(tmp_path / "state.json")]
    cases = [
        (
            [str(tmp_path / "missing"), "--server", server.url, *state],
            server.token,
            "no such file or directory",
        ),
        (
            [str(folder), "--server", f"http://127.0.0.1:{free_port()}", *state],
            server.token,
            "cannot reach",
        ),
        ([str(folder), "--server", server.url, *state], "iex_0000_bogus", "(401)"),
        ([str(folder), "--server", server.url, *state], None, "no token"),
        ([str(folder), "--server", "ftp://127.0.0.1", *state], server.token, "not an http"),
        (
            [str(folder), "--server", server.url, "--trust", "elsewhere", *state],
            server.token,
            "(403)",
        ),
    ]
    for args, token, message in cases:
        result = iex_upload(*args, token=token)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        if token:
            assert token not in result.stderr + result.stdout
    bad_size = iex_upload(str(folder), "--server", server.url, "--chunk-size", "0", *state)
    assert bad_size.returncode == 2
    assert "chunk size" in bad_size.stderr
