"""Signatures with domain separation, and the bundle key agreement."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from app.crypto import exchange
from app.crypto.errors import KeyUnavailable, SignatureInvalid

SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
RECIPIENT = X25519PrivateKey.from_private_bytes(bytes(range(64, 96)))


def test_a_signature_is_bound_to_its_context() -> None:
    payload = b'{"transfer":"tr-1"}'
    signature = exchange.sign(SIGNER, b"iex-bundle-manifest/1\n", payload)
    exchange.verify(SIGNER.public_key(), b"iex-bundle-manifest/1\n", payload, signature)
    with pytest.raises(SignatureInvalid):
        exchange.verify(SIGNER.public_key(), b"iex-receipt/1\n", payload, signature)
    with pytest.raises(SignatureInvalid):
        exchange.verify(SIGNER.public_key(), b"iex-bundle-manifest/1\n", payload + b" ", signature)
    with pytest.raises(SignatureInvalid, match="64 bytes, not 63"):
        exchange.verify(SIGNER.public_key(), b"iex-bundle-manifest/1\n", payload, signature[1:])


@pytest.mark.parametrize("context", [b"", b"no-newline", b"two\nlines\n", b"\n"])
def test_contexts_are_single_lines(context: bytes) -> None:
    with pytest.raises(ValueError):
        exchange.sign(SIGNER, context, b"x")


def test_both_sides_derive_the_same_key_for_one_transfer_and_key_id() -> None:
    eph, key = exchange.seal_key(RECIPIENT.public_key(), "x25519-1", "tr-1")
    assert len(eph) == 32 and len(key.aes) == 32 and len(key.commitment) == 32
    opened = exchange.open_key(RECIPIENT, eph, "x25519-1", "tr-1")
    assert opened.aes == key.aes and opened.matches(key.commitment)
    assert "aes" not in repr(key) and key.aes.hex() not in repr(key)
    for kid, transfer in (("x25519-2", "tr-1"), ("x25519-1", "tr-2")):
        assert exchange.open_key(RECIPIENT, eph, kid, transfer).aes != key.aes
    other = X25519PrivateKey.generate()
    assert not exchange.open_key(other, eph, "x25519-1", "tr-1").matches(key.commitment)
    eph2, key2 = exchange.seal_key(RECIPIENT.public_key(), "x25519-1", "tr-1")
    assert eph2 != eph and key2.aes != key.aes  # one ephemeral key per bundle


def test_a_low_order_ephemeral_key_is_refused() -> None:
    with pytest.raises(KeyUnavailable, match="all-zero"):
        exchange.open_key(RECIPIENT, bytes(32), "x25519-1", "tr-1")
