"""Real file systems for a data directory to live on: a tmpfs, an overlayfs, a loop-mounted
ext4. Mounting needs root; where it is impossible the test is skipped, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: The kinds a data directory is tested on, as pytest ids.
KINDS = ("tmpfs", "overlayfs", "ext4-loop")
IMAGE_SIZE = "256M"


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here: {' '.join(cmd)}: {result.stderr.strip()}")


def _unmount(target: Path) -> None:
    # A process still holding a file there (a gateway that did not stop) makes it busy:
    # detached lazily then, so no mount outlives the test run.
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=True)


@contextmanager
def mounted(kind: str, base: Path) -> Iterator[Path]:
    """A fresh, empty file system of ``kind`` mounted under ``base``; unmounted on exit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    target = base / "mnt"
    target.mkdir(parents=True)
    if kind == "tmpfs":
        _run("mount", "-t", "tmpfs", "-o", f"size={IMAGE_SIZE},mode=0700", "iex-test", str(target))
    elif kind == "overlayfs":
        layers = {name: base / name for name in ("lower", "upper", "work")}
        for layer in layers.values():
            layer.mkdir()
        options = ",".join(f"{name}dir={path}" for name, path in layers.items())
        _run("mount", "-t", "overlay", "overlay", "-o", options, str(target))
    elif kind == "ext4-loop":
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("mkfs.ext4 is not installed")
        image = base / "ext4.img"
        _run("truncate", "-s", IMAGE_SIZE, str(image))
        _run("mkfs.ext4", "-q", "-F", str(image))
        _run("mount", "-o", "loop", str(image), str(target))  # the loop device goes on umount
    else:
        raise ValueError(kind)
    try:
        yield target
    finally:
        _unmount(target)
        (base / "ext4.img").unlink(missing_ok=True)  # an image of 256 MB, if sparse
