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

from app.storage.sqlite_db import SQLiteDatabase, transaction
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
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    upload_id TEXT NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    start INTEGER NOT NULL,
    length INTEGER NOT NULL,
    blob_key TEXT NOT NULL,
    PRIMARY KEY (upload_id, start)
);
"""

_COLUMNS = (
    "id, trust, length, received, metadata, concat, parts, final_id, state, created_at, expires_at"
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
    uid, trust, length, received, metadata, concat, parts, final_id, state, created, expires = row
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
    )


class SQLiteUploadState:
    def __init__(self, path: Path, *, key: bytes | None = None) -> None:
        self._db = SQLiteDatabase(path, name="uploads", key=key, read_threads=2, setup=_setup)

    async def open(self) -> None:
        await self._db.write(lambda conn: conn.executescript(SCHEMA))

    async def insert(self, upload: Upload, joins: tuple[str, ...] = ()) -> None:
        """Record a new upload; a final one also claims its partials (``joins``), which
        then take its expiry. Raises ``StaleOffset`` when a partial is gone or taken."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO uploads ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

    async def close(self) -> None:
        await self._db.close()
