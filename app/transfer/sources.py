"""What an upload sends: a payload as deterministic bytes, readable from any offset.

A resumed upload continues at the server's offset with bytes produced again by a new
process, so the payload must be a pure function of what is on disk; otherwise the server
would splice two different payloads together. A ``.zip`` or ``.tar`` file is sent as it is.
Anything else (a folder, a single DICOM file) becomes an uncompressed tar generated on the
fly in which every header field is fixed: members are the regular files sorted by relative
POSIX path, with mtime 0, uid and gid 0, no owner names and mode 0644, in POSIX.1-2001
pax/ustar headers (IEEE Std 1003.1-2001, ``pax`` "ustar Interchange Format"), ending with
two zero blocks and padded to a 10240-byte record as tar writers do.

The tar's length is known before a byte is read (header sizes depend only on names and
sizes), which tus needs for ``Upload-Length`` (§Creation). Reading from an offset seeks:
members before it are not opened and the file holding it is entered with ``seek``.

Symbolic links inside a folder are never followed (they could lead out of it or into a
loop); they and other non-regular files are left out and listed in ``skipped``.

A file that changed since the source was scanned (size or mtime) raises ``SourceChanged``
instead of sending bytes that no longer match the length, fingerprint or sha256 announced.

A payload sent as several partial uploads (§Concatenation), as a bundle to a partner is,
sends each part as a source of its own: a ``FileRangeSource`` over a byte range of a file,
or a ``BytesSource`` for a small part held in memory.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.transfer.uploads import TAR, ZIP

#: Bytes read from a file at a time; bounds memory whatever the chunk size.
READ_SIZE = 1024 * 1024
#: What a part of a payload holds, to the server: bytes, whatever they mean together.
OCTET_STREAM = "application/octet-stream"
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_ARCHIVES = {".zip": ZIP, ".tar": TAR}


class SourceError(Exception):
    """The path cannot be uploaded as it is (missing, unreadable, nothing in it)."""


class SourceChanged(SourceError):
    """A file changed after the source was scanned; its bytes would not match."""


class UploadSource(Protocol):
    """A payload of known ``length`` that can be read again from any offset."""

    @property
    def length(self) -> int: ...

    @property
    def content_type(self) -> str: ...

    @property
    def filename(self) -> str: ...

    def chunks(self, offset: int, size: int) -> Iterator[bytes]:
        """The bytes from ``offset`` to the end, in pieces of exactly ``size`` bytes but the
        last. Blocking: file reads happen as the iterator is advanced."""
        ...

    def fingerprint(self) -> str:
        """Hex SHA-256 over what identifies the source: paths, sizes and mtimes."""
        ...


@dataclass(frozen=True)
class Skipped:
    """A directory entry left out of a generated tar, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class _Member:
    path: Path
    name: str
    size: int
    mtime_ns: int
    #: Where the member's header starts in the tar stream.
    start: int
    header_size: int

    @property
    def end(self) -> int:
        return self.start + self.header_size + _padded(self.size)


class FileSource:
    """A ``.zip`` or ``.tar`` file, sent unchanged."""

    def __init__(self, path: Path, content_type: str) -> None:
        info = _stat_regular(path)
        self.path = path
        self.content_type = content_type
        self.filename = path.name
        self.length = info.st_size
        self._mtime_ns = info.st_mtime_ns

    def chunks(self, offset: int, size: int) -> Iterator[bytes]:
        _check_range(offset, size, self.length)
        return _pieces(
            _file_bytes(self.path, self.length, self._mtime_ns, offset, self.length), size
        )

    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"iex-file-source\0" + self.content_type.encode() + b"\0")
        digest.update(_identity(_absolute(self.path), self.length, self._mtime_ns))
        return digest.hexdigest()


class TarSource:
    """A folder, or a single file that is not an archive, as a deterministic tar."""

    content_type = TAR

    def __init__(
        self, root: Path, filename: str, members: list[_Member], skipped: list[Skipped]
    ) -> None:
        self.root = root
        self.filename = filename
        self.skipped = skipped
        self._members = members
        self._starts = [m.start for m in members]
        self._trailer_start = members[-1].end if members else 0
        # Two zero blocks end the archive; writers then pad to a whole record.
        self.length = _round_up(self._trailer_start + 2 * _BLOCK, _RECORD)

    @classmethod
    def from_directory(cls, root: Path) -> TarSource:
        found, skipped = _scan(root)
        if not found:
            left_out = f" ({len(skipped)} links or special files left out)" if skipped else ""
            raise SourceError(f"{root}: no regular files to upload{left_out}")
        return cls(root, f"{_absolute(root).name or 'upload'}.tar", _layout(found), skipped)

    @classmethod
    def from_file(cls, path: Path) -> TarSource:
        info = _stat_regular(path)
        return cls(path, f"{path.name}.tar", _layout([(path.name, path, info)]), [])

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self._members]

    def chunks(self, offset: int, size: int) -> Iterator[bytes]:
        _check_range(offset, size, self.length)
        return _pieces(self._stream(offset), size)

    def _stream(self, offset: int) -> Iterator[bytes]:
        first = max(0, bisect.bisect_right(self._starts, offset) - 1)
        for member in self._members[first:]:
            if member.end > offset:
                yield from self._member_bytes(member, max(0, offset - member.start))
        trailer_from = max(offset, self._trailer_start)
        if trailer_from < self.length:
            yield bytes(self.length - trailer_from)

    def _member_bytes(self, member: _Member, skip: int) -> Iterator[bytes]:
        if skip < member.header_size:
            yield _header(member.name, member.size)[skip:]
        data_skip = max(0, skip - member.header_size)
        if data_skip < member.size:
            yield from _file_bytes(
                member.path, member.size, member.mtime_ns, data_skip, member.size
            )
        padding = _padded(member.size) - member.size
        pad_skip = max(0, skip - member.header_size - member.size)
        if pad_skip < padding:
            yield bytes(padding - pad_skip)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"iex-tar-source\0")
        digest.update(os.fsencode(_absolute(self.root)) + b"\0")
        for m in self._members:
            digest.update(_identity(m.name, m.size, m.mtime_ns))
        return digest.hexdigest()


class FileRangeSource:
    """Bytes ``start`` to ``start + length`` of a file: one part of a payload sent as several
    partial uploads (a bundle's data section in consecutive ranges, say), resumable from any
    offset within the range like every source."""

    content_type = OCTET_STREAM

    def __init__(self, path: Path, start: int, length: int, filename: str | None = None) -> None:
        info = _stat_regular(path)
        if start < 0 or length < 0 or start + length > info.st_size:
            raise SourceError(
                f"{path}: bytes {start} to {start + length} are outside its {info.st_size} bytes"
            )
        self.path = path
        self.start = start
        self.length = length
        self.filename = filename or f"{path.name}@{start}"
        self._size = info.st_size
        self._mtime_ns = info.st_mtime_ns

    def chunks(self, offset: int, size: int) -> Iterator[bytes]:
        _check_range(offset, size, self.length)
        begin, end = self.start + offset, self.start + self.length
        return _pieces(_file_bytes(self.path, self._size, self._mtime_ns, begin, end), size)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"iex-file-range-source\0")
        digest.update(_identity(_absolute(self.path), self._size, self._mtime_ns))
        digest.update(f"{self.start}\0{self.length}\n".encode())
        return digest.hexdigest()


class BytesSource:
    """A payload small enough to hold in memory (a bundle's head: its manifest and
    signature, at most some 16 MiB)."""

    content_type = OCTET_STREAM

    def __init__(self, data: bytes, filename: str = "payload") -> None:
        self._data = data
        self.filename = filename
        self.length = len(data)

    def chunks(self, offset: int, size: int) -> Iterator[bytes]:
        _check_range(offset, size, self.length)
        view = memoryview(self._data)
        return (bytes(view[at : at + size]) for at in range(offset, self.length, size))

    def fingerprint(self) -> str:
        return hashlib.sha256(b"iex-bytes-source\0" + self._data).hexdigest()


def open_source(path: Path) -> FileSource | TarSource:
    """The upload source for ``path``: a ``.zip`` or ``.tar`` file as it is, anything else
    (a folder, a single file) as a generated tar. The top-level path itself may be a
    symbolic link; links inside a folder are not followed."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        return TarSource.from_directory(path)
    content_type = _ARCHIVES.get(path.suffix.lower())
    if content_type is not None:
        return FileSource(path, content_type)
    return TarSource.from_file(path)


def payload_sha256(source: UploadSource) -> str:
    """Hex SHA-256 of the whole payload, streamed (the ``sha256`` of ``Upload-Metadata``)."""
    digest = hashlib.sha256()
    for piece in source.chunks(0, READ_SIZE):
        digest.update(piece)
    return digest.hexdigest()


# -- the tar layout ---------------------------------------------------------------------------


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    # pax only where ustar cannot say it (long or non-ASCII names, sizes of 8 GiB and more).
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _layout(found: list[tuple[str, Path, os.stat_result]]) -> list[_Member]:
    members: list[_Member] = []
    position = 0
    for name, path, info in sorted(found, key=lambda item: item[0]):
        header_size = len(_header(name, info.st_size))
        member = _Member(path, name, info.st_size, info.st_mtime_ns, position, header_size)
        members.append(member)
        position = member.end
    return members


def _scan(root: Path) -> tuple[list[tuple[str, Path, os.stat_result]], list[Skipped]]:
    """Regular files under ``root`` with their POSIX names relative to it, and what was left
    out. Walks without following links; an unreadable directory or file is an error rather
    than a silently incomplete upload."""
    found: list[tuple[str, Path, os.stat_result]] = []
    skipped: list[Skipped] = []
    pending: list[tuple[Path, str]] = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                listed = list(entries)
        except OSError as exc:
            raise SourceError(f"{directory}: {exc.strerror or exc}") from None
        for entry in listed:
            name = prefix + entry.name
            path = Path(entry.path)
            if entry.is_symlink():
                skipped.append(Skipped(name, "symbolic link, not followed"))
            elif entry.is_dir(follow_symlinks=False):
                pending.append((path, name + "/"))
            elif entry.is_file(follow_symlinks=False):
                if not os.access(path, os.R_OK):
                    raise SourceError(f"{path}: permission denied")
                found.append((name, path, entry.stat(follow_symlinks=False)))
            else:
                skipped.append(Skipped(name, "not a regular file"))
    skipped.sort(key=lambda s: s.name)
    return found, skipped


# -- reading ----------------------------------------------------------------------------------


def _file_bytes(path: Path, size: int, mtime_ns: int, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``start:end`` of a file scanned with ``size`` and ``mtime_ns``."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise SourceChanged(f"{path} was removed after it was scanned") from None
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(handle.fileno())
        if info.st_size != size or info.st_mtime_ns != mtime_ns:
            raise SourceChanged(f"{path} changed after it was scanned")
        handle.seek(start)
        position = start
        while position < end:
            data = handle.read(min(READ_SIZE, end - position))
            if not data:
                raise SourceChanged(f"{path} became shorter after it was scanned")
            position += len(data)
            yield data
    finally:
        handle.close()


def _pieces(blocks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """Regroup ``blocks`` into pieces of exactly ``size`` bytes (the last may be shorter)."""
    buffer = bytearray()
    try:
        for block in blocks:
            buffer += block
            while len(buffer) >= size:
                yield bytes(buffer[:size])
                del buffer[:size]
        if buffer:
            yield bytes(buffer)
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


def _check_range(offset: int, size: int, length: int) -> None:
    if size <= 0:
        raise ValueError("the piece size must be positive")
    if not 0 <= offset <= length:
        raise ValueError(f"offset {offset} is outside the payload (0 to {length})")


def _stat_regular(path: Path) -> os.stat_result:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SourceError(f"{path}: not a regular file or directory")
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path}: permission denied")
    return info


def _identity(name: str | Path, size: int, mtime_ns: int) -> bytes:
    """One file's part of a fingerprint: a changed size or mtime makes it another source."""
    return os.fsencode(name) + f"\0{size}\0{mtime_ns}\n".encode()


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _padded(size: int) -> int:
    return _round_up(size, _BLOCK)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
