"""Pulls and pull answers in SQLite (``pulls.sqlite3``), encrypted with the index key.

A pull's query holds patient identifiers, so the database is SQLCipher like the index.
``synchronous=FULL``: a pull answered, or an answer given, is on disk before anyone is
told, so a request sent again after a power loss still finds the answer that queued its
transfers and queues nothing twice.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from app.storage.sqlite_db import Migration, SQLiteDatabase, migrate, script, transaction
from app.transfer.pull_store import AnswerClaim, Pull, PullAnswer, PulledStudy

PULLS_FILE = "pulls.sqlite3"
#: Seconds an answer is kept: long past the few minutes a request stays fresh.
ANSWER_RETENTION = 24 * 3600.0

SCHEMA = """
CREATE TABLE pulls (
    id TEXT PRIMARY KEY,
    trust TEXT NOT NULL,
    partner TEXT NOT NULL,
    partner_trust TEXT NOT NULL,
    query TEXT NOT NULL,
    max_studies INTEGER NOT NULL,
    priority TEXT NOT NULL,
    created_at REAL NOT NULL,
    actor TEXT NOT NULL,
    state TEXT NOT NULL,
    studies TEXT NOT NULL,
    error TEXT
);
CREATE INDEX pulls_by_trust ON pulls (trust, created_at);
CREATE TABLE pull_answers (
    requester TEXT NOT NULL,
    request_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    studies TEXT,
    PRIMARY KEY (requester, request_id)
);
CREATE INDEX pull_answers_by_age ON pull_answers (claimed_at);
"""

#: The schema versions in order (``PRAGMA user_version``); a change is a new step at the end.
MIGRATIONS: tuple[Migration, ...] = (script(SCHEMA),)

_PULL_COLUMNS = (
    "id, trust, partner, partner_trust, query, max_studies, priority, created_at, actor, "
    "state, studies, error"
)


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA synchronous=FULL")


def _studies_json(studies: tuple[PulledStudy, ...]) -> str:
    return json.dumps([{"study": s.study, "transfer": s.transfer} for s in studies])


def _studies(text: str) -> tuple[PulledStudy, ...]:
    return tuple(PulledStudy(s["study"], s["transfer"]) for s in json.loads(text))


def _pull(row: tuple[Any, ...]) -> Pull:
    (pull_id, trust, partner, partner_trust, query, limit, priority, created, actor, state,
     studies, error) = row  # fmt: skip
    return Pull(
        id=pull_id,
        trust=trust,
        partner=partner,
        partner_trust=partner_trust,
        query=json.loads(query),
        limit=limit,
        priority=priority,
        created_at=created,
        actor=actor,
        state="failed" if state == "failed" else "answered",
        studies=_studies(studies),
        error=error,
    )


def _answer(row: tuple[Any, ...]) -> PullAnswer:
    requester, request_id, digest, claimed_at, studies = row
    return PullAnswer(
        requester, request_id, digest, claimed_at, None if studies is None else _studies(studies)
    )


def _select_answer(conn: sqlite3.Connection, requester: str, request_id: str) -> PullAnswer:
    row = conn.execute(
        "SELECT requester, request_id, digest, claimed_at, studies FROM pull_answers "
        "WHERE requester = ? AND request_id = ?",
        (requester, request_id),
    ).fetchone()
    return _answer(row)


class SQLitePulls:
    def __init__(self, path: Path, *, key: bytes | None = None) -> None:
        self._db = SQLiteDatabase(path, name="pulls", key=key, read_threads=1, setup=_setup)

    async def open(self) -> None:
        await self._db.write(lambda conn: migrate(conn, MIGRATIONS))

    async def insert(self, pull: Pull) -> None:
        values = (
            pull.id,
            pull.trust,
            pull.partner,
            pull.partner_trust,
            json.dumps(dict(pull.query)),
            pull.limit,
            pull.priority,
            pull.created_at,
            pull.actor,
            pull.state,
            _studies_json(pull.studies),
            pull.error,
        )

        def run(conn: sqlite3.Connection) -> None:
            marks = ", ".join("?" * len(values))
            conn.execute(f"INSERT INTO pulls ({_PULL_COLUMNS}) VALUES ({marks})", values)

        await self._db.write(lambda conn: transaction(conn, run))

    async def get(self, pull_id: str) -> Pull | None:
        def run(conn: sqlite3.Connection) -> Pull | None:
            row = conn.execute(
                f"SELECT {_PULL_COLUMNS} FROM pulls WHERE id = ?", (pull_id,)
            ).fetchone()
            return None if row is None else _pull(row)

        return await self._db.read(run)

    async def find(self, trust: str, limit: int) -> list[Pull]:
        def run(conn: sqlite3.Connection) -> list[Pull]:
            rows = conn.execute(
                f"SELECT {_PULL_COLUMNS} FROM pulls WHERE trust = ? "
                "ORDER BY created_at DESC, id LIMIT ?",
                (trust, limit),
            )
            return [_pull(r) for r in rows]

        return await self._db.read(run)

    async def claim_answer(
        self, requester: str, request_id: str, digest: str, now: float, stale_before: float
    ) -> AnswerClaim:
        def run(conn: sqlite3.Connection) -> AnswerClaim:
            conn.execute("DELETE FROM pull_answers WHERE claimed_at < ?", (now - ANSWER_RETENTION,))
            inserted = conn.execute(
                "INSERT OR IGNORE INTO pull_answers (requester, request_id, digest, claimed_at) "
                "VALUES (?, ?, ?, ?)",
                (requester, request_id, digest, now),
            )
            if inserted.rowcount == 1:
                return AnswerClaim(_select_answer(conn, requester, request_id), claimed=True)
            taken = conn.execute(
                "UPDATE pull_answers SET claimed_at = ? WHERE requester = ? AND request_id = ? "
                "AND digest = ? AND studies IS NULL AND claimed_at < ?",
                (now, requester, request_id, digest, stale_before),
            )
            return AnswerClaim(
                _select_answer(conn, requester, request_id), claimed=taken.rowcount == 1
            )

        return await self._db.write(lambda conn: transaction(conn, run))

    async def complete_answer(
        self, answer: PullAnswer, studies: tuple[PulledStudy, ...]
    ) -> PullAnswer | None:
        def run(conn: sqlite3.Connection) -> PullAnswer | None:
            done = conn.execute(
                "UPDATE pull_answers SET studies = ? WHERE requester = ? AND request_id = ? "
                "AND claimed_at = ? AND studies IS NULL",
                (_studies_json(studies), answer.requester, answer.request_id, answer.claimed_at),
            )
            if done.rowcount != 1:
                return None
            return _select_answer(conn, answer.requester, answer.request_id)

        return await self._db.write(lambda conn: transaction(conn, run))

    async def release_answer(self, answer: PullAnswer) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM pull_answers WHERE requester = ? AND request_id = ? "
                "AND claimed_at = ? AND studies IS NULL",
                (answer.requester, answer.request_id, answer.claimed_at),
            )

        await self._db.write(lambda conn: transaction(conn, run))

    async def close(self) -> None:
        await self._db.close()
