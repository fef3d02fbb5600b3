"""Opening, inspecting and rotating the gateway's keys; shared by ``iex serve`` and ``iex keys``.

The KEK and keyring live under ``<data-dir>/keys``. Every process of a running gateway holds
``keys/lock`` shared; rotation takes it exclusively, so keys never change under a running
gateway (whose keyring is in memory) — rotation is an offline operation of seconds, as it
touches no data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.crypto.errors import IntegrityError, KeyUnavailable
from app.crypto.identity import (
    EXCHANGE_PREFIX,
    SIGNING_OWNER,
    SIGNING_PREFIX,
    exchange_owner,
    exchange_trust,
    new_exchange_private,
    new_signing_private,
)
from app.crypto.keys import KeyEncryptionKey, decode_kek
from app.crypto.keystore import DataKeys, KeyStore
from app.crypto.segments import MAX_HEADER_SIZE, Header
from app.filelock import FileLock

INDEX_FILE = "index.sqlite3"


def key_store(data_dir: Path) -> KeyStore:
    return KeyStore(data_dir / "keys")


def data_exists(data_dir: Path) -> bool:
    """True once the gateway has stored anything that a new key could not read."""
    if (data_dir / INDEX_FILE).exists():
        return True
    blobs = data_dir / "blobs"
    return blobs.is_dir() and any(blobs.iterdir())


@contextmanager
def key_lock(data_dir: Path, purpose: str, *, shared: bool = False) -> Iterator[None]:
    """Hold ``keys/lock``: shared by every process of a running gateway, exclusively by key
    rotation, so keys never change under a running gateway."""
    lock = FileLock(data_dir / "keys" / "lock")
    if not lock.acquire(shared=shared):
        what = "a key rotation is running" if shared else "a gateway is running"
        raise KeyUnavailable(
            f"cannot {purpose}: another iex process holds {lock.path} "
            f"({what} on this data directory; wait for it or stop it first)"
        )
    try:
        yield
    finally:
        lock.release()


def open_data_keys(data_dir: Path, kek: str | None) -> DataKeys:
    """Load (or, for a new gateway, create) the keys. Blocking. The caller holds
    ``key_lock``: opening finishes or undoes an interrupted rotation, and must never take a
    rotation in progress for one."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = key_store(data_dir)
    ring = store.open(kek, data_exists=data_exists(data_dir))
    return DataKeys(store, ring)


def read_data_keys(data_dir: Path, kek: str | None, purpose: str) -> DataKeys:
    """``open_data_keys`` for a command that may run beside a gateway (shared with it), but
    not beside a key rotation. Blocking."""
    with key_lock(data_dir, purpose, shared=True):
        return open_data_keys(data_dir, kek)


@dataclass(frozen=True)
class KeyUsage:
    key_id: str
    owner: str
    created_at: float
    active: bool
    objects: int


def key_usage(data_dir: Path, keys: DataKeys) -> list[KeyUsage]:
    """Each key with how many stored objects it seals, read from the objects' headers."""
    counts: Counter[str] = Counter()
    blobs = data_dir / "blobs"
    if blobs.is_dir():
        for path in blobs.glob("*/*/*"):
            with open(path, "rb") as f:
                try:
                    counts[Header.decode(f.read(MAX_HEADER_SIZE), path.name).key_id] += 1
                except IntegrityError:
                    counts["(unreadable header)"] += 1
    usage = [
        KeyUsage(w.id, w.trust, w.created_at, w.active, counts.pop(w.id, 0))
        for w in keys.ring.wrapped_keys
    ]
    usage += [KeyUsage(kid, "(unknown key)", 0.0, False, n) for kid, n in counts.items()]
    return usage


def rotate_kek(data_dir: Path, kek: str | None, new_kek: str | None) -> KeyEncryptionKey:
    """Re-wrap every key under a new KEK. With the KEK in the environment, the new one must
    be given too (``new_kek``), since there is no key file to replace."""
    with key_lock(data_dir, "rotate keys"):
        keys = open_data_keys(data_dir, kek)
        store = key_store(data_dir)
        if kek is not None:
            if new_kek is None:
                raise KeyUnavailable(
                    "the KEK comes from IEX_KEK: generate one with `iex keys generate-kek` "
                    "and pass it in IEX_NEW_KEK, then set IEX_KEK to it"
                )
            return store.rotate_kek(keys.ring, decode_kek(new_kek, "IEX_NEW_KEK")).kek
        return store.rotate_kek(keys.ring, None).kek


def rotate_trust_key(data_dir: Path, kek: str | None, trust: str) -> str:
    """Start a new DEK for ``trust``'s new writes; returns its id. Old objects keep theirs."""
    if trust.startswith("@"):
        # The index key and the identity keys: no trust name starts with "@".
        raise KeyUnavailable(f"{trust} is not a trust but a reserved owner of keys")
    with key_lock(data_dir, "rotate keys"):
        keys = open_data_keys(data_dir, kek)
        wrapped = keys.ring.new_key(trust)
        key_store(data_dir).save(keys.ring)
        return wrapped.id


@dataclass(frozen=True)
class IdentityRotation:
    signing_key: str
    exchange_keys: dict[str, str]  # key id by trust


def rotate_identity(data_dir: Path, kek: str | None, trusts: Iterable[str]) -> IdentityRotation:
    """A new signing key, and a new exchange key for each of ``trusts`` and every trust that
    has one, saved together. The old keys stay, retired: they verify what was signed before
    and open bundles still in flight to them. Offline, like the other rotations."""
    with key_lock(data_dir, "rotate keys"):
        keys = open_data_keys(data_dir, kek)
        ring = keys.ring
        owners = {w.trust for w in ring.wrapped_keys}
        names = set(trusts) | {t for t in map(exchange_trust, owners) if t is not None}
        signing = ring.new_key(SIGNING_OWNER, SIGNING_PREFIX, new_signing_private()).id
        exchange = {
            t: ring.new_key(exchange_owner(t), EXCHANGE_PREFIX, new_exchange_private()).id
            for t in sorted(names)
        }
        key_store(data_dir).save(ring)
        return IdentityRotation(signing, exchange)


def make_trust_keys(data_dir: Path, kek: str | None, trust: str) -> str:
    """The exchange key of a new trust, made now so that the identity document lists it;
    returns its id. Runs beside a serving gateway (the keys' lock shared with it), never
    beside a rotation. Blocking."""
    with key_lock(data_dir, f"make the exchange key of trust {trust}", shared=True):
        return open_data_keys(data_dir, kek).exchange_key(trust).id
