"""Where keys live on disk: the KEK file and the keyring of wrapped keys beside it.

``keys/kek`` holds the key-encryption key (mode 0600) unless ``IEX_KEK`` provides it;
``keys/keyring.json`` holds every wrapped key (per-trust DEKs, the index key, the identity
keys of ``app.crypto.identity``) and the id of the KEK that wraps them. Neither file holds
anything usable without the KEK.

KEK rotation must switch two files together. The order makes any crash recoverable:
(1) write ``keyring.json.next`` wrapped by the new KEK, (2) write the new KEK to ``kek.next``,
(3) rename ``kek.next`` over ``kek`` — the commit point —, (4) rename the keyring into place.
Each write is itself a temporary file renamed into place (``app.durable``). On start, a
keyring wrapped by another KEK than the one loaded is replaced by a ``keyring.json.next``
wrapped by the loaded KEK; leftovers of an unfinished rotation go, temporary files too.
Opening must never run beside a rotation, whose files it would take for leftovers: callers
hold ``keys/lock`` (``app.services.keys``); openers take turns on the ring lock.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from app.crypto.errors import KeyUnavailable
from app.crypto.identity import (
    EXCHANGE_PREFIX,
    SIGNING_OWNER,
    SIGNING_PREFIX,
    ExchangeKey,
    SigningKey,
    exchange_owner,
    exchange_trust,
    is_identity_owner,
    new_exchange_private,
    new_signing_private,
)
from app.crypto.keys import (
    KeyEncryptionKey,
    Keyring,
    WrappedKey,
    load_kek,
    new_kek,
    write_key_file,
)
from app.durable import fsync_dir, temporary_for, write_atomically
from app.filelock import locked

#: The trust name under which the index key is kept; no real trust may use it.
INDEX_KEY_OWNER = "@index"


def _encode(kek_id: str, keys: list[WrappedKey]) -> bytes:
    doc = {
        "format": 1,
        "kek_id": kek_id,
        "keys": [
            {
                "id": w.id,
                "trust": w.trust,
                "kek_id": w.kek_id,
                "wrapped": base64.b64encode(w.wrapped).decode("ascii"),
                "created_at": w.created_at,
                "active": w.active,
            }
            for w in keys
        ],
    }
    return (json.dumps(doc, indent=1) + "\n").encode("ascii")


def _decode(data: bytes, source: Path) -> tuple[str, list[WrappedKey]]:
    try:
        doc = json.loads(data)
        keys = [
            WrappedKey(
                id=str(k["id"]),
                trust=str(k["trust"]),
                kek_id=str(k["kek_id"]),
                wrapped=base64.b64decode(k["wrapped"], validate=True),
                created_at=float(k["created_at"]),
                active=bool(k["active"]),
            )
            for k in doc["keys"]
        ]
        return str(doc["kek_id"]), keys
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyUnavailable(f"the keyring {source} is damaged: {exc}") from exc


@dataclass
class KeyStore:
    """The key files of one gateway, under ``<data-dir>/keys``."""

    directory: Path

    @property
    def kek_path(self) -> Path:
        return self.directory / "kek"

    @property
    def keyring_path(self) -> Path:
        return self.directory / "keyring.json"

    def _next(self, path: Path) -> Path:
        return path.with_name(path.name + ".next")

    def open(self, env_kek: str | None, *, data_exists: bool) -> Keyring:
        """Load the KEK and the keyring, finishing an interrupted rotation if there is one.

        A new KEK is made only for a gateway with no data and no keyring yet.
        """
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Every process that writes key files holds the ring lock to do it, or holds the
        # keys exclusively (rotation): here, any temporary file is what a crash left.
        with locked(self.ring_lock):
            may_create = not data_exists and not self.keyring_path.exists()
            kek = load_kek(self.kek_path, env_kek, may_create=may_create)
            self._recover(kek)
            if not self.keyring_path.exists():
                if not may_create:
                    raise KeyUnavailable(
                        f"the keyring {self.keyring_path} is missing but encrypted data exists"
                    )
                ring = Keyring(kek, [])
                ring.new_key(INDEX_KEY_OWNER)
                self.save(ring)
                return ring
        kek_id, keys = _decode(self.keyring_path.read_bytes(), self.keyring_path)
        if kek_id != kek.id:
            raise KeyUnavailable(
                f"the keyring is wrapped by {kek_id} but the key-encryption key given is "
                f"{kek.id}: wrong key file or IEX_KEK"
            )
        return Keyring(kek, keys)

    def _recover(self, kek: KeyEncryptionKey) -> None:
        next_ring, next_kek = self._next(self.keyring_path), self._next(self.kek_path)
        if next_ring.exists():
            kek_id, _ = _decode(next_ring.read_bytes(), next_ring)
            if kek_id == kek.id:
                os.replace(next_ring, self.keyring_path)  # step 4 of a rotation
                fsync_dir(self.directory)
            else:
                next_ring.unlink()  # the rotation never reached its commit point
        # A write stopped half way leaves its temporary file: steps 1 and 2 of a rotation, a
        # keyring saved with a new data key, the first KEK. The one of step 2 holds a KEK
        # that wraps nothing.
        leftovers = [next_kek] + [
            temporary_for(path) for path in (next_ring, next_kek, self.keyring_path, self.kek_path)
        ]
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)

    def reload(self, kek: KeyEncryptionKey) -> Keyring:
        """The keyring as saved now (another process of the gateway may have added keys)."""
        kek_id, keys = _decode(self.keyring_path.read_bytes(), self.keyring_path)
        if kek_id != kek.id:
            raise KeyUnavailable(f"the keyring is now wrapped by {kek_id}, not {kek.id}")
        return Keyring(kek, keys)

    @property
    def ring_lock(self) -> Path:
        """Held while a process adds a key: the keyring is read, extended and saved whole."""
        return self.directory / "ring.lock"

    def save(self, ring: Keyring) -> None:
        write_atomically(self.keyring_path, _encode(ring.kek.id, ring.wrapped_keys))

    def rotate_kek(self, ring: Keyring, given: KeyEncryptionKey | None) -> Keyring:
        """Re-wrap every key under a new KEK; data is not touched.

        ``given``: the new KEK when the KEK lives in the environment (the operator installs
        it there); otherwise a new one is made and the key file replaced.
        """
        new = given or new_kek()
        rewrapped = ring.rewrapped(new)
        next_ring = self._next(self.keyring_path)
        write_atomically(next_ring, _encode(new.id, rewrapped))
        if given is None:
            next_kek = self._next(self.kek_path)
            write_key_file(next_kek, new)
            os.replace(next_kek, self.kek_path)
            fsync_dir(self.directory)
        os.replace(next_ring, self.keyring_path)
        fsync_dir(self.directory)
        return Keyring(new, rewrapped)


class DataKeys:
    """The keys a running gateway works with: per-trust DEKs, the index key, and the
    identity keys (``app.crypto.identity``: the signing key, each trust's exchange key).

    A trust's first write makes its DEK and saves the keyring before any byte is sealed with
    it, so a key that protects data is always on disk (wrapped) first; an identity key is
    saved before it is first used or published, the same way. Several processes may serve
    one data directory: a key is added under a lock on the keyring file, to the keyring as
    saved (so no process's key is lost, and an owner gets one active key), and a key another
    process added is read from disk the first time it is needed.
    """

    def __init__(self, store: KeyStore, ring: Keyring) -> None:
        self._store = store
        self._ring = ring
        self._lock = threading.Lock()

    @property
    def ring(self) -> Keyring:
        return self._ring

    def key(self, key_id: str) -> bytes:
        """A DEK by id; one this process has not seen yet is looked for on disk (blocking).

        Identity keys are refused: a key serves one purpose, whatever an object's header
        names."""
        try:
            owner = self._owner(key_id)
        except KeyUnavailable:
            raise KeyUnavailable(f"no data key {key_id!r} in the keyring") from None
        if is_identity_owner(owner):
            raise KeyUnavailable(f"key {key_id} is an identity key of {owner}, not a data key")
        return self._ring.key(key_id)

    def _owner(self, key_id: str) -> str:
        try:
            return self._ring.owner(key_id)
        except KeyUnavailable:
            with self._lock:
                self._ring = self._store.reload(self._ring.kek)
            return self._ring.owner(key_id)

    def for_writing(self, trust: str) -> tuple[str, bytes]:
        """The active DEK of ``trust``; made and saved on first use (blocking I/O then)."""
        return self._active(trust, lambda ring: ring.new_key(trust))

    def _active(self, owner: str, make: Callable[[Keyring], WrappedKey]) -> tuple[str, bytes]:
        active = self._ring.active(owner)
        if active is not None:
            return active
        with self._lock, locked(self._store.ring_lock):
            self._ring = self._store.reload(self._ring.kek)
            active = self._ring.active(owner)
            if active is None:
                make(self._ring)
                self._store.save(self._ring)
                active = self._ring.active(owner)
            assert active is not None
            return active

    def needs_new_key(self, trust: str) -> bool:
        return self._ring.active(trust) is None

    @property
    def index_key(self) -> bytes:
        active = self._ring.active(INDEX_KEY_OWNER)
        if active is None:
            raise KeyUnavailable("the keyring has no index key")
        return active[1]

    # -- identity ---------------------------------------------------------------------------

    def signing_key(self) -> SigningKey:
        """The gateway's active signing key; made and saved on first use (blocking then)."""
        return SigningKey(*self._active(SIGNING_OWNER, _new_signing_key))

    def signing_keys(self) -> list[tuple[SigningKey, bool]]:
        """Every signing key with whether it is the active one, oldest first: retired keys
        still verify what was signed before a rotation."""
        return [(SigningKey(w.id, key), w.active) for w, key in self._ring.owned(SIGNING_OWNER)]

    def exchange_key(self, trust: str) -> ExchangeKey:
        """``trust``'s active exchange key; made and saved on first use (blocking then)."""
        owner = exchange_owner(trust)
        key_id, key = self._active(owner, _exchange_maker(trust))
        return ExchangeKey(key_id, trust, key)

    def exchange_key_by_id(self, key_id: str) -> ExchangeKey:
        """An exchange key by id, retired ones too (bundles in flight to an old key must still
        open); one this process has not seen yet is looked for on disk (blocking)."""
        trust = exchange_trust(self._owner(key_id))
        if trust is None:
            raise KeyUnavailable(f"key {key_id} is not an exchange key")
        return ExchangeKey(key_id, trust, self._ring.key(key_id))

    def ensure_identity(self, trusts: Iterable[str]) -> list[str]:
        """Make the signing key and the exchange key of each of ``trusts`` that are missing,
        saved together; returns the ids made (none when all exist). Blocking."""
        wanted = [(SIGNING_OWNER, _new_signing_key)] + [
            (exchange_owner(t), _exchange_maker(t)) for t in sorted(set(trusts))
        ]
        if all(self._ring.active(owner) is not None for owner, _ in wanted):
            return []
        with self._lock, locked(self._store.ring_lock):
            self._ring = self._store.reload(self._ring.kek)
            made = [make(self._ring).id for owner, make in wanted if not self._ring.active(owner)]
            if made:
                self._store.save(self._ring)
            return made


def _new_signing_key(ring: Keyring) -> WrappedKey:
    return ring.new_key(SIGNING_OWNER, SIGNING_PREFIX, new_signing_private())


def _new_exchange_key(ring: Keyring, trust: str) -> WrappedKey:
    return ring.new_key(exchange_owner(trust), EXCHANGE_PREFIX, new_exchange_private())


def _exchange_maker(trust: str) -> Callable[[Keyring], WrappedKey]:
    return lambda ring: _new_exchange_key(ring, trust)
