"""Background housekeeping: expired uploads swept, blobs that nothing references reclaimed.

Blobs are published before the index (or the upload state) commits the reference to them,
so that a reference never names a missing blob. The price is that a crash between the two
leaves blobs nobody references: never served, only wasted space. Reclaiming runs once, at
start, over blobs last written or published before then. When other processes serve the
same data directory, a blob of theirs may be published and not yet referenced, so only blobs
older than a grace period are considered; those younger wait for a later start.
"""

from __future__ import annotations

import asyncio
import logging
import time

from app.storage.base import InstanceStore, MetadataIndex
from app.transfer.tus import ResumableUploads

log = logging.getLogger(__name__)


#: How long another process may take from publishing a blob to recording it (far longer
#: than it does: one transaction).
ORPHAN_GRACE = 600.0


class Housekeeping:
    def __init__(
        self,
        store: InstanceStore,
        index: MetadataIndex,
        uploads: ResumableUploads,
        sweep_interval: float,
        started_at: float | None = None,
        *,
        shared: bool = False,
    ) -> None:
        self._store = store
        self._index = index
        self._uploads = uploads
        self._interval = sweep_interval
        started = time.time() if started_at is None else started_at
        self._reclaim_before = started - ORPHAN_GRACE if shared else started
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="housekeeping")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        try:
            reclaimed = await self.reclaim_orphans()
            if reclaimed:
                log.info("reclaimed %d blobs a previous run left unreferenced", reclaimed)
        except Exception:
            log.exception("reclaiming unreferenced blobs failed")
        while True:
            try:
                swept = await self._uploads.sweep()
                if swept:
                    log.info("removed %d expired uploads", swept)
            except Exception:
                log.exception("sweeping expired uploads failed")
            await asyncio.sleep(self._interval)

    async def reclaim_orphans(self) -> int:
        """Delete blobs from before this start that neither the index nor an upload names."""
        referenced = await self._index.blob_keys() | await self._uploads.blob_keys()
        reclaimed = 0
        async for batch in self._store.keys(older_than=self._reclaim_before):
            for key in batch:
                if key not in referenced:
                    await self._store.delete(key)
                    reclaimed += 1
        return reclaimed
