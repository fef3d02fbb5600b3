"""Who is asking, for which trust, and may they: authentication, roles and rate limits.

A *trust* is a tenant: every instance belongs to one, and a principal acts for exactly one.
Callers prove who they are with a bearer token (RFC 6750) or, for partner gateways, a client
certificate pinned by its SHA-256 fingerprint. Tokens look like ``iex_<id>_<secret>``: the id
is public (it names the actor in the audit trail), the secret is 256 random bits of which
only the SHA-256 is stored, so a copy of the database grants nothing.

Every failure of a bearer token is the same 401 unless the caller proved they hold the
secret (then "expired" or "revoked" tells them nothing they did not know); an unknown id costs
the same hash comparison as a wrong secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from app.errors import BadRequest, Forbidden, TooManyRequests, Unauthorized
from app.services.audit import AuditTrail
from app.storage.security import Partner, SecurityStore, StoredToken

log = logging.getLogger(__name__)


class Role(StrEnum):
    """What a principal may do within its trust."""

    READER = "reader"  # QIDO-RS, WADO-RS
    UPLOADER = "uploader"  # STOW-RS, resumable uploads
    EXPORTER = "exporter"  # export packages
    ADMIN = "admin"  # trusts, tokens, partners, audit, metrics


ALL_ROLES = frozenset(Role)

#: The trust created on first start. Its admins operate the gateway: they see the audit
#: records of every trust (and of callers that never authenticated) and the metrics.
OPERATOR_TRUST = "local"

_TOKEN = re.compile(r"iex_([0-9a-f]{16})_([0-9a-f]{64})")
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Compared against when a token id is unknown, so that path costs what a wrong secret costs.
_DUMMY_HASH = hashlib.sha256(b"iex-no-such-token").hexdigest()


def parse_roles(values: list[str]) -> frozenset[Role]:
    """Roles from ``["reader,uploader", "admin"]``; an unknown name is refused."""
    names = {n.strip() for v in values for n in v.split(",") if n.strip()}
    try:
        return frozenset(Role(n) for n in names)
    except ValueError:
        raise BadRequest(
            f"unknown role in {sorted(names)}; roles are {', '.join(r.value for r in Role)}"
        ) from None


def parse_duration(text: str) -> int:
    """Seconds in ``30d``, ``12h``, ``1h30m``, ``45s`` or ``2w``."""
    compact = text.replace(" ", "").lower()
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise BadRequest(f"{text!r} is not a duration such as 30d, 12h, 15m or 45s")
    return sum(int(n) * _SECONDS[u] for n, u in parts)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``actor`` is a token id, ``partner:<name>`` or ``anonymous``."""

    actor: str
    trust: str
    roles: frozenset[Role]
    client: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.trust == OPERATOR_TRUST and Role.ADMIN in self.roles


@dataclass(frozen=True)
class Credentials:
    """What a request presented: the bearer token and the pinned-certificate fingerprint."""

    bearer: str | None
    client_cert_sha256: str | None
    client: str | None

    @property
    def claimed_actor(self) -> str | None:
        """The actor the credentials name, valid or not, for the audit trail."""
        if self.bearer is not None:
            match = _TOKEN.fullmatch(self.bearer)
            return match.group(1) if match else None
        if self.client_cert_sha256 is not None:
            return f"certificate:{self.client_cert_sha256[:16]}"
        return None


@dataclass(frozen=True)
class IssuedToken:
    """A new token. ``secret`` is shown once and stored nowhere."""

    secret: str
    record: StoredToken


def new_token(
    trust: str, roles: frozenset[Role], expires_in: int | None, label: str | None = None
) -> IssuedToken:
    if not roles:
        raise BadRequest("a token needs at least one role")
    token_id = secrets.token_hex(8)
    secret = secrets.token_hex(32)
    now = time.time()
    record = StoredToken(
        id=token_id,
        trust=trust,
        roles=tuple(sorted(r.value for r in roles)),
        label=label,
        secret_sha256=_sha256(secret),
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        revoked_at=None,
    )
    return IssuedToken(f"iex_{token_id}_{secret}", record)


@dataclass(frozen=True)
class RatePolicy:
    """A token bucket per principal for expensive routes: ``burst`` at once, refilled at
    ``per_minute``."""

    burst: int = 20
    per_minute: float = 60.0


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class RateLimiter:
    """A token bucket per key, kept only while it says something.

    A bucket left idle until it refilled completely is the same as a new one, so it is
    dropped: the buckets kept are those of keys active within the last ``burst / rate``
    seconds, and ``max_buckets`` bounds even those (the least recently used goes first, and
    its key starts again with a full bucket). Buckets are kept least recently used first,
    so finding the refilled ones costs a look at the oldest per ``take``.
    """

    policy: RatePolicy
    max_buckets: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Spend one unit; 0 when allowed, else the seconds until one is available."""
        now = self.clock()
        burst = float(self.policy.burst)
        rate = self.policy.per_minute / 60.0
        self._forget_refilled(now, burst / rate if rate > 0 else math.inf)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(burst, now)
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate if rate > 0 else 3600.0

    def _forget_refilled(self, now: float, refill: float) -> None:
        """Drop the buckets idle for ``refill`` seconds: full again, whatever they held."""
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.stamp < refill:
                return
            self._buckets.popitem(last=False)


class Gatekeeper:
    """Authenticates credentials to a ``Principal`` and authorises roles."""

    def __init__(self, store: SecurityStore, *, auth: bool, rates: RatePolicy) -> None:
        self._store = store
        self.auth = auth
        self._limiter = RateLimiter(rates)

    async def authenticate(self, credentials: Credentials) -> Principal:
        if not self.auth:
            return Principal("anonymous", OPERATOR_TRUST, ALL_ROLES, credentials.client)
        if credentials.bearer is not None:
            return await self._bearer(credentials.bearer, credentials.client)
        if credentials.client_cert_sha256 is not None:
            partner = await self._store.partner_by_certificate(credentials.client_cert_sha256)
            if partner is None:
                raise Unauthorized("the client certificate is not pinned for any partner")
            return _partner_principal(partner, credentials.client)
        raise Unauthorized("authentication required: send Authorization: Bearer <token>")

    async def _bearer(self, bearer: str, client: str | None) -> Principal:
        match = _TOKEN.fullmatch(bearer)
        if match is None:
            raise Unauthorized("invalid token")
        token_id, secret = match.groups()
        stored = await self._store.token(token_id)
        expected = stored.secret_sha256 if stored is not None else _DUMMY_HASH
        if not hmac.compare_digest(expected, _sha256(secret)) or stored is None:
            raise Unauthorized("invalid token")
        if stored.revoked_at is not None:
            raise Unauthorized("token revoked")
        if stored.expires_at is not None and stored.expires_at <= time.time():
            raise Unauthorized("token expired")
        roles = frozenset(Role(r) for r in stored.roles if r in Role._value2member_map_)
        return Principal(stored.id, stored.trust, roles, client)

    def authorise(self, principal: Principal, role: Role) -> None:
        if role not in principal.roles:
            raise Forbidden(f"this token lacks the {role.value} role")

    def throttle(self, principal: Principal, what: str) -> None:
        """Charge an expensive request to the principal's bucket, or raise 429."""
        wait = self._limiter.take(f"{principal.actor}:{what}")
        if wait > 0:
            raise TooManyRequests(
                f"rate limit for {what} reached; retry after {int(wait) + 1} s", int(wait) + 1
            )


def _partner_principal(partner: Partner, client: str | None) -> Principal:
    roles = frozenset(Role(r) for r in partner.roles if r in Role._value2member_map_)
    return Principal(f"partner:{partner.name}", partner.trust, roles, client)


@dataclass(frozen=True)
class SecurityPolicy:
    auth: bool = True
    rates: RatePolicy = RatePolicy()


#: The security database, beside the index and encrypted with the same key.
SECURITY_FILE = "security.sqlite3"
#: The first admin token, written on first start for the operator to pick up.
ADMIN_TOKEN_FILE = "admin.token"


class Security:
    """The security store with what the gateway builds on it: the gatekeeper and the audit
    trail. Built once in the lifespan; the store is opened and closed by its owner."""

    def __init__(self, store: SecurityStore, gate: Gatekeeper, audit: AuditTrail) -> None:
        self.store = store
        self.gate = gate
        self.audit = audit

    @classmethod
    async def start(
        cls, store: SecurityStore, policy: SecurityPolicy, admin_token: Path, name: str
    ) -> Security:
        """Start the audit trail on ``store`` and, on first start, create the operator trust
        with an admin token written to the file ``admin_token``. ``name``: the gateway's
        (``IEX_NAME``), the source of its audit records."""
        audit = AuditTrail(store, name)
        audit.start()
        security = cls(store, Gatekeeper(store, auth=policy.auth, rates=policy.rates), audit)
        await security._bootstrap(admin_token)
        if not policy.auth:
            log.warning(
                "AUTHENTICATION IS OFF (IEX_AUTH=off): every caller acts as an admin of trust "
                "%r with every role. Use this for development only.",
                OPERATOR_TRUST,
            )
        return security

    async def _bootstrap(self, token_path: Path) -> None:
        """First start: create the operator trust and a token with every role, written to a
        0600 file (never to the log). Once the operator trust exists this does nothing."""
        if await self.store.has_trust(OPERATOR_TRUST):
            return
        await self.store.add_trust(OPERATOR_TRUST)
        issued = new_token(OPERATOR_TRUST, ALL_ROLES, None, label="bootstrap admin")
        await self.store.add_token(issued.record)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(issued.secret + "\n")
        os.chmod(token_path, 0o600)
        await self.audit.security_change(
            "trust created with its first admin token",
            actor=self.audit.source,
            trust=OPERATOR_TRUST,
            subject=issued.record.id,
        )
        log.warning(
            "first start: created trust %r and an admin token (id %s) in %s; "
            "send it as 'Authorization: Bearer <token>'",
            OPERATOR_TRUST,
            issued.record.id,
            token_path,
        )

    async def close(self) -> None:
        """Stop the audit trail once everything queued is appended; the store stays open."""
        await self.audit.close()
