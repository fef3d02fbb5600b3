"""The identity keys in the keyring (``DataKeys``) and the identity document's encoder and
strict decoder (``app.crypto.identity``), on real key files."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from app.crypto.errors import KeyUnavailable
from app.crypto.identity import (
    ExchangeKey,
    IdentityDocument,
    SigningKey,
    decode_identity,
    encode_identity,
    identity_document,
)
from app.crypto.keys import unwrap
from app.crypto.keystore import DataKeys
from app.errors import BadRequest
from app.services.keys import key_store, open_data_keys, rotate_identity


def _open(data_dir: Path) -> DataKeys:
    return open_data_keys(data_dir, None)


def test_identity_keys_are_made_once_saved_wrapped_and_found_again(tmp_path: Path) -> None:
    keys = _open(tmp_path)
    signing = keys.signing_key()
    exchange = keys.exchange_key("rad-a")
    assert signing.id.startswith("sig-") and exchange.id.startswith("xch-")
    assert keys.signing_key() == signing and keys.exchange_key("rad-a") == exchange
    # A usable key pair of each algorithm.
    Ed25519PrivateKey.from_private_bytes(signing.private)
    X25519PrivateKey.from_private_bytes(exchange.private)
    public = X25519PrivateKey.from_private_bytes(exchange.private).public_key()
    assert exchange.public == public.public_bytes_raw()

    # Another process (a new opening of the keyring) finds the same keys, by id too.
    again = _open(tmp_path)
    assert again.signing_key() == signing
    assert again.exchange_key("rad-a") == exchange
    assert again.exchange_key_by_id(exchange.id) == exchange
    assert again.signing_keys() == [(signing, True)]

    saved = (tmp_path / "keys" / "keyring.json").read_bytes()
    for secret in (signing.private, exchange.private):
        assert secret not in saved and base64.b64encode(secret) not in saved
    owners = {k["id"]: k["trust"] for k in json.loads(saved)["keys"]}
    assert owners[signing.id] == "@signing" and owners[exchange.id] == "@exchange:rad-a"


def test_reprs_never_show_private_keys(tmp_path: Path) -> None:
    keys = _open(tmp_path)
    for key in (keys.signing_key(), keys.exchange_key("rad-a")):
        assert key.private.hex() not in repr(key)
        assert repr(key.private) not in repr(key)
        assert key.id in repr(key)


def test_a_wrapped_key_cannot_change_owner(tmp_path: Path) -> None:
    """The owner is bound by the wrapping: a signing key relabelled as a trust's exchange
    key (or a data key) does not unwrap."""
    keys = _open(tmp_path)
    signing = keys.signing_key()
    wrapped = next(w for w in keys.ring.wrapped_keys if w.id == signing.id)
    assert unwrap(keys.ring.kek, wrapped) == signing.private
    for owner in ("@exchange:rad-a", "rad-a", "@index"):
        moved = type(wrapped)(**{**wrapped.__dict__, "trust": owner})
        with pytest.raises(KeyUnavailable, match="does not open"):
            unwrap(keys.ring.kek, moved)


def test_identity_keys_are_not_data_keys(tmp_path: Path) -> None:
    """An object header naming an identity key is not decrypted with it."""
    keys = _open(tmp_path)
    for key_id in (keys.signing_key().id, keys.exchange_key("rad-a").id):
        with pytest.raises(KeyUnavailable, match="identity key"):
            keys.key(key_id)
    dek_id, _ = keys.for_writing("rad-a")
    with pytest.raises(KeyUnavailable, match="not an exchange key"):
        keys.exchange_key_by_id(dek_id)


def test_ensure_identity_makes_only_what_is_missing(tmp_path: Path) -> None:
    keys = _open(tmp_path)
    made = keys.ensure_identity(["local", "rad-a"])
    assert len(made) == 3
    assert keys.ensure_identity(["rad-a", "local"]) == []
    assert [k for k in keys.ensure_identity(["local", "rad-b"])] == [keys.exchange_key("rad-b").id]
    assert {w.trust for w in _open(tmp_path).ring.wrapped_keys} >= {
        "@signing",
        "@exchange:local",
        "@exchange:rad-a",
        "@exchange:rad-b",
    }


def test_rotation_keeps_the_old_keys_retired(tmp_path: Path) -> None:
    keys = _open(tmp_path)
    old_signing = keys.signing_key()
    old_exchange = keys.exchange_key("rad-a")
    rotated = rotate_identity(tmp_path, None, ["local"])
    assert set(rotated.exchange_keys) == {"local", "rad-a"}  # the listed and the known trusts

    after = _open(tmp_path)
    assert after.signing_key().id == rotated.signing_key != old_signing.id
    assert after.exchange_key("rad-a").id == rotated.exchange_keys["rad-a"] != old_exchange.id
    assert after.signing_keys() == [(old_signing, False), (after.signing_key(), True)]
    assert after.exchange_key_by_id(old_exchange.id) == old_exchange


def _document(keys: DataKeys, **changes: Any) -> IdentityDocument:
    keys.signing_key()  # made on first use
    signing, exchange = keys.signing_keys(), [keys.exchange_key("rad-a")]
    doc = identity_document("gw-a", "https://gw-a.example:8443/", signing, exchange, None)
    return IdentityDocument(**{**doc.__dict__, **changes})


def test_the_document_round_trips_with_public_keys_only(tmp_path: Path) -> None:
    keys = _open(tmp_path)
    doc = _document(keys, tls_sha256="ab" * 32)
    text = encode_identity(doc)
    assert decode_identity(text) == doc
    data = json.loads(text)
    assert list(data) == [
        "format", "gateway", "url", "signing_keys", "trusts", "tls_sha256", "created",
    ]  # fmt: skip
    assert data["format"] == "iex-identity/1" and data["url"] == "https://gw-a.example:8443"
    signing, exchange = keys.signing_key(), keys.exchange_key("rad-a")
    assert data["signing_keys"] == [
        {
            "id": signing.id,
            "algorithm": "Ed25519",
            "public": base64.b64encode(signing.public).decode(),
            "active": True,
        }
    ]
    assert data["trusts"][0]["exchange_key"]["public"] == base64.b64encode(exchange.public).decode()
    for secret in (signing.private, exchange.private):
        assert base64.b64encode(secret).decode() not in text
    assert "tls_sha256" not in encode_identity(_document(keys))


def _valid(tmp_path: Path) -> dict[str, Any]:
    keys = _open(tmp_path)
    keys.signing_key()
    rotate_identity(tmp_path, None, ["rad-a", "rad-b"])  # a retired signing key too
    data: dict[str, Any] = json.loads(encode_identity(_document(_open(tmp_path))))
    return data


BAD_DOCUMENTS = [
    # (change to a valid document, the field the error names)
    (lambda d: d.update(format="iex-identity/2"), "format"),
    (lambda d: d.pop("gateway"), "'gateway'"),
    (lambda d: d.pop("signing_keys"), "'signing_keys'"),
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
    (lambda d: d.update(gateway="bad name"), "gateway"),
    (lambda d: d.update(gateway="@signing"), "gateway"),
    (lambda d: d.update(url="ftp://gw.example"), "url"),
    (lambda d: d.update(url="https://user:pw@gw.example"), "url"),
    (lambda d: d.update(url=42), "url"),
    (lambda d: d.update(signing_keys=[]), "signing_keys is empty"),
    (lambda d: d.update(signing_keys={}), "signing_keys must be a JSON array"),
    (lambda d: d["signing_keys"][0].update(public="not base64!"), "signing_keys[0].public"),
    (
        lambda d: d["signing_keys"][0].update(public=base64.b64encode(b"x" * 31).decode()),
        "signing_keys[0].public holds 31 bytes",
    ),
    (lambda d: d["signing_keys"][0].update(algorithm="RSA"), "signing_keys[0].algorithm"),
    (lambda d: d["signing_keys"][0].update(active="yes"), "signing_keys[0].active"),
    (lambda d: d["signing_keys"][0].pop("id"), "signing_keys[0] lacks the field 'id'"),
    (lambda d: d["signing_keys"][0].update(id="sig/../x"), "signing_keys[0].id"),
    (lambda d: d["signing_keys"][0].update(active=True), "exactly one"),
    (lambda d: d["signing_keys"][1].update(active=False), "exactly one"),
    (lambda d: d["signing_keys"][1].update(id=d["signing_keys"][0]["id"]), "twice"),
    (lambda d: d["trusts"][0]["exchange_key"].update(id=d["signing_keys"][0]["id"]), "twice"),
    (lambda d: d["trusts"].append(d["trusts"][0]), "the trust 'rad-a' twice"),
    (lambda d: d["trusts"][0].update(trust="no such/trust"), "trusts[0].trust"),
    (
        lambda d: d["trusts"][0]["exchange_key"].update(algorithm="Ed25519"),
        "trusts[0].exchange_key.algorithm",
    ),
    (
        lambda d: d["trusts"][0]["exchange_key"].update(public="AAAA"),
        "trusts[0].exchange_key.public holds 3 bytes",
    ),
    (lambda d: d["trusts"][0].pop("exchange_key"), "trusts[0] lacks the field 'exchange_key'"),
    (lambda d: d.update(tls_sha256="AB" * 32), "tls_sha256"),
    (lambda d: d.update(tls_sha256="ab"), "tls_sha256"),
    (lambda d: d.update(created="yesterday"), "created"),
]


@pytest.mark.parametrize(("change", "field"), BAD_DOCUMENTS)
def test_the_decoder_refuses_and_names_the_field(tmp_path: Path, change: Any, field: str) -> None:
    data = _valid(tmp_path)
    decode_identity(json.dumps(data))  # valid before the change
    change(data)
    with pytest.raises(BadRequest, match="identity document") as refused:
        decode_identity(json.dumps(data))
    assert field in refused.value.detail


def test_the_decoder_refuses_what_is_not_a_document() -> None:
    for text, problem in (
        ("not json", "not JSON"),
        ("[]", "must be a JSON object"),
        ('{"format": "iex-identity/1", "format": "x"}', "'format' appears twice"),
        (" " * (1024 * 1024 + 1), "larger than"),
    ):
        with pytest.raises(BadRequest, match=problem):
            decode_identity(text)


def test_keys_in_their_frozen_types() -> None:
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    key = SigningKey("sig-1", seed)
    assert key.public == Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    with pytest.raises(AttributeError):
        key.id = "other"  # type: ignore[misc]
    scalar = X25519PrivateKey.generate().private_bytes_raw()
    assert ExchangeKey("xch-1", "rad-a", scalar).private_key().private_bytes_raw() == scalar


def test_key_store_keeps_identity_keys_through_a_kek_rotation(tmp_path: Path) -> None:
    keys = _open(tmp_path)
    signing, exchange = keys.signing_key(), keys.exchange_key("rad-a")
    key_store(tmp_path).rotate_kek(keys.ring, None)
    after = _open(tmp_path)
    assert after.signing_key() == signing and after.exchange_key_by_id(exchange.id) == exchange
