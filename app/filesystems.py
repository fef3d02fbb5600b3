"""What a file system offers beyond plain reads and writes, learned from its first answer.

Some fast paths rest on features that not every file system has: ``preadv`` with
``RWF_NOWAIT`` (read only what the page cache holds) is refused by tmpfs, overlayfs, NFS,
SMB/CIFS and most FUSE file systems; a shared memory map by FUSE mounts in direct-I/O mode;
``fsync`` of a directory by some network and pseudo file systems. An optimisation must never
be a requirement: the first refusal on a file system (one ``st_dev``) is remembered, that
file system is not asked again, and the plain way is taken there from then on.

Pure ``os``; any layer may use it.
"""

from __future__ import annotations

import errno

#: What a file system answers for an operation it does not implement at all, as opposed to
#: one call that failed (EAGAIN, EIO): EOPNOTSUPP for an unsupported ``preadv`` flag, ENODEV
#: for a file that cannot be mapped, EINVAL for a directory that cannot be synced.
REFUSALS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS, errno.ENODEV})


def refused(exc: OSError) -> bool:
    """Whether ``exc`` says the file system lacks the operation, rather than that it failed."""
    return exc.errno in REFUSALS


class Feature:
    """One optional feature, per file system: unknown until first tried, then known for good.

    Process-wide, as the kernel's answer is. The event loop and worker threads both read and
    write it; each access is one dictionary operation, and two threads learning the same
    answer at once write the same value.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._by_device: dict[int, bool] = {}

    def supported(self, device: int) -> bool | None:
        """Whether the file system ``device`` has it; ``None`` before it was first tried."""
        return self._by_device.get(device)

    def learn(self, device: int, supported: bool) -> None:
        self._by_device[device] = supported

    def refusal(self, device: int, exc: OSError) -> bool:
        """Whether ``exc`` is the file system refusing the feature; if so, that is learned."""
        if refused(exc):
            self._by_device[device] = False
            return True
        return False


#: ``preadv(..., RWF_NOWAIT)``: a read that fails rather than wait for the disk.
NOWAIT_READS = Feature("preadv RWF_NOWAIT")
#: A shared, read-only memory map of a file.
MEMORY_MAPS = Feature("mmap")
