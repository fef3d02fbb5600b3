"""The security store interface: trusts, tokens, partners and the audit trail.

``SecurityStore`` is what the services and the command line use; SQLite implements it now
(``app.storage.sqlite_security``) and PostgreSQL can later. The records it keeps and returns
are defined here, so every backend speaks the same types. Token secrets are never stored,
only their SHA-256; audit records are stored as the exact canonical text that was hashed,
chained by a ``Seal`` the audit service passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

#: The ``prev_hash`` of the first audit record.
GENESIS = "0" * 64

#: Seals one record (already holding ``seq`` and ``prev_hash``): its canonical text and hash.
Seal = Callable[[dict[str, Any]], tuple[str, str]]


@dataclass(frozen=True)
class StoredToken:
    id: str
    trust: str
    roles: tuple[str, ...]
    label: str | None
    secret_sha256: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class Partner:
    name: str
    trust: str
    roles: tuple[str, ...]
    cert_sha256: str
    created_at: float


@dataclass(frozen=True)
class AuditAppend:
    """One record to append, with the columns it is found by."""

    record: dict[str, Any]
    at: float
    trust: str | None
    actor: str | None
    studies: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditFilter:
    since: float | None = None
    until: float | None = None
    trust: str | None = None
    actor: str | None = None
    study: str | None = None
    after_seq: int = 0
    limit: int = 1000


@dataclass(frozen=True)
class AuditRow:
    seq: int
    entry: str
    hash: str


class SecurityStore(Protocol):
    """Domain errors, not backend ones: ``BadRequest`` for a name or certificate already
    taken, ``NotFound`` for a trust, token or partner that does not exist."""

    async def add_trust(self, name: str) -> None: ...

    async def trusts(self) -> list[tuple[str, float]]:
        """Every trust's name and creation time (epoch seconds)."""

    async def has_trust(self, name: str) -> bool: ...

    async def add_token(self, token: StoredToken) -> None:
        """Keep a token of an existing trust."""

    async def token(self, token_id: str) -> StoredToken | None: ...

    async def tokens(self, trust: str | None = None) -> list[StoredToken]:
        """Tokens (of one trust, or all), oldest first."""

    async def revoke_token(self, token_id: str) -> StoredToken:
        """Revoke a token (once: a second revocation keeps the first time) and return it."""

    async def add_partner(self, partner: Partner) -> None:
        """Pin a partner's certificate to an existing trust."""

    async def remove_partner(self, name: str) -> None: ...

    async def partners(self) -> list[Partner]:
        """Every partner, by name."""

    async def partner_by_certificate(self, cert_sha256: str) -> Partner | None: ...

    async def append_audit(self, appends: Sequence[AuditAppend], seal: Seal) -> int:
        """Append records in one transaction, chained from the head, each sealed by ``seal``;
        returns the last seq (0 when there was nothing to append). Appenders in other
        processes are serialised, so the chain never forks."""

    async def probe_audit(self) -> None:
        """A durable write that appends no record: raises what an append would raise now."""

    async def audit(self, where: AuditFilter) -> list[AuditRow]:
        """Records matching the filter, oldest first."""

    async def audit_head(self) -> tuple[int, str]:
        """The seq and hash of the last sealed record, ``(0, GENESIS)`` before the first."""

    async def close(self) -> None: ...
