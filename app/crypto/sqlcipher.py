"""Encrypted SQLite databases through SQLCipher (AES-256, page-level, with per-page HMAC).

The index holds patient names, IDs and birth dates, so it is encrypted as a whole: every
page of the database, its WAL and its journal. The key is a random 256-bit key from the
keyring, given raw (``x'…'``) so no passphrase derivation is needed. See
``docs/ENCRYPTION.md`` for why SQLCipher rather than encrypted columns.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import cast

from sqlcipher3 import dbapi2 as sqlcipher

from app.crypto.errors import KeyUnavailable

#: Errors from either driver, for code that must catch database failures.
DatabaseErrors: tuple[type[Exception], ...] = (sqlite3.Error, sqlcipher.Error)
#: Constraint violations (UNIQUE, FOREIGN KEY) from either driver.
IntegrityErrors: tuple[type[Exception], ...] = (sqlite3.IntegrityError, sqlcipher.IntegrityError)


def connect(path: Path, key: bytes | None) -> sqlite3.Connection:
    """Open ``path``; encrypted with ``key`` when one is given, plain SQLite otherwise.

    The SQLCipher connection has the ``sqlite3`` API; it is typed as one.
    """
    if key is None:
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    if len(key) != 32:
        raise KeyUnavailable("a database key is 32 bytes")
    conn = sqlcipher.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlcipher.DatabaseError as exc:
        conn.close()
        raise KeyUnavailable(
            f"{path.name} cannot be opened with its key: wrong key, or not an iex database"
        ) from exc
    return cast(sqlite3.Connection, conn)
