"""The one place that says what may cross between this gateway and its partners, and how
to reach them: agreements, rights, partners' endpoints and signing keys.

Nothing crosses without an agreement of a local trust with a trust of a partner gateway
(``iex agreement add``). Each right, from this gateway's side:

- ``send``: the local trust may push studies to the partner's trust;
- ``receive``: the local trust accepts bundles sent by the partner's trust;
- ``pull``: the local trust's users may pull priors from the partner's trust (and what comes
  back answers the pull), and the partner's trust may pull the local trust's studies.

Each gateway's agreement is its own consent: a push needs ``send`` here and ``receive``
there, a pull ``pull`` on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from app.crypto.identity import PublicExchangeKey, PublicSigningKey
from app.errors import BadRequest, Conflict, Forbidden, NotFound
from app.storage.security import Agreement, Partner, SecurityStore


class Right(StrEnum):
    SEND = "send"
    RECEIVE = "receive"
    PULL = "pull"


def parse_rights(values: list[str]) -> tuple[Right, ...]:
    """Rights from ``["send,pull", "receive"]``, in the order send, receive, pull; at least
    one, and only known ones."""
    names = {n.strip() for v in values for n in v.split(",") if n.strip()}
    unknown = sorted(names - {r.value for r in Right})
    if unknown:
        raise BadRequest(
            f"unknown right {unknown[0]!r}; the rights are {', '.join(r.value for r in Right)}"
        )
    if not names:
        raise BadRequest(f"an agreement allows at least one of {', '.join(r.value for r in Right)}")
    return tuple(r for r in Right if r.value in names)


@dataclass(frozen=True)
class PartnerEndpoint:
    """Where and how this gateway calls a partner's trust: its URL, the token the partner
    issued for us (never shown), the SHA-256 of its TLS certificate when it serves TLS (to
    pin), and the exchange key that bundles for that trust are sealed to."""

    partner: str
    url: str
    token: str = field(repr=False)
    tls_sha256: str | None
    recipient: PublicExchangeKey


def describe(trust: str, partner: str, partner_trust: str) -> str:
    """How an agreement is named in messages."""
    return f"trust {trust} with trust {partner_trust} at partner {partner}"


def remote_exchange_key(partner: Partner, partner_trust: str) -> PublicExchangeKey:
    """The exchange key of ``partner_trust`` in ``partner``'s identity on record;
    ``Conflict`` saying what to import when there is none."""
    reimport = f"import its current identity: iex partner add {partner.name} --identity FILE"
    if partner.identity is None:
        raise Conflict(f"partner {partner.name} has no identity on record; {reimport}")
    key = partner.identity.exchange_key(partner_trust)
    if key is None:
        listed = ", ".join(t.trust for t in partner.identity.trusts) or "none"
        raise Conflict(
            f"partner {partner.name}'s identity on record lists no trust {partner_trust} "
            f"(it lists: {listed}); {reimport}"
        )
    return key


class ExchangeDirectory:
    """Agreements and partners as the exchange needs them, read from the security store on
    every call: a change made by the command line holds from the next one."""

    def __init__(self, store: SecurityStore) -> None:
        self._store = store

    async def agreement(self, local: str, partner: str, remote: str) -> Agreement | None:
        return await self._store.agreement(local, partner, remote)

    async def require(self, local: str, partner: str, remote: str, right: Right) -> Agreement:
        """The agreement of ``local`` with ``remote`` at ``partner`` when it allows
        ``right``; ``Forbidden`` saying what is missing otherwise."""
        return await self.require_any(local, partner, remote, (right,))

    async def require_any(
        self, local: str, partner: str, remote: str, rights: Iterable[Right]
    ) -> Agreement:
        """The agreement of ``local`` with ``remote`` at ``partner`` when it allows one of
        ``rights``; ``Forbidden`` saying what is missing otherwise. A study a pull asked
        for crosses under ``pull`` as a pushed one does under ``send`` (or ``receive``), so
        its delivery and its receiver ask for either."""
        wanted = tuple(rights)
        found = await self._store.agreement(local, partner, remote)
        what = describe(local, partner, remote)
        if found is None:
            raise Forbidden(
                f"no agreement of {what}: nothing crosses without one (iex agreement add)"
            )
        if not any(right.value in found.allow for right in wanted):
            names = " or ".join(right.value for right in wanted)
            raise Forbidden(f"the agreement of {what} allows {', '.join(found.allow)}, not {names}")
        return found

    async def partner_trusts(self, local: str, partner: str, right: Right) -> list[str]:
        """The trusts of ``partner`` that ``local`` has an agreement with allowing
        ``right``, by name."""
        agreements = await self._store.agreements(local, partner)
        return sorted(a.partner_trust for a in agreements if right.value in a.allow)

    async def partner(self, name: str) -> Partner:
        found = await self._store.partner(name)
        if found is None:
            raise NotFound(f"no partner {name!r}; register it with `iex partner add`")
        return found

    async def endpoint(self, partner: str, remote: str) -> PartnerEndpoint:
        """How to call ``remote`` at ``partner``. Says nothing of what is allowed: callers
        ``require`` the right first."""
        found = await self.partner(partner)
        recipient = remote_exchange_key(found, remote)
        assert found.identity is not None  # remote_exchange_key found the key in it
        if found.outbound_token is None:
            raise Conflict(
                f"partner {partner} has not given this gateway a token for outbound calls: "
                f"once it has issued one (iex token issue --partner <this gateway's name>), "
                f"add it with iex partner add {partner} --token-file FILE"
            )
        return PartnerEndpoint(
            partner=partner,
            url=found.identity.url,
            token=found.outbound_token,
            tls_sha256=found.identity.tls_sha256,
            recipient=recipient,
        )

    async def partner_signing_key(self, partner: str, key_id: str) -> PublicSigningKey:
        """The public key ``key_id`` of ``partner``, retired ones too (they verify what was
        signed before a rotation); ``Forbidden`` naming the ids on record otherwise."""
        found = await self.partner(partner)
        reimport = f"import its current identity: iex partner add {partner} --identity FILE"
        if found.identity is None:
            raise Forbidden(
                f"partner {partner} has no identity on record, so no signing key {key_id}; "
                f"{reimport}"
            )
        key = found.identity.signing_key(key_id)
        if key is None:
            on_record = ", ".join(k.id for k in found.identity.signing_keys)
            raise Forbidden(
                f"partner {partner} has no signing key {key_id} on record (its keys on "
                f"record: {on_record}); {reimport}"
            )
        return key
