"""What a transfer between gateways is: a durable job, its states, and the rules that move it.

A transfer sends one study of a local trust to a partner trust at another gateway (direction
``out``), or records one that arrived from a partner (direction ``in``). Outbound transfers
move through these states::

    queued ─► packaging ─► sending ─► awaiting-receipt ─► delivered
      │           │           │               │
      └───────────┴───────────┴───────────────┴─► failed ─(retry)─► queued
      └───────────┴───────────┴─► cancelled                (failed ─► cancelled too)

A job only moves forward along the first line (a delivery without packaging may go straight
from ``queued`` to ``sending``); ``delivered`` and ``cancelled`` are final, ``failed`` is
final until someone asks for a retry. A job ``awaiting-receipt`` cannot be cancelled
(``cancelled``): its bundle was sent whole, and the partner may hold it already. The state
of an in-flight job is the step it is at;
how far that step got (an upload's URL and offset, say) is the job's ``checkpoint``, a JSON
object that only the steps read and write. A transient failure keeps the job at its step,
with the reason in ``last_error`` and the time of the next attempt in ``next_attempt_at``.

Pausing is a flag, not a state: a paused job keeps the step it was at and its checkpoint,
the scheduler passes it by, and resuming continues from exactly there. As a state, ``paused``
would have to remember the step it replaced, and "a paused job at sending" is what a person
wants to read anyway.

Everything here is pure: no clock (times are passed in), no randomness (the jitter is).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from app.errors import BadRequest, Conflict


class Direction(Enum):
    OUT = "out"
    IN = "in"


class Priority(Enum):
    """``urgent`` jobs are scheduled before ``routine`` ones, and may use one connection
    more to a partner than the limit allows routine ones (see ``slots``)."""

    ROUTINE = "routine"
    URGENT = "urgent"


class JobState(Enum):
    QUEUED = "queued"
    PACKAGING = "packaging"
    SENDING = "sending"
    AWAITING_RECEIPT = "awaiting-receipt"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """No runner will pick the job up again (``failed`` only through an explicit retry)."""
        return self in FINAL_STATES

    @property
    def in_flight(self) -> bool:
        """A step has begun: a restarted gateway resumes the job from its checkpoint."""
        return self in (JobState.PACKAGING, JobState.SENDING, JobState.AWAITING_RECEIPT)


FINAL_STATES = frozenset({JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED})

#: The way forward; a job moves only to a later entry (or to failed/cancelled).
_PIPELINE = (
    JobState.QUEUED,
    JobState.PACKAGING,
    JobState.SENDING,
    JobState.AWAITING_RECEIPT,
    JobState.DELIVERED,
)


class IllegalTransition(Conflict):
    """A change a job's current state does not allow (409)."""


class JobExists(Conflict):
    """A new job under an id already recorded (409): an inbound job takes the id its sender
    gave the transfer, which may arrive again."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"transfer {job_id} is already recorded")
        self.job_id = job_id


def can_move(current: JobState, target: JobState) -> bool:
    if current is target:
        return False
    if current is JobState.FAILED:
        return target in (JobState.QUEUED, JobState.CANCELLED)
    if current.final:
        return False
    if current is JobState.AWAITING_RECEIPT and target is JobState.CANCELLED:
        return False  # sent whole: the partner may hold it already
    if target in (JobState.FAILED, JobState.CANCELLED):
        return True
    return target in _PIPELINE and _PIPELINE.index(target) > _PIPELINE.index(current)


def check_move(job_id: str, current: JobState, target: JobState) -> None:
    """Refuse a move the rules above do not allow, saying what the job is and why."""
    if can_move(current, target):
        return
    if current.final and current is not JobState.FAILED:
        raise IllegalTransition(
            f"transfer {job_id} is {current.value}, which is final: it cannot become {target.value}"
        )
    if current is JobState.FAILED:
        raise IllegalTransition(
            f"transfer {job_id} failed: it can only be queued again (retry) or cancelled, "
            f"not become {target.value}"
        )
    if current is JobState.AWAITING_RECEIPT and target is JobState.CANCELLED:
        raise IllegalTransition(
            f"transfer {job_id} was sent whole and awaits the partner's receipt: the partner "
            "may have stored it already, so it can no longer be cancelled"
        )
    raise IllegalTransition(
        f"transfer {job_id} is {current.value}: it can move on, fail or be cancelled, "
        f"not go {'back to' if target in _PIPELINE else 'to'} {target.value}"
    )


_ID = re.compile(r"[0-9a-f]{32}")


def new_job_id() -> str:
    return secrets.token_hex(16)


def is_job_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def parse_priority(value: str) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        raise BadRequest(f"priority {value[:40]!r} is not one of: routine, urgent") from None


def parse_direction(value: str) -> Direction:
    try:
        return Direction(value)
    except ValueError:
        raise BadRequest(f"direction {value[:40]!r} is not one of: out, in") from None


def parse_state(value: str) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        names = ", ".join(s.value for s in JobState)
        raise BadRequest(f"state {value[:40]!r} is not one of: {names}") from None


@dataclass(frozen=True)
class TransferJob:
    """One transfer as recorded.

    ``trust`` is the local trust (the sender of an outbound job, the recipient of an inbound
    one); ``partner`` the other gateway and ``partner_trust`` the trust there. ``attempts``
    counts the runs a runner started; ``failures`` the transient failures since the job
    last made progress, from which the backoff grows, and ``failing_since`` when the first
    of them happened, from which the retry window runs. ``receipt`` is the signed receipt,
    opaque here: the partner's for an outbound job, the one this gateway answered with
    (``stored``, or ``refused``) for an inbound one. ``version`` grows with every change:
    updates compare and set it. ``lease_owner``/``lease_expires`` say which runner holds the
    job (read-only here: only the store's claim, renew and release change them).
    """

    id: str
    direction: Direction
    trust: str
    partner: str
    partner_trust: str
    study: str
    priority: Priority
    state: JobState
    created_at: float
    updated_at: float
    next_attempt_at: float
    paused: bool = False
    bytes_sent: int = 0
    bytes_total: int | None = None
    attempts: int = 0
    failures: int = 0
    failing_since: float | None = None
    last_error: str | None = None
    receipt: bytes | None = None
    checkpoint: Mapping[str, Any] = field(default_factory=dict)
    version: int = 0
    lease_owner: str | None = None
    lease_expires: float | None = None

    def __repr__(self) -> str:
        # The receipt and checkpoint may be large; an upload URL may carry a capability.
        return (
            f"TransferJob(id={self.id!r}, {self.direction.value}, trust={self.trust!r}, "
            f"partner={self.partner!r}/{self.partner_trust!r}, state={self.state.value}, "
            f"paused={self.paused}, attempts={self.attempts})"
        )

    @property
    def runnable(self) -> bool:
        """A runner may pick it up when it is due: outbound, not final, not paused."""
        return self.direction is Direction.OUT and not self.state.final and not self.paused


def new_job(
    *,
    direction: Direction,
    trust: str,
    partner: str,
    partner_trust: str,
    study: str,
    priority: Priority,
    now: float,
    state: JobState = JobState.QUEUED,
    bytes_total: int | None = None,
    job_id: str | None = None,
    checkpoint: Mapping[str, Any] | None = None,
) -> TransferJob:
    """A job as first recorded; ``job_id`` defaults to a new random one (an inbound job
    takes its sender's, which must be a job id too)."""
    if job_id is not None and not is_job_id(job_id):
        raise ValueError("a job id is 32 lower-case hexadecimal digits")
    return TransferJob(
        id=new_job_id() if job_id is None else job_id,
        direction=direction,
        trust=trust,
        partner=partner,
        partner_trust=partner_trust,
        study=study,
        priority=priority,
        state=state,
        created_at=now,
        updated_at=now,
        next_attempt_at=now,
        bytes_total=bytes_total,
        checkpoint=dict(checkpoint or {}),
    )


# -- what the service and the runner make of a job ------------------------------------------


def moved(job: TransferJob, target: JobState, now: float, **changes: Any) -> TransferJob:
    """``job`` in state ``target`` (refused with ``IllegalTransition`` unless allowed)."""
    check_move(job.id, job.state, target)
    return dataclasses.replace(job, state=target, updated_at=now, **changes)


def cancelled(job: TransferJob, now: float) -> TransferJob:
    """Cancelling a cancelled job changes nothing; a delivered one cannot be cancelled, nor
    one awaiting its receipt (``can_move``): its bundle was sent whole, the partner may have
    stored it already, and a transfer shown as cancelled must not be one the partner holds."""
    if job.state is JobState.CANCELLED:
        return job
    if job.state is JobState.DELIVERED:
        raise IllegalTransition(f"transfer {job.id} was delivered: it can no longer be cancelled")
    return moved(job, JobState.CANCELLED, now, paused=False)


def paused(job: TransferJob, now: float) -> TransferJob:
    if job.state.final:
        raise IllegalTransition(
            f"transfer {job.id} is {job.state.value}: there is nothing to pause"
        )
    if job.paused:
        return job
    return dataclasses.replace(job, paused=True, updated_at=now)


def resumed(job: TransferJob, now: float) -> TransferJob:
    """Resuming clears any backoff wait: the person who resumed wants it to run now."""
    if job.state.final:
        raise IllegalTransition(
            f"transfer {job.id} is {job.state.value}: there is nothing to resume"
        )
    if not job.paused:
        return job
    return dataclasses.replace(job, paused=False, next_attempt_at=now, updated_at=now)


def retried(job: TransferJob, now: float) -> TransferJob:
    """A failed job queued again with a fresh retry window (its checkpoint kept: the steps
    decide what of it still holds); a job waiting out a backoff made due now."""
    if job.state is JobState.FAILED:
        return moved(job, JobState.QUEUED, now, failures=0, failing_since=None, next_attempt_at=now)
    if job.state.final:
        raise IllegalTransition(
            f"transfer {job.id} is {job.state.value}: only a failed transfer can be retried"
        )
    return dataclasses.replace(job, next_attempt_at=now, updated_at=now)


def arriving_again(
    job: TransferJob, now: float, checkpoint: Mapping[str, Any], bytes_total: int | None
) -> TransferJob:
    """An inbound transfer that was refused (nothing of it stored) arriving again in a new
    upload: the sender retried, once the cause was fixed (an agreement made, say). It
    arrives afresh; the refusal and its receipt are replaced by what comes of this one."""
    if job.direction is not Direction.IN or job.state is not JobState.FAILED:
        raise IllegalTransition(
            f"transfer {job.id} is {job.direction.value} and {job.state.value}: only a refused "
            "arrival can arrive again"
        )
    return dataclasses.replace(
        job,
        state=JobState.SENDING,
        updated_at=now,
        bytes_sent=0,
        bytes_total=bytes_total,
        last_error=None,
        receipt=None,
        checkpoint=dict(checkpoint),
    )


def progressed(
    job: TransferJob,
    now: float,
    *,
    state: JobState | None = None,
    bytes_sent: int | None = None,
    bytes_total: int | None = None,
    checkpoint: Mapping[str, Any] | None = None,
) -> TransferJob:
    """What a step recorded. Moving on to a later step, or more bytes sent, is progress:
    the count of failures since the last progress (and so the backoff) starts again."""
    if bytes_sent is not None and bytes_sent < 0:
        raise ValueError("bytes_sent cannot be negative")
    changes: dict[str, Any] = {"updated_at": now}
    advanced = False
    if state is not None and state is not job.state:
        if state in (JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED):
            raise ValueError("a step ends the job by its outcome, not by recording progress")
        check_move(job.id, job.state, state)
        changes["state"] = state
        advanced = True
    if bytes_sent is not None:
        advanced = advanced or bytes_sent > job.bytes_sent
        changes["bytes_sent"] = bytes_sent
    if bytes_total is not None:
        changes["bytes_total"] = bytes_total
    if checkpoint is not None:
        changes["checkpoint"] = dict(checkpoint)
    if advanced:
        changes.update(failures=0, failing_since=None)
    return dataclasses.replace(job, **changes)


def delivered(job: TransferJob, receipt: bytes, now: float) -> TransferJob:
    sent = job.bytes_total if job.bytes_total is not None else job.bytes_sent
    return moved(
        job,
        JobState.DELIVERED,
        now,
        receipt=receipt,
        bytes_sent=sent,
        last_error=None,
        failures=0,
        failing_since=None,
    )


def failed(job: TransferJob, reason: str, now: float, receipt: bytes | None = None) -> TransferJob:
    """``job`` failed for ``reason``; an inbound job keeps the refused receipt it sent back."""
    if receipt is None:
        return moved(job, JobState.FAILED, now, last_error=reason)
    return moved(job, JobState.FAILED, now, last_error=reason, receipt=receipt)


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter, and the window after which a job gives up.

    The n-th failure in a row waits ``d = min(cap, base * 2**(n-1))`` scaled into
    ``[d/2, d]`` by the jitter ("equal jitter"): runners that failed together spread out,
    and a wait is never shorter than half its step, so the waits still grow.
    """

    base: float = 5.0
    cap: float = 600.0
    #: Seconds from the first failure in a row (without progress between) to giving up.
    window: float = 6 * 3600.0

    def delay(self, failures: int, jitter: float) -> float:
        """Seconds before the next attempt after ``failures`` in a row; ``jitter`` in [0, 1)."""
        if failures < 1:
            return 0.0
        # Capping the exponent first keeps 2**n from overflowing after many failures.
        step = min(self.cap, self.base * 2.0 ** min(failures - 1, 62))
        return step / 2 + step / 2 * jitter


def after_transient_failure(
    job: TransferJob, reason: str, now: float, backoff: Backoff, jitter: float
) -> TransferJob:
    """The job waiting for its next attempt at the step it reached, or ``failed`` once the
    failures have lasted the retry window."""
    failures = job.failures + 1
    since = job.failing_since if job.failing_since is not None else now
    if now - since >= backoff.window:
        return failed(
            dataclasses.replace(job, failures=failures, failing_since=since),
            f"gave up after {failures} failed attempts over {_duration(now - since)}: {reason}",
            now,
        )
    return dataclasses.replace(
        job,
        failures=failures,
        failing_since=since,
        last_error=reason,
        next_attempt_at=now + backoff.delay(failures, jitter),
        updated_at=now,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def slots(limit: int, priority: Priority) -> int:
    """How many of a partner's jobs may run at once for a job of ``priority`` to start.

    Routine jobs start while fewer than ``limit`` of the partner's jobs run; urgent ones
    while fewer than ``limit + 1`` do. So a long routine transfer never holds back an urgent
    one, even with a limit of 1, and a partner never sees more than ``limit + 1``
    connections. (Reserving one of the ``limit`` slots for urgent work instead would leave
    routine work no slot at all with a limit of 1.)
    """
    return limit + 1 if priority is Priority.URGENT else limit
