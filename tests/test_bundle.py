"""Exchange bundles: round trips of real studies, the bytes as specified, limits and bounds."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pydicom
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydicom.uid import generate_uid

from app.crypto.errors import UnknownKey
from app.transfer import bundle
from app.transfer.bundle import BundleWriter
from app.transfer.manifest import (
    MAX_INSTANCES,
    MAX_MANIFEST_SIZE,
    BundleCorrupt,
    BundleMalformed,
    BundleMisaddressed,
    Compression,
    InstanceMeta,
)
from tests.bundle_helpers import (
    CREATED,
    EPHEMERAL,
    OTHER_RECIPIENT_KEY,
    RECIPIENT,
    RECIPIENT_KEY,
    SENDER,
    SENDER_KEY,
    STUDY,
    TEST_FILES,
    build,
    item,
    lookup,
    receive,
    receive_verified,
    resign,
    split,
)
from tests.helpers import make_instance

RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def into_study(path: Path, series: str) -> bytes:
    """A pydicom test file moved into the test study and the given series, bytes as saved."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def study() -> list[bytes]:
    """Three series: a real CT, a real MR and the same MR RLE-compressed, generated CTs."""
    ct_series, mr_series, gen_series = generate_uid(), generate_uid(), generate_uid()
    return [
        into_study(TEST_FILES / "CT_small.dcm", ct_series),
        into_study(TEST_FILES / "MR_small.dcm", mr_series),
        into_study(TEST_FILES / "MR_small_RLE.dcm", mr_series),
        *(
            make_instance(study_uid=STUDY, series_uid=gen_series, rows=64, columns=64)
            for _ in range(3)
        ),
    ]


def test_round_trip_of_a_multi_series_study(tmp_path: Path, study: list[bytes]) -> None:
    path = build([item(data) for data in study], tmp_path)
    assert receive(path) == study  # byte for byte, in order
    verified = receive_verified(path)
    entries = verified.manifest.instances
    assert len({e.meta.series_instance_uid for e in entries}) == 3
    for entry, data in zip(entries, study, strict=True):
        assert entry.size == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        if entry.meta.transfer_syntax_uid == RLE_LOSSLESS:
            assert entry.compression is Compression.NONE
        else:
            assert entry.compression is Compression.ZSTD
    ct = entries[0]
    assert ct.length < 0.8 * ct.size, "the real CT must shrink under zstd"
    assert verified.manifest_sha256 == hashlib.sha256(_manifest(path)).hexdigest()


def _manifest(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[12 : 12 + int.from_bytes(raw[8:12], "big")]


@pytest.mark.parametrize("compression", list(Compression))
def test_every_compression_round_trips_across_segments(
    tmp_path: Path, compression: Compression
) -> None:
    """Instances of several segments, one exactly a segment long, one empty."""
    sizes = [0, 4096, 3 * 4096 + 17, 200_000]
    datas = [(b"DICM" * (n // 4 + 1))[:n] for n in sizes]
    meta = [
        InstanceMeta(
            generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
        )
        for _ in sizes
    ]
    path = tmp_path / "b.iexb"
    data_path = tmp_path / "b.data"
    with data_path.open("wb") as sink:
        writer = _writer(sink, segment_size=4096)
        for m, data in zip(meta, datas, strict=True):
            writer.add_instance(m, [data[:1000], data[1000:]], compression)
        head = writer.finish()
    path.write_bytes(head + data_path.read_bytes())
    assert receive(path) == datas


def _writer(sink: Any, **kwargs: Any) -> BundleWriter:
    return BundleWriter(
        sender=SENDER,
        recipient=RECIPIENT,
        transfer_id=kwargs.pop("transfer_id", "tr-1"),
        study=STUDY,
        signing_key=SENDER_KEY,
        recipient_public=RECIPIENT_KEY.public_key(),
        sink=sink,
        created=CREATED,
        **kwargs,
    )


KNOWN_PLAINTEXT = bytes(i % 251 for i in range(10_000))
KNOWN_META = InstanceMeta("1.2.3.4.1", "1.2.3.4.2", "1.2.840.10008.5.1.4.1.1.7", RLE_LOSSLESS)


def test_known_answer_head(tmp_path: Path) -> None:
    """Fixed keys, time and content give a fixed head: the format cannot drift unseen."""
    sink = io.BytesIO()
    writer = _writer(sink, ephemeral=EPHEMERAL, segment_size=4096)
    writer.add_instance(KNOWN_META, [KNOWN_PLAINTEXT])
    head = writer.finish()
    data = sink.getvalue()

    assert head[:8] == b"\x89IEXBDL\n"
    (length,) = struct.unpack(">I", head[8:12])
    assert len(head) == 12 + length + 64
    manifest_bytes, signature = head[12 : 12 + length], head[12 + length :]
    manifest = orjson.loads(manifest_bytes)
    assert manifest_bytes == orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS)
    SENDER_KEY.public_key().verify(signature, b"iex-bundle-manifest/1\n" + manifest_bytes)
    eph = EPHEMERAL.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert manifest["encryption"]["ephemeral"] == base64.b64encode(eph).decode()
    assert manifest["instances"] == [
        {
            "compression": "none",
            "length": 23 + 8 + 3 * 16 + 10_000,  # header, key id, three tags, plaintext
            "offset": 0,
            "sha256": hashlib.sha256(KNOWN_PLAINTEXT).hexdigest(),
            "size": 10_000,
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7",
            "sop_instance_uid": "1.2.3.4.1",
            "series_instance_uid": "1.2.3.4.2",
            "transfer_syntax_uid": RLE_LOSSLESS,
        }
    ]
    assert manifest["data_length"] == len(data)
    assert list(manifest) == sorted(manifest)
    assert manifest["created"] == "2024-05-01T12:00:00Z"
    assert hashlib.sha256(head).hexdigest() == (
        "a6f249a3b018fa40e78ae1cf6b2fb5c5d69e10a138ce05d9dd772acf4a574bdc"
    )


def test_independent_reader_following_the_spec(tmp_path: Path) -> None:
    """Open instance 0 with nothing but X25519, HKDF, AES-GCM and docs/EXCHANGE.md."""
    sink = io.BytesIO()
    writer = _writer(sink, segment_size=4096)
    writer.add_instance(KNOWN_META, [KNOWN_PLAINTEXT])
    head = writer.finish()
    data = sink.getvalue()
    length = int.from_bytes(head[8:12], "big")
    manifest = orjson.loads(head[12 : 12 + length])
    eph = base64.b64decode(manifest["encryption"]["ephemeral"])
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    shared = RECIPIENT_KEY.exchange(X25519PublicKey.from_public_bytes(eph))
    recipient_raw = RECIPIENT_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    transfer, kid = b"tr-1", b"x25519-1"
    info = (
        b"iex-bundle-key/1"
        + len(transfer).to_bytes(2, "big")
        + transfer
        + len(kid).to_bytes(2, "big")
        + kid
    )
    okm = HKDF(hashes.SHA256(), 64, eph + recipient_raw, info).derive(shared)
    aes, commitment = okm[:32], okm[32:]
    assert base64.b64decode(manifest["encryption"]["commitment"]) == commitment
    entry = manifest["instances"][0]
    sealed = data[entry["offset"] : entry["offset"] + entry["length"]]
    kid_len = sealed[22]
    header = sealed[: 23 + kid_len]
    assert header[23:] == kid
    prefix = header[14:22]
    object_id = b"tr-1/0"
    body = sealed[len(header) :]
    stride = 4096 + 16
    segments = [body[i : i + stride] for i in range(0, len(body), stride)]
    plaintext = b""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        aad = header + len(object_id).to_bytes(2, "big") + object_id + struct.pack(">QB", i, last)
        plaintext += AESGCM(aes).decrypt(prefix + struct.pack(">I", i), segment, aad)
    assert plaintext == KNOWN_PLAINTEXT


def test_wrong_recipient_private_key(tmp_path: Path, study: list[bytes]) -> None:
    path = build([item(study[0])], tmp_path)
    with pytest.raises(BundleMisaddressed, match="sealed for another X25519 key.*'x25519-1'"):
        receive(path, private=OTHER_RECIPIENT_KEY)


def test_bundle_for_another_trust_is_refused(tmp_path: Path, study: list[bytes]) -> None:
    path = build([item(study[0])], tmp_path)
    with pytest.raises(
        BundleMisaddressed,
        match="for trust 'royal-east' at gateway 'south-gw', not for trust 'st-elsewhere'",
    ):
        receive(path, trust="st-elsewhere")
    with pytest.raises(BundleMisaddressed, match="not for trust 'royal-east' at gateway 'west-gw'"):
        receive(path, gateway="west-gw")


def test_unknown_signing_key_is_named(tmp_path: Path, study: list[bytes]) -> None:
    path = build([item(study[0])], tmp_path)

    def nobody(gateway: str, key_id: str) -> Any:
        raise KeyError(key_id)

    with pytest.raises(UnknownKey, match="'sig-1' is known for gateway 'north-gw'") as err:
        receive(path, key_lookup=nobody)
    assert err.value.key_id == "sig-1"


def test_oversized_manifest_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.iexb"
    path.write_bytes(bundle.MAGIC + (MAX_MANIFEST_SIZE + 1).to_bytes(4, "big") + b"{")
    with pytest.raises(BundleMalformed, match="over the limit of 16777216 bytes"):
        receive(path)


def _set(path: str, value: object) -> Any:
    def edit(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = manifest
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return edit


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("format", "iex-bundle/2", "format 'iex-bundle/2' is not 'iex-bundle/1'"),
        ("transfer", "a/b", "transfer is not 1-64 letters"),
        ("created", "2024-05-01 12:00:00", "created is malformed"),
        ("created", "2024-13-01T12:00:00Z", "created is not a valid UTC time"),
        ("study", "1.02.3", "study is not a DICOM UID"),
        ("data_length", -1, "data_length is -1, outside"),
        ("data_length", 1, "data_length is 1; the instances add up to"),
        ("recipient.trust", "../x", "recipient.trust is not 1-64 letters"),
        ("sender.extra", "x", "sender has unknown fields: 'extra'"),
        ("encryption.scheme", "rot13", "encryption.scheme 'rot13' is not"),
        ("encryption.ephemeral", "AAAA", "encryption.ephemeral is not the base64 of 32 bytes"),
        ("encryption.segment_size", 1024, "encryption.segment_size is 1024, outside"),
        ("encryption.commitment", _DELETE, "encryption lacks commitment"),
        ("instances.0.size", "10", r"instances\[0\].size is not an integer"),
        ("instances.0.size", True, r"instances\[0\].size is not an integer"),
        ("instances.0.size", 2**41, r"instances\[0\].size is 2199023255552, outside"),
        ("instances.0.sha256", "AB" * 32, r"instances\[0\].sha256 is malformed"),
        ("instances.0.compression", "lzma", r"instances\[0\].compression 'lzma' is not"),
        ("instances.0.sop_instance_uid", "1.2.x", r"instances\[0\].sop_instance_uid is not a"),
        ("instances.1.offset", 0, r"instances\[1\].offset is 0, not"),
        ("instances", {}, "instances is not an array"),
        ("instances", [{}] * (MAX_INSTANCES + 1), "instances has 65537 items; at most 65536"),
        ("study", 1.5, "holds a value outside the format|study is not a string"),
    ],
)
def test_malformed_manifest_fields_are_refused(
    tmp_path: Path, study: list[bytes], path: str, value: object, message: str
) -> None:
    """Signed by the sender, still refused: the field is named, nothing is decrypted."""
    good = build([item(study[0]), item(study[1])], tmp_path)
    with pytest.raises(BundleMalformed, match=message):
        receive(resign(good, _set(path, value)))


def test_non_canonical_manifest_is_refused(tmp_path: Path, study: list[bytes]) -> None:
    good = build([item(study[0])], tmp_path)
    with pytest.raises(BundleMalformed, match="not in canonical form"):
        receive(resign(good, lambda m: None, canonical=False))


def _bomb(tmp_path: Path, compression: Compression) -> Path:
    """64 MiB of zeros (a few kilobytes compressed), declared as 1 MiB by its signer."""
    sink_path = tmp_path / "bomb.data"
    meta = InstanceMeta(
        generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    )
    with sink_path.open("wb") as sink:
        writer = _writer(sink)
        writer.add_instance(meta, (bytes(1 << 20) for _ in range(64)), compression)
        head = writer.finish()
    honest = tmp_path / "honest.iexb"
    honest.write_bytes(head + sink_path.read_bytes())
    assert split(honest)[1]["instances"][0]["length"] < 1 << 20
    return resign(honest, _set("instances.0.size", 1 << 20))


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.GZIP])
def test_decompression_bomb_is_capped(tmp_path: Path, compression: Compression) -> None:
    path = _bomb(tmp_path, compression)
    tracemalloc.start()
    try:
        with pytest.raises(BundleCorrupt, match="decompresses to more than its declared 1048576"):
            receive(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


_NOISE = os.urandom(4096)


def _large_instance(total: int) -> Iterator[bytes]:
    """CT-like chunks of 1 MiB: 12-bit noise in 16-bit words, each chunk numbered."""
    masked = bytes(b & 0x0F if i % 2 else b for i, b in enumerate(_NOISE)) * 256
    for i in range(total // len(masked)):
        yield i.to_bytes(8, "big") + masked[8:]


def test_memory_is_bounded_for_a_large_instance(tmp_path: Path) -> None:
    """200 MB streams through packaging and opening with a few MiB held at a time."""
    total = 200 << 20
    meta = InstanceMeta(
        generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    )
    expected = hashlib.sha256()
    for chunk in _large_instance(total):
        expected.update(chunk)
    data_path = tmp_path / "large.data"
    path = tmp_path / "large.iexb"
    tracemalloc.start()
    try:
        with data_path.open("wb") as sink:
            writer = _writer(sink, segment_size=1 << 20)
            entry = writer.add_instance(meta, _large_instance(total))
            head = writer.finish()
        _, write_peak = tracemalloc.get_traced_memory()
        with path.open("wb") as out, data_path.open("rb") as data:
            out.write(head)
            while block := data.read(1 << 20):
                out.write(block)
        data_path.unlink()
        tracemalloc.reset_peak()
        with path.open("rb") as f:
            verified = bundle.verify(
                bundle.read_head(f), lookup, gateway="south-gw", trust="royal-east"
            )
            (reader,) = bundle.open_instances(f, verified, RECIPIENT_KEY)
            got = hashlib.sha256()
            size = 0
            for chunk in reader.chunks():
                got.update(chunk)
                size += len(chunk)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entry.size == total and entry.compression is Compression.ZSTD
    assert entry.length < total
    assert size == total and got.hexdigest() == expected.hexdigest()
    assert write_peak < 16 << 20, write_peak
    assert read_peak < 16 << 20, read_peak


def test_a_zstd_window_over_8_mib_is_refused(tmp_path: Path) -> None:
    """A frame asking for a 128 MiB window is an error, not an allocation, even sealed and
    signed by the sender."""
    import zstandard

    from app.crypto import exchange
    from app.crypto.segments import Sealer

    plaintext = os.urandom(1 << 20) * 2
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=27)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = compressor.compress(plaintext) + compressor.flush()  # size unknown: window kept
    meta = InstanceMeta(
        generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    )
    sink = io.BytesIO()
    writer = _writer(sink, segment_size=1 << 20)
    writer.add_instance(meta, [plaintext])
    head = writer.finish()
    honest = tmp_path / "honest.iexb"
    honest.write_bytes(head + sink.getvalue())
    _, manifest, _, _ = split(honest)
    key = exchange.open_key(
        RECIPIENT_KEY, base64.b64decode(manifest["encryption"]["ephemeral"]), "x25519-1", "tr-1"
    )
    sealer = Sealer(key.aes, "x25519-1", "tr-1/0", 1 << 20)
    sealed = sealer.header + b"".join(sealer.update(frame)) + b"".join(sealer.finish())

    def reseal(m: dict[str, Any]) -> None:
        m["instances"][0]["length"] = m["data_length"] = len(sealed)

    forged = resign(honest, reseal, data=sealed)
    with pytest.raises(BundleCorrupt, match="instance 0 .*does not decompress as zstd"):
        receive(forged)
