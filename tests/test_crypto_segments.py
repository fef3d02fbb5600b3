"""The encrypted object format: known answers, round trips, ranges and tamper detection."""

from __future__ import annotations

import ctypes
import hashlib
import io
import mmap
import os
import random
import struct
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.crypto.errors import IntegrityError
from app.crypto.reader import DecryptingReader, NotCached
from app.crypto.segments import MAGIC, TAG_SIZE, Sealer

KEY = bytes(range(32))
PREFIX = bytes.fromhex("0001020304050607")
SEG = 4096


def seal(data: bytes, object_id: str = "obj-1", key_id: str = "dek-1", seg: int = SEG) -> bytes:
    sealer = Sealer(KEY, key_id, object_id, seg, nonce_prefix=PREFIX)
    out = io.BytesIO()
    out.write(sealer.header)
    # Feed in irregular pieces so segment boundaries fall inside updates.
    rng = random.Random(len(data))
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 3 * seg)
        out.writelines(sealer.update(data[pos : pos + n]))
        pos += n
    out.writelines(sealer.finish())
    return out.getvalue()


def reader(blob: bytes, object_id: str = "obj-1") -> DecryptingReader:
    keys = {"dek-1": KEY}
    return DecryptingReader(io.BytesIO(blob), keys.__getitem__, object_id)


def test_known_answer() -> None:
    """A fixed key, nonce prefix and plaintext give fixed bytes: the format cannot drift."""
    plaintext = bytes(i % 251 for i in range(10_000))
    blob = seal(plaintext)
    assert blob[:8] == MAGIC
    assert len(blob) == 28 + 3 * TAG_SIZE + len(plaintext)
    assert hashlib.sha256(blob).hexdigest() == (
        "8f7217fe00ae4a69aa3f5057c7685cfd403523f685a9825174c776b92173f26f"
    )


def test_independent_reader_following_the_spec() -> None:
    """Decrypt with nothing but AES-GCM and the rules in docs/ENCRYPTION.md."""
    plaintext = os.urandom(2 * SEG + 100)
    blob = seal(plaintext)
    kid_len = blob[22]
    header = blob[: 23 + kid_len]
    version, algorithm, seg_size = blob[8], blob[9], struct.unpack(">I", blob[10:14])[0]
    prefix = blob[14:22]
    assert (version, algorithm, seg_size, prefix) == (1, 1, SEG, PREFIX)
    body = blob[len(header) :]
    stride = seg_size + 16
    segments = [body[i : i + stride] for i in range(0, len(body), stride)]
    oid = b"obj-1"
    out = b""
    for i, ct in enumerate(segments):
        last = i == len(segments) - 1
        aad = header + struct.pack(">H", len(oid)) + oid + struct.pack(">QB", i, last)
        out += AESGCM(KEY).decrypt(prefix + struct.pack(">I", i), ct, aad)
    assert out == plaintext


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 100 * 1024 * 1024])
def test_round_trip(size: int) -> None:
    plaintext = os.urandom(size) if size < 1_000_000 else bytes(size // 2) + os.urandom(size // 2)
    seg = SEG if size < 1_000_000 else 1024 * 1024
    blob = seal(plaintext, seg=seg)
    r = reader(blob)
    assert r.size == size
    assert r.read() == plaintext


def test_random_ranges_equal_the_plaintext_slice() -> None:
    plaintext = os.urandom(5 * SEG + 123)
    r = reader(seal(plaintext))
    rng = random.Random(7)
    for _ in range(200):
        a = rng.randrange(0, len(plaintext) + 1)
        b = rng.randrange(a, len(plaintext) + 1)
        r.seek(a)
        assert r.read(b - a) == plaintext[a:b]
        assert b"".join(r.iter_range(a, b)) == plaintext[a:b]


def _fails(blob: bytes, object_id: str = "obj-1") -> None:
    with pytest.raises(IntegrityError):
        reader(blob, object_id).read()


@pytest.mark.parametrize("where", ["magic", "header", "key-id", "first", "middle", "last-tag"])
def test_flipped_byte_is_detected(where: str) -> None:
    blob = bytearray(seal(os.urandom(4 * SEG + 10)))
    offsets = {
        "magic": 0,
        "header": 16,  # inside the nonce prefix
        "key-id": 24,
        "first": 30 + 5,
        "middle": 30 + 2 * (SEG + TAG_SIZE) + 100,
        "last-tag": len(blob) - 1,
    }
    blob[offsets[where]] ^= 0x01
    with pytest.raises((IntegrityError, KeyError)):
        reader(bytes(blob)).read()


def test_truncation_is_detected() -> None:
    blob = seal(os.urandom(3 * SEG + 10))
    for cut in (1, 10, TAG_SIZE, SEG + TAG_SIZE, len(blob) - 29):
        _fails(blob[:-cut])
    # Exactly at a segment boundary: what remains ends with a segment not sealed as last.
    header = 28
    _fails(blob[: header + 2 * (SEG + TAG_SIZE)])


def test_appending_is_detected() -> None:
    blob = seal(os.urandom(2 * SEG))
    _fails(blob + b"\x00" * (SEG + TAG_SIZE))
    _fails(blob + b"x")


def test_swapped_segments_are_detected() -> None:
    blob = seal(os.urandom(3 * SEG + 10))
    h, stride = 28, SEG + TAG_SIZE
    s0, s1 = blob[h : h + stride], blob[h + stride : h + 2 * stride]
    _fails(blob[:h] + s1 + s0 + blob[h + 2 * stride :])


def test_segments_from_another_object_are_detected() -> None:
    plaintext = os.urandom(2 * SEG + 10)
    a, b = seal(plaintext, "obj-1"), seal(plaintext, "obj-2")
    assert a != b  # same key and prefix, different object ids
    _fails(b, "obj-1")  # object swapped under another's name
    h, stride = 28, SEG + TAG_SIZE
    _fails(a[: h + stride] + b[h + stride :])


def test_wrong_key_is_detected() -> None:
    blob = seal(b"secret")
    with pytest.raises(IntegrityError):
        DecryptingReader(io.BytesIO(blob), lambda _kid: bytes(32), "obj-1").read()


def _cached_pages(fd: int, size: int) -> int:
    """How many of the file's pages are in the page cache (``mincore``, which reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        vector = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
        if libc.mincore(address, size, vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(byte & 1 for byte in vector.raw)
    finally:
        libc.munmap(address, size)


def _evict(path: Path) -> None:
    """Drop the file's pages from the page cache, and make sure they are gone: on a busy
    machine one ``DONTNEED`` can leave a page cached. Checked with ``mincore``, as a read
    would bring pages back (even a ``RWF_NOWAIT`` one starts readahead)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # clean pages can be dropped from the page cache
        for _ in range(100):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            if _cached_pages(f.fileno(), size) == 0:
                return
            time.sleep(0.01)
    pytest.skip("the kernel keeps this file's pages cached; nothing to test on this machine")


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs preadv's RWF_NOWAIT (Linux)")
def test_cached_only_opening_never_waits_for_the_disk(tmp_path: Path) -> None:
    """An object whose pages are not cached refuses to open ``cached_only`` (the event
    loop then opens it in a worker thread); once read, it opens that way too."""
    data = os.urandom(3 * SEG + 7)
    path = tmp_path / "object"
    path.write_bytes(seal(data))
    keys = {"dek-1": KEY}
    # A read with RWF_NOWAIT of pages not cached starts their readahead, and a fast disk can
    # finish it before the read gives up: the read then succeeds without having waited. So
    # the refusal is asserted over several evictions, and an opening that won the race must
    # still read the right bytes.
    for _ in range(20):
        _evict(path)
        with open(path, "rb") as raw:
            try:
                reader = DecryptingReader(raw, keys.__getitem__, "obj-1", cached_only=True)
            except NotCached:
                break
            with reader:
                assert reader.read() == data
    else:
        pytest.fail("opening cached_only never refused an object just evicted from the cache")
    with open(path, "rb") as raw, DecryptingReader(raw, keys.__getitem__, "obj-1") as reader:
        assert reader.read() == data
    with (
        open(path, "rb") as raw,
        DecryptingReader(raw, keys.__getitem__, "obj-1", cached_only=True) as reader,
    ):
        assert reader.read() == data


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs preadv's RWF_NOWAIT (Linux)")
def test_objects_opened_one_after_another_keep_their_own_bytes(tmp_path: Path) -> None:
    """Opening reads share one buffer per thread: what an open object still needs (a
    segment before its last) is its own copy, not that buffer."""
    contents = {
        "one-segment": os.urandom(SEG - 100),
        "three-segments": os.urandom(3 * SEG - 5),
        "other": os.urandom(3 * SEG - 5),
    }
    readers = []
    for name, data in contents.items():
        (tmp_path / name).write_bytes(seal(data, name, seg=SEG))
        raw = open(tmp_path / name, "rb")  # noqa: SIM115
        readers.append(DecryptingReader(raw, {"dek-1": KEY}.__getitem__, name, cached_only=True))
    for reader, data in zip(readers, contents.values(), strict=True):
        with reader:
            assert reader.read() == data


def test_cached_only_needs_a_real_file() -> None:
    with pytest.raises(NotCached):
        DecryptingReader(
            io.BytesIO(seal(b"x")), {"dek-1": KEY}.__getitem__, "obj-1", cached_only=True
        )
