"""The manifest of an exchange bundle: what it holds, from whom, for whom, and how sealed.

The sender signs the manifest's canonical JSON (``app.transfer.canonical_json``); the
receiver decodes it strictly, field by field, only after the signature verified
(``app.transfer.bundle.verify``), so a manifest altered in transit is reported as a bad
signature and one its signer got wrong as malformed. ``docs/EXCHANGE.md`` lists the fields.

Errors of a bundle, all 400 (the sender can fix them; nothing of the bundle is kept)::

    BundleError              the bundle is not acceptable
     ├── BundleMalformed     framing, manifest JSON, a field's type or bound
     ├── BundleMisaddressed  sealed for another gateway, trust or key
     └── BundleCorrupt       data that does not authenticate, decompress, or match its
                             size and SHA-256; truncated or extended data
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from app.crypto.exchange import PUBLIC_KEY_SIZE
from app.crypto.segments import MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE
from app.dicom.media import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from app.dicom.uids import is_valid_uid
from app.errors import BadRequest
from app.transfer import canonical_json as cj
from app.transfer.canonical_json import FieldError

FORMAT = "iex-bundle/1"
#: The one encryption scheme of format 1: ephemeral X25519, HKDF-SHA256, and the segmented
#: AES-256-GCM object format of docs/ENCRYPTION.md.
SCHEME = "x25519-hkdf-sha256-aes256gcm-segments/1"
#: Largest manifest: some 30,000 instances; more is refused before it is read.
MAX_MANIFEST_SIZE = 16 * 1024 * 1024
MAX_INSTANCES = 65_536
#: Largest instance (plaintext), and so the largest output of one decompression.
MAX_INSTANCE_SIZE = 2**40
#: Bundle segments stay small: a reader holds a couple of them at a time.
MAX_BUNDLE_SEGMENT_SIZE = 4 * 1024 * 1024
_MAX_DATA = 2**50
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Compression(StrEnum):
    ZSTD = "zstd"
    GZIP = "gzip"
    NONE = "none"


#: Transfer syntaxes whose bytes are worth compressing: the native ones. Deflated Explicit
#: VR Little Endian is compressed already, as are all encapsulated syntaxes.
COMPRESSIBLE_SYNTAXES = frozenset(
    {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN}
)
assert DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN not in COMPRESSIBLE_SYNTAXES


def compression_for(transfer_syntax_uid: str) -> Compression:
    """zstd for native pixel data, none for what is compressed already."""
    if transfer_syntax_uid in COMPRESSIBLE_SYNTAXES:
        return Compression.ZSTD
    return Compression.NONE


class BundleError(BadRequest):
    """An exchange bundle is not acceptable. The message never holds instance bytes."""


class BundleMalformed(BundleError):
    pass


class BundleMisaddressed(BundleError):
    pass


class BundleCorrupt(BundleError):
    pass


@dataclass(frozen=True)
class Endpoint:
    """One end of an exchange: a gateway, a trust in it, and the key id that speaks for it
    (the sender's Ed25519 signing key, the recipient trust's X25519 key)."""

    gateway: str
    trust: str
    key: str

    def to_json(self) -> dict[str, str]:
        return {"gateway": self.gateway, "trust": self.trust, "key": self.key}

    @staticmethod
    def from_json(value: object, path: str) -> Endpoint:
        d = cj.fields(value, path, frozenset({"gateway", "trust", "key"}))
        return Endpoint(
            cj.name(d["gateway"], f"{path}.gateway"),
            cj.name(d["trust"], f"{path}.trust"),
            cj.string(d["key"], f"{path}.key", pattern=cj.KEY_ID),
        )


@dataclass(frozen=True)
class InstanceMeta:
    """What a sender says of an instance besides its bytes."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class InstanceEntry:
    """An instance in the manifest: its identity, its plaintext's size and SHA-256 (of the
    DICOM bytes as stored), how it was compressed, and where it is sealed in the data."""

    meta: InstanceMeta
    size: int
    sha256: str
    compression: Compression
    offset: int
    length: int

    def to_json(self) -> dict[str, Any]:
        m = self.meta
        return {
            "sop_instance_uid": m.sop_instance_uid,
            "series_instance_uid": m.series_instance_uid,
            "sop_class_uid": m.sop_class_uid,
            "transfer_syntax_uid": m.transfer_syntax_uid,
            "size": self.size,
            "sha256": self.sha256,
            "compression": self.compression.value,
            "offset": self.offset,
            "length": self.length,
        }

    @staticmethod
    def from_json(value: object, path: str) -> InstanceEntry:
        d = cj.fields(value, path, _ENTRY_FIELDS)
        uids = [_uid(d[k], f"{path}.{k}") for k in _UID_FIELDS]
        compression = cj.string(d["compression"], f"{path}.compression", max_length=8)
        if compression not in Compression.__members__.values():
            raise FieldError(f"{path}.compression {compression!r} is not zstd, gzip or none")
        return InstanceEntry(
            InstanceMeta(*uids),
            cj.integer(d["size"], f"{path}.size", 0, MAX_INSTANCE_SIZE),
            cj.string(d["sha256"], f"{path}.sha256", pattern=_SHA256),
            Compression(compression),
            cj.integer(d["offset"], f"{path}.offset", 0, _MAX_DATA),
            cj.integer(d["length"], f"{path}.length", 1, _MAX_DATA),
        )


_UID_FIELDS = ("sop_instance_uid", "series_instance_uid", "sop_class_uid", "transfer_syntax_uid")
_ENTRY_FIELDS = frozenset({*_UID_FIELDS, "size", "sha256", "compression", "offset", "length"})


def _uid(value: object, path: str) -> str:
    text = cj.string(value, path)
    if not is_valid_uid(text):
        raise FieldError(f"{path} is not a DICOM UID (PS3.5 §9.1)")
    return text


@dataclass(frozen=True)
class Encryption:
    """How the instances are sealed: the scheme, the ephemeral X25519 public key of the key
    agreement, the segment size, and the commitment to the derived key."""

    ephemeral: bytes
    segment_size: int
    commitment: bytes
    scheme: str = SCHEME

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "ephemeral": cj.b64(self.ephemeral),
            "segment_size": self.segment_size,
            "commitment": cj.b64(self.commitment),
        }

    @staticmethod
    def from_json(value: object, path: str) -> Encryption:
        d = cj.fields(value, path, frozenset({"scheme", "ephemeral", "segment_size", "commitment"}))
        scheme = cj.string(d["scheme"], f"{path}.scheme")
        if scheme != SCHEME:
            raise FieldError(f"{path}.scheme {scheme!r} is not {SCHEME!r}")
        return Encryption(
            cj.binary(d["ephemeral"], f"{path}.ephemeral", PUBLIC_KEY_SIZE),
            cj.integer(
                d["segment_size"], f"{path}.segment_size", MIN_SEGMENT_SIZE, MAX_BUNDLE_SEGMENT_SIZE
            ),
            cj.binary(d["commitment"], f"{path}.commitment", 32),
            scheme,
        )


assert MAX_BUNDLE_SEGMENT_SIZE <= MAX_SEGMENT_SIZE

_MANIFEST_FIELDS = frozenset(
    {
        "format",
        "transfer",
        "created",
        "sender",
        "recipient",
        "encryption",
        "study",
        "instances",
        "data_length",
    }
)


@dataclass(frozen=True)
class Manifest:
    transfer: str
    created: str
    sender: Endpoint
    recipient: Endpoint
    encryption: Encryption
    study: str
    instances: tuple[InstanceEntry, ...]
    data_length: int
    format: str = FORMAT

    def object_id(self, index: int) -> str:
        """The segment format's object id of instance ``index``: binds it to this transfer
        and this place, so instances cannot be swapped or replayed from another bundle."""
        return f"{self.transfer}/{index}"

    def encode(self) -> bytes:
        return cj.encode(
            {
                "format": self.format,
                "transfer": self.transfer,
                "created": self.created,
                "sender": self.sender.to_json(),
                "recipient": self.recipient.to_json(),
                "encryption": self.encryption.to_json(),
                "study": self.study,
                "instances": [entry.to_json() for entry in self.instances],
                "data_length": self.data_length,
            }
        )

    @staticmethod
    def decode(data: bytes) -> Manifest:
        """Strictly: every field present, typed and bounded, nothing unknown, the instances
        contiguous in the data section from offset 0. Raises ``BundleMalformed``."""
        try:
            return Manifest.from_document(cj.decode(data, "the manifest"))
        except FieldError as exc:
            raise BundleMalformed(f"bundle manifest refused: {exc}") from None

    @staticmethod
    def from_document(d: dict[str, Any]) -> Manifest:
        """``decode`` of a document parsed already; raises ``FieldError``."""
        cj.fields(d, "manifest", _MANIFEST_FIELDS)
        fmt = cj.string(d["format"], "format")
        if fmt != FORMAT:
            raise FieldError(f"format {fmt!r} is not {FORMAT!r}")
        transfer = cj.name(d["transfer"], "transfer")
        items = cj.array(d["instances"], "instances", MAX_INSTANCES)
        instances = tuple(
            InstanceEntry.from_json(item, f"instances[{i}]") for i, item in enumerate(items)
        )
        data_length = cj.integer(d["data_length"], "data_length", 0, _MAX_DATA)
        offset = 0
        for i, entry in enumerate(instances):
            if entry.offset != offset:
                raise FieldError(f"instances[{i}].offset is {entry.offset}, not {offset}")
            offset += entry.length
        if offset != data_length:
            raise FieldError(f"data_length is {data_length}; the instances add up to {offset}")
        return Manifest(
            transfer=transfer,
            created=cj.time_field(d["created"], "created"),
            sender=Endpoint.from_json(d["sender"], "sender"),
            recipient=Endpoint.from_json(d["recipient"], "recipient"),
            encryption=Encryption.from_json(d["encryption"], "encryption"),
            study=_uid(d["study"], "study"),
            instances=instances,
            data_length=data_length,
            format=fmt,
        )
