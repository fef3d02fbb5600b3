"""The audit trail loses nothing: an answered access has a durable record, and when no record
can be written the access is refused (503), never served unaudited.

Failures are real: a gateway SIGKILLed while clients store and read, and a trail on a small
file system filled to the last block (mounting it needs root; without, those tests skip).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from app.dicom.uids import InstanceRef
from app.errors import AuditUnavailable
from app.services.audit import AccessFacts, AuditTrail, ChainVerifier
from app.storage.security import AuditFilter
from app.storage.sqlite_security import SQLiteSecurityStore
from tests.helpers import IexServer, make_instance, open_db, wait_until

CT = {"Content-Type": "application/dicom"}
STUDIES = "/dicomweb/studies"


def _records(data_dir: Path) -> list[dict[str, object]]:
    """Every record in a gateway's trail, read from its database (the gateway may be dead)."""
    with closing(open_db(data_dir, "security.sqlite3")) as db:
        return [json.loads(row[0]) for row in db.execute("SELECT entry FROM audit ORDER BY seq")]


def _key(record: dict[str, object]) -> tuple[str, str | None, int]:
    """(route, study, status) of a record: the study it names, or the one a query asked for."""
    extra = record["iex"]
    assert isinstance(extra, dict)
    study = None
    for obj in record.get("ParticipantObjectIdentification") or []:  # type: ignore[attr-defined]
        if obj.get("ParticipantObjectIDTypeCode", {}).get("csd-code") == "110180":
            study = obj["ParticipantObjectID"]
        elif "ParticipantObjectQuery" in obj:
            query = base64.b64decode(obj["ParticipantObjectQuery"]).decode()
            study = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get(
                "StudyInstanceUID"
            )
    return extra["route"], study, extra["status"]


# -- SIGKILL while clients store and read ---------------------------------------------------


Answer = tuple[str, str | None, int]


def _traffic_until_killed(srv: IexServer, known: list[str], answered: list[Answer]) -> None:
    """Clients storing (each request a study of its own) and reading (retrieve, metadata,
    search of the ``known`` studies) until the gateway is SIGKILLed in the midst of it.

    A status line counts as an answer: the record must be durable before it leaves, whether
    or not the body arrives before the kill."""
    lock = threading.Lock()
    before = len(answered)

    def exchange(
        client: httpx.Client, method: str, path: str, key: tuple[str, str], **kw: Any
    ) -> None:
        with client.stream(method, path, **kw) as r:
            with lock:
                answered.append((key[0], key[1], r.status_code))
            r.read()

    def storer() -> None:
        with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=60) as c:
            while True:
                study = generate_uid()
                data = make_instance(study_uid=study)
                exchange(c, "POST", STUDIES, (f"POST {STUDIES}", study), content=data, headers=CT)

    def reader(n: int) -> None:
        with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=60) as c:
            while True:
                study = known[n % len(known)]
                kinds: list[tuple[str, str, dict[str, Any]]] = [
                    (f"{STUDIES}/{study}", f"GET {STUDIES}/{{study}}", {}),
                    (f"{STUDIES}/{study}/metadata", f"GET {STUDIES}/{{study}}/metadata", {}),
                    (STUDIES, f"GET {STUDIES}", {"params": {"StudyInstanceUID": study}}),
                ]
                path, route, kw = kinds[n % len(kinds)]
                exchange(c, "GET", path, (route, study), **kw)
                n += 1

    def until_killed(work: Callable[[], None]) -> None:
        try:
            work()
        except httpx.TransportError:
            pass  # the gateway is gone: this client stops

    works: list[Callable[[], None]] = [storer] * 3
    works += [lambda i=i: reader(i) for i in range(4)]  # type: ignore[misc]
    threads = [threading.Thread(target=until_killed, args=(w,)) for w in works]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            with lock:
                fresh = answered[before:]
                enough = len(fresh) >= 60 and len({route for route, _, _ in fresh}) == 4
            if enough:
                break
            assert time.monotonic() < deadline, f"only {len(fresh)} answers so far"
            time.sleep(0.01)
    finally:
        srv.kill()  # SIGKILL, with requests of every kind in flight
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)


def test_every_answered_request_has_its_record_after_sigkill(
    make_server: Callable[..., IexServer],
) -> None:
    srv = make_server()
    known = [generate_uid() for _ in range(3)]
    with srv.client() as c:
        for study in known:
            assert c.post("/studies", content=make_instance(study_uid=study), headers=CT).is_success
    answered: list[Answer] = []
    # Killed three times: each kill may land between an answer and its record.
    for restart in (False, True, True):
        if restart:
            srv.start()
        _traffic_until_killed(srv, known, answered)

    recorded = Counter(_key(r) for r in _records(srv.data_dir))
    missing = Counter(answered) - recorded
    assert not missing, f"answered without a record: {missing}"
    assert any(status == 200 and route.startswith("POST") for route, _, status in answered)
    assert srv.iex("audit", "verify").startswith("ok: ")


# -- a trail that cannot be written ----------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 file system of the test's own (in a file, on a loop device), unmounted
    whatever happens.

    Made to fill up exactly: without extents ext4 keeps no reserved pool (as for ext2 and
    ext3), and without delayed allocation a write takes its blocks at once, so ENOSPC comes
    from the write that does not fit, not later at writeback.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system to fill it needs root")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed (Debian: e2fsprogs)")
    image, mount = tmp_path / "small.img", tmp_path / "small"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    # No blocks reserved for root either: the gateway runs as root here.
    mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", "-O", "^extents,^64bit"]
    subprocess.run([*mkfs, str(image)], check=True)
    subprocess.run(["mount", "-o", "loop,nodelalloc", str(image), str(mount)], check=True)
    try:
        os.chmod(mount, 0o700)
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def _write_until_full(path: Path, chunk: bytes) -> int:
    """Append ``chunk`` to ``path`` until ENOSPC; the bytes written."""
    wrote = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        return 0
    try:
        while True:
            try:
                wrote += os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return wrote
    finally:
        os.close(fd)


def fill(directory: Path) -> None:
    """Take every block of the file system left (ENOSPC for anyone).

    A big file cannot take the last few blocks (a file without extents needs indirect
    blocks as it grows), so small files take those. Then no append to the trail can
    succeed: a WAL frame is a 4 KiB page plus a 24-byte header, so every frame appended
    needs a block the WAL did not have, and SQLite writes over old frames only once a
    checkpoint (at 1000 pages) has copied them all back, which the few records of a fresh
    trail never reach. Called before each request, because a failed request may free
    blocks (a STOW-RS request removes what it staged).
    """
    while _write_until_full(directory / "filler", bytes(1 << 20)) > 0:
        pass
    n = len(list(directory.glob("filler-*")))
    while _write_until_full(directory / f"filler-{n}", bytes(4096)) > 0:
        n += 1


def _free(directory: Path) -> None:
    for filler in directory.glob("filler*"):
        filler.unlink()
    os.sync()  # ext4 reuses freed blocks once its journal has committed their freeing


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_targets(pid: int) -> list[str]:
    """What the process holds open, for a failure's message."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return sorted(targets)


def test_an_unwritable_trail_refuses_patient_data_and_recovers(small_fs: Path) -> None:
    srv = IexServer(small_fs).start()
    try:
        assert srv.process is not None
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        data = make_instance(study_uid=study, series_uid=series, sop_uid=sop, rows=256, columns=256)
        with srv.client() as c:
            for inst in (data, make_instance(study_uid=study), make_instance(study_uid=study)):
                assert c.post("/studies", content=inst, headers=CT).status_code == 200
            instance = f"/studies/{study}/series/{series}/instances/{sop}"
            assert c.get(instance).status_code == 200
            fds = _open_fds(srv.process.pid)
            held_before = _fd_targets(srv.process.pid)
            records = len(_records(small_fs))

            refused_study = generate_uid()
            refused = make_instance(study_uid=refused_study)
            requests: list[tuple[str, str, dict[str, object]]] = [
                ("GET", f"/studies/{study}", {}),
                ("GET", instance, {"headers": {"Accept": "*/*"}}),
                ("GET", f"/studies/{study}/metadata", {}),
                ("GET", f"{instance}/frames/1", {}),
                ("GET", "/studies", {"params": {"StudyInstanceUID": study}}),
                ("POST", "/studies", {"content": refused, "headers": CT}),
                ("GET", srv.url + "/audit", {}),
                # A push sends patient data away: refused like a store (and queues nothing).
                (
                    "POST",
                    srv.url + "/transfers",
                    {"json": {"study": study, "partner": "gw-b", "partner_trust": "rad-b"}},
                ),
            ]
            for _ in range(3):
                for method, path, kw in requests:
                    fill(small_fs)
                    r = c.request(method, path, **kw)  # type: ignore[arg-type]
                    assert r.status_code == 503, (method, path, r.status_code, r.text[:200])
                    assert "audit trail cannot be written" in r.json()["detail"]
            fill(small_fs)
            ready = httpx.get(srv.url + "/readyz")
            assert ready.status_code == 503
            assert "audit trail cannot be written" in ready.json()["detail"]

            # Nothing of the refused responses is left open in the gateway.
            deadline = time.monotonic() + 30
            while _open_fds(srv.process.pid) > fds:
                assert time.monotonic() < deadline, (
                    "refused responses left files open",
                    sorted(set(_fd_targets(srv.process.pid)) - set(held_before)),
                )
                time.sleep(0.05)

            _free(small_fs)
            # Stores are refused before they run while the trail is unwritable, so the trail
            # finds out by itself that it is mended: no /readyz needed for them to resume.
            store = make_instance()
            wait_until(
                lambda: c.post("/studies", content=store, headers=CT).status_code == 200,
                timeout=30,
                message="stores did not resume once the space came back",
            )
            assert httpx.get(srv.url + "/readyz").status_code == 200
            r = c.get(instance, headers={"Accept": "*/*"})
            assert r.status_code == 200 and data in r.content
            # The refused store changed nothing: its study is nowhere. Nor was a push queued.
            assert c.get("/studies", params={"StudyInstanceUID": refused_study}).json() == []
            assert c.get(srv.url + "/transfers").json() == {"transfers": []}
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
    # Of all that was refused nothing is in the trail, not even in part: only the store, the
    # retrieval and the search after the space came back (probes add no record).
    assert len(_records(small_fs)) == records + 3
    assert srv.iex("audit", "verify").startswith("ok: ")


# -- the writer's failure path, in-process ---------------------------------------------------


def _facts(study: str) -> AccessFacts:
    return AccessFacts(
        at=time.time(),
        method="GET",
        route="/dicomweb/studies/{study}/metadata",
        status=200,
        client="127.0.0.1",
        actor="0123456789abcdef",
        trust="local",
        kind="metadata",
        objects=[InstanceRef(study)],
    )


@pytest.fixture
async def trail(small_fs: Path) -> AsyncIterator[AuditTrail]:
    store = SQLiteSecurityStore(small_fs / "security.sqlite3", key=os.urandom(32))
    await store.open()
    trail = AuditTrail(store, "gw-test")
    trail.start()
    yield trail
    await trail.close()
    await store.close()


async def _chain(store: SQLiteSecurityStore) -> ChainVerifier:
    verifier = ChainVerifier()
    for row in await store.audit(AuditFilter(limit=10_000)):
        verifier.feed(row.entry, row.hash)
    verifier.finish(await store.audit_head())
    return verifier


async def test_a_failed_append_fails_its_waiters_and_leaves_the_chain_whole(
    trail: AuditTrail, small_fs: Path
) -> None:
    store = trail.store
    await asyncio.gather(*(trail.record(_facts(generate_uid())) for _ in range(5)))
    head = await store.audit_head()
    assert head[0] == 5 and trail.problem is None

    fill(small_fs)
    outcomes = await asyncio.gather(
        *(trail.record(_facts(generate_uid())) for _ in range(8)), return_exceptions=True
    )
    assert all(isinstance(o, AuditUnavailable) for o in outcomes), outcomes
    assert all("audit trail cannot be written" in o.detail for o in outcomes)  # type: ignore[union-attr]
    assert trail.problem is not None
    with pytest.raises(AuditUnavailable):
        await trail.check()
    # Nothing of the failed transaction is in the trail, and what is there still verifies.
    assert await store.audit_head() == head
    verifier = await _chain(store)
    assert verifier.ok and verifier.checked == 5

    _free(small_fs)
    await trail.check()
    assert trail.problem is None
    await asyncio.gather(*(trail.record(_facts(generate_uid())) for _ in range(3)))
    verifier = await _chain(store)
    assert verifier.ok and verifier.checked == 8
    assert (await store.audit_head())[0] == 8


async def test_concurrent_records_share_one_transaction(tmp_path: Path) -> None:
    store = SQLiteSecurityStore(tmp_path / "security.sqlite3", key=os.urandom(32))
    await store.open()
    trail = AuditTrail(store, "gw-test")
    trail.start()
    try:
        await trail.record(_facts(generate_uid()))
        before = trail.commits
        # All fifty are waiting before the writer runs again (asyncio runs ready tasks in
        # order), so one transaction, and one fsync, takes them all.
        await asyncio.gather(*(trail.record(_facts(generate_uid())) for _ in range(50)))
        assert trail.commits == before + 1
        assert trail.records == 51
        assert (await _chain(store)).checked == 51
    finally:
        await trail.close()
        await store.close()
    with pytest.raises(AuditUnavailable):
        await trail.record(_facts(generate_uid()))  # closed: refused, not queued


async def test_a_commit_waits_for_the_records_of_exchanges_under_way(tmp_path: Path) -> None:
    """With exchanges under way, the writer holds a commit for their records (up to
    ``gather``; long here, so that nothing depends on timing): one commit takes them all.
    An exchange that ends without a record lets the commit go."""
    store = SQLiteSecurityStore(tmp_path / "security.sqlite3", key=os.urandom(32))
    await store.open()
    trail = AuditTrail(store, "gw-test", gather=60)
    trail.start()
    try:
        first, second, silent = trail.expect(), trail.expect(), trail.expect()
        early = asyncio.create_task(trail.record(_facts(generate_uid()), first))
        for _ in range(5):  # the writer wakes for the first record, and waits
            await asyncio.sleep(0)
        assert not early.done() and trail.commits == 0
        late = asyncio.create_task(trail.record(_facts(generate_uid()), second))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not early.done()  # one exchange is still under way
        silent.settle()  # it ends without a record
        await asyncio.gather(early, late)
        assert (trail.commits, trail.records) == (1, 2)
        assert (await _chain(store)).checked == 2
        # A lone exchange, with nothing else under way, is committed at once.
        await trail.record(_facts(generate_uid()), trail.expect())
        assert (trail.commits, trail.records) == (2, 3)
    finally:
        await trail.close()
        await store.close()
