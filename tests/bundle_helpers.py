"""Building and opening exchange bundles in tests: fixed keys, real DICOM, real files."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pydicom
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from app.crypto.identity import PublicExchangeKey
from app.transfer import bundle
from app.transfer.bundle import BundleWriter, VerifiedBundle
from app.transfer.manifest import Compression, Endpoint, InstanceMeta

SENDER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
RECIPIENT_KEY = X25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
OTHER_RECIPIENT_KEY = X25519PrivateKey.from_private_bytes(bytes(range(96, 128)))
EPHEMERAL = X25519PrivateKey.from_private_bytes(bytes(range(128, 160)))
SENDER = Endpoint("north-gw", "st-mary", "sig-1")
RECIPIENT = Endpoint("south-gw", "royal-east", "x25519-1")
#: ``RECIPIENT_KEY`` as a partner's identity publishes it, for trust ``rad-b``.
RECIPIENT_EXCHANGE = PublicExchangeKey(
    "rad-b", "xch-00000000000000b1", RECIPIENT_KEY.public_key().public_bytes_raw()
)
CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.8.498.1"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def lookup(gateway: str, key_id: str) -> Ed25519PublicKey:
    """The sender's gateway key, as a partner registry would give it."""
    keys = {("north-gw", "sig-1"): SENDER_KEY.public_key()}
    return keys[(gateway, key_id)]


@dataclass(frozen=True)
class Item:
    meta: InstanceMeta
    data: bytes
    compression: Compression | None = None


def meta_of(data: bytes) -> InstanceMeta:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return InstanceMeta(
        str(ds.SOPInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPClassUID),
        str(ds.file_meta.TransferSyntaxUID),
    )


def item(data: bytes, compression: Compression | None = None) -> Item:
    return Item(meta_of(data), data, compression)


def pieces(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def build(
    items: Iterable[Item],
    directory: Path,
    *,
    transfer: str = "tr-1",
    recipient: Endpoint = RECIPIENT,
    segment_size: int = 4096,
    name: str = "bundle",
    ephemeral: X25519PrivateKey | None = None,
) -> Path:
    """Package the items: the data section streams to one file, the head is put before it."""
    data_path = directory / f"{name}.data"
    with data_path.open("wb") as sink:
        writer = BundleWriter(
            sender=SENDER,
            recipient=recipient,
            transfer_id=transfer,
            study=STUDY,
            signing_key=SENDER_KEY,
            recipient_public=RECIPIENT_KEY.public_key(),
            sink=sink,
            segment_size=segment_size,
            created=CREATED,
            ephemeral=ephemeral,
        )
        for it in items:
            writer.add_instance(it.meta, pieces(it.data), it.compression)
        head = writer.finish()
    path = directory / f"{name}.iexb"
    with path.open("wb") as out, data_path.open("rb") as data:
        out.write(head)
        shutil.copyfileobj(data, out)
    data_path.unlink()
    return path


def receive_verified(
    path: Path, *, gateway: str = "south-gw", trust: str = "royal-east"
) -> VerifiedBundle:
    with path.open("rb") as f:
        return bundle.verify(bundle.read_head(f), lookup, gateway=gateway, trust=trust)


def receive(
    path: Path,
    *,
    private: X25519PrivateKey = RECIPIENT_KEY,
    gateway: str = "south-gw",
    trust: str = "royal-east",
    key_lookup: Callable[[str, str], Ed25519PublicKey] = lookup,
) -> list[bytes]:
    """Every instance, read to its end as a consumer would."""
    with path.open("rb") as f:
        verified = bundle.verify(bundle.read_head(f), key_lookup, gateway=gateway, trust=trust)
        return [b"".join(reader.chunks()) for reader in bundle.open_instances(f, verified, private)]


def split(path: Path) -> tuple[bytes, dict[str, Any], bytes, bytes]:
    """prefix (magic and length), manifest document, signature, data."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[8:12], "big")
    manifest = orjson.loads(raw[12 : 12 + length])
    return raw[:12], manifest, raw[12 + length : 76 + length], raw[76 + length :]


def resign(
    path: Path,
    edit: Callable[[dict[str, Any]], object],
    *,
    key: Ed25519PrivateKey = SENDER_KEY,
    data: bytes | None = None,
    canonical: bool = True,
) -> Path:
    """The bundle with its manifest edited and signed again by ``key``: what a dishonest or
    buggy sender could make, not an outsider."""
    _, manifest, _, old_data = split(path)
    edit(manifest)
    text = (
        orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS)
        if canonical
        else orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
    )
    signature = key.sign(bundle.MANIFEST_CONTEXT + text)
    out = path.with_name(path.stem + "-resigned.iexb")
    out.write_bytes(
        bundle.MAGIC + len(text).to_bytes(4, "big") + text + signature + (data or old_data)
    )
    return out
