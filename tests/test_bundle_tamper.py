"""Tampering with a bundle anywhere is detected, with an error that says where, and no
instance is taken as good before its size and SHA-256 were checked."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from app.crypto.errors import SignatureInvalid, UnknownKey
from app.errors import IexError
from app.transfer import bundle
from app.transfer.manifest import BundleCorrupt, BundleMalformed, Compression
from tests.bundle_helpers import (
    OTHER_SIGNER,
    RECIPIENT_KEY,
    STUDY,
    Item,
    build,
    item,
    lookup,
    meta_of,
    receive,
    resign,
    split,
)
from tests.helpers import make_instance


@pytest.fixture(scope="module")
def instances() -> list[bytes]:
    """Three instances of the same shape, so their sealed forms are the same length."""
    series = generate_uid()
    return [
        make_instance(study_uid=STUDY, series_uid=series, rows=64, columns=64, instance_number=i)
        for i in range(3)
    ]


@pytest.fixture
def good(tmp_path: Path, instances: list[bytes]) -> Path:
    path = build([item(d, Compression.NONE) for d in instances], tmp_path)
    assert receive(path) == instances
    return path


def _regions(path: Path) -> dict[str, range]:
    prefix, _, _, data = split(path)
    length = int.from_bytes(prefix[8:12], "big")
    return {
        "magic": range(0, 8),
        "length": range(8, 12),
        "manifest": range(12, 12 + length),
        "signature": range(12 + length, 76 + length),
        "data": range(76 + length, 76 + length + len(data)),
    }


_EXPECTED: dict[str, tuple[type[IexError], ...]] = {
    "magic": (BundleMalformed,),
    "length": (BundleMalformed,),
    # A flip that breaks the JSON is malformed; one in the sender's key id or gateway finds
    # no key; any other fails the signature.
    "manifest": (SignatureInvalid, BundleMalformed, UnknownKey),
    "signature": (SignatureInvalid,),
    "data": (BundleCorrupt,),
}


def _flip(raw: bytes, position: int, bit: int) -> bytes:
    out = bytearray(raw)
    out[position] ^= 1 << bit
    return bytes(out)


@pytest.mark.parametrize("region", list(_EXPECTED))
def test_one_flipped_bit_anywhere_is_detected(tmp_path: Path, good: Path, region: str) -> None:
    raw = good.read_bytes()
    positions = _regions(good)[region]
    rng = random.Random(region)
    sample = sorted(
        set(rng.sample(positions, min(len(positions), 60))) | {positions[0], positions[-1]}
    )
    tampered = tmp_path / "tampered.iexb"
    for position in sample:
        tampered.write_bytes(_flip(raw, position, rng.randrange(8)))
        with pytest.raises(_EXPECTED[region]) as err:
            receive(tampered)
        if region == "data":
            _, manifest, _, _ = split(good)
            offset = position - positions[0]
            index = next(
                i
                for i, e in enumerate(manifest["instances"])
                if e["offset"] <= offset < e["offset"] + e["length"]
            )
            assert f"instance {index} (" in str(err.value), (position, err.value)


def test_instances_before_a_damaged_one_are_delivered_and_it_is_not(
    tmp_path: Path, good: Path, instances: list[bytes]
) -> None:
    """A consumer reading one instance after another gets the intact ones whole, and an
    error, not an end, for the damaged one."""
    raw = good.read_bytes()
    data_start = _regions(good)["data"][0]
    last = split(good)[1]["instances"][2]
    tampered = tmp_path / "tampered.iexb"
    tampered.write_bytes(_flip(raw, data_start + last["offset"] + last["length"] - 1, 0))
    with tampered.open("rb") as f:
        verified = bundle.verify(
            bundle.read_head(f), lookup, gateway="south-gw", trust="royal-east"
        )
        readers = bundle.open_instances(f, verified, RECIPIENT_KEY)
        assert b"".join(next(readers).chunks()) == instances[0]
        assert b"".join(next(readers).chunks()) == instances[1]
        third = next(readers)
        with pytest.raises(BundleCorrupt, match=r"instance 2 .*segment \d+ does not authenticate"):
            third.read()
        with pytest.raises(BundleCorrupt):  # and stays failed
            third.read()


@pytest.mark.parametrize("cut", [1, 16, 17, 4096, 5000])
def test_truncation_is_detected(tmp_path: Path, good: Path, cut: int) -> None:
    tampered = tmp_path / "short.iexb"
    tampered.write_bytes(good.read_bytes()[:-cut])
    with pytest.raises(BundleCorrupt, match="is truncated"):
        receive(tampered)


def test_truncated_head_and_appended_bytes(tmp_path: Path, good: Path) -> None:
    raw = good.read_bytes()
    tampered = tmp_path / "t.iexb"
    for length in (0, 7, 11, 12, 100, _regions(good)["signature"][-1]):
        tampered.write_bytes(raw[:length])
        with pytest.raises(BundleMalformed, match="truncated"):
            receive(tampered)
    tampered.write_bytes(raw + b"\0")
    with pytest.raises(BundleCorrupt, match="1 bytes after its data"):
        receive(tampered)


def test_swapped_instances_are_detected(tmp_path: Path, good: Path) -> None:
    """Two sealed instances of equal length traded places in the data section."""
    prefix, manifest, _, data = split(good)
    first, second = manifest["instances"][0], manifest["instances"][1]
    assert first["length"] == second["length"]
    a = data[first["offset"] : first["offset"] + first["length"]]
    b = data[second["offset"] : second["offset"] + second["length"]]
    swapped = b + a + data[second["offset"] + second["length"] :]
    raw = good.read_bytes()
    tampered = tmp_path / "swapped.iexb"
    tampered.write_bytes(raw[: len(raw) - len(data)] + swapped)
    with pytest.raises(BundleCorrupt, match=r"instance 0 \(.*segment 0 does not authenticate"):
        receive(tampered)


def test_reordered_manifest_entries_fail_the_signature(tmp_path: Path, good: Path) -> None:
    """Entries reordered (offsets kept contiguous) by someone without the sender's key."""

    def reorder(m: dict[str, list[dict[str, object]]]) -> None:
        first, second = m["instances"][0], m["instances"][1]
        first["offset"], second["offset"] = second["offset"], first["offset"]
        m["instances"][0], m["instances"][1] = second, first

    with pytest.raises(SignatureInvalid, match="against key 'sig-1' of gateway 'north-gw'"):
        receive(resign(good, reorder, key=OTHER_SIGNER))


def test_replayed_instance_from_another_transfer(tmp_path: Path, instances: list[bytes]) -> None:
    """The same instance sealed in transfer A, spliced into transfer B in its place."""
    a = build([item(instances[0], Compression.NONE)], tmp_path, transfer="tr-a", name="a")
    b = build([item(instances[0], Compression.NONE)], tmp_path, transfer="tr-b", name="b")
    data_a, data_b = split(a)[3], split(b)[3]
    assert len(data_a) == len(data_b)
    raw_b = b.read_bytes()
    replayed = tmp_path / "replayed.iexb"
    replayed.write_bytes(raw_b[: len(raw_b) - len(data_b)] + data_a)
    with pytest.raises(
        BundleCorrupt, match=r"instance 0 .* of bundle 'tr-b'.*does not authenticate"
    ):
        receive(replayed)


def test_a_signer_lying_about_the_hash_hands_out_nothing_unverified(
    tmp_path: Path, instances: list[bytes]
) -> None:
    """Data that authenticates but does not match its signed SHA-256: nothing of an instance
    of at most a chunk is released, and of a larger one never its last chunk."""
    big = b"".join(instances) * 100  # over 2 MiB: three chunks
    path = build([item(instances[0], Compression.NONE)], tmp_path)
    small_lie = resign(path, lambda m: m["instances"][0].update(sha256="0" * 64))
    with small_lie.open("rb") as f:
        verified = bundle.verify(
            bundle.read_head(f), lookup, gateway="south-gw", trust="royal-east"
        )
        (reader,) = bundle.open_instances(f, verified, RECIPIENT_KEY)
        with pytest.raises(BundleCorrupt, match="its SHA-256 does not match the manifest"):
            reader.read(1)  # not one byte of an instance smaller than a chunk

    meta = meta_of(instances[0])
    path = build([Item(meta, big, Compression.ZSTD)], tmp_path, name="big")
    lie = resign(path, lambda m: m["instances"][0].update(sha256="0" * 64))
    released = 0
    with lie.open("rb") as f:
        verified = bundle.verify(
            bundle.read_head(f), lookup, gateway="south-gw", trust="royal-east"
        )
        (reader,) = bundle.open_instances(f, verified, RECIPIENT_KEY)
        with pytest.raises(BundleCorrupt, match="SHA-256 does not match"):
            for chunk in reader.chunks():
                released += len(chunk)
    assert released == bundle.CHUNK  # the second and the last were not released


def test_a_signer_lying_about_the_size(tmp_path: Path, instances: list[bytes]) -> None:
    path = build([item(instances[0], Compression.ZSTD)], tmp_path)
    size = len(instances[0])
    lie = resign(path, lambda m: m["instances"][0].update(size=size + 1))
    with pytest.raises(BundleCorrupt, match=f"it is {size} bytes; the manifest says {size + 1}"):
        receive(lie)
    plain = build([item(instances[0], Compression.NONE)], tmp_path, name="plain")
    lie = resign(plain, lambda m: m["instances"][0].update(size=size - 1))
    with pytest.raises(BundleCorrupt, match=f"it seals {size} bytes; the manifest says {size - 1}"):
        receive(lie)
