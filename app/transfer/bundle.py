"""Exchange bundles: a study sealed for one partner trust, signed by the sending gateway.

A bundle is ``head || data`` (``docs/EXCHANGE.md`` specifies the bytes)::

    head = magic "\\x89IEXBDL\\n" || uint32 manifest length || manifest || Ed25519 signature
    data = sealed instance 0 || sealed instance 1 || ...

The data comes first when packaging: ``BundleWriter`` streams each instance (hashed,
compressed, sealed) to a sink as it goes, and ``finish`` makes the head, since the manifest
gives each instance's offset and sealed length. A sender may so send head and data as two
tus partial uploads and have the receiver concatenate them.

Receiving checks in this order: the framing (``read_head``), the signature against a key
known for the sender, then the manifest's fields and that it is addressed to this gateway
and trust (``verify``), then the key agreement, the data section's length, and each
instance's segments, size and SHA-256 as it is decrypted (``open_instances``).

An ``InstanceReader`` holds back the last chunk of an instance until its size and SHA-256
were checked: a read either raises or, at the end, has proven every byte it returned. So a
consumer takes an instance as good when it has read it to the end (``read`` returned
``b""``) without an error, never before; what it has written by then must be discarded on
an error. Memory stays bounded (a couple of segments and decompression buffers) whatever the
size of a bundle or what a decompressor is fed.

Blocking and synchronous: callers run it in worker threads, on files.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Protocol, cast

import zstandard

from app.crypto import exchange
from app.crypto.errors import IntegrityError, KeyUnavailable, SignatureInvalid, UnknownKey
from app.crypto.exchange import AgreementPrivateKey, AgreementPublicKey, SigningKey, VerifyKey
from app.crypto.segments import MAX_HEADER_SIZE, MIN_SEGMENT_SIZE, Header, Opener, Sealer
from app.dicom.uids import is_valid_uid
from app.names import is_valid_name
from app.transfer import canonical_json as cj
from app.transfer.canonical_json import FieldError
from app.transfer.manifest import (
    MAX_BUNDLE_SEGMENT_SIZE,
    MAX_MANIFEST_SIZE,
    BundleCorrupt,
    BundleMalformed,
    BundleMisaddressed,
    Compression,
    Encryption,
    Endpoint,
    InstanceEntry,
    InstanceMeta,
    Manifest,
    compression_for,
)
from app.transfer.uploads import BUNDLE

MEDIA_TYPE = BUNDLE
MAGIC = b"\x89IEXBDL\n"
#: What the sender's signature covers, before the manifest bytes.
MANIFEST_CONTEXT = b"iex-bundle-manifest/1\n"
DEFAULT_SEGMENT_SIZE = 1024 * 1024
#: Plaintext handed out per read, and compressed bytes fed to a decompressor per step.
CHUNK = 1024 * 1024
#: zstd frames may ask a decoder for a window of at most this (level 19 and below need no
#: more); a larger one is refused rather than allocated.
ZSTD_MAX_WINDOW = 8 * 1024 * 1024
ZSTD_LEVEL = 3
GZIP_LEVEL = 6
_LENGTH = struct.Struct(">I")
_PREFIX = len(MAGIC) + _LENGTH.size

#: ``key_lookup(gateway, key_id)``: the Ed25519 public key that gateway signs with under that
#: id, or ``LookupError`` (or ``UnknownKey``) when there is none.
KeyLookup = Callable[[str, str], VerifyKey]


class Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...


def encode_head(manifest_bytes: bytes, signature: bytes) -> bytes:
    if len(manifest_bytes) > MAX_MANIFEST_SIZE:
        raise ValueError("the manifest is over the size limit")
    return MAGIC + _LENGTH.pack(len(manifest_bytes)) + manifest_bytes + signature


# -- writing ---------------------------------------------------------------------------------


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _compressor(compression: Compression) -> _Compressor:
    if compression is Compression.ZSTD:
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    if compression is Compression.GZIP:
        return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return _Identity()


def _check_endpoint(endpoint: Endpoint, what: str) -> None:
    if not (is_valid_name(endpoint.gateway) and is_valid_name(endpoint.trust)):
        raise ValueError(f"the {what} gateway and trust must be valid names")
    if cj.KEY_ID.fullmatch(endpoint.key) is None:
        raise ValueError(f"the {what} key id must be 1-64 printable ASCII characters")


class BundleWriter:
    """Packages one transfer: ``add_instance`` for each instance, then ``finish`` for the
    head. The sink receives the data section only; it must not be read as a bundle before
    the head is put in front of it."""

    def __init__(
        self,
        *,
        sender: Endpoint,
        recipient: Endpoint,
        transfer_id: str,
        study: str,
        signing_key: SigningKey,
        recipient_public: AgreementPublicKey,
        sink: Sink,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        created: datetime | None = None,
        ephemeral: AgreementPrivateKey | None = None,
    ) -> None:
        """``created`` defaults to now; ``ephemeral`` is for test vectors only."""
        _check_endpoint(sender, "sender")
        _check_endpoint(recipient, "recipient")
        if not is_valid_name(transfer_id):
            raise ValueError("a transfer id is 1-64 letters, digits, '.', '_' or '-'")
        if not is_valid_uid(study):
            raise ValueError("the study must be a Study Instance UID")
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_BUNDLE_SEGMENT_SIZE:
            raise ValueError(f"segment size must be {MIN_SEGMENT_SIZE}..{MAX_BUNDLE_SEGMENT_SIZE}")
        self._sender = sender
        self._recipient = recipient
        self._transfer = transfer_id
        self._study = study
        self._signing_key = signing_key
        self._sink = sink
        self._segment_size = segment_size
        self._created = cj.timestamp(created or datetime.now(UTC))
        self._ephemeral, self._key = exchange.seal_key(
            recipient_public, recipient.key, transfer_id, ephemeral
        )
        self._entries: list[InstanceEntry] = []
        self._offset = 0
        self.manifest: Manifest | None = None

    def add_instance(
        self,
        meta: InstanceMeta,
        chunks: Iterable[bytes],
        compression: Compression | None = None,
    ) -> InstanceEntry:
        """Hash, compress and seal one instance's bytes (as stored) into the sink.
        ``compression`` defaults to ``compression_for`` its transfer syntax."""
        if self.manifest is not None:
            raise ValueError("the bundle is finished")
        for name in ("sop_instance_uid", "series_instance_uid", "sop_class_uid"):
            if not is_valid_uid(getattr(meta, name)):
                raise ValueError(f"{name} is not a DICOM UID")
        if not is_valid_uid(meta.transfer_syntax_uid):
            raise ValueError("transfer_syntax_uid is not a DICOM UID")
        if compression is None:
            compression = compression_for(meta.transfer_syntax_uid)
        object_id = f"{self._transfer}/{len(self._entries)}"
        sealer = Sealer(self._key.aes, self._recipient.key, object_id, self._segment_size)
        compressor = _compressor(compression)
        digest = hashlib.sha256()
        size = 0
        length = self._write([sealer.header])
        for chunk in chunks:
            size += len(chunk)
            digest.update(chunk)
            compressed = compressor.compress(chunk)
            if compressed:
                length += self._write(sealer.update(compressed))
        tail = compressor.flush()
        if tail:
            length += self._write(sealer.update(tail))
        length += self._write(sealer.finish())
        entry = InstanceEntry(meta, size, digest.hexdigest(), compression, self._offset, length)
        self._entries.append(entry)
        self._offset += length
        return entry

    def _write(self, pieces: Iterable[bytes]) -> int:
        written = 0
        for piece in pieces:
            self._sink.write(piece)
            written += len(piece)
        return written

    def finish(self) -> bytes:
        """Build and sign the manifest; the head to put before the data section."""
        if self.manifest is not None:
            raise ValueError("finish called twice")
        manifest = Manifest(
            transfer=self._transfer,
            created=self._created,
            sender=self._sender,
            recipient=self._recipient,
            encryption=Encryption(self._ephemeral, self._segment_size, self._key.commitment),
            study=self._study,
            instances=tuple(self._entries),
            data_length=self._offset,
        )
        manifest_bytes = manifest.encode()
        signature = exchange.sign(self._signing_key, MANIFEST_CONTEXT, manifest_bytes)
        self.manifest = manifest
        return encode_head(manifest_bytes, signature)


# -- reading the head ------------------------------------------------------------------------


def _read_exactly(f: IO[bytes], size: int) -> bytes:
    parts: list[bytes] = []
    left = size
    while left:
        piece = f.read(left)
        if not piece:
            break
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


@dataclass(frozen=True)
class SignedManifest:
    """A bundle's head as read, nothing of it trusted yet: ``sender`` and ``transfer`` are
    what the manifest claims, to find the key to verify it with."""

    manifest_bytes: bytes
    signature: bytes
    sender: Endpoint
    transfer: str
    _document: dict[str, Any] = field(repr=False, compare=False)

    @property
    def head_size(self) -> int:
        return _PREFIX + len(self.manifest_bytes) + exchange.SIGNATURE_SIZE


def read_head(f: IO[bytes]) -> SignedManifest:
    """Read the head from the start of ``f``: framing and JSON only, at most 16 MiB."""
    prefix = _read_exactly(f, _PREFIX)
    if len(prefix) < _PREFIX:
        raise BundleMalformed("truncated: shorter than a bundle head")
    if prefix[: len(MAGIC)] != MAGIC:
        raise BundleMalformed("not an iex bundle (bad magic)")
    (length,) = _LENGTH.unpack_from(prefix, len(MAGIC))
    if length > MAX_MANIFEST_SIZE:
        raise BundleMalformed(
            f"manifest of {length} bytes is over the limit of {MAX_MANIFEST_SIZE} bytes"
        )
    manifest_bytes = _read_exactly(f, length)
    signature = _read_exactly(f, exchange.SIGNATURE_SIZE)
    if len(manifest_bytes) < length or len(signature) < exchange.SIGNATURE_SIZE:
        raise BundleMalformed("truncated: the head ends before its manifest and signature")
    try:
        document = cj.decode(manifest_bytes, "the manifest")
        sender = Endpoint.from_json(document.get("sender"), "sender")
        transfer = cj.string(document.get("transfer"), "transfer")
    except FieldError as exc:
        raise BundleMalformed(f"bundle manifest refused: {exc}") from None
    return SignedManifest(manifest_bytes, signature, sender, transfer, document)


@dataclass(frozen=True)
class VerifiedBundle:
    """A manifest whose signature verified, addressed to the gateway and trust that asked.
    Only ``verify`` makes one; ``open_instances`` takes nothing else."""

    manifest: Manifest
    #: SHA-256 (hex) of the exact manifest bytes: what a receipt names.
    manifest_sha256: str
    data_offset: int


def verify(
    signed: SignedManifest, key_lookup: KeyLookup, *, gateway: str, trust: str
) -> VerifiedBundle:
    """Check the signature with the sender's key, then the manifest's fields, then that the
    bundle is for ``trust`` at ``gateway``."""
    sender = signed.sender
    try:
        public = key_lookup(sender.gateway, sender.key)
    except LookupError:
        raise UnknownKey(sender.gateway, sender.key) from None
    try:
        exchange.verify(public, MANIFEST_CONTEXT, signed.manifest_bytes, signed.signature)
    except SignatureInvalid:
        raise SignatureInvalid(
            f"the manifest signature of bundle {signed.transfer!r} does not verify against "
            f"key {sender.key!r} of gateway {sender.gateway!r}"
        ) from None
    try:
        manifest = Manifest.from_document(signed._document)
    except FieldError as exc:
        raise BundleMalformed(f"bundle manifest refused: {exc}") from None
    to = manifest.recipient
    if (to.gateway, to.trust) != (gateway, trust):
        raise BundleMisaddressed(
            f"bundle {manifest.transfer!r} is for trust {to.trust!r} at gateway "
            f"{to.gateway!r}, not for trust {trust!r} at gateway {gateway!r}"
        )
    return VerifiedBundle(
        manifest, hashlib.sha256(signed.manifest_bytes).hexdigest(), signed.head_size
    )


# -- reading instances -----------------------------------------------------------------------


def _read_at(f: IO[bytes], offset: int, size: int) -> bytes:
    f.seek(offset)
    return _read_exactly(f, size)


class _SealedInstance:
    """The segments of one sealed instance, opened in order: a source of its compressed
    plaintext with a ``read(size)`` that returns at most one segment's worth."""

    def __init__(
        self, f: IO[bytes], start: int, length: int, key: bytes, key_id: str, object_id: str
    ) -> None:
        self._f = f
        header = Header.decode(_read_at(f, start, min(length, MAX_HEADER_SIZE)), object_id)
        if header.key_id != key_id:
            raise IntegrityError(object_id, f"its segment header names key {header.key_id!r}")
        self.segment_size = header.segment_size
        self._opener = Opener(key, header, object_id, length)
        self._pos = start + header.size
        self._next = 0
        self._buffer = memoryview(b"")

    @property
    def plaintext_size(self) -> int:
        return self._opener.layout.plaintext_size

    @property
    def exhausted(self) -> bool:
        return self._next == self._opener.layout.segments and not self._buffer

    def read(self, size: int = -1) -> bytes:
        layout = self._opener.layout
        while not self._buffer and self._next < layout.segments:
            ciphertext = _read_at(self._f, self._pos, layout.segment_ciphertext_size(self._next))
            self._buffer = memoryview(self._opener.open(self._next, ciphertext))
            self._pos += len(ciphertext)
            self._next += 1
        if size < 0:
            size = len(self._buffer)
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return bytes(out)


class _Gunzip:
    """One gzip member (RFC 1952), never more than ``size`` bytes out per read."""

    def __init__(self, source: _SealedInstance) -> None:
        self._source = source
        self._inflate = zlib.decompressobj(31)

    def read(self, size: int) -> bytes:
        inflate = self._inflate
        while not inflate.eof:
            data = inflate.unconsumed_tail or self._source.read(CHUNK)
            if not data:
                raise zlib.error("the gzip stream ends early")
            out = inflate.decompress(data, size)
            if out:
                return out
        if inflate.unused_data:
            raise zlib.error("bytes follow the gzip member")
        return b""


class _Plain:
    def __init__(self, source: _SealedInstance) -> None:
        self._source = source

    def read(self, size: int) -> bytes:
        return self._source.read(size)


def _decompressor(compression: Compression, source: _SealedInstance) -> _Plain | _Gunzip | Any:
    if compression is Compression.ZSTD:
        # Bounded per read, across frames: bytes after the last frame are an error.
        return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
            cast(IO[bytes], source), read_size=CHUNK, read_across_frames=True
        )
    if compression is Compression.GZIP:
        return _Gunzip(source)
    return _Plain(source)


class InstanceReader(io.RawIOBase):
    """The verified plaintext of one instance of a bundle (its DICOM bytes as stored).

    Plaintext is pulled a ``CHUNK`` at a time and released one chunk behind: the last one
    (so all of an instance of at most ``CHUNK`` bytes) only once the instance's size and
    SHA-256 are checked. When they do not match, ``BundleCorrupt`` is raised instead, and by
    every read after. Reading to the end without an error proves every byte genuine.
    """

    def __init__(
        self, f: IO[bytes], bundle: VerifiedBundle, index: int, key: exchange.BundleKey
    ) -> None:
        super().__init__()
        manifest = bundle.manifest
        self.index = index
        self.entry = manifest.instances[index]
        entry = self.entry
        self._what = (
            f"instance {index} ({entry.meta.sop_instance_uid}) of bundle {manifest.transfer!r}"
        )
        self._error: BundleCorrupt | None = None
        self._digest = hashlib.sha256()
        self._count = 0
        self._held = b""
        self._out = memoryview(b"")
        self._done = False
        try:
            self._sealed = _SealedInstance(
                f,
                bundle.data_offset + entry.offset,
                entry.length,
                key.aes,
                manifest.recipient.key,
                manifest.object_id(index),
            )
        except IntegrityError as exc:
            raise self._fail(exc.reason) from None
        if self._sealed.segment_size != manifest.encryption.segment_size:
            raise self._fail("its segment size is not the manifest's")
        if entry.compression is Compression.NONE and self._sealed.plaintext_size != entry.size:
            raise self._fail(
                f"it seals {self._sealed.plaintext_size} bytes; the manifest says {entry.size}"
            )
        self._plain = _decompressor(entry.compression, self._sealed)

    def _fail(self, reason: str) -> BundleCorrupt:
        self._error = BundleCorrupt(f"{self._what}: {reason}")
        return self._error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._error is not None:
            raise self._error
        while not self._out:
            if self._done:
                return 0
            self._advance()
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def chunks(self) -> Iterator[bytes]:
        """The plaintext in pieces of at most ``CHUNK`` bytes, the last after verification."""
        while True:
            data = self.read(CHUNK)
            if not data:
                return
            yield data

    def _pull(self) -> tuple[bytes, bool]:
        """Up to ``CHUNK`` bytes of plaintext, counted and hashed, and whether they end it."""
        entry = self.entry
        pieces: list[bytes] = []
        got = 0
        while got < CHUNK:
            try:
                piece = self._plain.read(CHUNK - got)
            except IntegrityError as exc:
                raise self._fail(exc.reason) from None
            except (zstandard.ZstdError, zlib.error) as exc:
                reason = f"it does not decompress as {entry.compression.value}: {exc}"
                raise self._fail(reason) from None
            if not piece:
                return b"".join(pieces), True
            self._count += len(piece)
            if self._count > entry.size:
                # A decompression bomb, or a lying manifest: stop at the declared size.
                raise self._fail(f"it decompresses to more than its declared {entry.size} bytes")
            self._digest.update(piece)
            pieces.append(piece)
            got += len(piece)
        return b"".join(pieces), False

    def _advance(self) -> None:
        """Release what was held, and hold what was pulled; at the end, verify first."""
        chunk, end = self._pull()
        if not end:
            self._out, self._held = memoryview(self._held), chunk
            return
        entry = self.entry
        if not self._sealed.exhausted:
            raise self._fail(f"sealed bytes follow the end of its {entry.compression.value} data")
        if self._count != entry.size:
            raise self._fail(f"it is {self._count} bytes; the manifest says {entry.size}")
        if self._digest.hexdigest() != entry.sha256:
            raise self._fail("its SHA-256 does not match the manifest")
        self._out, self._held = memoryview(self._held + chunk), b""
        self._done = True


def _size(f: IO[bytes]) -> int:
    return f.seek(0, io.SEEK_END)


def open_instances(
    f: IO[bytes], bundle: VerifiedBundle, recipient_private: AgreementPrivateKey
) -> Iterator[InstanceReader]:
    """A reader for each instance, in manifest order. ``f`` is the whole bundle, seekable;
    readers seek for every read, so they may be read in any order, one at a time."""
    manifest = bundle.manifest
    try:
        key = exchange.open_key(
            recipient_private,
            manifest.encryption.ephemeral,
            manifest.recipient.key,
            manifest.transfer,
        )
    except KeyUnavailable as exc:
        raise BundleMisaddressed(f"bundle {manifest.transfer!r}: {exc.detail}") from None
    if not key.matches(manifest.encryption.commitment):
        raise BundleMisaddressed(
            f"bundle {manifest.transfer!r} is sealed for another X25519 key than the one "
            f"given for recipient key {manifest.recipient.key!r}"
        )
    expected = bundle.data_offset + manifest.data_length
    actual = _size(f)
    if actual < expected:
        raise BundleCorrupt(
            f"bundle {manifest.transfer!r} is truncated: {actual} bytes of {expected}"
        )
    if actual > expected:
        raise BundleCorrupt(
            f"bundle {manifest.transfer!r} has {actual - expected} bytes after its data"
        )
    for index in range(len(manifest.instances)):
        yield InstanceReader(f, bundle, index, key)
