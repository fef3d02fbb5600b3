"""Keys: one key-encryption key (KEK) per gateway, data-encryption keys (DEKs) per trust.

DEKs are random 256-bit keys, kept only wrapped (AES-256-GCM under the KEK, bound to the
DEK's id and trust), so rotating the KEK re-wraps a few dozen bytes per DEK and never
touches data. Each encrypted object names the DEK that sealed it in its header; a trust's
new DEK takes new writes while old objects stay readable with their own.

The KEK comes from ``IEX_KEK`` (base64) or from a key file created with mode 0600 on the
first start of an empty gateway. A missing key file beside existing data, or a KEK that does
not open the stored DEKs, stops the gateway: a new key must never be made over old data.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.crypto.errors import KeyUnavailable
from app.crypto.segments import KEY_SIZE
from app.durable import write_atomically

_WRAP_NONCE = 12


@dataclass(frozen=True)
class KeyEncryptionKey:
    id: str
    key: bytes = b""

    def __repr__(self) -> str:  # never show key bytes in logs or tracebacks
        return f"KeyEncryptionKey(id={self.id!r})"


@dataclass(frozen=True)
class WrappedKey:
    """A DEK as stored: wrapped by the KEK named ``kek_id``."""

    id: str
    trust: str
    kek_id: str
    wrapped: bytes
    created_at: float
    active: bool


def new_kek() -> KeyEncryptionKey:
    return KeyEncryptionKey("kek-" + secrets.token_hex(6), secrets.token_bytes(KEY_SIZE))


def encode_kek(kek: KeyEncryptionKey) -> str:
    return json.dumps({"id": kek.id, "key": base64.b64encode(kek.key).decode("ascii")}) + "\n"


def decode_kek(text: str, source: str) -> KeyEncryptionKey:
    try:
        data = json.loads(text)
        key = base64.b64decode(data["key"], validate=True)
        kek_id = str(data["id"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise KeyUnavailable(f"{source} does not hold a key-encryption key") from exc
    if len(key) != KEY_SIZE:
        raise KeyUnavailable(f"{source} holds a key of {len(key)} bytes; 32 are needed")
    return KeyEncryptionKey(kek_id, key)


def write_key_file(path: Path, kek: KeyEncryptionKey) -> None:
    """Write the key file atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, encode_kek(kek).encode("ascii"))


def load_kek(path: Path, env_value: str | None, *, may_create: bool) -> KeyEncryptionKey:
    """The KEK from the environment, else the key file, else a new one if ``may_create``."""
    if env_value:
        return decode_kek(env_value, "IEX_KEK")
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyUnavailable(
                f"the key file {path} is readable by others (mode {mode:o}); chmod 600 it"
            )
        return decode_kek(path.read_text("ascii"), f"the key file {path}")
    if not may_create:
        raise KeyUnavailable(
            f"the key file {path} is missing but encrypted data exists; restore the key file "
            "or set IEX_KEK. A new key would make the existing data unreadable."
        )
    kek = new_kek()
    write_key_file(path, kek)
    return kek


def _aad(key_id: str, trust: str) -> bytes:
    return f"iex-dek|{key_id}|{trust}".encode()


def wrap(kek: KeyEncryptionKey, key_id: str, trust: str, dek: bytes) -> bytes:
    nonce = os.urandom(_WRAP_NONCE)
    return nonce + AESGCM(kek.key).encrypt(nonce, dek, _aad(key_id, trust))


def unwrap(kek: KeyEncryptionKey, wrapped: WrappedKey) -> bytes:
    if wrapped.kek_id != kek.id:
        raise KeyUnavailable(
            f"data key {wrapped.id} is wrapped by {wrapped.kek_id}, but the key-encryption key "
            f"given is {kek.id}: wrong key file or IEX_KEK"
        )
    blob = wrapped.wrapped
    try:
        return AESGCM(kek.key).decrypt(
            blob[:_WRAP_NONCE], blob[_WRAP_NONCE:], _aad(wrapped.id, wrapped.trust)
        )
    except InvalidTag as exc:
        raise KeyUnavailable(
            f"the key-encryption key {kek.id} does not open data key {wrapped.id}: wrong key"
        ) from exc


class Keyring:
    """The unwrapped DEKs in memory, and the rules for choosing and making them."""

    def __init__(self, kek: KeyEncryptionKey, wrapped: Iterable[WrappedKey]) -> None:
        self.kek = kek
        self._wrapped: dict[str, WrappedKey] = {}
        self._keys: dict[str, bytes] = {}
        for w in wrapped:
            self._keys[w.id] = unwrap(kek, w)
            self._wrapped[w.id] = w

    @property
    def wrapped_keys(self) -> list[WrappedKey]:
        return sorted(self._wrapped.values(), key=lambda w: (w.trust, w.created_at, w.id))

    def key(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyUnavailable(f"no data key {key_id!r} in the keyring") from None

    def active(self, trust: str) -> tuple[str, bytes] | None:
        for w in self._wrapped.values():
            if w.trust == trust and w.active:
                return w.id, self._keys[w.id]
        return None

    def owner(self, key_id: str) -> str:
        """Whose key ``key_id`` is: a trust, ``@index``, or an identity owner."""
        try:
            return self._wrapped[key_id].trust
        except KeyError:
            raise KeyUnavailable(f"no key {key_id!r} in the keyring") from None

    def owned(self, owner: str) -> list[tuple[WrappedKey, bytes]]:
        """Every key of ``owner`` (retired ones too), oldest first."""
        return [(w, self._keys[w.id]) for w in self.wrapped_keys if w.trust == owner]

    def new_key(self, trust: str, prefix: str = "dek-", key: bytes | None = None) -> WrappedKey:
        """Make the key for new use by ``trust`` (an owner); earlier ones stay for reading.

        A DEK by default; identity keys (``app.crypto.identity``) pass their ``prefix`` and
        the private ``key`` they generated. The caller persists the returned keys (the new
        one, and the old one now inactive).
        """
        key_id = prefix + secrets.token_hex(8)
        dek = secrets.token_bytes(KEY_SIZE) if key is None else key
        for old_id, old in list(self._wrapped.items()):
            if old.trust == trust and old.active:
                self._wrapped[old_id] = replace(old, active=False)
        w = WrappedKey(
            key_id, trust, self.kek.id, wrap(self.kek, key_id, trust, dek), time.time(), True
        )
        self._wrapped[key_id] = w
        self._keys[key_id] = dek
        return w

    def rewrapped(self, new: KeyEncryptionKey) -> list[WrappedKey]:
        """Every DEK wrapped by ``new`` instead: the data stays as it is."""
        return [
            replace(w, kek_id=new.id, wrapped=wrap(new, w.id, w.trust, self._keys[w.id]))
            for w in self.wrapped_keys
        ]
