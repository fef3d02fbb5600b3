"""Trusts, tokens, partners, agreements and the audit trail, in their own SQLite file.

``<data-dir>/security.sqlite3`` is separate from the instance index so that audit appends
never queue behind STOW-RS index writes, and so that the command line (``iex token``,
``iex audit``) can work on it while the server runs (WAL lets both open it).

Token secrets are never stored: only the SHA-256 of the secret. The exception is the token
a partner issued for this gateway's outbound calls, which must be sent and so is kept as it
is; the database is encrypted (SQLCipher) like the rest. The audit table keeps each
record as the exact canonical text that was hashed, so verification re-hashes stored bytes;
the hash chain itself is computed by a ``Seal`` the audit service passes in.

Every commit here is durable when it returns (``synchronous=FULL``: the WAL is fsynced at
each commit, not only at checkpoints): an access is answered only once its audit record is,
and a change to who may do what is recorded before the command says it is done.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.crypto.identity import decode_identity, encode_identity
from app.crypto.sqlcipher import IntegrityErrors
from app.errors import BadRequest, Conflict, NotFound
from app.storage.security import (
    GENESIS,
    Agreement,
    AuditAppend,
    AuditFilter,
    AuditRow,
    Partner,
    Seal,
    StoredToken,
)
from app.storage.sqlite_db import Migration, SQLiteDatabase, migrate, script, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trusts (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    trust TEXT NOT NULL REFERENCES trusts (name),
    roles TEXT NOT NULL,
    label TEXT,
    secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS partners (
    name TEXT PRIMARY KEY,
    trust TEXT NOT NULL REFERENCES trusts (name),
    roles TEXT NOT NULL,
    cert_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    trust TEXT,
    actor TEXT,
    entry TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_trust ON audit (trust, at);
CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor, at);
CREATE TABLE IF NOT EXISTS audit_studies (
    study_uid TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (study_uid, seq)
) WITHOUT ROWID;
-- The last sealed record: appends chain from here, and verification compares the table's
-- tail with it, so deleting the newest records is caught as well.
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""

#: What the readiness probe writes: its row and 7 overflow pages, the 8 pages that the commit
#: of one record writes (the record, its three indexes, its study, the head, and the pages
#: above them), so that when the probe fits, an append of a record fits too.
_PROBE_BYTES = 7 * 4096


def _durable(conn: sqlite3.Connection) -> None:
    # FULL in WAL mode fsyncs the WAL at every commit; NORMAL (the default of our
    # databases) leaves the last commits to the next checkpoint after a power loss.
    conn.execute("PRAGMA synchronous=FULL")


#: Version 3: a partner may be known by its identity document rather than a certificate
#: (the pin becomes optional), and may have issued us a token for outbound calls. SQLite
#: cannot drop a NOT NULL in place, so the table is rebuilt; nothing refers to it yet.
_PARTNER_IDENTITIES = """
CREATE TABLE partners_v3 (
    name TEXT PRIMARY KEY,
    trust TEXT NOT NULL REFERENCES trusts (name),
    roles TEXT NOT NULL,
    cert_sha256 TEXT UNIQUE,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    identity TEXT,
    outbound_token TEXT
);
INSERT INTO partners_v3 (name, trust, roles, cert_sha256, created_at, updated_at)
    SELECT name, trust, roles, cert_sha256, created_at, created_at FROM partners;
DROP TABLE partners;
ALTER TABLE partners_v3 RENAME TO partners;
"""

#: Version 4: what may cross between a local trust and a partner's trust.
_AGREEMENTS = """
CREATE TABLE agreements (
    trust TEXT NOT NULL REFERENCES trusts (name),
    partner TEXT NOT NULL REFERENCES partners (name),
    partner_trust TEXT NOT NULL,
    allow TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (trust, partner, partner_trust)
);
CREATE INDEX agreements_partner ON agreements (partner);
"""

#: The schema versions in order (``PRAGMA user_version``); a change is a new step at the end.
#: Version 1 is ``_SCHEMA``, also reached, unchanged, by a database made before versions.
MIGRATIONS: tuple[Migration, ...] = (
    script(_SCHEMA),
    # Rewritten by the readiness probe: a durable commit that adds no audit record.
    script(
        """
        CREATE TABLE IF NOT EXISTS audit_probe (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            at REAL NOT NULL,
            pad BLOB NOT NULL
        );
        """
    ),
    script(_PARTNER_IDENTITIES),
    script(_AGREEMENTS),
)


def _roles(text: str) -> tuple[str, ...]:
    return tuple(r for r in text.split(",") if r)


def _token(row: Sequence[Any]) -> StoredToken:
    return StoredToken(row[0], row[1], _roles(row[2]), row[3], row[4], row[5], row[6], row[7])


_TOKEN_COLUMNS = "id, trust, roles, label, secret_sha256, created_at, expires_at, revoked_at"
_PARTNER_COLUMNS = (
    "name, trust, roles, cert_sha256, created_at, identity, outbound_token, updated_at"
)
_AGREEMENT_COLUMNS = "trust, partner, partner_trust, allow, created_at, updated_at"


def _partner(row: Sequence[Any]) -> Partner:
    identity = None if row[5] is None else decode_identity(row[5])
    return Partner(row[0], row[1], _roles(row[2]), row[3], row[4], identity, row[6], row[7])


def _agreement(row: Sequence[Any]) -> Agreement:
    return Agreement(row[0], row[1], row[2], _roles(row[3]), row[4], row[5])


def _require_trust(conn: sqlite3.Connection, trust: str) -> None:
    if not conn.execute("SELECT 1 FROM trusts WHERE name = ?", (trust,)).fetchone():
        raise NotFound(f"no trust {trust!r}; create it with `iex trust add`")


class SQLiteSecurityStore:
    """``SecurityStore`` (``app.storage.security``) on SQLite."""

    def __init__(self, path: Path, key: bytes | None = None) -> None:
        """``key``: encrypt the database (SQLCipher), as the gateway always does."""
        self._db = SQLiteDatabase(path, name="security", key=key, read_threads=2, setup=_durable)

    async def open(self) -> None:
        await self._db.write(lambda conn: migrate(conn, MIGRATIONS))

    async def close(self) -> None:
        await self._db.close()

    # -- trusts ---------------------------------------------------------------------------

    async def add_trust(self, name: str) -> None:
        def add(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO trusts (name, created_at) VALUES (?, ?)", (name, time.time())
                )
            except IntegrityErrors:
                raise BadRequest(f"trust {name!r} already exists") from None

        await self._db.write(add)

    async def trusts(self) -> list[tuple[str, float]]:
        return await self._db.read(
            lambda c: [(r[0], r[1]) for r in c.execute("SELECT name, created_at FROM trusts")]
        )

    async def has_trust(self, name: str) -> bool:
        row = await self._db.read(
            lambda c: c.execute("SELECT 1 FROM trusts WHERE name = ?", (name,)).fetchone()
        )
        return row is not None

    # -- tokens ---------------------------------------------------------------------------

    async def add_token(self, token: StoredToken) -> None:
        def add(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM trusts WHERE name = ?", (token.trust,)).fetchone():
                conn.execute(
                    f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        token.id,
                        token.trust,
                        ",".join(token.roles),
                        token.label,
                        token.secret_sha256,
                        token.created_at,
                        token.expires_at,
                        token.revoked_at,
                    ),
                )
            else:
                raise NotFound(f"no trust {token.trust!r}; create it with `iex trust add`")

        await self._db.write(add)

    async def token(self, token_id: str) -> StoredToken | None:
        row = await self._db.read(
            lambda c: c.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
        )
        return None if row is None else _token(row)

    async def tokens(self, trust: str | None = None) -> list[StoredToken]:
        sql = f"SELECT {_TOKEN_COLUMNS} FROM tokens"
        params: tuple[str, ...] = ()
        if trust is not None:
            sql += " WHERE trust = ?"
            params = (trust,)
        rows = await self._db.read(
            lambda c: c.execute(sql + " ORDER BY created_at", params).fetchall()
        )
        return [_token(r) for r in rows]

    async def revoke_token(self, token_id: str) -> StoredToken:
        def revoke(conn: sqlite3.Connection) -> StoredToken:
            conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), token_id),
            )
            row = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no token {token_id!r}")
            return _token(row)

        return await self._db.write(revoke)

    # -- partners -------------------------------------------------------------------------

    async def put_partner(self, partner: Partner) -> bool:
        def put(conn: sqlite3.Connection) -> bool:
            _require_trust(conn, partner.trust)
            if partner.cert_sha256 is not None:
                holder = conn.execute(
                    "SELECT name FROM partners WHERE cert_sha256 = ? AND name != ?",
                    (partner.cert_sha256, partner.name),
                ).fetchone()
                if holder is not None:
                    raise BadRequest(
                        f"the certificate {partner.cert_sha256} is already pinned for partner "
                        f"{holder[0]!r}"
                    )
            known = conn.execute(
                "SELECT 1 FROM partners WHERE name = ?", (partner.name,)
            ).fetchone()
            conn.execute(
                f"INSERT INTO partners ({_PARTNER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT (name) DO UPDATE SET trust = excluded.trust,"
                " roles = excluded.roles, cert_sha256 = excluded.cert_sha256,"
                " identity = excluded.identity, outbound_token = excluded.outbound_token,"
                " updated_at = excluded.updated_at",
                (
                    partner.name,
                    partner.trust,
                    ",".join(partner.roles),
                    partner.cert_sha256,
                    partner.created_at,
                    None if partner.identity is None else encode_identity(partner.identity),
                    partner.outbound_token,
                    partner.updated_at or partner.created_at,
                ),
            )
            return known is None

        return await self._db.write(lambda conn: transaction(conn, put))

    async def partner(self, name: str) -> Partner | None:
        row = await self._db.read(
            lambda c: c.execute(
                f"SELECT {_PARTNER_COLUMNS} FROM partners WHERE name = ?", (name,)
            ).fetchone()
        )
        return None if row is None else _partner(row)

    async def remove_partner(self, name: str) -> None:
        def remove(conn: sqlite3.Connection) -> None:
            agreed = conn.execute(
                "SELECT trust, partner_trust FROM agreements WHERE partner = ?"
                " ORDER BY trust, partner_trust",
                (name,),
            ).fetchall()
            if agreed:
                listed = ", ".join(f"{trust} with {remote}" for trust, remote in agreed)
                raise Conflict(
                    f"partner {name!r} still has agreements ({listed}): remove them first "
                    "with `iex agreement remove`"
                )
            if conn.execute("DELETE FROM partners WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no partner {name!r}")

        await self._db.write(lambda conn: transaction(conn, remove))

    async def partners(self) -> list[Partner]:
        rows = await self._db.read(
            lambda c: c.execute(f"SELECT {_PARTNER_COLUMNS} FROM partners ORDER BY name").fetchall()
        )
        return [_partner(r) for r in rows]

    async def partner_by_certificate(self, cert_sha256: str) -> Partner | None:
        row = await self._db.read(
            lambda c: c.execute(
                f"SELECT {_PARTNER_COLUMNS} FROM partners WHERE cert_sha256 = ?", (cert_sha256,)
            ).fetchone()
        )
        return None if row is None else _partner(row)

    # -- agreements -----------------------------------------------------------------------

    async def put_agreement(self, agreement: Agreement) -> bool:
        def put(conn: sqlite3.Connection) -> bool:
            _require_trust(conn, agreement.trust)
            if not conn.execute(
                "SELECT 1 FROM partners WHERE name = ?", (agreement.partner,)
            ).fetchone():
                raise NotFound(
                    f"no partner {agreement.partner!r}; register it with `iex partner add`"
                )
            key = (agreement.trust, agreement.partner, agreement.partner_trust)
            known = conn.execute(
                "SELECT 1 FROM agreements WHERE trust = ? AND partner = ? AND partner_trust = ?",
                key,
            ).fetchone()
            conn.execute(
                f"INSERT INTO agreements ({_AGREEMENT_COLUMNS}) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT (trust, partner, partner_trust) DO UPDATE SET"
                " allow = excluded.allow, updated_at = excluded.updated_at",
                (*key, ",".join(agreement.allow), agreement.created_at, agreement.updated_at),
            )
            return known is None

        return await self._db.write(lambda conn: transaction(conn, put))

    async def agreement(self, trust: str, partner: str, partner_trust: str) -> Agreement | None:
        row = await self._db.read(
            lambda c: c.execute(
                f"SELECT {_AGREEMENT_COLUMNS} FROM agreements"
                " WHERE trust = ? AND partner = ? AND partner_trust = ?",
                (trust, partner, partner_trust),
            ).fetchone()
        )
        return None if row is None else _agreement(row)

    async def agreements(
        self, trust: str | None = None, partner: str | None = None
    ) -> list[Agreement]:
        clauses, params = [], []
        for column, value in (("trust", trust), ("partner", partner)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        sql = f"SELECT {_AGREEMENT_COLUMNS} FROM agreements{where}"
        rows = await self._db.read(
            lambda c: c.execute(sql + " ORDER BY trust, partner, partner_trust", params).fetchall()
        )
        return [_agreement(r) for r in rows]

    async def remove_agreement(self, trust: str, partner: str, partner_trust: str) -> Agreement:
        def remove(conn: sqlite3.Connection) -> Agreement:
            key = (trust, partner, partner_trust)
            row = conn.execute(
                f"SELECT {_AGREEMENT_COLUMNS} FROM agreements"
                " WHERE trust = ? AND partner = ? AND partner_trust = ?",
                key,
            ).fetchone()
            if row is None:
                raise NotFound(
                    f"no agreement of trust {trust!r} with trust {partner_trust!r} at partner "
                    f"{partner!r}"
                )
            conn.execute(
                "DELETE FROM agreements WHERE trust = ? AND partner = ? AND partner_trust = ?",
                key,
            )
            return _agreement(row)

        return await self._db.write(lambda conn: transaction(conn, remove))

    # -- audit ----------------------------------------------------------------------------

    async def append_audit(self, appends: Sequence[AuditAppend], seal: Seal) -> int:
        """Append records in one transaction, chained from the head; returns the last seq.

        ``BEGIN IMMEDIATE`` serialises appenders across processes (the server and the
        command line), so the chain never forks.
        """

        def append(conn: sqlite3.Connection) -> int:
            head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            seq, prev = (head[0], head[1]) if head else (0, GENESIS)
            for item in appends:
                seq += 1
                entry, digest = seal({**item.record, "seq": seq, "prev_hash": prev})
                conn.execute(
                    "INSERT INTO audit (seq, at, trust, actor, entry, hash) VALUES (?,?,?,?,?,?)",
                    (seq, item.at, item.trust, item.actor, entry, digest),
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO audit_studies (study_uid, seq) VALUES (?, ?)",
                    [(study, seq) for study in item.studies],
                )
                prev = digest
            conn.execute(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (seq, prev),
            )
            return int(seq)

        if not appends:
            return 0
        return await self._db.write(lambda conn: transaction(conn, append))

    async def probe_audit(self) -> None:
        """A durable commit that adds no record: raises what an append would raise now."""

        def probe(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO audit_probe (id, at, pad) VALUES (1, ?, zeroblob(?))"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at, pad = excluded.pad",
                (time.time(), _PROBE_BYTES),
            )

        await self._db.write(lambda conn: transaction(conn, probe))

    async def audit(self, where: AuditFilter) -> list[AuditRow]:
        """Records matching the filter, oldest first."""
        clauses = ["a.seq > ?"]
        params: list[Any] = [where.after_seq]
        for column, op, value in (
            ("a.at", ">=", where.since),
            ("a.at", "<", where.until),
            ("a.trust", "=", where.trust),
            ("a.actor", "=", where.actor),
        ):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(value)
        if where.study is not None:
            clauses.append("a.seq IN (SELECT seq FROM audit_studies WHERE study_uid = ?)")
            params.append(where.study)
        sql = (
            "SELECT a.seq, a.entry, a.hash FROM audit a WHERE "
            + " AND ".join(clauses)
            + " ORDER BY a.seq LIMIT ?"
        )
        params.append(where.limit)
        rows = await self._db.read(lambda c: c.execute(sql, params).fetchall())
        return [AuditRow(r[0], r[1], r[2]) for r in rows]

    async def audit_head(self) -> tuple[int, str]:
        row = await self._db.read(
            lambda c: c.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        )
        return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))
