"""Transfers between gateways as a trust sees them: ``TransferService``.

A trust pushes a study to a partner trust (``create``), follows it (``get``, ``list``) and
may cancel, pause, resume or retry it; the ``TransferRunner`` does the sending. Each trust
sees only its own transfers: another trust's answers exactly like one that does not exist.

Every change reads the job, decides with the pure rules of ``app.transfer.jobs`` and stores
the result by compare-and-set, reading again when the job moved meanwhile (a running job
records its progress often), so a change is never lost to, nor overwrites, another.

Transfers that arrived from partners (direction ``in``) are recorded here too, by the
receiver, and listed beside the outbound ones: ``sending`` while the bytes arrive, then
``delivered`` (stored, receipt sent back) or ``failed``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from app.dicom.uids import validate_uid
from app.errors import BadRequest, Conflict, NotFound
from app.names import check_name
from app.services.transfer_runner import TransferRunner
from app.transfer import jobs
from app.transfer.job_store import JobFilter, TransferJobStore
from app.transfer.jobs import Direction, JobState, Priority, TransferJob

#: Reads and compare-and-sets a change may take while a running job keeps recording.
_CHANGE_TRIES = 20
#: The most transfers one listing returns.
MAX_LIST = 1000

Change = Callable[[TransferJob, float], TransferJob]


class TransferService:
    def __init__(
        self,
        store: TransferJobStore,
        runner: TransferRunner | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.runner = runner
        self._clock = clock

    def _new_job(
        self,
        direction: Direction,
        trust: str,
        partner: str,
        partner_trust: str,
        study: str,
        priority: str | Priority,
        **initial: Any,
    ) -> TransferJob:
        """A new job in either direction, its names and UID checked as a caller gave them."""
        return jobs.new_job(
            direction=direction,
            trust=trust,
            partner=check_name(partner, "partner"),
            partner_trust=check_name(partner_trust, "partner trust"),
            study=validate_uid(study, "the study's Study Instance UID"),
            priority=priority if isinstance(priority, Priority) else jobs.parse_priority(priority),
            now=self._clock(),
            **initial,
        )

    # -- outbound -------------------------------------------------------------------------

    async def create(
        self,
        trust: str,
        *,
        study: str,
        partner: str,
        partner_trust: str,
        priority: str | Priority = Priority.ROUTINE,
    ) -> TransferJob:
        """Queue ``study`` of ``trust`` for ``partner_trust`` at ``partner``."""
        job = self._new_job(Direction.OUT, trust, partner, partner_trust, study, priority)
        await self._store.insert(job)
        self._wake()
        return job

    async def get(self, trust: str, job_id: str) -> TransferJob:
        job = await self._store.get(job_id) if jobs.is_job_id(job_id) else None
        if job is None or job.trust != trust:
            raise NotFound(f"no transfer {job_id[:64]!r}")
        return job

    async def list(
        self,
        trust: str,
        *,
        direction: str | Direction | None = None,
        state: str | JobState | None = None,
        partner: str | None = None,
        limit: int = MAX_LIST,
    ) -> list[TransferJob]:
        """The trust's transfers matching every filter given, newest first."""
        if isinstance(direction, str):
            direction = jobs.parse_direction(direction)
        if isinstance(state, str):
            state = jobs.parse_state(state)
        return await self._store.find(
            JobFilter(
                trust=trust,
                direction=direction,
                state=state,
                partner=None if partner is None else check_name(partner, "partner"),
                limit=max(1, min(limit, MAX_LIST)),
            )
        )

    async def cancel(self, trust: str, job_id: str) -> TransferJob:
        """Cancel a transfer not yet delivered (``Conflict`` for a delivered one); a running
        one stops at once here, or at its next lease renewal in another process."""
        job = await self._change(trust, job_id, jobs.cancelled)
        self._stop(job_id)
        return job

    async def pause(self, trust: str, job_id: str) -> TransferJob:
        """Hold a transfer where it is (state and checkpoint kept) until ``resume``."""
        job = await self._change(trust, job_id, jobs.paused)
        self._stop(job_id)
        return job

    async def resume(self, trust: str, job_id: str) -> TransferJob:
        job = await self._change(trust, job_id, jobs.resumed)
        self._wake()
        return job

    async def retry(self, trust: str, job_id: str) -> TransferJob:
        """Queue a failed transfer again, with a new retry window; a transfer waiting out a
        backoff runs now."""
        job = await self._change(trust, job_id, jobs.retried)
        self._wake()
        return job

    # -- inbound --------------------------------------------------------------------------

    async def record_arrival(
        self,
        trust: str,
        *,
        partner: str,
        partner_trust: str,
        study: str,
        priority: str | Priority = Priority.ROUTINE,
        bytes_total: int | None = None,
        job_id: str | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> TransferJob:
        """A transfer from ``partner_trust`` at ``partner`` to ``trust`` begins to arrive.

        ``job_id`` is the id the sender gave the transfer (a bundle's ``transfer``), by which
        it asks for its receipt: it must be a job id (``BadRequest`` otherwise), and one
        recorded already, in whichever trust or direction, is ``JobExists``.
        """
        if job_id is not None and not jobs.is_job_id(job_id):
            raise BadRequest(
                f"transfer id {job_id[:64]!r} cannot be recorded: a transfer id from a partner "
                "is 32 lower-case hexadecimal digits"
            )
        job = self._new_job(
            Direction.IN,
            trust,
            partner,
            partner_trust,
            study,
            priority,
            state=JobState.SENDING,
            bytes_total=bytes_total,
            job_id=job_id,
            checkpoint=checkpoint,
        )
        await self._store.insert(job)
        return job

    async def record_arrival_again(
        self,
        trust: str,
        job_id: str,
        *,
        checkpoint: Mapping[str, Any],
        bytes_total: int | None = None,
    ) -> TransferJob:
        """The refused arrival ``job_id`` arrives again in a new upload (``arriving_again``)."""
        return await self._change(
            trust,
            job_id,
            lambda job, now: jobs.arriving_again(job, now, checkpoint, bytes_total),
        )

    async def arrival(self, trust: str, job_id: str) -> TransferJob:
        """The inbound transfer ``job_id`` of ``trust``; ``NotFound`` for an outbound one, as
        for another trust's or a missing one."""
        job = await self.get(trust, job_id)
        if job.direction is not Direction.IN:
            raise NotFound(f"no transfer {job_id[:64]!r} received by this trust")
        return job

    async def record_arrival_progress(
        self, trust: str, job_id: str, bytes_received: int
    ) -> TransferJob:
        return await self._change(
            trust,
            job_id,
            lambda job, now: jobs.progressed(_inbound(job), now, bytes_sent=bytes_received),
        )

    async def record_arrived(self, trust: str, job_id: str, receipt: bytes) -> TransferJob:
        """The transfer was stored and ``receipt`` sent back to the partner."""
        return await self._change(
            trust, job_id, lambda job, now: jobs.delivered(_inbound(job), receipt, now)
        )

    async def record_refused(
        self, trust: str, job_id: str, reason: str, receipt: bytes | None = None
    ) -> TransferJob:
        """The transfer was refused for ``reason``; ``receipt``: the signed ``refused``
        receipt sent back, kept like a stored one so that it can be asked for again."""
        return await self._change(
            trust, job_id, lambda job, now: jobs.failed(_inbound(job), reason, now, receipt)
        )

    # -- helpers --------------------------------------------------------------------------

    async def _change(self, trust: str, job_id: str, change: Change) -> TransferJob:
        for _ in range(_CHANGE_TRIES):
            job = await self.get(trust, job_id)
            new = change(job, self._clock())
            if new is job:
                return job
            stored = await self._store.replace(job, new)
            if stored is not None:
                return stored
        raise Conflict(f"transfer {job_id} kept changing while being updated; try again")

    def _wake(self) -> None:
        if self.runner is not None:
            self.runner.wake()

    def _stop(self, job_id: str) -> None:
        if self.runner is not None:
            self.runner.stop(job_id)


def _inbound(job: TransferJob) -> TransferJob:
    if job.direction is not Direction.IN:
        raise Conflict(f"transfer {job.id} is outbound: its runner records its progress")
    return job


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _receipt(receipt: bytes | None) -> Any:
    """A receipt as JSON: the signed document itself when it is JSON (as iex receipts
    are), else its base64 text."""
    if receipt is None:
        return None
    try:
        return json.loads(receipt)
    except ValueError:  # not JSON, or not UTF-8 text
        return base64.b64encode(receipt).decode("ascii")


def view(job: TransferJob) -> dict[str, Any]:
    """What ``GET /transfers/{id}`` shows of a transfer (the checkpoint is the steps' own
    business and may hold capabilities such as an upload URL: never shown)."""
    return {
        "id": job.id,
        "direction": job.direction.value,
        "trust": job.trust,
        "partner": job.partner,
        "partner_trust": job.partner_trust,
        "study": job.study,
        "priority": job.priority.value,
        "state": job.state.value,
        "paused": job.paused,
        "bytes_sent": job.bytes_sent,
        "bytes_total": job.bytes_total,
        "attempts": job.attempts,
        "last_error": job.last_error,
        # When the runner will next try: only for an outbound transfer it will run.
        "next_attempt_at": _iso(job.next_attempt_at) if job.runnable else None,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "receipt": _receipt(job.receipt),
    }
