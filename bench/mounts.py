"""Real file systems for a data directory to live on: a tmpfs, an overlayfs, a loop-mounted
ext4. The benchmarks and the tests (``tests/mounts.py``) mount them the same way.

Mounting needs root. Plain ``subprocess`` and ``os``: a benchmark imports this as ``mounts``,
a test as ``bench.mounts``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The kinds a data directory is measured and tested on.
KINDS = ("ext4-loop", "tmpfs", "overlayfs")


class CannotMount(Exception):
    """This machine cannot mount that kind here (not root, a tool missing, a container)."""


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise CannotMount(f"{' '.join(cmd)}: {result.stderr.strip()}")


def _unmount(target: Path) -> None:
    # A process still holding a file there (a gateway that did not stop) makes it busy:
    # detached lazily then, so no mount outlives the run.
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=True)


@contextmanager
def mounted(kind: str, base: Path, size_mb: int = 256) -> Iterator[Path]:
    """A fresh, empty file system of ``kind`` mounted at ``base/mnt``; unmounted on exit."""
    if os.geteuid() != 0:
        raise CannotMount("mounting a file system needs root")
    target = base / "mnt"
    target.mkdir(parents=True)
    image = base / "ext4.img"
    if kind == "tmpfs":
        _run("mount", "-t", "tmpfs", "-o", f"size={size_mb}M,mode=0700", "iex", str(target))
    elif kind == "overlayfs":
        layers = {name: base / name for name in ("lower", "upper", "work")}
        for layer in layers.values():
            layer.mkdir()
        options = ",".join(f"{name}dir={path}" for name, path in layers.items())
        _run("mount", "-t", "overlay", "overlay", "-o", options, str(target))
    elif kind == "ext4-loop":
        if shutil.which("mkfs.ext4") is None:
            raise CannotMount("mkfs.ext4 is not installed")
        _run("truncate", "-s", f"{size_mb}M", str(image))
        _run("mkfs.ext4", "-q", "-F", str(image))
        _run("mount", "-o", "loop", str(image), str(target))  # the loop device goes on umount
    else:
        raise ValueError(kind)
    try:
        yield target
    finally:
        _unmount(target)
        image.unlink(missing_ok=True)


def drop_cached_pages(directory: Path) -> None:
    """Evict the files under ``directory`` from the page cache: the next reads go to disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
