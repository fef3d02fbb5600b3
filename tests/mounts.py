"""Real file systems for a data directory to live on (``bench/mounts.py``), for tests: where
this machine cannot mount one, the test is skipped, saying why."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.mounts import KINDS, CannotMount, drop_cached_pages
from bench.mounts import mounted as _mounted

__all__ = ["KINDS", "drop_cached_pages", "mounted"]


@contextmanager
def mounted(kind: str, base: Path) -> Iterator[Path]:
    """A fresh, empty file system of ``kind`` mounted under ``base``; unmounted on exit."""
    try:
        with _mounted(kind, base) as target:
            yield target
    except CannotMount as exc:
        pytest.skip(f"cannot mount {kind} here: {exc}")
