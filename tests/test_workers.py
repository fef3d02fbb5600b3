"""Several processes serving one data directory (``iex serve --workers N``).

What they share is on disk: the keyring, the databases, the blobs. A data key one process
makes is never lost to another's, staging is per process, writes to a database take turns,
and one process at a time ingests uploads.
"""

from __future__ import annotations

import os
import signal
import socket
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from app.services.keys import open_data_keys
from app.storage.filesystem import FileInstanceStore
from tests.helpers import IexServer, make_instance, wait_until
from tests.transfer_helpers import (
    metadata,
    source_digests,
    stored_digests,
    study_files,
    tus_client,
    upload,
    wait_report,
    zip_of,
)

ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def test_processes_adding_data_keys_never_lose_one_another(tmp_path: Path) -> None:
    """Two processes' views of one keyring: each adds a trust's key to the keyring as
    saved, so both keys survive, a trust gets one key, and each process finds the other's."""
    first = open_data_keys(tmp_path, None)
    second = open_data_keys(tmp_path, None)
    a = first.for_writing("trust-a")
    b = second.for_writing("trust-b")  # made after "trust-a" was saved by the other
    assert second.for_writing("trust-a") == a
    assert first.key(b[0]) == b[1]  # not in its keyring yet: read from disk
    reopened = open_data_keys(tmp_path, None)
    assert reopened.key(a[0]) == a[1] and reopened.key(b[0]) == b[1]


def test_staging_of_a_live_process_is_left_alone(tmp_path: Path) -> None:
    live = FileInstanceStore(tmp_path)
    (live.staging_dir / "0123456789abcdef0123456789abcdef").write_bytes(b"being written")
    gone = tmp_path / "staging" / "feedfacefeedface"  # its process ended: lock not held
    gone.mkdir()
    (gone / "fedcba9876543210fedcba9876543210").write_bytes(b"half a blob")
    (tmp_path / "staging" / "feedfacefeedface.lock").touch()

    other = FileInstanceStore(tmp_path)
    assert other.shared
    assert not gone.exists()
    assert [p.name for p in live.staging_dir.iterdir()] == ["0123456789abcdef0123456789abcdef"]
    other.close()
    live.close()
    assert not FileInstanceStore(tmp_path).shared


@pytest.fixture
def two_workers(make_server: Callable[..., IexServer]) -> IexServer:
    srv = make_server(IEX_WORKERS="2")
    staging = srv.data_dir / "staging"
    # Answering is one process being up; each stages in a directory of its own.
    wait_until(
        lambda: len([p for p in staging.iterdir() if p.is_dir()]) >= 2,
        message="the second process to start",
    )
    return srv


def _tcp_table() -> list[list[str]]:
    return [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]


def _loopback(port: int) -> str:
    return f"0100007F:{port:04X}"


def _holders(inode: str) -> list[int]:
    """The processes with a descriptor for the socket of ``inode``."""
    pids = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                pids.add(int(fd.parent.parent.name))
        except OSError:
            continue  # a descriptor (or a process) that closed meanwhile
    return sorted(pids)


def _server_inode(port: int, client: socket.socket) -> str:
    """The inode of the server's end of ``client``'s connection: "0" until it is accepted."""
    ends = [_loopback(port), _loopback(client.getsockname()[1])]
    return next(fields[9] for fields in _tcp_table() if fields[1:3] == ends)


def test_pending_connections_are_shared_between_the_workers(two_workers: IexServer) -> None:
    """Connections waiting together (a client opening its pool) are not all taken by the
    first process to look: it accepts one at a time, waiting longer the more it serves,
    and leaves the rest to the other. Left to the event loop, the first process that wakes
    accepts everything pending at once, so one process served all of a client's connections
    while the other idled."""
    assert two_workers.process is not None
    port = _loopback(two_workers.port)
    listener = next(f[9] for f in _tcp_table() if f[1] == port and f[3] == "0A")  # LISTEN
    first, second = [p for p in _holders(listener) if p != two_workers.process.pid]
    for pid in (first, second):
        os.kill(pid, signal.SIGSTOP)
    try:
        # Enough that taking them all alone would take the first process about half a
        # second of waits (10 ms each once it serves ten): on a busy machine the second,
        # resumed as soon as the first accepts one, still gets there in time.
        connections = [socket.create_connection(("127.0.0.1", two_workers.port)) for _ in range(64)]
        os.kill(first, signal.SIGCONT)
        wait_until(
            lambda: any(_server_inode(two_workers.port, c) != "0" for c in connections),
            interval=0,
            message="a connection to be accepted",
        )
    finally:
        for pid in (first, second):
            os.kill(pid, signal.SIGCONT)
    try:
        for c in connections:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for c in connections:
            assert c.recv(4096).startswith(b"HTTP/1.1 200 ")
        served = Counter(
            pid for c in connections for pid in _holders(_server_inode(two_workers.port, c))
        )
    finally:
        for c in connections:
            c.close()
    # Evenly, unless this machine is too busy to run the second process promptly.
    assert served.keys() == {first, second}, served


def test_two_workers_store_for_new_trusts_concurrently(two_workers: IexServer) -> None:
    """Many first stores of several new trusts at once, over fresh connections (so both
    processes take some), each trust's data key made by whichever process came first;
    then everything reads back, byte for byte, from a gateway started afresh."""
    trusts = [f"trust-{n}" for n in range(4)]
    tokens = {}
    for trust in trusts:
        two_workers.iex("trust", "add", trust)
        tokens[trust] = two_workers.issue_token(trust, "uploader", "reader")

    def store(n: int) -> tuple[str, str, bytes]:
        trust = trusts[n % len(trusts)]
        study = generate_uid()
        data = make_instance(study_uid=study, instance_number=n)
        with two_workers.client(tokens[trust]) as c:
            r = c.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200, r.text
        return trust, study, data

    with ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(store, range(32)))
    # Both processes appended to one audit trail: the chain never forked.
    assert two_workers.iex("audit", "verify").startswith("ok: ")

    two_workers.stop()
    two_workers.env["IEX_WORKERS"] = "1"
    two_workers.start()
    for trust, study, data in stored:
        with two_workers.client(tokens[trust]) as c:
            r = c.get(f"/studies/{study}", headers={"Accept": ANY_SYNTAX})
        assert r.status_code == 200
        assert data in r.content


def test_two_workers_ingest_an_upload_once(two_workers: IexServer) -> None:
    members = study_files(6)
    with tus_client(two_workers) as tus:
        url, _ = upload(tus, zip_of(members), metadata(content_type="application/zip"))
        report = wait_report(tus, url)
    assert report["state"] == "complete", report
    assert report["counts"]["stored"] == len(members)
    [study] = report["studies"]
    assert stored_digests(two_workers, study["study_uid"]) == source_digests(members)


def test_keys_cannot_rotate_under_two_workers(two_workers: IexServer) -> None:
    with pytest.raises(RuntimeError, match="a gateway is running"):
        two_workers.iex("keys", "rotate")
    assert httpx.get(two_workers.url + "/readyz").status_code == 200
