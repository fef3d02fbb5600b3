"""The C allocator's settings that keep a gateway's memory bounded: ``tune_allocator``.

Payloads cross the gateway in buffers of one to a few MiB (read, encrypted, compressed,
sent), made and freed thousands of times a second by the event loop and worker threads.
glibc's malloc serves blocks over its mmap threshold with ``mmap`` and gives them back on
``free``, but by default it *raises* that threshold to the size of every such block freed
(up to 32 MiB): after the first few, MiB-sized buffers come from the heaps of the threads'
arenas instead, which they fragment and never shrink. Measured on a 64 MiB push, the
sender's peak resident set was 193 MB with the default and 155 MB with a fixed threshold of
1 MiB (docs/BENCHMARKS.md). Fixing the threshold (``M_MMAP_THRESHOLD``) turns the dynamic
raise off; blocks under a MiB still come from the heaps as before.

Only glibc has ``mallopt`` with these meanings: elsewhere (musl, macOS) nothing is changed.
An operator's own ``MALLOC_MMAP_THRESHOLD_`` in the environment is left to rule.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

#: glibc's ``<malloc.h>``: ``M_MMAP_THRESHOLD``.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1024 * 1024


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD``; whether it was set here."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) was refused; memory may run higher")
        return False
    return True
