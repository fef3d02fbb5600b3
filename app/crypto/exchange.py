"""The cryptography of exchange between gateways: signatures and the recipient key of a bundle.

Two primitives, both pure (no I/O):

* ``sign``/``verify``: Ed25519 over ``context || payload``. The context is one line naming
  what is signed (``b"iex-bundle-manifest/1\\n"``), so a signature made for one kind of
  document can never be taken for another (a receipt for a manifest, say): contexts end with
  their only newline, so none is a prefix of another.
* ``seal_key``/``open_key``: one ephemeral X25519 agreement per bundle with the recipient
  trust's X25519 key, then HKDF-SHA256 into a 32-byte AES-256-GCM key for the segment format
  of ``app.crypto.segments`` and a 32-byte key commitment that the signed manifest carries.
  The salt binds both public keys, the info the format, the transfer and the recipient key
  id, so a key is good for one bundle to one recipient key only.

``docs/EXCHANGE.md`` specifies the bytes. Key objects are ``cryptography``'s; the aliases
below let the layers above name them without importing ``cryptography`` themselves.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from app.crypto.errors import KeyUnavailable, SignatureInvalid
from app.crypto.segments import KEY_SIZE

SigningKey = Ed25519PrivateKey
VerifyKey = Ed25519PublicKey
AgreementPrivateKey = X25519PrivateKey
AgreementPublicKey = X25519PublicKey

SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
#: HKDF info prefix: the key derivation of format version 1.
KEY_INFO = b"iex-bundle-key/1"
_ZERO = bytes(32)


@dataclass(frozen=True)
class BundleKey:
    """What one bundle's key agreement yields: the AES-256-GCM key that seals its instances
    and the commitment to it that the manifest carries (so a wrong private key is told
    apart from altered data before any segment is opened)."""

    aes: bytes
    commitment: bytes

    def __repr__(self) -> str:  # never show key bytes in logs or tracebacks
        return "BundleKey(...)"

    def matches(self, commitment: bytes) -> bool:
        return hmac.compare_digest(self.commitment, commitment)


def _check_context(context: bytes) -> None:
    if not context.endswith(b"\n") or b"\n" in context[:-1] or len(context) < 2:
        raise ValueError("a signature context is one line ending in its only newline")


def sign(private: SigningKey, context: bytes, payload: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of ``context || payload``."""
    _check_context(context)
    return private.sign(context + payload)


def verify(public: VerifyKey, context: bytes, payload: bytes, signature: bytes) -> None:
    """Raise ``SignatureInvalid`` unless ``signature`` is ``public``'s over ``context ||
    payload``. The message says only that; callers add what was signed and by whom."""
    _check_context(context)
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureInvalid(f"a signature is {SIGNATURE_SIZE} bytes, not {len(signature)}")
    try:
        public.verify(signature, context + payload)
    except InvalidSignature:
        raise SignatureInvalid("the signature does not verify") from None


def public_raw(key: VerifyKey | AgreementPublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 or X25519 public key (RFC 8032, RFC 7748)."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _info(recipient_key_id: str, transfer_id: str) -> bytes:
    out = bytearray(KEY_INFO)
    for field in (transfer_id, recipient_key_id):
        raw = field.encode("utf-8")
        out += struct.pack(">H", len(raw)) + raw
    return bytes(out)


def _derive(
    shared: bytes, ephemeral_raw: bytes, recipient_raw: bytes, recipient_key_id: str, transfer: str
) -> BundleKey:
    if hmac.compare_digest(shared, _ZERO):
        # A low-order point: the "shared" secret would be known to anyone (RFC 7748 §6.1).
        raise KeyUnavailable("the ephemeral key agreement gave an all-zero secret")
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * KEY_SIZE,
        salt=ephemeral_raw + recipient_raw,
        info=_info(recipient_key_id, transfer),
    ).derive(shared)
    return BundleKey(okm[:KEY_SIZE], okm[KEY_SIZE:])


def seal_key(
    recipient_public: AgreementPublicKey,
    recipient_key_id: str,
    transfer_id: str,
    ephemeral: AgreementPrivateKey | None = None,
) -> tuple[bytes, BundleKey]:
    """A fresh ephemeral key pair, agreed with the recipient's key: the ephemeral public key
    (32 raw bytes, for the manifest) and the bundle's key. ``ephemeral`` is for test
    vectors only: a key must never seal two bundles."""
    eph = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    eph_raw = public_raw(eph.public_key())
    try:
        shared = eph.exchange(recipient_public)
    except ValueError as exc:  # OpenSSL refuses low-order points itself
        raise KeyUnavailable("the recipient's X25519 key is not usable") from exc
    return eph_raw, _derive(
        shared, eph_raw, public_raw(recipient_public), recipient_key_id, transfer_id
    )


def open_key(
    recipient_private: AgreementPrivateKey,
    ephemeral_public_raw: bytes,
    recipient_key_id: str,
    transfer_id: str,
) -> BundleKey:
    """The bundle's key, on the recipient's side."""
    if len(ephemeral_public_raw) != PUBLIC_KEY_SIZE:
        raise KeyUnavailable(f"an X25519 public key is {PUBLIC_KEY_SIZE} bytes")
    ephemeral = X25519PublicKey.from_public_bytes(ephemeral_public_raw)
    try:
        shared = recipient_private.exchange(ephemeral)
    except ValueError as exc:
        raise KeyUnavailable("the ephemeral key agreement gave an all-zero secret") from exc
    recipient_raw = public_raw(recipient_private.public_key())
    return _derive(shared, ephemeral_public_raw, recipient_raw, recipient_key_id, transfer_id)
