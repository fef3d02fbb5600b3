"""The transfer runner: scheduling by priority and per-partner limits, backoff and the retry
window, resuming after a restart, and runners of several processes sharing one database.

Everything runs for real (SQLite store, asyncio tasks); only the network side of a delivery
is stood in for (``StandIn``). Time is a ``Clock`` the test moves; nothing waits on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from app.services.transfer_runner import RunnerPolicy, TransferRunner
from app.services.transfers import TransferService
from app.services.wiring import build_services
from app.settings import Settings
from app.transfer.delivery import (
    Delivered,
    DeliveryOutcome,
    JobProgress,
    JobStopped,
    PermanentFailure,
    TransientFailure,
)
from app.transfer.jobs import Backoff, JobState, TransferJob
from app.transfer.sqlite_jobs import SQLiteTransferJobs
from tests.transfer_jobs_helpers import (
    RECEIPT,
    Clock,
    StandIn,
    eventually,
    open_store,
    started,
)

TRUST = "north"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteTransferJobs]:
    s = await open_store(tmp_path / "transfers.sqlite3")
    yield s
    await s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Gateway:
    """One process's worth: a runner and the service over a store."""

    def __init__(
        self,
        store: SQLiteTransferJobs,
        delivery: StandIn,
        clock: Clock,
        policy: RunnerPolicy | None = None,
        owner: str = "p1",
    ) -> None:
        self.store = store
        self.delivery = delivery
        self.clock = clock
        self.runner = TransferRunner(
            store, delivery, policy or RunnerPolicy(), owner=owner, clock=clock, jitter=lambda: 0.0
        )
        self.service = TransferService(store, self.runner, clock=clock)

    async def send(self, partner: str = "east-gw", priority: str = "routine") -> TransferJob:
        self.clock.now += 1  # one after the other: "oldest first" is then well defined
        return await self.service.create(
            TRUST, study=generate_uid(), partner=partner, partner_trust="east", priority=priority
        )

    async def get(self, job: TransferJob) -> TransferJob:
        return await self.service.get(TRUST, job.id)

    async def finish(self, *jobs: TransferJob) -> None:
        """Let these jobs' runs end, and wait until they have (others keep running)."""
        ids = {job.id for job in jobs}
        for job_id in ids:
            self.delivery.go[job_id].set()

        async def ended() -> bool:
            return not ids & self.runner.running

        await eventually(ended, "the runs to end")


# -- scheduling -----------------------------------------------------------------------------


async def test_an_urgent_transfer_overtakes_a_long_routine_one_to_the_same_partner(
    store: SQLiteTransferJobs, clock: Clock
) -> None:
    gw = Gateway(store, StandIn(), clock, RunnerPolicy(partner_limit=1))
    gw.runner.start()
    try:
        big = await gw.send()
        await started(gw.delivery, big.id)
        second = await gw.send()
        urgent = await gw.send(priority="urgent")
        # Started by the pass the creation asked for, while the routine one still runs.
        await started(gw.delivery, urgent.id)
        assert gw.runner.running == {big.id, urgent.id}
        # The limit holds for routine work, and urgent work gets one slot more, not more.
        another_urgent = await gw.send(priority="urgent")
        assert await gw.runner.schedule() == []
        assert not gw.delivery.started[second.id].is_set()
        await gw.finish(urgent)
        await started(gw.delivery, another_urgent.id)
        assert not gw.delivery.started[second.id].is_set()
        await gw.finish(big, another_urgent)
        await started(gw.delivery, second.id)
        await gw.finish(second)
        for job in (big, urgent, another_urgent, second):
            done = await gw.get(job)
            assert (done.state, done.receipt, done.attempts) == (JobState.DELIVERED, RECEIPT, 1)
    finally:
        await gw.runner.close()


async def test_each_partner_has_its_own_limit(store: SQLiteTransferJobs, clock: Clock) -> None:
    gw = Gateway(store, StandIn(), clock, RunnerPolicy(partner_limit=2))
    east = [await gw.send("east-gw") for _ in range(3)]
    west = [await gw.send("west-gw") for _ in range(2)]
    started_ids = await gw.runner.schedule()
    assert set(started_ids) == {east[0].id, east[1].id, west[0].id, west[1].id}
    assert await gw.runner.schedule() == []
    await gw.finish(west[0])
    assert await gw.runner.schedule() == []  # east is still full
    await gw.finish(east[0])
    assert await gw.runner.schedule() == [east[2].id]
    await gw.finish(*east, west[1])


async def test_queued_jobs_start_urgent_first_then_oldest_first(
    store: SQLiteTransferJobs, clock: Clock
) -> None:
    gw = Gateway(store, StandIn(), clock, RunnerPolicy(partner_limit=1))
    jobs = []
    for priority in ("routine", "routine", "urgent", "routine", "urgent"):
        jobs.append(await gw.send(priority=priority))
    passes = []
    while len(sum(passes, [])) < len(jobs):
        started_ids = await gw.runner.schedule()
        passes.append(started_ids)
        await gw.finish(*jobs)
    # Both urgent ones at once (an urgent job may use one slot over the limit), then the
    # routine ones one at a time, oldest first.
    assert passes == [[jobs[2].id, jobs[4].id], [jobs[0].id], [jobs[1].id], [jobs[3].id]]


# -- failures, backoff, retry ---------------------------------------------------------------


async def test_transient_failures_back_off_then_fail_and_an_explicit_retry_delivers(
    store: SQLiteTransferJobs, clock: Clock
) -> None:
    outcomes: list[DeliveryOutcome] = []

    async def step(job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
        return outcomes.pop(0)

    policy = RunnerPolicy(backoff=Backoff(base=10, cap=40, window=50))
    gw = Gateway(store, StandIn(step, hold=False), clock, policy)
    job = await gw.send()
    waits = []
    outcomes += [TransientFailure("the partner answered 503")] * 5
    while (current := await gw.get(job)).state is not JobState.FAILED:
        assert await gw.runner.schedule() == [job.id]
        await gw.runner.idle()
        current = await gw.get(job)
        if current.state is JobState.FAILED:
            break
        assert current.last_error == "the partner answered 503"
        waits.append(current.next_attempt_at - clock.now)
        # Not due before its time: nothing runs.
        clock.now = current.next_attempt_at - 0.5
        assert await gw.runner.schedule() == []
        clock.now += 0.5
    assert waits == [5, 10, 20, 20]  # doubling, then capped (jitter 0: half of each step)
    assert current.attempts == 5
    assert current.last_error == (
        "gave up after 5 failed attempts over 55 s: the partner answered 503"
    )
    assert await gw.runner.schedule() == []  # failed is final until someone retries

    outcomes.append(Delivered(RECEIPT))
    retried = await gw.service.retry(TRUST, job.id)
    assert retried.state is JobState.QUEUED
    assert await gw.runner.schedule() == [job.id]
    await gw.runner.idle()
    done = await gw.get(job)
    assert (done.state, done.receipt, done.attempts, done.last_error) == (
        JobState.DELIVERED,
        RECEIPT,
        6,
        None,
    )


async def test_a_permanent_failure_fails_at_once_and_an_exception_is_transient(
    store: SQLiteTransferJobs, clock: Clock
) -> None:
    async def step(job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
        if job.partner == "refusing-gw":
            return PermanentFailure("the partner refused the bundle: unknown trust")
        raise RuntimeError("a bug in the delivery")

    gw = Gateway(store, StandIn(step, hold=False), clock)
    refused = await gw.send("refusing-gw")
    broken = await gw.send("east-gw")
    await gw.runner.schedule()
    await gw.runner.idle()
    refused = await gw.get(refused)
    assert refused.state is JobState.FAILED and refused.attempts == 1
    assert refused.last_error == "the partner refused the bundle: unknown trust"
    broken = await gw.get(broken)
    assert broken.state is JobState.QUEUED and broken.failures == 1
    assert broken.last_error == "the delivery failed unexpectedly (RuntimeError)"


# -- cancel and pause -----------------------------------------------------------------------


async def test_cancelling_a_running_transfer_stops_it_at_once(
    store: SQLiteTransferJobs, clock: Clock
) -> None:
    gw = Gateway(store, StandIn(), clock)
    job = await gw.send()
    await gw.runner.schedule()
    await started(gw.delivery, job.id)
    cancelled = await gw.service.cancel(TRUST, job.id)
    await asyncio.wait_for(gw.delivery.stopped[job.id].wait(), 30)
    await gw.runner.idle()
    job = await gw.get(job)
    assert cancelled.state is job.state is JobState.CANCELLED
    assert job.lease_owner is None and job.receipt is None
    assert await gw.runner.schedule() == []


async def test_a_paused_transfer_keeps_its_step_and_resumes_from_it(
    store: SQLiteTransferJobs, clock: Clock
) -> None:
    seen: list[TransferJob] = []

    async def step(job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
        seen.append(job)
        if not job.checkpoint:
            await progress.record(
                state=JobState.SENDING, bytes_sent=40, bytes_total=100, checkpoint={"offset": 40}
            )
            await asyncio.Event().wait()  # the rest never comes: paused meanwhile
        return Delivered(RECEIPT)

    gw = Gateway(store, StandIn(step), clock)
    job = await gw.send()
    await gw.runner.schedule()
    gw.delivery.go[job.id].set()
    await eventually(lambda: _has_checkpoint(gw, job), "the first 40 bytes recorded")
    paused = await gw.service.pause(TRUST, job.id)
    await asyncio.wait_for(gw.delivery.stopped[job.id].wait(), 30)
    await gw.runner.idle()
    assert paused.paused and paused.state is JobState.SENDING
    assert await gw.runner.schedule() == []
    await gw.service.resume(TRUST, job.id)
    assert await gw.runner.schedule() == [job.id]
    await gw.runner.idle()
    assert seen[1].state is JobState.SENDING and dict(seen[1].checkpoint) == {"offset": 40}
    done = await gw.get(job)
    assert (done.state, done.bytes_sent, done.attempts) == (JobState.DELIVERED, 100, 2)


async def _has_checkpoint(gw: Gateway, job: TransferJob) -> bool:
    return bool((await gw.get(job)).checkpoint)


# -- durability -----------------------------------------------------------------------------


async def test_a_transfer_in_flight_resumes_after_a_restart_and_a_delivered_one_never_reruns(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "transfers.sqlite3"
    recorded = asyncio.Event()

    async def first_run(job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
        await progress.record(state=JobState.PACKAGING, bytes_total=1000)
        await progress.record(
            state=JobState.SENDING, bytes_sent=600, checkpoint={"upload": "u-1", "offset": 600}
        )
        recorded.set()
        await asyncio.Event().wait()  # the gateway stops before the rest is sent
        raise AssertionError("unreachable")

    store = await open_store(path)
    gw = Gateway(store, StandIn(first_run, hold=False), clock)
    job = await gw.send()
    await gw.runner.schedule()
    await asyncio.wait_for(recorded.wait(), 30)
    await gw.runner.close()
    await store.close()

    resumed_from: list[TransferJob] = []

    async def second_run(job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
        resumed_from.append(job)
        await progress.record(bytes_sent=1000, checkpoint={"upload": "u-1", "offset": 1000})
        await progress.record(state=JobState.AWAITING_RECEIPT)
        return Delivered(RECEIPT)

    store = await open_store(path)
    gw = Gateway(store, StandIn(second_run, hold=False), clock, owner="p2")
    assert await gw.runner.schedule() == [job.id]
    await gw.runner.idle()
    (before,) = resumed_from
    assert before.state is JobState.SENDING and before.bytes_sent == 600
    assert dict(before.checkpoint) == {"upload": "u-1", "offset": 600}
    done = await gw.get(job)
    assert (done.state, done.bytes_sent, done.bytes_total) == (JobState.DELIVERED, 1000, 1000)
    await store.close()

    store = await open_store(path)
    gw = Gateway(store, StandIn(second_run, hold=False), clock, owner="p3")
    clock.now += 10 * 24 * 3600
    assert await gw.runner.schedule() == []
    assert len(resumed_from) == 1 and (await gw.get(job)).state is JobState.DELIVERED
    await store.close()


# -- several processes ----------------------------------------------------------------------


async def test_two_processes_never_run_one_transfer_at_once(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "transfers.sqlite3"
    first, second = await open_store(path), await open_store(path)
    shared = StandIn()
    one = Gateway(first, shared, clock, RunnerPolicy(partner_limit=2), owner="p1")
    two = Gateway(second, shared, clock, RunnerPolicy(partner_limit=2), owner="p2")
    jobs = [await one.send(partner) for partner in ("east-gw", "west-gw") for _ in range(4)]
    try:
        # Both read the same due jobs and race for each one.
        a, b = await asyncio.gather(one.runner.schedule(), two.runner.schedule())
        assert not set(a) & set(b)
        assert len(a) + len(b) == 4  # two per partner, over both processes
        assert not shared.overlaps
        for job in jobs:
            shared.go[job.id].set()
        for _ in jobs:  # each round delivers at least one job
            await asyncio.gather(one.runner.schedule(), two.runner.schedule())
            await asyncio.gather(one.runner.idle(), two.runner.idle())
        finished = [await one.get(j) for j in jobs]
        assert {j.state for j in finished} == {JobState.DELIVERED}
        assert not shared.overlaps
        assert [shared.ran(j.id) for j in jobs] == [1] * len(jobs)
        assert [j.attempts for j in finished] == [1] * len(jobs)
    finally:
        await one.runner.close()
        await two.runner.close()
        await first.close()
        await second.close()


async def test_a_lease_that_expired_is_taken_over_and_the_old_holder_stopped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "transfers.sqlite3"
    first, second = await open_store(path), await open_store(path)
    clock_one, clock_two = Clock(), Clock()
    hung_result: list[BaseException] = []

    async def hung(job: TransferJob, progress: JobProgress) -> DeliveryOutcome:
        try:
            await progress.record(state=JobState.SENDING, bytes_sent=1)
        except JobStopped as exc:
            hung_result.append(exc)
            raise
        return Delivered(b"never")

    policy = RunnerPolicy(lease=30)
    one = Gateway(first, StandIn(hung), clock_one, policy, owner="p1")
    two = Gateway(second, StandIn(), clock_two, policy, owner="p2")
    try:
        job = await one.send()
        assert await one.runner.schedule() == [job.id]
        await started(one.delivery, job.id)
        # p1 hangs (no renewal); until its lease ends p2 leaves the job alone.
        clock_two.now += 29
        assert await two.runner.schedule() == []
        clock_two.now += 3
        assert await two.runner.schedule() == [job.id]
        await started(two.delivery, job.id)
        taken = await two.get(job)
        assert taken.lease_owner == "p2" and taken.attempts == 2
        # p1 wakes up: it can record nothing more, and a renewal tells it to stop.
        one.delivery.go[job.id].set()
        await one.runner.idle()
        assert len(hung_result) == 1
        assert not await first.renew(job.id, "p1", clock_one.now + 30)
        assert (await two.get(job)).lease_owner == "p2"
        await two.finish(job)
        done = await two.get(job)
        assert done.state is JobState.DELIVERED and done.bytes_sent == 0
    finally:
        await one.runner.close()
        await two.runner.close()
        await first.close()
        await second.close()


async def test_a_cancel_in_another_process_stops_the_run_at_its_next_renewal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "transfers.sqlite3"
    first, second = await open_store(path), await open_store(path)
    # A real clock and a short lease: the renewal is what carries the cancellation over.
    one = TransferRunner(first, running := StandIn(), RunnerPolicy(lease=0.3), owner="p1")
    elsewhere = TransferService(second)
    try:
        job = await elsewhere.create(
            TRUST, study=generate_uid(), partner="east-gw", partner_trust="east"
        )
        assert await one.schedule() == [job.id]
        await started(running, job.id)
        await elsewhere.cancel(TRUST, job.id)
        await asyncio.wait_for(running.stopped[job.id].wait(), 30)
        await one.idle()
        assert (await elsewhere.get(TRUST, job.id)).state is JobState.CANCELLED
    finally:
        await one.close()
        await first.close()
        await second.close()


# -- in the gateway -------------------------------------------------------------------------


async def test_the_gateway_pushes_by_default_and_a_given_delivery_replaces_it(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", transfer_partner_concurrency=1)
    async with build_services(settings) as services:
        job = await services.transfers.create(
            "local", study=generate_uid(), partner="east-gw", partner_trust="east"
        )

        async def failed() -> TransferJob | None:
            current = await services.transfers.get("local", job.id)
            return current if current.state is JobState.FAILED else None

        done = await eventually(failed, "the transfer to fail")
        assert done.last_error is not None
        # The partner push itself ran: it found no agreement for the transfer.
        assert done.last_error.startswith("no agreement of trust local with trust east")

    delivery = StandIn(hold=False)
    async with build_services(settings, delivery=delivery) as services:
        await services.transfers.retry("local", job.id)

        async def delivered() -> bool:
            current = await services.transfers.get("local", job.id)
            return current.state is JobState.DELIVERED

        await eventually(delivered, "the transfer to be delivered")
        assert delivery.ran(job.id) == 1
