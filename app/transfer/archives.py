"""The DICOM members of a zip or uncompressed tar upload, as STOW-RS part events.

Nothing is extracted to disk: members stream in chunks of at most 1 MiB. An archive is
refused whole (``HostileArchive``, 400) when it:

* is not a zip (PKWARE APPNOTE 6.3) or a plain tar (POSIX.1-2001 pax, ustar, GNU), is
  truncated, or is corrupt (bad CRC, bad deflate data, a member longer than it declares);
* names a member with an absolute path, a ``..`` component, a backslash, a drive letter, a
  control character or nothing at all: harmless here, but the mark of an archive built to
  escape an extraction directory;
* holds a link, device, FIFO or sparse member, an encrypted zip member, or one compressed
  other than stored or deflate (LZMA lets the archive choose a dictionary size);
* exceeds ``ArchiveLimits`` (members, bytes per member and in total, compression ratio):
  judged on the declared sizes before a member is read, and again on the bytes produced;
* overlaps zip members (a zip-bomb construction), or carries more zip central directory or
  tar header data than a member needs, ways to exhaust memory before any limit applies.

A member is DICOM when it is a PS3.10 §7.1 file: ``DICM`` after a 128-byte preamble. A
DICOMDIR (PS3.10 §8) is skipped; other members are skipped or refused as the policy says.
"""

from __future__ import annotations

import copy
import io
import re
import stat
import struct
import tarfile
import unicodedata
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from itertools import pairwise
from typing import IO, Protocol, cast

from app.dicom.media import DICOM
from app.dicom.multipart import PartData, PartEnd, PartEvent, PartStart
from app.errors import BadRequest, IexError
from app.transfer.threads import in_thread
from app.transfer.uploads import TAR, ZIP

#: Largest ``PartData`` emitted.
CHUNK = 1024 * 1024
#: PS3.10 §7.1: a 128-byte preamble, then the prefix ``DICM``.
_PREAMBLE = 128
_PREFIX = b"DICM"
_SNIFF = _PREAMBLE + len(_PREFIX)

DICOMDIR_REASON = "DICOMDIR (a media index, not an instance)"
NOT_DICOM_REASON = "not a DICOM file (no DICM prefix)"

#: Characters of a member name shown in a message.
_SHOWN = 200
_DRIVE = re.compile(r"[A-Za-z]:")

# APPNOTE 4.3.16 end of central directory, 4.3.15 zip64 locator, 4.3.14 zip64 record,
# 4.3.12 central directory header.
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
_CD_ENTRY = struct.Struct("<4s4B4HL2L5H2L")
_CD_SIGNATURE = b"PK\x01\x02"
_LOCAL_HEADER_SIZE = 30
_ENCRYPTED = 0x1
#: Longest comment the end of central directory record may carry (APPNOTE 4.3.16).
_MAX_COMMENT = 1 << 16
#: Name, extra field and comment of one zip entry, together. Real ones use a few hundred
#: bytes; the cap bounds what zipfile holds in memory per entry.
_MAX_ENTRY_META = 4096
#: zipfile may decompress this far beyond the bytes a read asks for (ZipExtFile reads at
#: least MIN_READ_SIZE, 4 KiB); declaring a member this much longer than it claims lets
#: extra data show up as extra bytes instead of as a CRC error.
_SIZE_SURPLUS = 64 * 1024

#: pax, GNU long-name and sparse-map data before one tar member, and global pax headers in
#: all: tarfile reads them whole into memory.
_MAX_TAR_HEADER_BYTES = 64 * 1024
_TAR_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_TAR_REFUSED_TYPES = {
    tarfile.SYMTYPE: "is a symbolic link",
    tarfile.LNKTYPE: "is a hard link",
    tarfile.CHRTYPE: "is a character device",
    tarfile.BLKTYPE: "is a block device",
    tarfile.FIFOTYPE: "is a FIFO",
    tarfile.GNUTYPE_SPARSE: "is a sparse file",
}
_COMPRESSED_TAR = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


class PayloadFile(Protocol):
    """What the readers need of a payload: blocking reads, which may come up short (a
    ``ChunkedPayload`` stops at chunk boundaries), and seeks. ``IO[bytes]`` fits too."""

    def read(self, size: int = -1, /) -> bytes | None: ...

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int: ...

    def tell(self) -> int: ...


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on one archive. ``max_ratio`` is uncompressed over compressed bytes, for each
    member and for the whole archive; stored members (and tar) have ratio 1."""

    max_members: int
    max_member_bytes: int
    max_total_bytes: int
    max_ratio: float


class NonDicomPolicy(Enum):
    """What happens to a member that is not a DICOM file (a DICOMDIR is always skipped)."""

    SKIP = "skip"
    REFUSE = "refuse"


class HostileArchive(BadRequest):
    """The archive is malformed or built to harm its reader; nothing of it is stored."""


@dataclass(frozen=True)
class SkippedMember:
    name: str
    reason: str


def show(name: str) -> str:
    """A member name fit for a message: cut to ~200 characters, quoted and escaped, so a
    control character cannot forge a log line."""
    return repr(name[:_SHOWN]) + ("..." if len(name) > _SHOWN else "")


def _member(name: str, problem: str) -> HostileArchive:
    return HostileArchive(f"archive member {show(name)} {problem}")


async def archive_events(
    fp: PayloadFile,
    kind: str,
    limits: ArchiveLimits,
    policy: NonDicomPolicy,
    skipped: list[SkippedMember],
) -> AsyncGenerator[PartEvent]:
    """One ``PartStart``, ``PartData``… ``PartEnd`` run per DICOM member of the ``kind``
    (``ZIP`` or ``TAR``) archive in ``fp``, in archive order; members not stored are
    appended to ``skipped``. Blocking work runs in worker threads, one at a time."""
    opener: Callable[[_Reader, ArchiveLimits], _ArchiveReader]
    if kind == ZIP:
        opener = _ZipArchive
    elif kind == TAR:
        opener = _TarArchive
    else:
        raise ValueError(f"not an archive kind: {kind!r}")
    archive = await in_thread(opener, _Reader(fp), limits)
    try:
        while (name := await in_thread(archive.next_member)) is not None:
            if name.rpartition("/")[2].upper() == "DICOMDIR":
                skipped.append(SkippedMember(name, DICOMDIR_REASON))
                continue
            head = await in_thread(archive.open_member)
            if len(head) < _SNIFF or head[_PREAMBLE:_SNIFF] != _PREFIX:
                if policy is NonDicomPolicy.REFUSE:
                    raise _member(name, "is not a DICOM file (no DICM prefix)")
                skipped.append(SkippedMember(name, NOT_DICOM_REASON))
                continue
            yield PartStart({"content-type": DICOM, "content-location": name})
            yield PartData(head)
            while data := await in_thread(archive.read):
                yield PartData(data)
            yield PartEnd()
    finally:
        # Neither library closes a file it was given, so this never touches fp.
        archive.close()


class _OverBudget(Exception):
    """More header bytes than ``_Reader.budget`` allows."""


class _Reader:
    """The payload as zipfile and tarfile need it: ``read(n)`` returns n bytes unless the
    end comes first (a raw payload stops at chunk boundaries, which both would take for
    truncation), and while ``budget`` is set, reading past it raises ``_OverBudget``."""

    def __init__(self, fp: PayloadFile) -> None:
        self._fp = fp
        self.budget: int | None = None

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self.budget + 1 if self.budget is not None else 1 << 62
        if self.budget is not None and n > self.budget:
            raise _OverBudget
        parts: list[bytes] = []
        got = 0
        while got < n and (data := self._fp.read(min(n - got, CHUNK))):
            parts.append(data)
            got += len(data)
        if self.budget is not None:
            self.budget -= got
        return b"".join(parts)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


@contextmanager
def _reading(context: str) -> Iterator[None]:
    """Turn the archive libraries' failures into ``HostileArchive`` prefixed by ``context``.
    Our own errors pass unchanged: a chunk failing authentication is not the uploader's
    doing."""
    try:
        yield
    except IexError:
        raise
    except zipfile.BadZipFile as exc:
        detail = "bad CRC" if str(exc).startswith("Bad CRC-32") else str(exc)
        raise HostileArchive(f"{context}: {detail}") from exc
    except (
        tarfile.TarError,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
        NotImplementedError,
        OverflowError,
        struct.error,
    ) as exc:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, zlib.error):
            detail = f"invalid deflate data ({detail})"
        elif isinstance(exc, EOFError):
            detail = "unexpected end of data"
        raise HostileArchive(f"{context}: {detail}") from exc


def _name_problem(name: str) -> str | None:
    if not name:
        return "has an empty name"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        # Surrogates are how tarfile carries bytes that are not UTF-8.
        return "has a control character or invalid UTF-8 in its name"
    if "\\" in name:
        return "has a backslash in its name"
    if name.startswith("/"):
        return "has an absolute path"
    if _DRIVE.match(name):
        return "has a drive letter"
    if ".." in name.split("/"):
        return "has a '..' path component"
    return None


class _ArchiveReader(ABC):
    """One member at a time, its bytes counted against what it declared and the limits;
    subclasses find and check the members."""

    def __init__(self, fp: _Reader, limits: ArchiveLimits) -> None:
        self._fp = fp
        self._limits = limits
        self._stream: IO[bytes] | None = None
        self._name = ""
        self._declared = self._packed = self._count = self._total = 0

    @abstractmethod
    def next_member(self) -> str | None:
        """The name of the next regular file, checked; None after the last."""

    @abstractmethod
    def open_member(self) -> bytes:
        """Start reading the member ``next_member`` named; its first 132 bytes or fewer."""

    def read(self) -> bytes:
        """The member's next bytes (at most ``CHUNK``); empty at its end."""
        return self._read(CHUNK)

    def close(self) -> None:
        self._close_member()

    def _start(
        self, name: str, declared: int, packed: int, opener: Callable[[], IO[bytes]]
    ) -> bytes:
        self._name, self._declared, self._packed, self._count = name, declared, packed, 0
        with _reading(f"archive member {show(name)} is corrupt"):
            self._stream = opener()
        return self._read(_SNIFF)

    def _read(self, n: int) -> bytes:
        assert self._stream is not None
        with _reading(f"archive member {show(self._name)} is corrupt"):
            # One byte past the declared size is enough to prove it a lie.
            data = self._stream.read(min(n, self._declared + 1 - self._count))
        self._count += len(data)
        self._total += len(data)
        limits = self._limits
        if self._count > self._declared:
            raise _member(self._name, f"holds more than the {self._declared} bytes it declares")
        if self._count > limits.max_member_bytes:
            raise _member(self._name, f"is over the limit of {limits.max_member_bytes} bytes")
        if self._count > limits.max_ratio * self._packed:
            raise _member(self._name, f"expands over the limit of {limits.max_ratio:g} to 1")
        if self._total > limits.max_total_bytes:
            raise HostileArchive(
                f"the archive's members hold more than {limits.max_total_bytes} bytes"
            )
        if not data and self._count != self._declared:
            raise _member(
                self._name,
                f"is corrupt: it holds {self._count} bytes but declares {self._declared}",
            )
        return data

    def _close_member(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


# -- zip ------------------------------------------------------------------------------------


class _ZipArchive(_ArchiveReader):
    def __init__(self, fp: _Reader, limits: ArchiveLimits) -> None:
        super().__init__(fp, limits)
        with _reading("the upload is not a valid zip archive"):
            start = _zip_directory(fp, limits)
            self._zip = zipfile.ZipFile(cast(IO[bytes], fp))
        try:
            self._files = deque(_zip_files(self._zip.infolist(), start, limits))
        except BaseException:
            self._zip.close()
            raise
        self._info: zipfile.ZipInfo | None = None

    def next_member(self) -> str | None:
        self._close_member()
        self._info = self._files.popleft() if self._files else None
        return None if self._info is None else self._info.orig_filename

    def open_member(self) -> bytes:
        info = self._info
        assert info is not None
        probe = copy.copy(info)
        probe.file_size = info.file_size + _SIZE_SURPLUS
        return self._start(
            info.orig_filename, info.file_size, info.compress_size, lambda: self._zip.open(probe)
        )

    def close(self) -> None:
        super().close()
        self._zip.close()


def _not_zip(detail: str) -> HostileArchive:
    return HostileArchive(f"the upload is not a valid zip archive: {detail}")


def _zip_directory(fp: _Reader, limits: ArchiveLimits) -> int:
    """Find the central directory as zipfile will, and count its entries before zipfile
    loads them all; where it starts.

    zipfile reads the whole directory into memory and makes an object per entry, however
    many the end record declares, so the entry count and size are bounded first."""
    size = fp.seek(0, io.SEEK_END)
    if size < _EOCD.size:
        raise _not_zip(f"it is only {size} bytes long")
    location = size - _EOCD.size
    fp.seek(location)
    record = fp.read(_EOCD.size)
    if record[:4] != _EOCD_SIGNATURE or record[-2:] != b"\0\0":
        # A comment follows the record: search for it from the end, as zipfile does.
        search = max(size - _MAX_COMMENT - _EOCD.size, 0)
        fp.seek(search)
        tail = fp.read(size - search)
        found = tail.rfind(_EOCD_SIGNATURE)
        if found < 0 or len(tail) - found < _EOCD.size:
            raise _not_zip("no end of central directory record")
        location = search + found
        record = tail[found : found + _EOCD.size]
    directory_size = int(_EOCD.unpack(record)[5])
    start = location - directory_size
    if location >= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size:
        fp.seek(location - _ZIP64_LOCATOR.size)
        locator = _ZIP64_LOCATOR.unpack(fp.read(_ZIP64_LOCATOR.size))
        if locator[0] == _ZIP64_LOCATOR_SIGNATURE:
            if locator[1] != 0 or locator[3] > 1:
                raise _not_zip("it spans several disks")
            fp.seek(location - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size)
            record64 = _ZIP64_EOCD.unpack(fp.read(_ZIP64_EOCD.size))
            if record64[0] == _ZIP64_EOCD_SIGNATURE:
                directory_size = int(record64[8])
                start = location - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size - directory_size
    if start < 0:
        raise _not_zip("the central directory offset is out of range")
    if directory_size > limits.max_members * (_CD_ENTRY.size + _MAX_ENTRY_META):
        raise HostileArchive(
            f"the zip central directory is {directory_size} bytes, more than "
            f"{limits.max_members} entries can need"
        )
    fp.seek(start)
    directory = fp.read(directory_size)
    if len(directory) < directory_size:
        raise _not_zip("the central directory is truncated")
    pos = entries = 0
    while pos < directory_size:
        entries += 1
        if entries > limits.max_members:
            raise HostileArchive(f"the archive has more than {limits.max_members} entries")
        if directory_size - pos < _CD_ENTRY.size:
            raise _not_zip("the central directory is truncated")
        entry = _CD_ENTRY.unpack_from(directory, pos)
        if entry[0] != _CD_SIGNATURE:
            raise _not_zip(f"central directory entry {entries} has a bad signature")
        meta = entry[12] + entry[13] + entry[14]
        if meta > _MAX_ENTRY_META:
            raise HostileArchive(
                f"zip entry {entries} has {meta} bytes of name, extra field and comment; "
                f"at most {_MAX_ENTRY_META} are accepted"
            )
        pos += _CD_ENTRY.size + meta
    return start


def _zip_files(
    infos: list[zipfile.ZipInfo], directory_start: int, limits: ArchiveLimits
) -> list[zipfile.ZipInfo]:
    """Check every entry from the central directory; the regular files, in order."""
    if len(infos) > limits.max_members:
        raise HostileArchive(f"the archive has more than {limits.max_members} entries")
    total = packed = 0
    for info in infos:
        name = info.orig_filename
        problem = _name_problem(name) or _zip_entry_problem(info, limits)
        if problem:
            raise _member(name, problem)
        total += info.file_size
        packed += info.compress_size
        if total > limits.max_total_bytes:
            raise HostileArchive(
                f"the archive's members declare more than {limits.max_total_bytes} bytes"
            )
    if total > limits.max_ratio * packed:
        raise HostileArchive(
            f"the archive expands {total} bytes from {packed}, over the limit of "
            f"{limits.max_ratio:g} to 1 (a zip bomb)"
        )
    _check_zip_layout(infos, directory_start)
    return [info for info in infos if not info.is_dir()]


def _zip_entry_problem(info: zipfile.ZipInfo, limits: ArchiveLimits) -> str | None:
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "is a symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is a device, FIFO or socket"
    if info.flag_bits & _ENCRYPTED:
        return "is encrypted"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return (
            f"uses compression method {info.compress_type}; only stored (0) and "
            "deflate (8) are accepted"
        )
    size, packed = info.file_size, info.compress_size
    if info.compress_type == zipfile.ZIP_STORED and size != packed:
        return f"is stored but declares {size} bytes in {packed}"
    if size > limits.max_member_bytes:
        return f"is {size} bytes, over the limit of {limits.max_member_bytes}"
    if size > limits.max_ratio * packed:
        return (
            f"expands {size} bytes from {packed}, over the limit of "
            f"{limits.max_ratio:g} to 1 (a zip bomb)"
        )
    return None


def _check_zip_layout(infos: list[zipfile.ZipInfo], directory_start: int) -> None:
    """Members must not share bytes: overlapping entries make a zip bomb that no ratio
    reveals (APPNOTE 4.3.6: local header, data, data descriptor, in turn)."""
    spans = sorted(
        (
            (info.header_offset, info.header_offset + _LOCAL_HEADER_SIZE + info.compress_size, info)
            for info in infos
        ),
        key=lambda span: span[:2],
    )
    for (_, end, first), (start, _, second) in pairwise(spans):
        if end > start:
            raise HostileArchive(
                f"archive members {show(first.orig_filename)} and "
                f"{show(second.orig_filename)} overlap (a zip bomb construction)"
            )
    if spans and spans[-1][1] > directory_start:
        raise _member(spans[-1][2].orig_filename, "runs into the central directory")


# -- tar ------------------------------------------------------------------------------------


class _TarFile(tarfile.TarFile):
    #: Every header read so far (tarfile's, undeclared in its stubs).
    members: list[tarfile.TarInfo]


class _TarArchive(_ArchiveReader):
    def __init__(self, fp: _Reader, limits: ArchiveLimits) -> None:
        super().__init__(fp, limits)
        with _reading("the upload is not a valid tar archive"):
            fp.seek(0)
            magic = fp.read(6)
        for prefix, compression in _COMPRESSED_TAR:
            if magic.startswith(prefix):
                raise HostileArchive(
                    f"the upload is a {compression}-compressed tar; send an uncompressed tar "
                    "or a zip"
                )
        self._previous: str | None = None
        with self._headers():
            fp.seek(0)
            self._tar = _TarFile.open(fileobj=cast(IO[bytes], fp), mode="r:")
        self._entries = self._declared_total = 0
        self._offset = -1
        self._info: tarfile.TarInfo | None = None

    @contextmanager
    def _headers(self) -> Iterator[None]:
        after = f" after member {show(self._previous)}" if self._previous is not None else ""
        self._fp.budget = _MAX_TAR_HEADER_BYTES
        try:
            with _reading(f"the upload is not a valid tar archive{after}"):
                yield
        except _OverBudget:
            raise HostileArchive(
                f"the tar archive has more than {_MAX_TAR_HEADER_BYTES} bytes of headers "
                f"for one member{after}"
            ) from None
        finally:
            self._fp.budget = None

    def next_member(self) -> str | None:
        self._close_member()
        limits = self._limits
        while True:
            with self._headers():
                info = self._tar.next()
            if info is None:
                self._check_end()
                return None
            # tarfile keeps every header it has read; only the current one is needed.
            self._tar.members.clear()
            if _pax_size(self._tar.pax_headers) > _MAX_TAR_HEADER_BYTES:
                raise HostileArchive(
                    f"the tar archive has more than {_MAX_TAR_HEADER_BYTES} bytes of global "
                    "pax headers"
                )
            self._entries += 1
            if self._entries > limits.max_members:
                raise HostileArchive(f"the archive has more than {limits.max_members} entries")
            name = self._previous = info.name
            problem = _name_problem(name) or _tar_type_problem(info)
            if problem:
                raise _member(name, problem)
            if info.offset <= self._offset:
                # A negative size sends tarfile back to a header it has read: a loop.
                raise _member(name, "has a header out of order")
            self._offset = info.offset
            if info.isdir():
                continue
            if info.size < 0:
                raise _member(name, "has a negative size")
            if info.size > limits.max_member_bytes:
                raise _member(
                    name, f"is {info.size} bytes, over the limit of {limits.max_member_bytes}"
                )
            self._declared_total += info.size
            if self._declared_total > limits.max_total_bytes:
                raise HostileArchive(
                    f"the archive's members declare more than {limits.max_total_bytes} bytes"
                )
            self._info = info
            return name

    def _check_end(self) -> None:
        """tarfile takes a missing or damaged header for the end of the archive; only the
        end-of-archive zero block (POSIX.1-2001 ustar) is one."""
        offset = self._tar.offset
        with _reading("the upload is not a valid tar archive"):
            self._fp.seek(offset)
            block = self._fp.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE:
            raise HostileArchive(
                "the upload is not a valid tar archive: it is truncated (no end-of-archive block)"
            )
        if block.count(0) != tarfile.BLOCKSIZE:
            raise HostileArchive(
                f"the upload is not a valid tar archive: invalid header at offset {offset}"
            )

    def open_member(self) -> bytes:
        info = self._info
        assert info is not None
        return self._start(info.name, info.size, info.size, lambda: self._extract(info))

    def _extract(self, info: tarfile.TarInfo) -> IO[bytes]:
        stream = self._tar.extractfile(info)
        assert stream is not None  # a regular file, as next_member checked
        return stream

    def close(self) -> None:
        super().close()
        self._tar.close()


def _tar_type_problem(info: tarfile.TarInfo) -> str | None:
    if info.type in _TAR_FILE_TYPES:
        return "is a sparse file" if info.issparse() else None
    if info.type == tarfile.DIRTYPE:
        return None
    return _TAR_REFUSED_TYPES.get(
        info.type, f"has the unsupported tar type {info.type.decode('latin-1')!r}"
    )


def _pax_size(headers: Mapping[str, str]) -> int:
    return sum(len(key) + len(value) for key, value in headers.items())
