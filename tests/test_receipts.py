"""Receipts: signed by the receiver, checked by the sender before a transfer is delivered."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.crypto.errors import SignatureInvalid, UnknownKey
from app.transfer.manifest import Endpoint
from app.transfer.receipts import Receipt, ReceiptInvalid, sign_receipt, verify_receipt

RECEIVER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(200, 232)))
RECEIVER = Endpoint("south-gw", "royal-east", "sig-south-1")
MANIFEST_SHA = "ab" * 32


def lookup(gateway: str, key_id: str) -> Ed25519PublicKey:
    return {("south-gw", "sig-south-1"): RECEIVER_KEY.public_key()}[(gateway, key_id)]


def stored(**changes: Any) -> Receipt:
    fields: dict[str, Any] = {
        "transfer": "tr-1",
        "manifest_sha256": MANIFEST_SHA,
        "result": "stored",
        "instances": 6,
        "time": "2024-05-01T12:00:05Z",
        "receiver": RECEIVER,
    }
    return Receipt(**{**fields, **changes})


def check(document: bytes, **expect: Any) -> Receipt:
    return verify_receipt(
        document,
        lookup,
        expect_transfer=expect.get("transfer", "tr-1"),
        expect_manifest_sha256=expect.get("sha", MANIFEST_SHA),
        expect_receiver=expect.get("receiver", Endpoint("south-gw", "royal-east", "x25519-1")),
    )


def test_sign_and_verify() -> None:
    receipt = stored()
    document = sign_receipt(receipt, RECEIVER_KEY)
    outer = orjson.loads(document)
    assert set(outer) == {"receipt", "signature"}
    text = outer["receipt"].encode()
    RECEIVER_KEY.public_key().verify(
        base64.b64decode(outer["signature"]), b"iex-receipt/1\n" + text
    )
    assert check(document) == receipt


def test_refused_receipt_carries_its_reason() -> None:
    receipt = stored(result="refused", reason="instance 2: its SHA-256 does not match", instances=0)
    assert check(sign_receipt(receipt, RECEIVER_KEY)).reason == receipt.reason
    with pytest.raises(ValueError):
        stored(result="refused")
    with pytest.raises(ValueError):
        stored(reason="why not")


def _retext(document: bytes, edit: Any) -> bytes:
    outer = orjson.loads(document)
    inner = orjson.loads(outer["receipt"])
    edit(inner)
    outer["receipt"] = orjson.dumps(inner, option=orjson.OPT_SORT_KEYS).decode()
    return orjson.dumps(outer, option=orjson.OPT_SORT_KEYS)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(instances=5),
        lambda r: r.update(result="refused", reason="no"),
        lambda r: r.update(manifest_sha256="cd" * 32),
        lambda r: r.update(time="2024-05-01T12:00:06Z"),
    ],
)
def test_tampered_receipt_fails_its_signature(edit: Any) -> None:
    document = _retext(sign_receipt(stored(), RECEIVER_KEY), edit)
    with pytest.raises(SignatureInvalid, match="key 'sig-south-1' of gateway 'south-gw'"):
        check(document)


def test_flipped_bytes_are_detected() -> None:
    document = sign_receipt(stored(), RECEIVER_KEY)
    for position in range(0, len(document), 7):
        raw = bytearray(document)
        raw[position] ^= 0x01
        with pytest.raises((SignatureInvalid, ReceiptInvalid, UnknownKey)):
            check(bytes(raw))


def test_wrong_transfer_manifest_or_receiver() -> None:
    document = sign_receipt(stored(), RECEIVER_KEY)
    with pytest.raises(ReceiptInvalid, match="answers transfer 'tr-1', not 'tr-2'"):
        check(document, transfer="tr-2")
    with pytest.raises(ReceiptInvalid, match="answers another manifest"):
        check(document, sha="cd" * 32)
    with pytest.raises(ReceiptInvalid, match="comes from trust 'royal-east' at gateway 'south-gw'"):
        check(document, receiver=Endpoint("south-gw", "st-elsewhere", "x25519-1"))


def test_unknown_key() -> None:
    other = Endpoint("south-gw", "royal-east", "sig-south-2")
    document = sign_receipt(stored(receiver=other), RECEIVER_KEY)
    with pytest.raises(UnknownKey, match="'sig-south-2' is known for gateway 'south-gw'"):
        check(document)


def test_signed_by_another_key() -> None:
    impostor = Ed25519PrivateKey.from_private_bytes(bytes(32))
    with pytest.raises(SignatureInvalid):
        check(sign_receipt(stored(), impostor))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"[]", "not a JSON object"),
        (b'{"receipt":"{}"}', "lacks signature"),
        (b'{"receipt":"x","signature":"AAAA"}', "signature is not the base64 of 64 bytes"),
        (b"{" + b" " * 70_000 + b"}", "over the limit"),
    ],
)
def test_malformed_documents(document: bytes, message: str) -> None:
    with pytest.raises(ReceiptInvalid, match=message):
        check(document)


def test_malformed_but_signed_receipt() -> None:
    """A receiver's bug, not an attack: the signature holds, the fields do not."""
    text = orjson.dumps({**stored().to_json(), "result": "maybe"}, option=orjson.OPT_SORT_KEYS)
    signature = RECEIVER_KEY.sign(b"iex-receipt/1\n" + text)
    document = orjson.dumps(
        {"receipt": text.decode(), "signature": base64.b64encode(signature).decode()},
        option=orjson.OPT_SORT_KEYS,
    )
    with pytest.raises(ReceiptInvalid, match="result 'maybe' is not"):
        check(document)
