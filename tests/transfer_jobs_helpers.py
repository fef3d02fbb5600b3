"""What the transfer job tests share: a clock the test moves, and a delivery the test steers.

``StandIn`` stands in for the network side of a delivery (packaging, sending, waiting for
the receipt), not for any component of ours: the store, runner and service are the real ones.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from app.transfer.delivery import Delivered, DeliveryOutcome, JobProgress
from app.transfer.jobs import TransferJob
from app.transfer.sqlite_jobs import SQLiteTransferJobs

T = TypeVar("T")

#: Any key will do: the store encrypts with whatever index key the gateway gives it.
KEY = bytes(range(32))
RECEIPT = b'{"receipt": "{\\"result\\":\\"stored\\"}", "signature": "c2ln"}'


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def open_store(path: Path) -> SQLiteTransferJobs:
    store = SQLiteTransferJobs(path, key=KEY)
    await store.open()
    return store


#: What a run does once let go: the outcome, given the job and its progress.
Step = Callable[[TransferJob, JobProgress], Awaitable[DeliveryOutcome]]


async def deliver(job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
    return Delivered(RECEIPT)


class StandIn:
    """Each run marks its job started, waits until the test lets it go (unless ``hold``
    is off), then does what ``step`` says (by default: delivered with ``RECEIPT``)."""

    def __init__(self, step: Step = deliver, *, hold: bool = True) -> None:
        self.step = step
        self.hold = hold
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.go: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.stopped: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.runs: list[TransferJob] = []
        self.active: set[str] = set()
        self.overlaps: list[str] = []

    async def run(self, job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
        self.runs.append(job)
        if job.id in self.active:
            self.overlaps.append(job.id)
        self.active.add(job.id)
        self.started[job.id].set()
        try:
            if self.hold:
                await self.go[job.id].wait()
            return await self.step(job, progress)
        except asyncio.CancelledError:
            self.stopped[job.id].set()
            raise
        finally:
            self.active.discard(job.id)

    def ran(self, job_id: str) -> int:
        return sum(1 for j in self.runs if j.id == job_id)


async def eventually(check: Callable[[], Awaitable[T]], what: str, timeout: float = 30) -> T:
    """Ask ``check`` until it answers something truthy; the timeout only keeps a stuck run
    from hanging the suite."""

    async def poll() -> T:
        while not (value := await check()):
            await asyncio.sleep(0.01)
        return value

    try:
        return await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"gave up after {timeout:g} s waiting for {what}") from None


async def started(stand_in: StandIn, job_id: str) -> None:
    await asyncio.wait_for(stand_in.started[job_id].wait(), 30)
