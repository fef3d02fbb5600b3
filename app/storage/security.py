"""The security store interface: trusts, tokens, partners, agreements and the audit trail.

``SecurityStore`` is what the services and the command line use; SQLite implements it now
(``app.storage.sqlite_security``) and PostgreSQL can later. The records it keeps and returns
are defined here, so every backend speaks the same types. Token secrets are never stored,
only their SHA-256; audit records are stored as the exact canonical text that was hashed,
chained by a ``Seal`` the audit service passes in. The one secret kept as it is, a bearer
token a partner issued for this gateway's outbound calls, lives only in the encrypted
database, and no ``repr`` shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.crypto.identity import IdentityDocument

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
    """A partner gateway, named by its gateway name.

    Inbound, it acts for ``trust`` with ``roles``, authenticated by its pinned client
    certificate (``cert_sha256``) or a token issued for it. Outbound, its ``identity``
    document gives its URL and keys, and ``outbound_token`` is the token it issued for us.
    """

    name: str
    trust: str
    roles: tuple[str, ...]
    cert_sha256: str | None
    created_at: float
    identity: IdentityDocument | None = None
    outbound_token: str | None = field(default=None, repr=False)
    updated_at: float | None = None

    @property
    def url(self) -> str | None:
        return self.identity.url if self.identity else None


@dataclass(frozen=True)
class Agreement:
    """What may cross between a local trust and a trust of a partner gateway: ``allow``
    holds rights (``send``, ``receive``, ``pull``; their meaning is the exchange
    directory's, ``app.services.exchange_directory``)."""

    trust: str
    partner: str
    partner_trust: str
    allow: tuple[str, ...]
    created_at: float
    updated_at: float


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
    taken, ``NotFound`` for a trust, token, partner or agreement that does not exist,
    ``Conflict`` for a change that the records depending on it forbid."""

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

    async def put_partner(self, partner: Partner) -> bool:
        """Register a partner of an existing trust, or replace what is kept of one (its
        ``created_at`` stays the first); True when it was new."""

    async def partner(self, name: str) -> Partner | None: ...

    async def remove_partner(self, name: str) -> None:
        """Forget a partner; ``Conflict`` while agreements with it remain."""

    async def partners(self) -> list[Partner]:
        """Every partner, by name."""

    async def partner_by_certificate(self, cert_sha256: str) -> Partner | None: ...

    async def put_agreement(self, agreement: Agreement) -> bool:
        """Keep an agreement of an existing trust with a registered partner, or replace its
        rights (its ``created_at`` stays the first); True when it was new."""

    async def agreement(self, trust: str, partner: str, partner_trust: str) -> Agreement | None: ...

    async def agreements(
        self, trust: str | None = None, partner: str | None = None
    ) -> list[Agreement]:
        """Agreements (of one trust, with one partner, or all) by trust, partner, partner
        trust."""

    async def remove_agreement(self, trust: str, partner: str, partner_trust: str) -> Agreement:
        """Remove an agreement and return it as it was."""

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
