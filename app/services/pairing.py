"""Pairing with partner gateways: registering a partner (and updating what is known of it)
and agreeing what may cross between a local trust and a trust of a partner.

Pairing two gateways takes a few steps on each side, in an order that a person can follow
(each side must know the other before it can issue a token for it): register the partner
from its identity document, issue it a token, add the token it issued for us, agree. Every
step after the first updates what is known: options given replace what is stored, the
others are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from app.crypto.identity import IdentityDocument
from app.errors import BadRequest, NotFound
from app.names import check_name
from app.services.exchange_directory import Right, remote_exchange_key
from app.services.security import Role
from app.storage.security import Agreement, Partner, SecurityStore

#: Longer than any token iex issues; anything longer is a wrong file, not a token.
MAX_TOKEN_LENGTH = 4096


@dataclass(frozen=True)
class PartnerChange:
    """What is given about a partner; ``None`` keeps what is stored."""

    name: str
    trust: str | None = None
    roles: frozenset[Role] | None = None
    cert_sha256: str | None = None
    identity: IdentityDocument | None = None
    outbound_token: str | None = field(default=None, repr=False)


def check_outbound_token(text: str) -> str:
    """A bearer token read from a file (its line end dropped): one line of visible ASCII.
    Messages never quote it."""
    token = text.strip()
    if not token:
        raise BadRequest("the token file is empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise BadRequest(f"the token file holds more than {MAX_TOKEN_LENGTH} characters")
    if not all("!" <= c <= "~" for c in token):
        raise BadRequest("the token file must hold one token: visible ASCII characters on one line")
    return token


async def register_partner(
    store: SecurityStore, change: PartnerChange, now: float | None = None
) -> tuple[Partner, bool]:
    """Register the partner ``change.name``, or update it when it is known; the partner as
    kept, and whether it was new."""
    name = check_name(change.name, "partner")
    if change.identity is not None and change.identity.gateway != name:
        raise BadRequest(
            f"the identity document is gateway {change.identity.gateway!r}'s, not {name!r}'s: "
            f"a partner's name is its gateway name, so register it as {change.identity.gateway}"
        )
    now = time.time() if now is None else now
    known = await store.partner(name)
    if known is None:
        if change.trust is None:
            raise BadRequest(f"partner {name} is new: give --trust, the trust it acts for here")
        partner = Partner(
            name=name,
            trust=change.trust,
            roles=_roles(change.roles or frozenset({Role.READER})),
            cert_sha256=change.cert_sha256,
            created_at=now,
            identity=change.identity,
            outbound_token=change.outbound_token,
            updated_at=now,
        )
    else:
        partner = replace(
            known,
            trust=change.trust or known.trust,
            roles=_roles(change.roles) if change.roles else known.roles,
            cert_sha256=change.cert_sha256 or known.cert_sha256,
            identity=change.identity or known.identity,
            outbound_token=change.outbound_token or known.outbound_token,
            updated_at=now,
        )
    if partner.cert_sha256 is None and partner.identity is None:
        raise BadRequest(
            "give the partner's certificate: --cert FILE or --cert-sha256 HEX "
            "(or its identity, --identity FILE, to let it authenticate with a token instead)"
        )
    if partner.outbound_token is not None and partner.identity is None:
        raise BadRequest(
            f"a token for calls to partner {name} needs its identity (its URL): "
            "give --identity FILE too"
        )
    created = await store.put_partner(partner)
    return partner, created


def _roles(roles: frozenset[Role]) -> tuple[str, ...]:
    return tuple(sorted(r.value for r in roles))


async def set_agreement(
    store: SecurityStore,
    trust: str,
    partner: str,
    partner_trust: str,
    allow: tuple[Right, ...],
    now: float | None = None,
) -> tuple[Agreement, bool]:
    """Agree what may cross between the local ``trust`` and ``partner_trust`` at
    ``partner``, or change the rights of that agreement; it, and whether it was new.

    ``send`` and ``pull`` call the partner's trust, so its identity on record must list it
    (with the exchange key a push seals to)."""
    check_name(partner_trust, "partner trust")
    if not allow:
        raise BadRequest(f"an agreement allows at least one of {', '.join(Right)}")
    if not await store.has_trust(trust):
        raise NotFound(f"no trust {trust!r}; create it with `iex trust add`")
    known = await store.partner(partner)
    if known is None:
        raise NotFound(f"no partner {partner!r}; register it with `iex partner add`")
    if Right.SEND in allow or Right.PULL in allow:
        remote_exchange_key(known, partner_trust)
    now = time.time() if now is None else now
    before = await store.agreement(trust, partner, partner_trust)
    agreement = Agreement(
        trust,
        partner,
        partner_trust,
        tuple(r.value for r in allow),
        before.created_at if before else now,
        now,
    )
    created = await store.put_agreement(agreement)
    return agreement, created
