"""One SQLite database file, used without blocking the event loop.

One thread owns the single writer connection (SQLite allows one writer at a time anyway);
a small pool of threads each own a read connection (WAL lets readers run beside the writer).
Every store on SQLite (the metadata index, the security records, upload state) builds on
this, so connection set-up, pragmas, schema versions and shutdown live in one place.

Schema versions: a database's ``PRAGMA user_version`` counts the migrations applied to it.
A store lists its migrations in order, and ``migrate`` applies those the database lacks,
each in a transaction that also records the version it reached.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from app.crypto.sqlcipher import connect
from app.filelock import Turns

T = TypeVar("T")

Setup = Callable[[sqlite3.Connection], None]
#: One schema change: the n-th of a store's list brings its database from version n-1 to n.
Migration = Callable[[sqlite3.Connection], None]


def _connect(path: Path, key: bytes | None, setup: Setup | None) -> sqlite3.Connection:
    # Each connection is used by one thread only; the check is off so close() can reap them.
    conn = connect(path, key)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode keeps the database consistent after power loss; what must be durable
    # before an acknowledgement (a stored blob) is fsynced by its owner before the commit.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    # 16 MiB of page cache per connection: with SQLCipher a page read from the cache skips
    # its decryption, which roughly halves the encryption cost of repeated searches.
    conn.execute("PRAGMA cache_size=-16384")
    if setup is not None:
        setup(conn)
    return conn


class SQLiteDatabase:
    def __init__(
        self,
        path: Path,
        *,
        name: str,
        key: bytes | None = None,
        read_threads: int = 4,
        setup: Setup | None = None,
    ) -> None:
        """``key``: encrypt the whole database with SQLCipher (``app.crypto.sqlcipher``)."""
        self.path = path
        self._key = key
        path.parent.mkdir(parents=True, exist_ok=True)
        self._setup = setup
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix=f"iex-{name}-write")
        self._reader_pool = ThreadPoolExecutor(read_threads, thread_name_prefix=f"iex-{name}-read")
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._writer: sqlite3.Connection | None = None
        self._turns: Turns | None = None

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with the writer connection on the writer thread."""

        def run() -> T:
            if self._writer is None:
                self._writer = _connect(self.path, self._key, self._setup)
                self._turns = Turns(self.path.with_name(self.path.name + ".lock"))
            assert self._turns is not None
            # Several processes may serve one data directory: they write in turns.
            with self._turns:
                return fn(self._writer)

        return await asyncio.get_running_loop().run_in_executor(self._writer_pool, run)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with a read connection on one of the reader threads."""

        def run() -> T:
            conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = _connect(self.path, self._key, self._setup)
                self._readers.append(conn)
            return fn(conn)

        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, run)

    async def close(self) -> None:
        def close_writer(conn: sqlite3.Connection) -> None:
            conn.close()
            self._writer = None

        if self._writer is not None:
            await self.write(close_writer)
        if self._turns is not None:
            self._turns.close()
            self._turns = None
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)
        for conn in self._readers:
            conn.close()
        self._readers.clear()


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn`` inside ``BEGIN IMMEDIATE`` … ``COMMIT``, rolling back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (a full disk, an I/O error): then the error
        # that did it is the one to raise, not "no transaction is active".
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def statements(script: str) -> list[str]:
    """The SQL statements of ``script``, in order (``executescript`` would commit the
    transaction a migration runs in)."""
    found: list[str] = []
    pending = ""
    *pieces, rest = script.split(";")
    for piece in pieces:
        pending += piece + ";"
        # A semicolon inside a string, a comment or a trigger body does not end a statement.
        if sqlite3.complete_statement(pending):
            found.append(pending.strip())
            pending = ""
    if (pending + rest).strip():
        raise ValueError(f"an unterminated SQL statement: {(pending + rest).strip()[:60]!r}")
    return found


def script(sql: str) -> Migration:
    """A migration that runs the statements of ``sql``."""
    steps = statements(sql)

    def run(conn: sqlite3.Connection) -> None:
        for statement in steps:
            conn.execute(statement)

    return run


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
    """Bring the database to version ``len(migrations)``, one transaction per step.

    The version is read again inside each step's ``BEGIN IMMEDIATE``: when several processes
    open one database at once, each step still runs once.
    """
    if schema_version(conn) >= len(migrations):
        return
    for version, migration in enumerate(migrations, start=1):
        transaction(conn, partial(_apply, version=version, migration=migration))


def _apply(conn: sqlite3.Connection, *, version: int, migration: Migration) -> None:
    if schema_version(conn) < version:
        migration(conn)
        conn.execute(f"PRAGMA user_version = {version:d}")
