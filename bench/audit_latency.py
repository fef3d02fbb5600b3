"""Durable audit: what an access waits for its record, and how many records share an fsync.

    python bench/audit_latency.py [--seconds 5] [--dir DIR] [--smoke]

Every audited exchange holds back its answer until ``AuditTrail.record`` returns, i.e. until
its record is committed and fsynced (``app/http/audit.py``). This times exactly that wait,
in-process, against a fresh security database as the gateway opens it (SQLCipher, WAL,
``synchronous=FULL``), for 1, 8 and 32 clients each recording retrievals back to back:

* p50 / p95 of the wait: the latency the durable trail adds to a request;
* records/s, and records per transaction (each transaction is one fsync of the WAL): what
  the group commit shares once clients are concurrent.

The limit, measured in the same run on the same file system: a bare loop writing what the
commit of one record writes to the WAL (8 frames of a 4 KiB page and a 24-byte header: the
record, its three indexes, its study, the head, and the pages above them) and syncing it
with ``fsync``, the call the SQLCipher build of SQLite makes at each commit (it is built
without ``fdatasync``); once appended to a growing file, once written over frames written
before, as a WAL in use is after its first checkpoint. One record cannot be durable sooner
than that.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.dicom.uids import InstanceRef  # noqa: E402
from app.services.audit import AccessFacts, AuditTrail  # noqa: E402
from app.storage.sqlite_security import SQLiteSecurityStore  # noqa: E402

FRAME = 4096 + 24
#: WAL frames a commit of one record writes (measured: the WAL grows by 8 frames a record).
FRAMES = 8
STUDY = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000000001"


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def bare_sync(directory: Path, seconds: float, *, grow: bool) -> list[float]:
    """Seconds per write-and-fsync of one commit's frames, for ``seconds``: appended to a
    growing file (``grow``, a WAL before its first checkpoint), or cycling through 1000
    frames written once before (a WAL after it: SQLite writes over checkpointed frames)."""
    path = directory / "bare-sync"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    commit = os.urandom(FRAME * FRAMES)
    took: list[float] = []
    try:
        if not grow:
            os.write(fd, commit * (1000 // FRAMES))
            os.fsync(fd)
        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            os.pwrite(fd, commit, (n if grow else n % (1000 // FRAMES)) * len(commit))
            os.fsync(fd)
            took.append(time.perf_counter() - start)
            n += 1
    finally:
        os.close(fd)
        path.unlink()
    return took


def _retrieval(n: int) -> AccessFacts:
    """What the middleware records for a WADO-RS retrieval of one instance."""
    return AccessFacts(
        at=time.time(),
        method="GET",
        route="/dicomweb/studies/{study}/series/{series}/instances/{instance}",
        status=200,
        client="127.0.0.1",
        actor="0123456789abcdef",
        trust="local",
        kind="retrieve",
        objects=[InstanceRef(STUDY, STUDY + ".1", f"{STUDY}.1.{n}")],
        bytes_sent=526_000,
    )


async def clients(trail: AuditTrail, count: int, seconds: float) -> tuple[list[float], int, int]:
    """``count`` clients recording back to back for ``seconds``: the waits, and the
    records and transactions it took."""
    waits: list[float] = []
    records, commits = trail.records, trail.commits
    end = time.perf_counter() + seconds

    async def client(k: int) -> None:
        n = 0
        while time.perf_counter() < end:
            start = time.perf_counter()
            await trail.record(_retrieval(k * 1_000_000 + n))
            waits.append(time.perf_counter() - start)
            n += 1

    await asyncio.gather(*(client(k) for k in range(count)))
    return waits, trail.records - records, trail.commits - commits


async def run(directory: Path, seconds: float, counts: list[int]) -> None:
    print(f"file system of {directory}")
    for grow in (True, False):
        took = bare_sync(directory, seconds, grow=grow)
        print(
            f"limit, {FRAMES} frames {'appended' if grow else 'written over'} and "
            f"fsynced: p50 {_ms(took, 0.5):.2f} ms, p95 {_ms(took, 0.95):.2f} ms "
            f"({len(took) / seconds:,.0f}/s)"
        )
    limit = took  # written over: what a WAL in use does, the lower of the two
    store = SQLiteSecurityStore(directory / "security.sqlite3", key=os.urandom(32))
    await store.open()
    trail = AuditTrail(store, "bench")
    trail.start()
    try:
        await clients(trail, 1, min(seconds, 0.5))  # warm up: connections, first pages
        print("\nclients | wait p50 / p95 ms | p50 / limit p50 | records/s | records per fsync")
        for count in counts:
            waits, records, commits = await clients(trail, count, seconds)
            p50 = _ms(waits, 0.5)
            print(
                f"{count:7d} | {p50:6.2f} / {_ms(waits, 0.95):6.2f} | "
                f"{p50 / _ms(limit, 0.5):15.2f} | {records / seconds:9,.0f} | "
                f"{records / max(commits, 1):.1f}"
            )
    finally:
        await trail.close()
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measure (5)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: the temp directory)"
    )
    parser.add_argument("--smoke", action="store_true", help="short runs, 1 and 8 clients (CI)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="iex-audit-", dir=args.dir))
    try:
        if args.smoke:
            asyncio.run(run(work, 0.3, [1, 8]))
        else:
            asyncio.run(run(work, args.seconds, [1, 8, 32]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
