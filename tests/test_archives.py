"""Archive payloads: ChunkedPayload over pieces, and the zip/tar readers with their defences
against hostile archives (real DICOM members, archives built with zipfile and tarfile)."""

from __future__ import annotations

import asyncio
import functools
import io
import random
import stat
import struct
import tarfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import IO

import pytest

from app.crypto.errors import IntegrityError
from app.crypto.reader import DecryptingReader
from app.crypto.segments import Sealer
from app.dicom.multipart import PartData, PartEnd, PartStart
from app.errors import ServiceUnavailable
from app.transfer.archives import (
    CHUNK,
    DICOMDIR_REASON,
    NOT_DICOM_REASON,
    ArchiveLimits,
    HostileArchive,
    NonDicomPolicy,
    PayloadFile,
    SkippedMember,
    archive_events,
)
from app.transfer.payload import ChunkedPayload
from app.transfer.uploads import TAR, ZIP
from tests.helpers import make_instance

LIMITS = ArchiveLimits(
    max_members=100,
    max_member_bytes=64 * 1024 * 1024,
    max_total_bytes=256 * 1024 * 1024,
    max_ratio=100,
)
SKIP = NonDicomPolicy.SKIP
REFUSE = NonDicomPolicy.REFUSE

_SMALL = make_instance()
_BIG = make_instance(rows=800, columns=800)  # over 1 MiB: several PartData chunks


def dicom() -> bytes:
    """A small Part 10 object (the same one each time: a member's content is not the point)."""
    return _SMALL


# -- building archives -------------------------------------------------------------------


def make_zip(
    members: Sequence[tuple[str | zipfile.ZipInfo, bytes]],
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def tar_member(name: str, data: bytes = b"", **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def tar_files(members: list[tuple[str, bytes]]) -> bytes:
    return make_tar([tar_member(name, data) for name, data in members])


def cd_entries(data: bytes) -> list[int]:
    """Offsets of the central directory entries of a zip without comment or zip64."""
    count, _, offset = struct.unpack_from("<HLL", data, len(data) - 22 + 10)
    entries = []
    for _ in range(count):
        entries.append(offset)
        lengths = struct.unpack_from("<3H", data, offset + 28)
        offset += 46 + sum(lengths)
    return entries


def patch_cd(data: bytes, index: int, field: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of one central directory entry (APPNOTE 4.3.12 offsets)."""
    out = bytearray(data)
    struct.pack_into(fmt, out, cd_entries(data)[index] + field, value)
    return bytes(out)


def zip_data_offset(data: bytes, index: int) -> int:
    header = struct.unpack_from("<L", data, cd_entries(data)[index] + 42)[0]
    name_len, extra_len = struct.unpack_from("<2H", data, header + 26)
    return int(header + 30 + name_len + extra_len)


def with_zip64_end(data: bytes) -> bytes:
    """The same zip with a zip64 end of central directory record and locator (APPNOTE
    4.3.14, 4.3.15), the classic record pointing at them."""
    count, size, offset = struct.unpack_from("<HLL", data, len(data) - 22 + 10)
    body = data[:-22]
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(body), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return body + record + locator + end


# -- reading events ----------------------------------------------------------------------


async def collect(
    fp: PayloadFile | bytes,
    kind: str,
    limits: ArchiveLimits = LIMITS,
    policy: NonDicomPolicy = SKIP,
) -> tuple[list[tuple[str, bytes]], list[SkippedMember]]:
    """The members archive_events yields, checking the event grammar on the way."""
    skipped: list[SkippedMember] = []
    members: list[tuple[str, bytes]] = []
    current: list[bytes] | None = None
    name = ""
    source = io.BytesIO(fp) if isinstance(fp, bytes) else fp
    async for event in archive_events(source, kind, limits, policy, skipped):
        if isinstance(event, PartStart):
            assert current is None
            assert event.headers["content-type"] == "application/dicom"
            name, current = event.headers["content-location"], []
        elif isinstance(event, PartData):
            assert current is not None and 0 < len(event.data) <= CHUNK
            current.append(event.data)
        else:
            assert isinstance(event, PartEnd) and current is not None
            members.append((name, b"".join(current)))
            current = None
    assert current is None
    return members, skipped


def pieces_of(data: bytes, sizes: list[int]) -> list[tuple[int, Callable[[], IO[bytes]]]]:
    """``data`` cut into pieces of the given sizes (cycled), each opened from its own bytes."""
    pieces: list[tuple[int, Callable[[], IO[bytes]]]] = []
    pos = 0
    i = 0
    while pos < len(data):
        piece = data[pos : pos + sizes[i % len(sizes)]]
        pieces.append((len(piece), functools.partial(io.BytesIO, piece)))
        pos += len(piece)
        i += 1
    return pieces


# -- ChunkedPayload ----------------------------------------------------------------------


class TrackedPiece(io.BytesIO):
    def __init__(self, data: bytes, open_pieces: set[int]) -> None:
        super().__init__(data)
        self._open_pieces = open_pieces
        open_pieces.add(id(self))

    def close(self) -> None:
        self._open_pieces.discard(id(self))
        super().close()


def tracked(
    data: bytes, sizes: list[int], open_pieces: set[int], opened: list[int]
) -> ChunkedPayload:
    pieces: list[tuple[int, Callable[[], IO[bytes]]]] = []
    pos = 0
    for index, size in enumerate(sizes):
        piece = data[pos : pos + size]

        def opener(piece: bytes = piece, index: int = index) -> IO[bytes]:
            opened.append(index)
            return TrackedPiece(piece, open_pieces)

        pieces.append((size, opener))
        pos += size
    assert pos == len(data)
    return ChunkedPayload(pieces)


def test_chunked_payload_random_reads_match_the_bytes() -> None:
    rng = random.Random(20240102)
    sizes = [1, 7, 1, 4096, 0, 13, 1, 65536, 3, 1, 0, 100_000, 1]
    data = rng.randbytes(sum(sizes))
    open_pieces: set[int] = set()
    opened: list[int] = []
    payload = tracked(data, sizes, open_pieces, opened)
    assert payload.size == len(data) and not opened  # nothing opened before a read
    for _ in range(3000):
        op = rng.random()
        if op < 0.3:
            target = rng.randrange(len(data) + 10)
            whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
            offset = {
                io.SEEK_SET: target,
                io.SEEK_CUR: target - payload.tell(),
                io.SEEK_END: target - len(data),
            }[whence]
            assert payload.seek(offset, whence) == target
        pos = payload.tell()
        n = rng.choice([1, 2, 5, 100, 5000, 70_000, 200_000])
        got = payload.read(n)
        assert got is not None
        assert got == data[pos : pos + len(got)]
        assert 0 < len(got) <= n if pos < len(data) else got == b""
        assert payload.tell() == pos + len(got)
        assert len(open_pieces) <= 1
    payload.seek(0)
    assert payload.readall() == data
    buffered = io.BufferedReader(payload, 4096)
    for _ in range(500):
        pos = rng.randrange(len(data))
        n = rng.randrange(1, 150_000)
        buffered.seek(pos)
        assert buffered.read(n) == data[pos : pos + n]
    payload.close()
    assert not open_pieces


def test_chunked_payload_stops_at_piece_boundaries_and_opens_lazily() -> None:
    open_pieces: set[int] = set()
    opened: list[int] = []
    payload = tracked(b"abcdefgh", [3, 0, 5], open_pieces, opened)
    assert payload.read(8) == b"abc"
    assert payload.read(8) == b"defgh"
    assert payload.read(8) == b""
    assert opened == [0, 2]
    payload.seek(1)
    assert payload.read(1) == b"b" and opened == [0, 2, 0]
    payload.close()
    assert not open_pieces
    with pytest.raises(ValueError):
        payload.read(1)


def test_chunked_payload_short_piece_is_an_integrity_error() -> None:
    payload = ChunkedPayload([(4, lambda: io.BytesIO(b"abcd")), (10, lambda: io.BytesIO(b"xy"))])
    assert payload.read(4) == b"abcd"
    assert payload.read(10) == b"xy"
    with pytest.raises(IntegrityError, match="piece 1"):
        payload.read(10)


def missing_blob() -> IO[bytes]:
    raise FileNotFoundError(2, "No such file or directory", "/somewhere/blob")


def test_chunked_payload_unreadable_piece_is_the_store_failing() -> None:
    payload = ChunkedPayload([(4, lambda: io.BytesIO(b"abcd")), (10, missing_blob)])
    assert payload.read(4) == b"abcd"
    with pytest.raises(ServiceUnavailable, match="piece 1 could not be read") as caught:
        payload.read(10)
    assert "/somewhere" not in caught.value.detail


@pytest.mark.parametrize("kind", [ZIP, TAR])
async def test_unreadable_piece_is_not_a_hostile_archive(kind: str) -> None:
    data = make_zip(members_for_test()) if kind == ZIP else tar_files(members_for_test())
    pieces = pieces_of(data, [200_000])
    pieces[1] = (pieces[1][0], missing_blob)
    with pytest.raises(ServiceUnavailable):
        await collect(ChunkedPayload(pieces), kind)


def test_chunked_payload_empty() -> None:
    payload = ChunkedPayload([])
    assert payload.read(10) == b"" and payload.seek(0, io.SEEK_END) == 0


# -- valid archives ----------------------------------------------------------------------


def members_for_test() -> list[tuple[str, bytes]]:
    return [
        ("study/series/1.dcm", dicom()),
        ("study/series/2.dcm", _BIG),
        ("3.dcm", make_instance(instance_number=3)),
    ]


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
async def test_zip_members_arrive_whole_and_in_order(compression: int) -> None:
    expected = members_for_test()
    data = make_zip([("study/", b""), ("study/series/", b""), *expected], compression)
    members, skipped = await collect(data, ZIP)
    assert members == expected
    assert skipped == []


async def test_tar_members_arrive_whole_and_in_order() -> None:
    expected = [
        *members_for_test(),
        ("./here.dcm", make_instance()),
        # A long non-ASCII name: a pax header.
        ("séries/" + "x" * 150 + ".dcm", make_instance()),
    ]
    dirs = [tar_member(d, type=tarfile.DIRTYPE) for d in ("study", "study/series/")]
    data = make_tar([*dirs, *(tar_member(name, body) for name, body in expected)])
    members, skipped = await collect(data, TAR)
    assert members == expected
    assert skipped == []


async def test_gnu_tar_with_long_names() -> None:
    expected = [("a" * 120 + "/b.dcm", dicom()), ("c.dcm", make_instance())]
    data = make_tar([tar_member(n, b) for n, b in expected], fmt=tarfile.GNU_FORMAT)
    assert (await collect(data, TAR))[0] == expected


async def test_zip64_end_record() -> None:
    expected = members_for_test()
    data = with_zip64_end(make_zip(expected))
    assert (await collect(data, ZIP))[0] == expected
    limits = replace(LIMITS, max_members=2)
    with pytest.raises(HostileArchive, match="more than 2 entries"):
        await collect(data, ZIP, limits)


async def test_empty_archives_yield_nothing() -> None:
    assert await collect(make_zip([]), ZIP) == ([], [])
    assert await collect(make_tar([]), TAR) == ([], [])


@pytest.mark.parametrize("kind", [ZIP, TAR])
async def test_archive_read_through_a_chunked_payload(kind: str) -> None:
    expected = members_for_test()
    data = make_zip(expected) if kind == ZIP else tar_files(expected)
    payload = ChunkedPayload(pieces_of(data, [1, 511, 7, 4097, 1, 65_537, 3, 300_001]))
    assert (await collect(payload, kind))[0] == expected
    payload.close()


# -- encrypted pieces --------------------------------------------------------------------

KEY = bytes(range(32))
SEGMENT = 4096


def sealed(data: bytes, object_id: str) -> bytes:
    sealer = Sealer(KEY, "dek-1", object_id, SEGMENT)
    return b"".join([sealer.header, *sealer.update(data), *sealer.finish()])


def encrypted_payload(data: bytes, piece_size: int, tamper: int | None = None) -> ChunkedPayload:
    """``data`` as sealed chunk blobs read through DecryptingReader, as the store reads
    upload chunks; ``tamper`` flips a ciphertext byte in the middle of that piece."""
    pieces: list[tuple[int, Callable[[], IO[bytes]]]] = []
    for index, pos in enumerate(range(0, len(data), piece_size)):
        plain = data[pos : pos + piece_size]
        blob = bytearray(sealed(plain, f"chunk-{index}"))
        if index == tamper:
            blob[len(blob) // 2] ^= 0x01

        def opener(blob: bytes = bytes(blob), index: int = index) -> IO[bytes]:
            keys = {"dek-1": KEY}
            reader = DecryptingReader(io.BytesIO(blob), keys.__getitem__, f"chunk-{index}")
            return io.BufferedReader(reader, SEGMENT)

        pieces.append((len(plain), opener))
    return ChunkedPayload(pieces)


@pytest.mark.parametrize("kind", [ZIP, TAR])
async def test_encrypted_pieces(kind: str) -> None:
    expected = members_for_test()
    data = make_zip(expected) if kind == ZIP else tar_files(expected)
    payload = encrypted_payload(data, 100_000)
    assert (await collect(payload, kind))[0] == expected
    payload.close()


@pytest.mark.parametrize("kind", [ZIP, TAR])
async def test_tampered_chunk_is_an_integrity_error_not_a_hostile_archive(kind: str) -> None:
    expected = members_for_test()
    data = make_zip(expected, zipfile.ZIP_STORED) if kind == ZIP else tar_files(expected)
    # The big member spans the middle pieces.
    payload = encrypted_payload(data, 100_000, tamper=len(data) // 100_000 // 2)
    with pytest.raises(IntegrityError, match="chunk-"):
        await collect(payload, kind)
    payload.close()


# -- DICOMDIR and other non-DICOM members --------------------------------------------------


def with_non_dicom(kind: str) -> bytes:
    members = [
        ("DICOMDIR", b"\0" * 128 + b"DICM" + b"\0" * 200),
        ("a.dcm", dicom()),
        ("README.txt", b"these are the images\n" * 10),
        ("disk1/dicomdir", b"\0" * 300),
        ("short.dcm", b"\0" * 128 + b"DIC"),
        ("b.dcm", make_instance()),
    ]
    return make_zip(members) if kind == ZIP else tar_files(members)


@pytest.mark.parametrize("kind", [ZIP, TAR])
async def test_non_dicom_members_are_skipped(kind: str) -> None:
    members, skipped = await collect(with_non_dicom(kind), kind)
    assert [name for name, _ in members] == ["a.dcm", "b.dcm"]
    assert skipped == [
        SkippedMember("DICOMDIR", DICOMDIR_REASON),
        SkippedMember("README.txt", NOT_DICOM_REASON),
        SkippedMember("disk1/dicomdir", DICOMDIR_REASON),
        SkippedMember("short.dcm", NOT_DICOM_REASON),
    ]


@pytest.mark.parametrize("kind", [ZIP, TAR])
async def test_non_dicom_members_are_refused(kind: str) -> None:
    with pytest.raises(HostileArchive, match=r"'README\.txt' is not a DICOM file"):
        await collect(with_non_dicom(kind), kind, policy=REFUSE)
    only_dicomdir = [("DICOMDIR", b"\0" * 300), ("a.dcm", dicom())]
    data = make_zip(only_dicomdir) if kind == ZIP else tar_files(only_dicomdir)
    members, skipped = await collect(data, kind, policy=REFUSE)
    assert members == [("a.dcm", dicom())]
    assert skipped == [SkippedMember("DICOMDIR", DICOMDIR_REASON)]


# -- hostile archives --------------------------------------------------------------------

BAD_NAMES = [
    ("../evil.dcm", "has a '..' path component"),
    ("a/../../evil.dcm", "has a '..' path component"),
    ("/etc/x.dcm", "has an absolute path"),
    ("..\\x.dcm", "has a backslash in its name"),
    ("C:/x.dcm", "has a drive letter"),
    ("c:x.dcm", "has a drive letter"),
    ("a\nb.dcm", "has a control character or invalid UTF-8 in its name"),
    ("a\x7fb.dcm", "has a control character or invalid UTF-8 in its name"),
]


@pytest.mark.parametrize("kind", [ZIP, TAR])
@pytest.mark.parametrize(("name", "problem"), BAD_NAMES)
async def test_hostile_member_names(kind: str, name: str, problem: str) -> None:
    members = [("ok.dcm", dicom()), (name, dicom())]
    data = make_zip(members) if kind == ZIP else tar_files(members)
    with pytest.raises(HostileArchive) as caught:
        await collect(data, kind)
    assert caught.value.detail == f"archive member {name!r} {problem}"
    assert "\n" not in caught.value.detail and "\x7f" not in caught.value.detail


async def test_nul_and_empty_names() -> None:
    data = patch_cd(make_zip([("abc.dcm", dicom())]), 0, 46 + 1, "<B", 0)
    with pytest.raises(HostileArchive, match=r"'a\\x00c\.dcm' has a control character"):
        await collect(data, ZIP)
    with pytest.raises(HostileArchive, match="'' has an empty name"):
        await collect(tar_files([("", dicom())]), TAR)


async def test_long_hostile_name_is_cut_in_the_message() -> None:
    name = "../" + "x" * 5000 + ".dcm"
    with pytest.raises(HostileArchive) as caught:
        await collect(tar_files([(name, dicom())]), TAR)
    assert len(caught.value.detail) < 300
    assert caught.value.detail.startswith("archive member '../xxx")


def zip_symlink() -> bytes:
    info = zipfile.ZipInfo("link.dcm")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return make_zip([("a.dcm", dicom()), (info, b"/etc/passwd")])


def zip_fifo() -> bytes:
    info = zipfile.ZipInfo("pipe.dcm")
    info.create_system = 3
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return make_zip([(info, b"")])


def zip_bomb() -> bytes:
    """50 MB of zeros deflated to about 50 kB."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("zeros.dcm", "w") as member:
            block = b"\0" * CHUNK
            for _ in range(50):
                member.write(block)
    return buf.getvalue()


def zip_encrypted() -> bytes:
    return patch_cd(make_zip([("a.dcm", dicom()), ("b.dcm", dicom())]), 1, 8, "<H", 0x1)


def zip_bad_crc() -> bytes:
    data = bytearray(make_zip([("a.dcm", _BIG)], zipfile.ZIP_STORED))
    data[zip_data_offset(bytes(data), 0) + 1000] ^= 0xFF
    return bytes(data)


def zip_lying_size() -> bytes:
    """A deflated member declaring fewer bytes than its data inflates to."""
    return patch_cd(make_zip([("a.dcm", _BIG)]), 0, 24, "<L", len(_BIG) - 1000)


def zip_stored_size_mismatch() -> bytes:
    return patch_cd(make_zip([("a.dcm", dicom())], zipfile.ZIP_STORED), 0, 24, "<L", 100)


def zip_overlap() -> bytes:
    """A second entry pointing at the first one's local header (the overlapping-files bomb)."""
    data = make_zip([("a.dcm", dicom()), ("b.dcm", dicom())])
    return patch_cd(data, 1, 42, "<L", 0)


def zip_big_comment() -> bytes:
    info = zipfile.ZipInfo("a.dcm")
    info.comment = b"c" * 5000
    return make_zip([(info, dicom())])


def zip_bzip2() -> bytes:
    return make_zip([("a.dcm", dicom())], zipfile.ZIP_BZIP2)


def zip_truncated() -> bytes:
    return make_zip(members_for_test())[:-100]


def zip_bad_deflate() -> bytes:
    data = bytearray(make_zip([("a.dcm", _BIG)]))
    start = zip_data_offset(bytes(data), 0)
    data[start + 10 : start + 60] = b"\xff" * 50
    return bytes(data)


def tar_with(info: tarfile.TarInfo) -> bytes:
    return make_tar([tar_member("a.dcm", dicom()), (info, b"")])


def tar_link(kind: bytes) -> bytes:
    info = tarfile.TarInfo("link.dcm")
    info.type = kind
    info.linkname = "/etc/passwd"
    return tar_with(info)


def tar_device() -> bytes:
    info = tarfile.TarInfo("dev.dcm")
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return tar_with(info)


def tar_typed(kind: bytes) -> bytes:
    info = tarfile.TarInfo("odd.dcm")
    info.type = kind
    return tar_with(info)


def tar_gzip() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info, data = tar_member("a.dcm", dicom())
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_truncated_in_data() -> bytes:
    data = tar_files([("a.dcm", _BIG)])
    return data[: 512 + len(_BIG) // 2]


def tar_truncated_at_a_header() -> bytes:
    """A whole member, then nothing: no end-of-archive blocks."""
    member = tar_files([("a.dcm", dicom())])
    return member[: 512 + (len(dicom()) + 511) // 512 * 512]


def tar_garbage_header() -> bytes:
    data = bytearray(tar_files([("a.dcm", dicom()), ("b.dcm", dicom())]))
    second = 512 + (len(dicom()) + 511) // 512 * 512
    # The pax header before b.dcm loses its checksum: tarfile would call that the end.
    data[second + 148 : second + 156] = b"0000000\0"
    return bytes(data)


def tar_huge_pax() -> bytes:
    info, data = tar_member("a.dcm", dicom())
    info.pax_headers = {"comment": "x" * 100_000}
    return make_tar([(info, data)])


def tar_negative_size() -> bytes:
    """GNU base-256 lets a header declare a negative size, which sends tarfile back to the
    same header forever unless refused."""
    data = bytearray(make_tar([tar_member("a.dcm", b"")], fmt=tarfile.GNU_FORMAT))
    data[124:136] = b"\xff" * 11 + b"\x00"  # -256 in base-256
    checksum = 256 + sum(data[:148]) + sum(data[156:512])
    data[148:156] = b"%06o\0 " % checksum
    return bytes(data)


def two_members(kind: str, first: bytes, second: bytes) -> bytes:
    members = [("a.dcm", first), ("b.dcm", second)]
    return make_zip(members) if kind == ZIP else tar_files(members)


def many_members(kind: str) -> bytes:
    if kind == ZIP:
        return make_zip([("d/", b""), ("d/a.dcm", dicom()), ("b.dcm", dicom()), ("c", b"")])
    directory = tar_member("d", type=tarfile.DIRTYPE)
    files = [tar_member(n, dicom()) for n in ("d/a.dcm", "b.dcm")]
    return make_tar([directory, *files, tar_member("c")])


NOT_ARCHIVE = random.Random(7).randbytes(5000)
SIZE = len(dicom())

HOSTILE: list[tuple[str, str, Callable[[], bytes], ArchiveLimits, str]] = [
    ("zip symlink", ZIP, zip_symlink, LIMITS, "'link.dcm' is a symbolic link"),
    ("zip fifo", ZIP, zip_fifo, LIMITS, "'pipe.dcm' is a device, FIFO or socket"),
    ("zip bomb", ZIP, zip_bomb, replace(LIMITS, max_member_bytes=1 << 30), "zip bomb"),
    ("zip encrypted", ZIP, zip_encrypted, LIMITS, "'b.dcm' is encrypted"),
    ("zip bzip2", ZIP, zip_bzip2, LIMITS, "uses compression method 12"),
    ("zip bad CRC", ZIP, zip_bad_crc, LIMITS, "'a.dcm' is corrupt: bad CRC$"),
    ("zip bad deflate", ZIP, zip_bad_deflate, LIMITS, "'a.dcm' is corrupt: "),
    ("zip lying size", ZIP, zip_lying_size, LIMITS, "holds more than the .* bytes it declares"),
    ("zip stored size", ZIP, zip_stored_size_mismatch, LIMITS, "is stored but declares 100"),
    ("zip overlap", ZIP, zip_overlap, LIMITS, "'a.dcm' and 'b.dcm' overlap"),
    ("zip entry meta", ZIP, zip_big_comment, LIMITS, "5005 bytes of name, extra field"),
    ("zip truncated", ZIP, zip_truncated, LIMITS, "not a valid zip archive"),
    ("not a zip", ZIP, lambda: NOT_ARCHIVE, LIMITS, "not a valid zip archive"),
    ("dicom as zip", ZIP, dicom, LIMITS, "not a valid zip archive"),
    ("empty zip", ZIP, lambda: b"", LIMITS, "not a valid zip archive: it is only 0 bytes"),
    ("tar as zip", ZIP, lambda: tar_files([("a.dcm", dicom())]), LIMITS, "not a valid zip"),
    ("tar symlink", TAR, lambda: tar_link(tarfile.SYMTYPE), LIMITS, "is a symbolic link"),
    ("tar hardlink", TAR, lambda: tar_link(tarfile.LNKTYPE), LIMITS, "is a hard link"),
    ("tar device", TAR, tar_device, LIMITS, "'dev.dcm' is a character device"),
    ("tar fifo", TAR, lambda: tar_typed(tarfile.FIFOTYPE), LIMITS, "'odd.dcm' is a FIFO"),
    ("tar sparse", TAR, lambda: tar_typed(tarfile.GNUTYPE_SPARSE), LIMITS, "is a sparse file"),
    ("tar odd type", TAR, lambda: tar_typed(b"V"), LIMITS, "unsupported tar type 'V'"),
    ("tar gzip", TAR, tar_gzip, LIMITS, "gzip-compressed tar; send an uncompressed tar or a zip"),
    ("tar cut in data", TAR, tar_truncated_in_data, LIMITS, "'a.dcm' is corrupt: unexpected end"),
    ("tar cut at header", TAR, tar_truncated_at_a_header, LIMITS, "truncated"),
    ("tar bad header", TAR, tar_garbage_header, LIMITS, "invalid header at offset"),
    ("tar huge pax", TAR, tar_huge_pax, LIMITS, "more than 65536 bytes of headers"),
    ("tar negative size", TAR, tar_negative_size, LIMITS, "'a.dcm' has a negative size"),
    ("not a tar", TAR, lambda: NOT_ARCHIVE, LIMITS, "not a valid tar archive"),
    ("empty tar", TAR, lambda: b"", LIMITS, "not a valid tar archive"),
    ("zip as tar", TAR, lambda: make_zip([("a.dcm", dicom())]), LIMITS, "not a valid tar"),
]
for _kind in (ZIP, TAR):
    HOSTILE += [
        (
            f"{_kind} member over the limit",
            _kind,
            functools.partial(two_members, _kind, _SMALL, _BIG),
            replace(LIMITS, max_member_bytes=SIZE + 10),
            f"'b.dcm' is {len(_BIG)} bytes, over the limit of {SIZE + 10}",
        ),
        (
            f"{_kind} total over the limit",
            _kind,
            functools.partial(two_members, _kind, _SMALL, _SMALL),
            replace(LIMITS, max_total_bytes=SIZE * 3 // 2),
            f"members declare more than {SIZE * 3 // 2} bytes",
        ),
        (
            f"{_kind} too many members",
            _kind,
            functools.partial(many_members, _kind),
            replace(LIMITS, max_members=3),
            "the archive has more than 3 entries",
        ),
    ]


@pytest.mark.parametrize(
    ("kind", "build", "limits", "problem"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
async def test_hostile_archives_are_refused(
    kind: str, build: Callable[[], bytes], limits: ArchiveLimits, problem: str
) -> None:
    with pytest.raises(HostileArchive, match=problem) as caught:
        await collect(build(), kind, limits)
    assert caught.value.status_code == 400


async def test_zip_is_refused_before_any_member_is_yielded() -> None:
    data = make_zip([("a.dcm", dicom()), ("b.dcm", dicom()), ("../c.dcm", dicom())])
    events = archive_events(io.BytesIO(data), ZIP, LIMITS, SKIP, [])
    with pytest.raises(HostileArchive, match="'../c.dcm'"):
        await anext(events)


async def test_tar_is_refused_when_the_hostile_header_is_read() -> None:
    data = make_tar([tar_member("a.dcm", dicom()), tar_member("../c.dcm", dicom())])
    events = archive_events(io.BytesIO(data), TAR, LIMITS, SKIP, [])
    assert isinstance(await anext(events), PartStart)
    with pytest.raises(HostileArchive, match="'../c.dcm'"):
        async for _ in events:
            pass


async def test_actual_bytes_are_counted_against_the_total() -> None:
    """The declared sizes fit; what a member holds is counted as it streams."""
    data = zip_lying_size()
    limits = replace(LIMITS, max_total_bytes=len(_BIG) - 500)
    with pytest.raises(HostileArchive, match="holds more than"):
        await collect(data, ZIP, limits)


# -- cancellation ------------------------------------------------------------------------


class GatedFile(io.BytesIO):
    """A payload whose next read, once armed, waits until released."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.read_after_close = False

    def read(self, n: int | None = -1) -> bytes:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(60)
        if self.closed:
            self.read_after_close = True
            return b""
        return super().read(n)


async def test_cancelled_reader_finishes_its_read_before_the_payload_is_closed() -> None:
    fp = GatedFile(make_zip([("a.dcm", _BIG)], zipfile.ZIP_STORED))
    events = archive_events(fp, ZIP, LIMITS, SKIP, [])
    assert isinstance(await anext(events), PartStart)
    assert isinstance(await anext(events), PartData)  # the sniffed head
    fp.armed = True

    async def consume() -> None:
        try:
            async for _ in events:
                pass
        finally:
            fp.close()

    task = asyncio.create_task(consume())
    assert await asyncio.to_thread(fp.entered.wait, 60)
    task.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    closed_while_reading = fp.closed
    fp.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not closed_while_reading
    assert not fp.read_after_close
