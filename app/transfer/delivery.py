"""The work of delivering one transfer, behind a small interface: ``Delivery``.

The runner (``app.services.transfer_runner``) decides *when* a job runs and records what
came of it; a ``Delivery`` does the work: package the study, send it, wait for the
partner's receipt. It is handed the job as last recorded and a ``JobProgress`` through which
it records, durably, the step it reached, the bytes the partner acknowledged and its own
``checkpoint`` (an upload URL and offset, say). A job found in flight after a restart, or
retried after a transient failure, is handed over again with what was recorded: the delivery
resumes from there and never sends again what was acknowledged.

Its answer is one of three outcomes: ``Delivered`` (with the partner's receipt), a
``TransientFailure`` (tried again after a backoff, until the retry window ends), or a
``PermanentFailure`` (the job fails at once). An exception it raises counts as transient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from app.transfer.jobs import JobState, TransferJob


@dataclass(frozen=True)
class Delivered:
    receipt: bytes

    def __repr__(self) -> str:
        return f"Delivered(receipt=<{len(self.receipt)} bytes>)"


@dataclass(frozen=True)
class TransientFailure:
    """Worth trying again later: the partner unreachable, a 5xx, a timeout."""

    reason: str


@dataclass(frozen=True)
class PermanentFailure:
    """Trying again will not help: the partner refused the bundle, the study is gone."""

    reason: str


DeliveryOutcome = Delivered | TransientFailure | PermanentFailure


class JobStopped(Exception):
    """The job was cancelled, paused or taken over by another runner since it started:
    nothing was recorded, and the delivery should stop (the runner cancels it anyway)."""


class JobProgress(Protocol):
    @property
    def job(self) -> TransferJob:
        """The job as last recorded."""

    async def record(
        self,
        *,
        state: JobState | None = None,
        bytes_sent: int | None = None,
        bytes_total: int | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> TransferJob:
        """Record durably (before returning) the step reached (``packaging``, ``sending``,
        ``awaiting-receipt``: forward only), the bytes acknowledged and the checkpoint
        (which replaces the previous one). Raises ``JobStopped`` when the job is no longer
        this runner's to run."""


class Delivery(Protocol):
    async def run(self, job: TransferJob, progress: JobProgress) -> DeliveryOutcome: ...
