"""The transfer job store interface: ``TransferJobStore``.

SQLite implements it now (``app.transfer.sqlite_jobs``); PostgreSQL can later. Several
processes, each with its own store on one database, share the jobs: every change is a
compare-and-set, so two of them never both believe they moved a job, and a runner holds a
job through a *lease* (owner and expiry) that it renews while it runs the job. A lease that
expired (its process died or hung) may be claimed by another runner.

The store knows no clock: callers pass ``now``, so a test can move time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from app.transfer.jobs import Direction, JobState, TransferJob


@dataclass(frozen=True)
class JobFilter:
    trust: str | None = None
    direction: Direction | None = None
    state: JobState | None = None
    partner: str | None = None
    limit: int = 1000


class TransferJobStore(Protocol):
    async def open(self) -> None: ...

    async def insert(self, job: TransferJob) -> None:
        """Record a new job; ``JobExists`` when its id is recorded already (ids made here
        are random, but an inbound job takes the id its sender gave the transfer)."""

    async def get(self, job_id: str) -> TransferJob | None: ...

    async def find(self, where: JobFilter) -> list[TransferJob]:
        """Jobs matching every given field, newest first."""

    async def replace(
        self, current: TransferJob, new: TransferJob, *, owner: str | None = None
    ) -> TransferJob | None:
        """Store ``new`` in place of ``current`` if the job is still at ``current.version``
        (and, with ``owner``, still leased by it); the stored job, its version one more.
        ``None`` when it changed meanwhile: read it again and decide again. The lease is
        left as it is."""

    async def due(self, now: float, limit: int = 100) -> list[TransferJob]:
        """Outbound jobs a runner may claim now (not final, not paused, due, no live lease),
        urgent ones first, then oldest first."""

    async def running(self, now: float) -> dict[str, int]:
        """How many outbound jobs hold a live lease, by partner."""

    async def next_due(self) -> float | None:
        """When the earliest runnable job falls due (``None``: there is none)."""

    async def claim(
        self, job: TransferJob, owner: str, now: float, lease_until: float, limit: int
    ) -> TransferJob | None:
        """Lease ``job`` to ``owner`` and count an attempt, in one compare-and-set: only if
        it is unchanged since read, still runnable, not leased live by another, and fewer
        than ``limit`` other jobs to its partner hold a live lease. ``None`` otherwise."""

    async def renew(self, job_id: str, owner: str, lease_until: float) -> bool:
        """Extend ``owner``'s lease; ``False`` when it no longer holds the job or the job
        should stop (cancelled, paused, finished): the runner stops it."""

    async def release(self, job_id: str, owner: str) -> None:
        """Give the lease up (when ``owner`` still holds it)."""

    async def close(self) -> None: ...
