"""Transfer jobs in SQLite (``transfers.sqlite3``), encrypted with the index key.

The database runs with ``synchronous=FULL``: progress a step recorded (bytes a partner
acknowledged, say) survives power loss, so a resumed job never sends them again. Every
change is one ``UPDATE … WHERE`` that compares before it sets (the version, the lease), and
writers in several processes take turns (``SQLiteDatabase``), so a claim that counts the
partner's running jobs and takes one more cannot interleave with another claim.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from app.crypto.sqlcipher import IntegrityErrors
from app.storage.sqlite_db import Migration, SQLiteDatabase, migrate, script, transaction
from app.transfer.job_store import JobFilter
from app.transfer.jobs import Direction, JobExists, JobState, Priority, TransferJob

TRANSFERS_FILE = "transfers.sqlite3"

SCHEMA = """
CREATE TABLE transfers (
    id TEXT PRIMARY KEY,
    direction TEXT NOT NULL,
    trust TEXT NOT NULL,
    partner TEXT NOT NULL,
    partner_trust TEXT NOT NULL,
    study TEXT NOT NULL,
    priority TEXT NOT NULL,
    state TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    bytes_sent INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    failing_since REAL,
    last_error TEXT,
    receipt BLOB,
    checkpoint TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL
);
CREATE INDEX transfers_by_trust ON transfers (trust, direction, created_at);
-- What the runners scan: the jobs still to run, by when they fall due.
CREATE INDEX transfers_to_run ON transfers (next_attempt_at)
    WHERE direction = 'out' AND state NOT IN ('delivered', 'failed', 'cancelled');
CREATE INDEX transfers_by_partner ON transfers (partner, lease_expires);
"""

#: The schema versions in order (``PRAGMA user_version``); a change is a new step at the end.
MIGRATIONS: tuple[Migration, ...] = (script(SCHEMA),)

_COLUMNS = (
    "id, direction, trust, partner, partner_trust, study, priority, state, paused, "
    "bytes_sent, bytes_total, attempts, failures, failing_since, last_error, receipt, "
    "checkpoint, created_at, updated_at, next_attempt_at, version, lease_owner, lease_expires"
)
#: What ``replace`` writes: everything but the identity, the attempts (counted by claims),
#: the version (set by the store) and the lease.
_CONTENT = (
    "state",
    "paused",
    "bytes_sent",
    "bytes_total",
    "failures",
    "failing_since",
    "last_error",
    "receipt",
    "checkpoint",
    "updated_at",
    "next_attempt_at",
)
_FINAL = "('delivered', 'failed', 'cancelled')"
#: A job a runner may take: outbound, not final, not paused.
_RUNNABLE = f"direction = 'out' AND state NOT IN {_FINAL} AND paused = 0"


def _setup(conn: sqlite3.Connection) -> None:
    # Acknowledged progress must survive power loss, not only a process crash.
    conn.execute("PRAGMA synchronous=FULL")


def _job(row: sqlite3.Row | tuple[Any, ...]) -> TransferJob:
    (
        job_id,
        direction,
        trust,
        partner,
        partner_trust,
        study,
        priority,
        state,
        paused,
        bytes_sent,
        bytes_total,
        attempts,
        failures,
        failing_since,
        last_error,
        receipt,
        checkpoint,
        created_at,
        updated_at,
        next_attempt_at,
        version,
        lease_owner,
        lease_expires,
    ) = row
    return TransferJob(
        id=job_id,
        direction=Direction(direction),
        trust=trust,
        partner=partner,
        partner_trust=partner_trust,
        study=study,
        priority=Priority(priority),
        state=JobState(state),
        paused=bool(paused),
        bytes_sent=bytes_sent,
        bytes_total=bytes_total,
        attempts=attempts,
        failures=failures,
        failing_since=failing_since,
        last_error=last_error,
        receipt=None if receipt is None else bytes(receipt),
        checkpoint=json.loads(checkpoint),
        created_at=created_at,
        updated_at=updated_at,
        next_attempt_at=next_attempt_at,
        version=version,
        lease_owner=lease_owner,
        lease_expires=lease_expires,
    )


def _content(job: TransferJob) -> tuple[Any, ...]:
    return (
        job.state.value,
        int(job.paused),
        job.bytes_sent,
        job.bytes_total,
        job.failures,
        job.failing_since,
        job.last_error,
        job.receipt,
        json.dumps(dict(job.checkpoint), separators=(",", ":")),
        job.updated_at,
        job.next_attempt_at,
    )


def _select(conn: sqlite3.Connection, job_id: str) -> TransferJob | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM transfers WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else _job(row)


class SQLiteTransferJobs:
    def __init__(self, path: Path, *, key: bytes | None = None) -> None:
        self._db = SQLiteDatabase(path, name="transfers", key=key, read_threads=2, setup=_setup)

    async def open(self) -> None:
        await self._db.write(lambda conn: migrate(conn, MIGRATIONS))

    async def insert(self, job: TransferJob) -> None:
        columns = (
            "id, direction, trust, partner, partner_trust, study, priority, created_at, "
            f"attempts, version, {', '.join(_CONTENT)}"
        )
        values = (
            job.id,
            job.direction.value,
            job.trust,
            job.partner,
            job.partner_trust,
            job.study,
            job.priority.value,
            job.created_at,
            job.attempts,
            job.version,
            *_content(job),
        )

        def run(conn: sqlite3.Connection) -> None:
            marks = ", ".join("?" * len(values))
            conn.execute(f"INSERT INTO transfers ({columns}) VALUES ({marks})", values)

        try:
            await self._db.write(lambda conn: transaction(conn, run))
        except IntegrityErrors:
            # The one constraint a well-formed job can break: its id is the primary key.
            raise JobExists(job.id) from None

    async def get(self, job_id: str) -> TransferJob | None:
        return await self._db.read(lambda conn: _select(conn, job_id))

    async def find(self, where: JobFilter) -> list[TransferJob]:
        terms: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("trust", where.trust),
            ("direction", where.direction.value if where.direction else None),
            ("state", where.state.value if where.state else None),
            ("partner", where.partner),
        ):
            if value is not None:
                terms.append(f"{column} = ?")
                args.append(value)
        clause = f"WHERE {' AND '.join(terms)}" if terms else ""

        def run(conn: sqlite3.Connection) -> list[TransferJob]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM transfers {clause} ORDER BY created_at DESC, id LIMIT ?",
                (*args, where.limit),
            )
            return [_job(r) for r in rows]

        return await self._db.read(run)

    async def replace(
        self, current: TransferJob, new: TransferJob, *, owner: str | None = None
    ) -> TransferJob | None:
        if new.id != current.id:
            raise ValueError("replace keeps a job's id")
        sets = ", ".join(f"{c} = ?" for c in _CONTENT)
        held = "" if owner is None else " AND lease_owner = ?"

        def run(conn: sqlite3.Connection) -> TransferJob | None:
            changed = conn.execute(
                f"UPDATE transfers SET {sets}, version = version + 1 "
                f"WHERE id = ? AND version = ?{held}",
                (*_content(new), current.id, current.version, *(() if owner is None else (owner,))),
            )
            return _select(conn, current.id) if changed.rowcount == 1 else None

        return await self._db.write(lambda conn: transaction(conn, run))

    async def due(self, now: float, limit: int = 100) -> list[TransferJob]:
        def run(conn: sqlite3.Connection) -> list[TransferJob]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM transfers WHERE {_RUNNABLE} AND next_attempt_at <= ? "
                "AND (lease_owner IS NULL OR lease_expires <= ?) "
                "ORDER BY priority = 'urgent' DESC, created_at, id LIMIT ?",
                (now, now, limit),
            )
            return [_job(r) for r in rows]

        return await self._db.read(run)

    async def running(self, now: float) -> dict[str, int]:
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT partner, COUNT(*) FROM transfers WHERE direction = 'out' "
                f"AND state NOT IN {_FINAL} AND lease_owner IS NOT NULL AND lease_expires > ? "
                "GROUP BY partner",
                (now,),
            )
            return {str(p): int(n) for p, n in rows}

        return await self._db.read(run)

    async def next_due(self) -> float | None:
        def run(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                f"SELECT MIN(next_attempt_at) FROM transfers WHERE {_RUNNABLE}"
            ).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._db.read(run)

    async def claim(
        self, job: TransferJob, owner: str, now: float, lease_until: float, limit: int
    ) -> TransferJob | None:
        def run(conn: sqlite3.Connection) -> TransferJob | None:
            # One statement: the count and the claim see the same database, and no other
            # writer (thread or process) runs between them.
            claimed = conn.execute(
                "UPDATE transfers SET lease_owner = ?, lease_expires = ?, "
                "attempts = attempts + 1, version = version + 1, updated_at = ? "
                f"WHERE id = ? AND version = ? AND {_RUNNABLE} "
                "AND (lease_owner IS NULL OR lease_expires <= ?) "
                "AND (SELECT COUNT(*) FROM transfers AS other WHERE other.partner = ? "
                f"AND other.direction = 'out' AND other.state NOT IN {_FINAL} "
                "AND other.id != ? AND other.lease_owner IS NOT NULL "
                "AND other.lease_expires > ?) < ?",
                (
                    owner,
                    lease_until,
                    now,
                    job.id,
                    job.version,
                    now,
                    job.partner,
                    job.id,
                    now,
                    limit,
                ),
            )
            return _select(conn, job.id) if claimed.rowcount == 1 else None

        return await self._db.write(lambda conn: transaction(conn, run))

    async def renew(self, job_id: str, owner: str, lease_until: float) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            renewed = conn.execute(
                "UPDATE transfers SET lease_expires = ? "
                f"WHERE id = ? AND lease_owner = ? AND {_RUNNABLE}",
                (lease_until, job_id, owner),
            )
            return renewed.rowcount == 1

        return await self._db.write(lambda conn: transaction(conn, run))

    async def release(self, job_id: str, owner: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE transfers SET lease_owner = NULL, lease_expires = NULL "
                "WHERE id = ? AND lease_owner = ?",
                (job_id, owner),
            )

        await self._db.write(lambda conn: transaction(conn, run))

    async def close(self) -> None:
        await self._db.close()
