"""A gateway's identity: its signing keys, its trusts' exchange keys, and the document that
tells partners about them. Pure: no I/O; the keys are kept wrapped in the keyring
(``app.crypto.keystore``).

Each gateway signs what it sends (bundle manifests, receipts) with an Ed25519 key, and each
of its trusts receives with its own X25519 key, so that a bundle for one trust opens only for
that trust. Private keys are the raw 32 bytes that RFC 8032 and RFC 7748 define (an Ed25519
seed, an X25519 scalar); public keys travel as the base64 of their raw 32 bytes.

The keys live in the keyring under owners that no trust name can take (trust names start
with a letter or digit): ``@signing`` and ``@exchange:<trust>``. Wrapping binds the owner,
so a key cannot be moved to another owner. A rotation makes new keys and keeps the old ones,
inactive: partners still verify what was signed before it, and bundles in flight to an old
exchange key still open.

The identity document (``iex-identity/1``) is what partners import; its decoder is strict,
since what it accepts decides whose signatures a gateway will believe.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from app.errors import BadRequest
from app.names import is_valid_name

IDENTITY_FORMAT = "iex-identity/1"
SIGNING_ALGORITHM = "Ed25519"
EXCHANGE_ALGORITHM = "X25519"
#: Raw private and public keys of both algorithms are 32 bytes.
RAW_KEY_SIZE = 32

#: Keyring owners of identity keys; a trust name never starts with ``@``.
SIGNING_OWNER = "@signing"
EXCHANGE_OWNER_PREFIX = "@exchange:"
#: Key id prefixes, so that a key id says what kind of key it names (data keys: ``dek-``).
SIGNING_PREFIX = "sig-"
EXCHANGE_PREFIX = "xch-"

#: An identity document is a few kilobytes; this bounds what the decoder reads.
MAX_DOCUMENT_BYTES = 1024 * 1024
_MAX_KEYS = 1000
_TIME = "%Y-%m-%dT%H:%M:%SZ"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DOCUMENT_FIELDS = frozenset({"format", "gateway", "url", "signing_keys", "trusts", "created"})


def exchange_owner(trust: str) -> str:
    """The keyring owner of ``trust``'s exchange keys."""
    return EXCHANGE_OWNER_PREFIX + trust


def exchange_trust(owner: str) -> str | None:
    """The trust whose exchange keys ``owner`` holds, or ``None`` for another owner."""
    return owner[len(EXCHANGE_OWNER_PREFIX) :] if owner.startswith(EXCHANGE_OWNER_PREFIX) else None


def is_identity_owner(owner: str) -> bool:
    return owner == SIGNING_OWNER or owner.startswith(EXCHANGE_OWNER_PREFIX)


# -- private keys ------------------------------------------------------------------------------


def new_signing_private() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes_raw()


def new_exchange_private() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


@dataclass(frozen=True)
class SigningKey:
    """The gateway's Ed25519 key: ``private`` is the raw 32-byte seed."""

    id: str
    private: bytes = field(repr=False)

    def private_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.private)

    @property
    def public(self) -> bytes:
        return self.private_key().public_key().public_bytes_raw()


@dataclass(frozen=True)
class ExchangeKey:
    """A trust's X25519 key, which bundles for that trust are sealed to."""

    id: str
    trust: str
    private: bytes = field(repr=False)

    def private_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.private)

    @property
    def public(self) -> bytes:
        return self.private_key().public_key().public_bytes_raw()


# -- public keys -------------------------------------------------------------------------------


def encode_public(raw: bytes) -> str:
    """A public key as it travels: the base64 (RFC 4648 §4, padded) of its raw 32 bytes."""
    return base64.b64encode(raw).decode("ascii")


def decode_public(text: object, where: str) -> bytes:
    """The raw 32 bytes of a public key in base64; ``where`` names the field in errors."""
    if not isinstance(text, str):
        raise _bad(where, "must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _bad(where, "is not base64") from None
    if len(raw) != RAW_KEY_SIZE:
        raise _bad(where, f"holds {len(raw)} bytes; a raw public key is {RAW_KEY_SIZE}")
    return raw


@dataclass(frozen=True)
class PublicSigningKey:
    """A signing key as a partner publishes it; ``active`` signs now, the others did before."""

    id: str
    public: bytes
    active: bool

    def ed25519(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public)


@dataclass(frozen=True)
class PublicExchangeKey:
    """The exchange key that bundles for ``trust`` are sealed to."""

    trust: str
    id: str
    public: bytes

    def x25519(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.public)


# -- the identity document ---------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityDocument:
    gateway: str
    url: str
    signing_keys: tuple[PublicSigningKey, ...]
    trusts: tuple[PublicExchangeKey, ...]
    created: str
    tls_sha256: str | None = None

    @property
    def active_signing_key(self) -> PublicSigningKey:
        return next(k for k in self.signing_keys if k.active)

    def signing_key(self, key_id: str) -> PublicSigningKey | None:
        return next((k for k in self.signing_keys if k.id == key_id), None)

    def exchange_key(self, trust: str) -> PublicExchangeKey | None:
        return next((k for k in self.trusts if k.trust == trust), None)

    @property
    def key_ids(self) -> list[str]:
        """Every key id, signing keys first."""
        return [k.id for k in self.signing_keys] + [k.id for k in self.trusts]


def utc_now_text(now: datetime | None = None) -> str:
    """A time as the document writes it: ``2026-12-02T10:00:00Z``."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime(_TIME)


def identity_document(
    gateway: str,
    url: str,
    signing_keys: Iterable[tuple[SigningKey, bool]],
    exchange_keys: Iterable[ExchangeKey],
    tls_sha256: str | None,
    created: str | None = None,
) -> IdentityDocument:
    """The document of a gateway's own keys (public halves only), validated as a partner
    would validate it, so that what is exported is always importable."""
    doc = IdentityDocument(
        gateway=gateway,
        url=url,
        signing_keys=tuple(PublicSigningKey(k.id, k.public, active) for k, active in signing_keys),
        trusts=tuple(
            PublicExchangeKey(k.trust, k.id, k.public)
            for k in sorted(exchange_keys, key=lambda k: k.trust)
        ),
        created=created or utc_now_text(),
        tls_sha256=tls_sha256,
    )
    return decode_identity(encode_identity(doc))


def encode_identity(doc: IdentityDocument) -> str:
    """The document as JSON text, fields in the documented order; ``tls_sha256`` only when
    the gateway serves TLS."""
    data: dict[str, Any] = {
        "format": IDENTITY_FORMAT,
        "gateway": doc.gateway,
        "url": doc.url,
        "signing_keys": [
            {
                "id": k.id,
                "algorithm": SIGNING_ALGORITHM,
                "public": encode_public(k.public),
                "active": k.active,
            }
            for k in doc.signing_keys
        ],
        "trusts": [
            {
                "trust": k.trust,
                "exchange_key": {
                    "id": k.id,
                    "algorithm": EXCHANGE_ALGORITHM,
                    "public": encode_public(k.public),
                },
            }
            for k in doc.trusts
        ],
    }
    if doc.tls_sha256 is not None:
        data["tls_sha256"] = doc.tls_sha256
    data["created"] = doc.created
    return json.dumps(data, indent=2) + "\n"


def decode_identity(text: str | bytes) -> IdentityDocument:
    """A partner's identity document, checked field by field; ``BadRequest`` names the field
    that is wrong. Unknown fields are refused too: ``format`` versions the document."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise BadRequest(f"identity document: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_fields)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"identity document: not JSON ({exc})") from None
    doc = _object(
        data, "the document", required=_DOCUMENT_FIELDS, optional=frozenset({"tls_sha256"})
    )
    if doc["format"] != IDENTITY_FORMAT:
        raise _bad("format", f"is {doc['format']!r}; this gateway reads {IDENTITY_FORMAT!r}")
    gateway = _name(doc["gateway"], "gateway")
    url = check_url(doc["url"], "url")
    signing = tuple(
        _signing_key(k, f"signing_keys[{i}]")
        for i, k in enumerate(_list(doc["signing_keys"], "signing_keys"))
    )
    if not signing:
        raise _bad("signing_keys", "is empty; a gateway has at least one signing key")
    if sum(k.active for k in signing) != 1:
        raise _bad("signing_keys", 'must have exactly one key with "active": true')
    trusts = tuple(_trust(t, f"trusts[{i}]") for i, t in enumerate(_list(doc["trusts"], "trusts")))
    _unique([t.trust for t in trusts], "trusts", "trust")
    _unique([k.id for k in signing] + [t.id for t in trusts], "key ids", "id")
    tls = doc.get("tls_sha256")
    if tls is not None and not (isinstance(tls, str) and _HEX64.fullmatch(tls)):
        raise _bad("tls_sha256", "must be 64 lower-case hex digits (SHA-256 of the certificate)")
    return IdentityDocument(gateway, url, signing, trusts, _time(doc["created"]), tls)


def check_url(url: object, where: str) -> str:
    """An ``http(s)://host[:port][/path]`` URL without credentials, query or fragment,
    returned without its trailing ``/``."""
    if not isinstance(url, str):
        raise _bad(where, "must be a string")
    try:
        parts = urlsplit(url)
        valid = (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and parts.port != 0
            and not (parts.username or parts.password or parts.query or parts.fragment)
        )
    except ValueError:
        valid = False
    if not valid:
        raise _bad(where, f"{url[:200]!r} is not an http:// or https:// URL of a gateway")
    return url.rstrip("/")


def _bad(where: str, problem: str) -> BadRequest:
    return BadRequest(f"identity document: {where} {problem}")


def _no_duplicate_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BadRequest(f"identity document: the field {key!r} appears twice")
        seen[key] = value
    return seen


def _object(
    value: object, where: str, *, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, "must be a JSON object")
    missing = sorted(required - value.keys())
    if missing:
        raise _bad(where, f"lacks the field {missing[0]!r}")
    unknown = sorted(value.keys() - required - optional)
    if unknown:
        raise _bad(where, f"has an unknown field {unknown[0]!r}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(where, "must be a JSON array")
    if len(value) > _MAX_KEYS:
        raise _bad(where, f"has more than {_MAX_KEYS} entries")
    return value


def _name(value: object, where: str) -> str:
    if not (isinstance(value, str) and is_valid_name(value)):
        raise _bad(where, "must be a name: 1-64 letters, digits, '.', '_' or '-'")
    return value


def _key_id(value: object, where: str) -> str:
    # Key ids go into encrypted objects' headers, which hold 1-64 ASCII characters.
    if not (isinstance(value, str) and is_valid_name(value)):
        raise _bad(where, "must be a key id: 1-64 letters, digits, '.', '_' or '-'")
    return value


def _algorithm(value: object, expected: str, where: str) -> None:
    if value != expected:
        raise _bad(where, f"is {value!r}; it must be {expected!r}")


def _signing_key(value: object, where: str) -> PublicSigningKey:
    key = _object(value, where, required=frozenset({"id", "algorithm", "public", "active"}))
    _algorithm(key["algorithm"], SIGNING_ALGORITHM, f"{where}.algorithm")
    if not isinstance(key["active"], bool):
        raise _bad(f"{where}.active", "must be true or false")
    return PublicSigningKey(
        _key_id(key["id"], f"{where}.id"),
        decode_public(key["public"], f"{where}.public"),
        key["active"],
    )


def _trust(value: object, where: str) -> PublicExchangeKey:
    entry = _object(value, where, required=frozenset({"trust", "exchange_key"}))
    key_where = f"{where}.exchange_key"
    key = _object(
        entry["exchange_key"], key_where, required=frozenset({"id", "algorithm", "public"})
    )
    _algorithm(key["algorithm"], EXCHANGE_ALGORITHM, f"{key_where}.algorithm")
    return PublicExchangeKey(
        _name(entry["trust"], f"{where}.trust"),
        _key_id(key["id"], f"{key_where}.id"),
        decode_public(key["public"], f"{key_where}.public"),
    )


def _unique(values: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise _bad(where, f"name the {what} {value!r} twice")
        seen.add(value)


def _time(value: object) -> str:
    try:
        if isinstance(value, str):
            datetime.strptime(value, _TIME)
            return value
    except ValueError:
        pass
    raise _bad("created", "must be a UTC time such as 2026-12-02T10:00:00Z")
