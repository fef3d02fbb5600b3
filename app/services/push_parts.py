"""Sending a staged bundle as tus partial uploads, at once, resumably: ``send_parts``.

The head is one part, the data section up to ``streams`` more: consecutive ranges of at
least ``MIN_PART`` bytes each (a data section under twice that is one part). Every part is
sent by a task of its own, over its own connection (§Concatenation lets the recipient join
them in the order the final upload names). The layout and each part's URL, as soon as the
part exists, are in the checkpoint, so a push that stops (a restart, a failure, a pause)
asks each part's offset with ``HEAD`` and sends only the rest; a part the recipient no
longer knows (404 or 410: it expired) is created again.

The bytes acknowledged, the sum of the parts' offsets, are recorded about once a second and
at the end of every part: the job's ``bytes_sent``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from app.services.packaging import StagedBundle
from app.services.push_progress import PushRecorder
from app.transfer.sources import BytesSource, FileRangeSource, UploadSource
from app.transfer.tus_client import TusClient, TusError, UploadGone, UploadMismatch

T = TypeVar("T")

#: The smallest data part: below it, another connection costs more than it saves.
MIN_PART = 8 * 1024 * 1024
#: Times a part is created again within one push when the recipient keeps forgetting it.
_RECREATE = 3


def layout(head_length: int, data_length: int, streams: int) -> list[dict[str, Any]]:
    """The parts of a bundle, in bundle offsets: the head, then up to ``streams`` data
    ranges of at least ``MIN_PART`` bytes each (just one when the data is smaller)."""
    count = max(1, min(streams, data_length // MIN_PART))
    size = data_length // count
    parts = [{"offset": 0, "length": head_length, "url": None}]
    start = head_length
    for i in range(count):
        length = size if i < count - 1 else data_length - size * (count - 1)
        parts.append({"offset": start, "length": length, "url": None})
        start += length
    return parts


def recorded_parts(checkpoint: dict[str, Any], bundle: StagedBundle) -> list[dict[str, Any]] | None:
    """The parts the checkpoint records for ``bundle``, when they still add up to it."""
    parts = checkpoint.get("parts")
    if not isinstance(parts, list) or not parts:
        return None
    position = 0
    for part in parts:
        if not isinstance(part, dict) or part.get("offset") != position:
            return None
        length, url = part.get("length"), part.get("url")
        if not isinstance(length, int) or length < 0 or not (url is None or isinstance(url, str)):
            return None
        position += length
    if parts[0]["length"] != len(bundle.head) or position != bundle.length:
        return None
    return [dict(p) for p in parts]


async def send_parts(
    client: TusClient,
    recorder: PushRecorder,
    bundle: StagedBundle,
    staging: Path,
    *,
    streams: int,
    report_every: float = 1.0,
) -> list[str]:
    """Send every part of ``bundle`` (its data staged in ``staging``) until the recipient
    holds all of it; their URLs, in order. Records the layout and URLs in
    ``recorder.checkpoint["parts"]`` as they come."""
    parts = recorded_parts(recorder.checkpoint, bundle)
    if parts is None:
        parts = layout(len(bundle.head), bundle.data_length, streams)
        recorder.checkpoint["parts"] = parts
        await recorder.save()
    recorder.checkpoint["parts"] = parts  # the URLs are filled in below, then saved
    acked = [0] * len(parts)

    def total() -> int:
        return sum(acked)

    async def report() -> None:
        while True:
            await asyncio.sleep(report_every)
            await recorder.sent(total)

    async def send(index: int) -> str:
        part = parts[index]
        source = _source(bundle, staging, part["offset"], part["length"])

        def on_progress(offset: int, length: int) -> None:
            acked[index] = offset

        for _ in range(_RECREATE):
            if part["url"] is None:
                part["url"] = await client.create(part["length"], {}, partial=True)
                await recorder.save()
            try:
                url: str = await client.upload(
                    source, part["url"], partial=True, on_progress=on_progress
                )
            except (UploadGone, UploadMismatch):
                # Expired (or, mismatched, never ours to finish): the recipient starts anew.
                acked[index] = 0
                part["url"] = None
                continue
            await recorder.sent(total)
            return url
        raise TusError(f"the recipient lost part {index} of the bundle {_RECREATE} times")

    reporter = asyncio.create_task(report())
    try:
        return await first_failure([send(i) for i in range(len(parts))])
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter


def forget_parts(recorder: PushRecorder) -> None:
    """Start the next send with new parts (the old ones were joined, or are lost)."""
    recorder.checkpoint.pop("parts", None)


def _source(bundle: StagedBundle, staging: Path, offset: int, length: int) -> UploadSource:
    if offset == 0:
        return BytesSource(bundle.head, "head")
    return FileRangeSource(staging, offset - len(bundle.head), length)


async def first_failure(work: Sequence[Awaitable[T]]) -> list[T]:
    """Run ``work`` at once; their results in order, or the first exception raised (the
    rest are cancelled then, and awaited, so nothing keeps running)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            failure = task.exception() if task.done() and not task.cancelled() else None
            if failure is not None:
                raise failure
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
