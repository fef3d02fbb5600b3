"""The scheduler of outbound transfers: ``TransferRunner`` picks due jobs and runs them.

Every process serving the data directory runs one. A pass (``schedule``) reads the jobs
that are due, urgent first, and claims those its partner has room for: at most
``partner_limit`` running jobs per partner for routine work and one more for urgent work
(``app.transfer.jobs.slots``), counted over every process's live leases. Each claimed job
runs in its own task through the ``Delivery``, while a companion task renews its lease; when
a renewal finds the job cancelled, paused or taken over, the task is cancelled. The runner
records the outcome: delivered, failed, or waiting for its next attempt after a transient
failure (capped exponential backoff with jitter, until the retry window ends).

A pass runs when something changed here (a job created, resumed, retried or finished), when
a backoff ends, and at least every ``poll`` seconds for what other processes changed.

Why leases in SQL rather than a file lock like ingest's ``run/ingest.lock``: one process
ingests at a time, but transfers should spread over every process, one job each at a time;
and a lease in the database still works when the database is a server shared by hosts. A
runner stopping cleanly gives its leases back, so the next start resumes the jobs at once;
one that crashed leaves them to expire (``lease`` seconds) before another takes them over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.transfer.delivery import (
    Delivered,
    Delivery,
    DeliveryOutcome,
    JobStopped,
    PermanentFailure,
    TransientFailure,
)
from app.transfer.job_store import TransferJobStore
from app.transfer.jobs import (
    Backoff,
    JobState,
    TransferJob,
    after_transient_failure,
    delivered,
    failed,
    progressed,
    slots,
)

log = logging.getLogger(__name__)

#: Attempts at recording an outcome when the job changes under the runner (paused, say).
_RECORD_TRIES = 5


@dataclass(frozen=True)
class RunnerPolicy:
    #: Jobs to one partner running at once (routine; urgent ones may use one more).
    partner_limit: int = 2
    backoff: Backoff = field(default_factory=Backoff)
    #: Seconds a claim holds a job without renewal; renewed every third of it.
    lease: float = 30.0
    #: Seconds between passes when nothing here asks for one.
    poll: float = 1.0

    @property
    def renew_every(self) -> float:
        return self.lease / 3


def runner_id() -> str:
    """Names this process's runner in the leases it holds (host and pid help a person
    reading the table; the random part keeps a restarted pid from passing as the old)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


class TransferRunner:
    def __init__(
        self,
        store: TransferJobStore,
        delivery: Delivery,
        policy: RunnerPolicy,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._delivery = delivery
        self._policy = policy
        self.owner = owner or runner_id()
        self._clock = clock
        self._jitter = jitter
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        """Schedule in the background until ``close``."""
        self._loop = asyncio.create_task(self._schedule_forever(), name="transfer-runner")

    def wake(self) -> None:
        """Run a pass soon: something here changed what is due."""
        self._wake.set()

    @property
    def running(self) -> frozenset[str]:
        """The ids of the jobs this runner runs now."""
        return frozenset(self._tasks)

    def stop(self, job_id: str) -> bool:
        """Cancel the job's task if it runs here (it was cancelled or paused)."""
        task = self._tasks.get(job_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def idle(self) -> None:
        """Wait until no job runs here."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        """Stop scheduling, stop the running jobs and give their leases back (their state
        and checkpoints stay as recorded, for whoever runs them next)."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        stopped = list(self._tasks)
        for task in self._tasks.values():
            task.cancel()
        await self.idle()
        # A task cancelled before it began never gave its lease back itself.
        for job_id in stopped:
            try:
                await self._store.release(job_id, self.owner)
            except Exception:
                log.exception("transfer %s: its lease could not be given back", job_id)

    async def _schedule_forever(self) -> None:
        poll = self._policy.poll
        while True:
            self._wake.clear()
            delay = poll
            try:
                await self.schedule()
                due = await self._store.next_due()
                # A backoff ending before the next poll: wake for it. A job due already but
                # not claimed waits for a slot: a job ending here wakes us, others' at a poll.
                if due is not None and due > self._clock():
                    delay = min(poll, due - self._clock())
            except Exception:
                log.exception("scheduling transfers failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def schedule(self) -> list[str]:
        """One pass: claim the due jobs that fit their partner's limit and start them, urgent
        ones first. The ids of the jobs started."""
        now = self._clock()
        busy = await self._store.running(now)
        started: list[str] = []
        for job in await self._store.due(now):
            allowed = slots(self._policy.partner_limit, job.priority)
            if job.id in self._tasks or busy.get(job.partner, 0) >= allowed:
                continue
            claimed = await self._store.claim(
                job, self.owner, now, now + self._policy.lease, allowed
            )
            if claimed is None:
                continue  # another runner took it, or the partner filled up meanwhile
            busy[job.partner] = busy.get(job.partner, 0) + 1
            task = asyncio.create_task(self._run(claimed), name=f"transfer-{job.id}")
            self._tasks[job.id] = task
            task.add_done_callback(self._forget)
            started.append(job.id)
        return started

    def _forget(self, task: asyncio.Task[None]) -> None:
        for job_id, running in list(self._tasks.items()):
            if running is task:
                del self._tasks[job_id]

    # -- one job --------------------------------------------------------------------------

    async def _run(self, job: TransferJob) -> None:
        task = asyncio.current_task()
        assert task is not None
        renewal = asyncio.create_task(self._renew(job.id, task), name=f"transfer-lease-{job.id}")
        progress = _Progress(job, self)
        try:
            log.info("transfer %s: attempt %d (%s)", job.id, job.attempts, job.state.value)
            try:
                outcome: DeliveryOutcome = await self._delivery.run(job, progress)
            except JobStopped:
                return
            except Exception as exc:
                log.exception("transfer %s: the delivery failed unexpectedly", job.id)
                outcome = TransientFailure(
                    f"the delivery failed unexpectedly ({type(exc).__name__})"
                )
            # Recording the outcome makes the job final or not due: no more renewals, or
            # the next one would take that for a stop.
            renewal.cancel()
            await self._record(progress.job, outcome)
        except Exception:
            # The database is failing: the job stays as last recorded, its lease expires,
            # and it runs again (resuming from its checkpoint).
            log.exception("transfer %s: its outcome could not be recorded", job.id)
        finally:
            renewal.cancel()
            try:
                await self._store.release(job.id, self.owner)
            except Exception:
                log.exception("transfer %s: its lease could not be given back", job.id)
            self.wake()

    async def _renew(self, job_id: str, task: asyncio.Task[None]) -> None:
        while True:
            await asyncio.sleep(self._policy.renew_every)
            try:
                held = await self._store.renew(
                    job_id, self.owner, self._clock() + self._policy.lease
                )
            except Exception:
                log.exception("transfer %s: renewing its lease failed", job_id)
                continue
            if not held:
                log.info("transfer %s was cancelled, paused or taken over: stopped", job_id)
                task.cancel()
                return

    async def _record(self, job: TransferJob, outcome: DeliveryOutcome) -> None:
        """Record what came of the run; when the job changed meanwhile (paused elsewhere),
        apply the outcome to it as it is now, unless it was cancelled or taken over."""
        for _ in range(_RECORD_TRIES):
            now = self._clock()
            if isinstance(outcome, Delivered):
                new = delivered(job, outcome.receipt, now)
            elif isinstance(outcome, PermanentFailure):
                new = failed(job, outcome.reason, now)
            else:
                new = after_transient_failure(
                    job, outcome.reason, now, self._policy.backoff, self._jitter()
                )
            if await self._store.replace(job, new, owner=self.owner) is not None:
                _log_outcome(new)
                return
            current = await self._store.get(job.id)
            if current is None or current.state.final or current.lease_owner != self.owner:
                log.info("transfer %s changed while it ran: %r not recorded", job.id, outcome)
                return
            job = current
        log.warning("transfer %s kept changing: %r not recorded", job.id, outcome)

    async def _progress(
        self, job: TransferJob, changes: dict[str, Any], checkpoint: Mapping[str, Any] | None
    ) -> TransferJob:
        new = progressed(job, self._clock(), checkpoint=checkpoint, **changes)
        stored = await self._store.replace(job, new, owner=self.owner)
        if stored is None:
            raise JobStopped(f"transfer {job.id} was cancelled, paused or taken over")
        return stored


def _log_outcome(job: TransferJob) -> None:
    if job.state is JobState.DELIVERED:
        log.info("transfer %s delivered to %s", job.id, job.partner)
    elif job.state is JobState.FAILED:
        log.warning("transfer %s failed: %s", job.id, job.last_error)
    else:
        log.info(
            "transfer %s: attempt %d failed (%s); next at %.0f",
            job.id,
            job.attempts,
            job.last_error,
            job.next_attempt_at,
        )


class _Progress:
    """What a delivery records through (``app.transfer.delivery.JobProgress``)."""

    def __init__(self, job: TransferJob, runner: TransferRunner) -> None:
        self._job = job
        self._runner = runner

    @property
    def job(self) -> TransferJob:
        return self._job

    async def record(
        self,
        *,
        state: JobState | None = None,
        bytes_sent: int | None = None,
        bytes_total: int | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> TransferJob:
        changes = {"state": state, "bytes_sent": bytes_sent, "bytes_total": bytes_total}
        self._job = await self._runner._progress(self._job, changes, checkpoint)
        return self._job
