"""Receipts: the receiving gateway's signed word on what became of a bundle.

A receipt names the transfer, the SHA-256 of the exact manifest bytes it answers, the
result (``stored``, or ``refused`` with a reason), how many instances were stored and when,
and the receiving gateway, trust and signing key. The receiver signs the receipt's canonical
JSON with its Ed25519 key; the document on the wire embeds that text as a string, so the
signature is checked over the very bytes that were signed, never over a re-encoding::

    {"receipt": "<canonical JSON text>", "signature": "<base64 of 64 bytes>"}

A sender marks a transfer delivered only after ``verify_receipt`` accepted a ``stored``
receipt from the recipient it sent to, for the manifest it sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from app.crypto import exchange
from app.crypto.errors import SignatureInvalid, UnknownKey
from app.crypto.exchange import SigningKey
from app.errors import BadRequest
from app.transfer import canonical_json as cj
from app.transfer.bundle import KeyLookup
from app.transfer.canonical_json import FieldError
from app.transfer.manifest import MAX_INSTANCES, Endpoint

FORMAT = "iex-receipt/1"
RECEIPT_CONTEXT = b"iex-receipt/1\n"
#: A receipt document is small; a larger one is refused before it is parsed.
MAX_RECEIPT_SIZE = 64 * 1024
MAX_REASON = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset(
    {"format", "transfer", "manifest_sha256", "result", "instances", "time", "receiver"}
)

Result = Literal["stored", "refused"]


class ReceiptInvalid(BadRequest):
    """A receipt that is malformed, or that does not answer the transfer it is taken for."""


@dataclass(frozen=True)
class Receipt:
    transfer: str
    manifest_sha256: str
    result: Result
    instances: int
    time: str
    receiver: Endpoint
    reason: str | None = None
    format: str = FORMAT

    def __post_init__(self) -> None:
        if (self.result == "refused") != (self.reason is not None):
            raise ValueError("a refused receipt has a reason, a stored one none")

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format": self.format,
            "transfer": self.transfer,
            "manifest_sha256": self.manifest_sha256,
            "result": self.result,
            "instances": self.instances,
            "time": self.time,
            "receiver": self.receiver.to_json(),
        }
        if self.reason is not None:
            document["reason"] = self.reason
        return document

    @staticmethod
    def from_document(d: dict[str, Any]) -> Receipt:
        cj.fields(d, "receipt", _FIELDS, frozenset({"reason"}))
        fmt = cj.string(d["format"], "format")
        if fmt != FORMAT:
            raise FieldError(f"format {fmt!r} is not {FORMAT!r}")
        result = cj.string(d["result"], "result")
        if result not in ("stored", "refused"):
            raise FieldError(f"result {result!r} is not 'stored' or 'refused'")
        reason = None
        if "reason" in d:
            reason = cj.string(d["reason"], "reason", max_length=MAX_REASON)
        if (result == "refused") != (reason is not None):
            raise FieldError("a refused receipt needs a reason, and a stored one has none")
        return Receipt(
            transfer=cj.name(d["transfer"], "transfer"),
            manifest_sha256=cj.string(d["manifest_sha256"], "manifest_sha256", pattern=_SHA256),
            result="stored" if result == "stored" else "refused",
            instances=cj.integer(d["instances"], "instances", 0, MAX_INSTANCES),
            time=cj.time_field(d["time"], "time"),
            receiver=Endpoint.from_json(d["receiver"], "receiver"),
            reason=reason,
            format=fmt,
        )


def sign_receipt(receipt: Receipt, private: SigningKey) -> bytes:
    """The receipt document: its canonical text and the signature over it."""
    text = cj.encode(receipt.to_json())
    signature = exchange.sign(private, RECEIPT_CONTEXT, text)
    return cj.encode({"receipt": text.decode("utf-8"), "signature": cj.b64(signature)})


def verify_receipt(
    document: bytes,
    key_lookup: KeyLookup,
    *,
    expect_transfer: str,
    expect_manifest_sha256: str,
    expect_receiver: Endpoint,
) -> Receipt:
    """The receipt, once its signature verified against the receiver's key and it answers
    this transfer and manifest from the gateway and trust it was sent to (their key id is
    not compared: the receipt names the key it was signed with)."""
    if len(document) > MAX_RECEIPT_SIZE:
        raise ReceiptInvalid(f"a receipt of {len(document)} bytes is over the limit")
    try:
        outer = cj.fields(
            cj.decode(document, "the receipt document"),
            "receipt document",
            frozenset({"receipt", "signature"}),
        )
        text = cj.string(outer["receipt"], "receipt", max_length=MAX_RECEIPT_SIZE)
        signature = cj.binary(outer["signature"], "signature", exchange.SIGNATURE_SIZE)
        signed = text.encode("utf-8")
        inner = cj.decode(signed, "the receipt")
        receiver = Endpoint.from_json(inner.get("receiver"), "receiver")
    except FieldError as exc:
        raise ReceiptInvalid(f"receipt refused: {exc}") from None
    try:
        public = key_lookup(receiver.gateway, receiver.key)
    except LookupError:
        raise UnknownKey(receiver.gateway, receiver.key) from None
    try:
        exchange.verify(public, RECEIPT_CONTEXT, signed, signature)
    except SignatureInvalid:
        raise SignatureInvalid(
            f"the receipt signature does not verify against key {receiver.key!r} of "
            f"gateway {receiver.gateway!r}"
        ) from None
    try:
        receipt = Receipt.from_document(inner)
    except FieldError as exc:
        raise ReceiptInvalid(f"receipt refused: {exc}") from None
    if receipt.transfer != expect_transfer:
        raise ReceiptInvalid(
            f"the receipt answers transfer {receipt.transfer!r}, not {expect_transfer!r}"
        )
    if receipt.manifest_sha256 != expect_manifest_sha256:
        raise ReceiptInvalid(
            f"the receipt for transfer {expect_transfer!r} answers another manifest "
            f"(SHA-256 {receipt.manifest_sha256})"
        )
    got = (receipt.receiver.gateway, receipt.receiver.trust)
    if got != (expect_receiver.gateway, expect_receiver.trust):
        raise ReceiptInvalid(
            f"the receipt for transfer {expect_transfer!r} comes from trust {got[1]!r} at "
            f"gateway {got[0]!r}, not from the recipient"
        )
    return receipt
