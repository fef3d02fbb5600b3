"""What a push records as it goes, one record at a time: ``PushRecorder``.

A push sends its parts at once, and each part records its upload URL as soon as it exists
while a reporter records the bytes the partner acknowledged. The runner's ``JobProgress``
compares and sets the job's version, so two records at once would each take the other for
a change made by someone else (and stop the push): every record goes through one lock here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from app.transfer.delivery import JobProgress
from app.transfer.jobs import JobState, TransferJob, can_move


class PushRecorder:
    def __init__(self, progress: JobProgress) -> None:
        self._progress = progress
        self._lock = asyncio.Lock()
        #: The checkpoint as this push knows it; ``save`` records it as it is.
        self.checkpoint: dict[str, Any] = dict(progress.job.checkpoint)
        self._bytes = progress.job.bytes_sent

    @property
    def job(self) -> TransferJob:
        return self._progress.job

    async def save(
        self,
        *,
        state: JobState | None = None,
        bytes_sent: int | None = None,
        bytes_total: int | None = None,
    ) -> TransferJob:
        """Record the checkpoint, with the step ``state`` when it is a step forward (a
        bundle sent again from ``awaiting-receipt`` stays there), and the counts given."""
        async with self._lock:
            return await self._record(state, bytes_sent, bytes_total, checkpoint=True)

    async def advance(self, state: JobState) -> None:
        """Move on to ``state`` unless the job is there or past it already."""
        async with self._lock:
            if can_move(self.job.state, state):
                await self._record(state, None, None, checkpoint=False)

    async def sent(self, total: Callable[[], int]) -> None:
        """Record ``total()`` bytes acknowledged, when more than recorded so far."""
        async with self._lock:
            value = total()
            if value > self._bytes:
                await self._record(None, value, None, checkpoint=False)

    async def _record(
        self,
        state: JobState | None,
        bytes_sent: int | None,
        bytes_total: int | None,
        *,
        checkpoint: bool,
    ) -> TransferJob:
        if state is not None and not can_move(self.job.state, state):
            state = None
        job = await self._progress.record(
            state=state,
            bytes_sent=bytes_sent,
            bytes_total=bytes_total,
            checkpoint=dict(self.checkpoint) if checkpoint else None,
        )
        if bytes_sent is not None:
            self._bytes = bytes_sent
        return job
