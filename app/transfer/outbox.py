"""The outbox: where outbound bundles wait, sealed, while they are sent.

A push stages its bundle's data section in ``<data dir>/exchange/outbox/<transfer id>``
(``docs/EXCHANGE.md``, "Transport: pushing a bundle"). It is ciphertext only, sealed for the
recipient trust, and it lives as long as the transfer: the delivery removes it when it
delivers or fails the transfer, and ``sweep`` removes what it left: the files of transfers
that ended otherwise (cancelled, perhaps in another process) or that are not recorded at all.

A transfer may be run by any process serving the data directory (one at a time, under its
lease), so the outbox is on the data directory, not in a process's temporary space.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from app.transfer.job_store import TransferJobStore
from app.transfer.jobs import is_job_id

log = logging.getLogger(__name__)

OUTBOX_DIR = Path("exchange") / "outbox"


class Outbox:
    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / OUTBOX_DIR

    def path(self, job_id: str) -> Path:
        """Where the bundle of transfer ``job_id`` is staged (ids are 32 hex digits: never a
        path of their own)."""
        if not is_job_id(job_id):
            raise ValueError("not a transfer id")
        return self.directory / job_id

    def prepare(self) -> None:
        """Make the directory, readable by the gateway's user only. Blocking."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def remove(self, job_id: str) -> bool:
        """Delete the bundle staged for ``job_id``; whether there was one. Blocking."""
        try:
            self.path(job_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def staged(self) -> list[str]:
        """The transfer ids that have a staged file. Blocking."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if is_job_id(name))

    async def sweep(self, jobs: TransferJobStore) -> int:
        """Remove the staged files of transfers that ended or that no record names; how many.

        A transfer retried after it failed packages again, so nothing of a final one is kept.
        """
        removed = 0
        for job_id in await asyncio.to_thread(self.staged):
            job = await jobs.get(job_id)
            if job is None or job.state.final:
                if await asyncio.to_thread(self.remove, job_id):
                    removed += 1
        return removed

    async def sweep_every(self, jobs: TransferJobStore, interval: float) -> None:
        """``sweep`` at once and then every ``interval`` seconds, until cancelled."""
        while True:
            try:
                removed = await self.sweep(jobs)
                if removed:
                    log.info("removed %d staged bundles of transfers that ended", removed)
            except Exception:
                log.exception("sweeping the outbox failed")
            await asyncio.sleep(interval)
