"""How far a running ingest is: what an upload's report shows while it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class IngestProgress:
    """Set by whichever reader unpacks the payload: ``position`` tells the bytes of the
    payload read so far (the reader's own counter, read from the event loop while a worker
    thread reads), ``objects`` counts the objects handed to the store."""

    position: Callable[[], int] = lambda: 0
    objects: int = 0
