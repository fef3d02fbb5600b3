"""Durable upload state in SQLite: each upload's offset, length, metadata and expiry, and the
encrypted blobs (chunks) holding its bytes.

The database is encrypted with the index key and runs with ``synchronous=FULL``: a
transaction that returned is on disk, so an offset this store recorded survives power loss
(the chunk blob it names was fsynced before). The offset only moves by compare-and-set
(``WHERE received = ?``), which is what keeps two writers apart across processes.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from app.storage.sqlite_db import Migration, SQLiteDatabase, migrate, script, transaction
from app.transfer.uploads import Concat, Upload, UploadState, parse_metadata

UPLOADS_FILE = "uploads.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    trust TEXT NOT NULL,
    length INTEGER NOT NULL,
    received INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    concat TEXT NOT NULL,
    parts TEXT NOT NULL,
    final_id TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    actor TEXT
);
CREATE TABLE IF NOT EXISTS chunks (
    upload_id TEXT NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    start INTEGER NOT NULL,
    length INTEGER NOT NULL,
    blob_key TEXT NOT NULL,
    PRIMARY KEY (upload_id, start)
);
-- What ingest made of an upload: counts, stored UIDs, failures (JSON, see app.transfer.report).
CREATE TABLE IF NOT EXISTS reports (
    upload_id TEXT PRIMARY KEY REFERENCES uploads (id) ON DELETE CASCADE,
    report TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_by_state ON uploads (state);
CREATE INDEX IF NOT EXISTS uploads_by_expiry ON uploads (expires_at);
"""

_create_tables = script(SCHEMA)


def _version_1(conn: sqlite3.Connection) -> None:
    """The tables of ``SCHEMA``: made new, or reached from a state file made before the
    schema had a version (the only time its columns are looked at)."""
    _create_tables(conn)
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(uploads)")}
    if "actor" not in columns:  # a state file from before uploads recorded who
        conn.execute("ALTER TABLE uploads ADD COLUMN actor TEXT")


#: The schema versions in order (``PRAGMA user_version``); a change is a new step at the end.
MIGRATIONS: tuple[Migration, ...] = (_version_1,)

_COLUMNS = (
    "id, trust, length, received, metadata, concat, parts, final_id, state, created_at, "
    "expires_at, actor"
)


@dataclass(frozen=True)
class Chunk:
    """``length`` bytes of an upload from ``start``, sealed in the blob ``blob_key``."""

    start: int
    length: int
    blob_key: str


class StaleOffset(Exception):
    """The upload moved on (or vanished) since the caller read it: nothing was recorded."""


def _setup(conn: sqlite3.Connection) -> None:
    # An acknowledged offset must survive power loss, not only a process crash.
    conn.execute("PRAGMA synchronous=FULL")


def _upload(row: tuple[object, ...]) -> Upload:
    (
        uid,
        trust,
        length,
        received,
        metadata,
        concat,
        parts,
        final_id,
        state,
        created,
        expires,
        actor,
    ) = row
    return Upload(
        id=str(uid),
        trust=str(trust),
        length=int(str(length)),
        offset=int(str(received)),
        metadata=parse_metadata(str(metadata)),
        concat=Concat(concat),
        parts=tuple(json.loads(str(parts))),
        joined_to=None if final_id is None else str(final_id),
        state=UploadState(state),
        created_at=float(str(created)),
        expires_at=float(str(expires)),
        actor=None if actor is None else str(actor),
    )


class SQLiteUploadState:
    def __init__(self, path: Path, *, key: bytes | None = None) -> None:
        self._db = SQLiteDatabase(path, name="uploads", key=key, read_threads=2, setup=_setup)

    async def open(self) -> None:
        await self._db.write(lambda conn: migrate(conn, MIGRATIONS))

    async def insert(self, upload: Upload, joins: tuple[str, ...] = ()) -> None:
        """Record a new upload; a final one also claims its partials (``joins``), which
        then take its expiry. Raises ``StaleOffset`` when a partial is gone or taken."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO uploads ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    upload.id,
                    upload.trust,
                    upload.length,
                    upload.offset,
                    upload.metadata.raw,
                    upload.concat.value,
                    json.dumps(list(upload.parts)),
                    upload.joined_to,
                    upload.state.value,
                    upload.created_at,
                    upload.expires_at,
                    upload.actor,
                ),
            )
            for part in joins:
                claimed = conn.execute(
                    "UPDATE uploads SET final_id = ?, expires_at = ? "
                    "WHERE id = ? AND final_id IS NULL AND received = length",
                    (upload.id, upload.expires_at, part),
                )
                if claimed.rowcount != 1:
                    raise StaleOffset(part)

        await self._db.write(lambda conn: transaction(conn, run))

    async def get(self, upload_id: str) -> Upload | None:
        def run(conn: sqlite3.Connection) -> Upload | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM uploads WHERE id = ?", (upload_id,)
            ).fetchone()
            return _upload(row) if row else None

        return await self._db.read(run)

    async def add_chunk(
        self, upload_id: str, chunk: Chunk, state: UploadState, expires_at: float
    ) -> None:
        """Record a committed chunk and move the offset past it, in one transaction, only if
        the offset is still ``chunk.start`` (else ``StaleOffset``)."""

        def run(conn: sqlite3.Connection) -> None:
            moved = conn.execute(
                "UPDATE uploads SET received = received + ?, state = ?, expires_at = ? "
                "WHERE id = ? AND received = ?",
                (chunk.length, state.value, expires_at, upload_id, chunk.start),
            )
            if moved.rowcount != 1:
                raise StaleOffset(upload_id)
            conn.execute(
                "INSERT INTO chunks (upload_id, start, length, blob_key) VALUES (?, ?, ?, ?)",
                (upload_id, chunk.start, chunk.length, chunk.blob_key),
            )

        await self._db.write(lambda conn: transaction(conn, run))

    async def chunks(self, upload_id: str) -> list[Chunk]:
        def run(conn: sqlite3.Connection) -> list[Chunk]:
            rows = conn.execute(
                "SELECT start, length, blob_key FROM chunks WHERE upload_id = ? ORDER BY start",
                (upload_id,),
            ).fetchall()
            return [Chunk(int(s), int(n), str(k)) for s, n, k in rows]

        return await self._db.read(run)

    async def delete(self, upload_ids: list[str]) -> list[str]:
        """Forget uploads and their chunks; the blob keys the caller should now delete."""

        def run(conn: sqlite3.Connection) -> list[str]:
            keys: list[str] = []
            for uid in upload_ids:
                rows = conn.execute("SELECT blob_key FROM chunks WHERE upload_id = ?", (uid,))
                keys += [str(r[0]) for r in rows]
                conn.execute("DELETE FROM uploads WHERE id = ?", (uid,))
            return keys

        return await self._db.write(lambda conn: transaction(conn, run))

    async def set_state(
        self,
        upload_id: str,
        state: UploadState,
        *,
        expires_at: float | None = None,
        report: str | None = None,
    ) -> None:
        """Move an upload to ``state`` (optionally a new expiry and its report) in one
        transaction; a vanished upload is ``StaleOffset``."""

        def run(conn: sqlite3.Connection) -> None:
            moved = conn.execute(
                "UPDATE uploads SET state = ?, expires_at = COALESCE(?, expires_at) WHERE id = ?",
                (state.value, expires_at, upload_id),
            )
            if moved.rowcount != 1:
                raise StaleOffset(upload_id)
            if report is not None:
                conn.execute(
                    "INSERT INTO reports (upload_id, report) VALUES (?, ?) "
                    "ON CONFLICT (upload_id) DO UPDATE SET report = excluded.report",
                    (upload_id, report),
                )

        await self._db.write(lambda conn: transaction(conn, run))

    async def report(self, upload_id: str) -> str | None:
        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT report FROM reports WHERE upload_id = ?", (upload_id,)
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._db.read(run)

    async def in_state(self, *states: UploadState) -> list[Upload]:
        """Uploads in any of ``states``, oldest first (ingest resumes them after a restart)."""

        def run(conn: sqlite3.Connection) -> list[Upload]:
            marks = ",".join("?" * len(states))
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM uploads WHERE state IN ({marks}) ORDER BY created_at",
                [s.value for s in states],
            ).fetchall()
            return [_upload(r) for r in rows]

        return await self._db.read(run)

    async def expired(self, now: float, limit: int = 500) -> list[Upload]:
        """Uploads past their expiry that no final upload or ingest still needs."""

        def run(conn: sqlite3.Connection) -> list[Upload]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM uploads WHERE expires_at <= ? AND final_id IS NULL "
                "AND state NOT IN (?, ?) ORDER BY expires_at LIMIT ?",
                (now, UploadState.VERIFYING.value, UploadState.INGESTING.value, limit),
            ).fetchall()
            return [_upload(r) for r in rows]

        return await self._db.read(run)

    async def drop_chunks(self, upload_ids: list[str]) -> list[str]:
        """Forget the chunks of uploads whose bytes are no longer needed (ingested); the
        uploads and their reports stay. The blob keys the caller should now delete."""

        def run(conn: sqlite3.Connection) -> list[str]:
            keys: list[str] = []
            for uid in upload_ids:
                rows = conn.execute("SELECT blob_key FROM chunks WHERE upload_id = ?", (uid,))
                keys += [str(r[0]) for r in rows]
                conn.execute("DELETE FROM chunks WHERE upload_id = ?", (uid,))
            return keys

        return await self._db.write(lambda conn: transaction(conn, run))

    async def blob_keys(self) -> set[str]:
        """Every blob key a chunk names (for reclaiming blobs nothing references)."""

        def run(conn: sqlite3.Connection) -> set[str]:
            return {str(r[0]) for r in conn.execute("SELECT blob_key FROM chunks")}

        return await self._db.read(run)

    async def close(self) -> None:
        await self._db.close()
