"""Partners, agreements and the exchange directory on the real SQLite security store
(SQLCipher, as the gateway opens it), and the upgrade of a security database made before
partners had identities."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.crypto.identity import (
    ExchangeKey,
    IdentityDocument,
    SigningKey,
    identity_document,
    new_exchange_private,
    new_signing_private,
)
from app.errors import BadRequest, Conflict, Forbidden, NotFound
from app.services.exchange_directory import ExchangeDirectory, Right, parse_rights
from app.services.pairing import PartnerChange, register_partner, set_agreement
from app.services.security import Role
from app.storage.security import Partner
from app.storage.sqlite_db import SQLiteDatabase, migrate, schema_version
from app.storage.sqlite_security import MIGRATIONS, SQLiteSecurityStore

KEY = os.urandom(32)
TOKEN = "iex_0123456789abcdef_" + "5e" * 32


def _identity(gateway: str, *trusts: str, rotated: bool = False) -> IdentityDocument:
    signing = [(SigningKey(f"sig-{gateway}-1", new_signing_private()), not rotated)]
    if rotated:
        signing.append((SigningKey(f"sig-{gateway}-2", new_signing_private()), True))
    exchange = [ExchangeKey(f"xch-{gateway}-{t}", t, new_exchange_private()) for t in trusts]
    return identity_document(gateway, f"https://{gateway}.example:8443", signing, exchange, None)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteSecurityStore]:
    s = SQLiteSecurityStore(tmp_path / "security.sqlite3", key=KEY)
    await s.open()
    await s.add_trust("local")
    await s.add_trust("rad-a")
    yield s
    await s.close()


async def test_register_then_update_keeps_what_is_not_given(store: SQLiteSecurityStore) -> None:
    east = _identity("east", "rad-b", "rad-c")
    partner, created = await register_partner(
        store, PartnerChange("east", trust="rad-a", identity=east), now=100.0
    )
    assert created and partner.cert_sha256 is None and partner.outbound_token is None
    assert partner.roles == ("reader",) and partner.url == "https://east.example:8443"
    assert await store.partner("east") == partner

    updated, created = await register_partner(
        store, PartnerChange("east", outbound_token=TOKEN), now=200.0
    )
    assert not created
    assert updated == Partner(
        "east", "rad-a", ("reader",), None, 100.0, east, TOKEN, updated_at=200.0
    )
    assert await store.partner("east") == updated
    assert TOKEN not in repr(updated)

    roles = frozenset({Role.UPLOADER, Role.READER})
    again, _ = await register_partner(
        store, PartnerChange("east", trust="local", roles=roles, cert_sha256="ab" * 32)
    )
    assert again.trust == "local" and again.roles == ("reader", "uploader")
    assert again.cert_sha256 == "ab" * 32
    assert again.outbound_token == TOKEN and again.identity == east
    assert await store.partner_by_certificate("ab" * 32) == again


async def test_registration_is_refused_with_a_reason(store: SQLiteSecurityStore) -> None:
    east = _identity("east", "rad-b")
    cases = [
        (PartnerChange("west", trust="rad-a", identity=east), BadRequest, "gateway 'east'"),
        (PartnerChange("east", identity=east), BadRequest, "give --trust"),
        (PartnerChange("east", trust="rad-a"), BadRequest, "--cert FILE or --cert-sha256"),
        (
            PartnerChange("east", trust="rad-a", cert_sha256="cd" * 32, outbound_token=TOKEN),
            BadRequest,
            "needs its identity",
        ),
        (PartnerChange("east", trust="nowhere", identity=east), NotFound, "no trust 'nowhere'"),
        (PartnerChange("bad name", trust="rad-a", cert_sha256="cd" * 32), BadRequest, "name"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            await register_partner(store, change)
    assert await store.partners() == []

    await register_partner(store, PartnerChange("north", trust="local", cert_sha256="cd" * 32))
    with pytest.raises(BadRequest, match="already pinned for partner 'north'"):
        await register_partner(
            store, PartnerChange("east", trust="local", identity=east, cert_sha256="cd" * 32)
        )


async def test_agreements_are_validated_updated_and_removed(store: SQLiteSecurityStore) -> None:
    await register_partner(
        store, PartnerChange("east", trust="rad-a", identity=_identity("east", "rad-b"))
    )
    await register_partner(store, PartnerChange("north", trust="local", cert_sha256="ef" * 32))
    send_pull = parse_rights(["pull,send"])
    assert send_pull == (Right.SEND, Right.PULL)

    first, created = await set_agreement(store, "rad-a", "east", "rad-b", send_pull, now=10.0)
    assert created and first.allow == ("send", "pull")
    second, created = await set_agreement(
        store, "rad-a", "east", "rad-b", (Right.RECEIVE,), now=20.0
    )
    assert not created and second.allow == ("receive",)
    assert (second.created_at, second.updated_at) == (10.0, 20.0)
    # Receiving alone needs no identity: the trust need not be in it.
    await set_agreement(store, "local", "north", "anything", (Right.RECEIVE,))
    assert [(a.trust, a.partner, a.partner_trust) for a in await store.agreements()] == [
        ("local", "north", "anything"),
        ("rad-a", "east", "rad-b"),
    ]
    assert await store.agreements(trust="rad-a") == [second]
    assert await store.agreements(partner="north") == await store.agreements(trust="local")

    refusals = [
        (("nowhere", "east", "rad-b", send_pull), NotFound, "no trust 'nowhere'"),
        (("rad-a", "nobody", "rad-b", send_pull), NotFound, "no partner 'nobody'"),
        (("rad-a", "east", "bad/name", send_pull), BadRequest, "partner trust name"),
        (("rad-a", "east", "rad-b", ()), BadRequest, "at least one"),
        (("rad-a", "east", "rad-x", (Right.SEND,)), Conflict, "lists no trust rad-x"),
        (("rad-a", "north", "rad-b", (Right.PULL,)), Conflict, "no identity on record"),
    ]
    for arguments, error, message in refusals:
        with pytest.raises(error, match=message):
            await set_agreement(store, *arguments)
    for values, message in (([""], "at least one"), (["send,fly"], "unknown right 'fly'")):
        with pytest.raises(BadRequest, match=message):
            parse_rights(values)

    with pytest.raises(Conflict, match=r"still has agreements \(local with anything\)"):
        await store.remove_partner("north")
    removed = await store.remove_agreement("local", "north", "anything")
    assert removed.allow == ("receive",)
    with pytest.raises(NotFound, match="no agreement of trust 'local'"):
        await store.remove_agreement("local", "north", "anything")
    await store.remove_partner("north")


async def test_the_directory_answers_what_later_code_asks(store: SQLiteSecurityStore) -> None:
    east_identity = _identity("east", "rad-b", rotated=True)
    await register_partner(
        store, PartnerChange("east", trust="rad-a", identity=east_identity, cert_sha256="12" * 32)
    )
    await set_agreement(store, "rad-a", "east", "rad-b", (Right.SEND, Right.RECEIVE))
    directory = ExchangeDirectory(store)

    assert (await directory.agreement("rad-a", "east", "rad-b")) is not None
    assert await directory.agreement("local", "east", "rad-b") is None
    agreed = await directory.require("rad-a", "east", "rad-b", Right.SEND)
    assert agreed.allow == ("send", "receive")
    with pytest.raises(Forbidden, match="allows send, receive, not pull"):
        await directory.require("rad-a", "east", "rad-b", Right.PULL)
    with pytest.raises(Forbidden, match="no agreement of trust local with trust rad-b at part"):
        await directory.require("local", "east", "rad-b", Right.RECEIVE)

    with pytest.raises(Conflict, match="has not given this gateway a token"):
        await directory.endpoint("east", "rad-b")
    await register_partner(store, PartnerChange("east", outbound_token=TOKEN))
    endpoint = await directory.endpoint("east", "rad-b")
    assert endpoint.url == "https://east.example:8443" and endpoint.tls_sha256 is None
    assert endpoint.token == TOKEN
    assert endpoint.recipient == east_identity.exchange_key("rad-b")
    assert TOKEN not in repr(endpoint)
    with pytest.raises(Conflict, match=r"lists no trust rad-z \(it lists: rad-b\)"):
        await directory.endpoint("east", "rad-z")
    with pytest.raises(NotFound, match="no partner 'west'"):
        await directory.endpoint("west", "rad-b")

    old, new = east_identity.signing_keys
    assert await directory.partner_signing_key("east", old.id) == old  # retired: still known
    assert (await directory.partner_signing_key("east", new.id)).ed25519() is not None
    with pytest.raises(Forbidden) as unknown:
        await directory.partner_signing_key("east", "sig-unknown")
    assert unknown.value.detail == (
        f"partner east has no signing key sig-unknown on record (its keys on record: {old.id}, "
        f"{new.id}); import its current identity: iex partner add east --identity FILE"
    )
    await register_partner(store, PartnerChange("north", trust="local", cert_sha256="34" * 32))
    with pytest.raises(Forbidden, match="north has no identity on record, so no signing key s"):
        await directory.partner_signing_key("north", "sig-1")


async def test_studies_a_pull_asked_for_cross_under_send_or_pull(
    store: SQLiteSecurityStore,
) -> None:
    await register_partner(
        store,
        PartnerChange("east", trust="rad-a", identity=_identity("east", "rad-b", "rad-c", "rad-d")),
    )
    await set_agreement(store, "rad-a", "east", "rad-b", (Right.PULL,))
    await set_agreement(store, "rad-a", "east", "rad-c", (Right.SEND, Right.PULL))
    await set_agreement(store, "rad-a", "east", "rad-d", (Right.RECEIVE,))
    directory = ExchangeDirectory(store)
    either = (Right.SEND, Right.PULL)
    assert (await directory.require_any("rad-a", "east", "rad-b", either)).allow == ("pull",)
    assert (await directory.require_any("rad-a", "east", "rad-c", either)).allow == ("send", "pull")
    with pytest.raises(Forbidden, match="allows receive, not send or pull"):
        await directory.require_any("rad-a", "east", "rad-d", either)
    with pytest.raises(Forbidden, match="no agreement of trust local"):
        await directory.require_any("local", "east", "rad-b", either)
    assert await directory.partner_trusts("rad-a", "east", Right.PULL) == ["rad-b", "rad-c"]
    assert await directory.partner_trusts("rad-a", "east", Right.RECEIVE) == ["rad-d"]
    assert await directory.partner_trusts("local", "east", Right.PULL) == []
    assert await directory.partner_trusts("rad-a", "west", Right.PULL) == []


# -- the upgrade from the previous schema ------------------------------------------------------

#: How the code before identities registered a partner (its ``add_partner``).
_OLD_PARTNER = (
    "INSERT INTO partners (name, trust, roles, cert_sha256, created_at) VALUES (?,?,?,?,?)"
)


async def test_a_database_of_the_previous_schema_keeps_its_partners(tmp_path: Path) -> None:
    path = tmp_path / "security.sqlite3"
    old = SQLiteDatabase(path, name="security", key=KEY)

    def previous(conn: sqlite3.Connection) -> None:
        migrate(conn, MIGRATIONS[:2])  # the schema steps as they were before this one
        conn.execute("INSERT INTO trusts (name, created_at) VALUES ('local', 1.0)")
        conn.execute("INSERT INTO trusts (name, created_at) VALUES ('north', 2.0)")
        conn.execute(_OLD_PARTNER, ("east", "local", "reader", "aa" * 32, 3.0))
        conn.execute(_OLD_PARTNER, ("west", "north", "reader,uploader", "bb" * 32, 4.0))

    await old.write(previous)
    assert await old.read(schema_version) == 2
    await old.close()

    store = SQLiteSecurityStore(path, key=KEY)
    await store.open()
    try:
        assert await store.partners() == [
            Partner("east", "local", ("reader",), "aa" * 32, 3.0, updated_at=3.0),
            Partner("west", "north", ("reader", "uploader"), "bb" * 32, 4.0, updated_at=4.0),
        ]
        found = await store.partner_by_certificate("bb" * 32)
        assert found is not None and found.name == "west"
        # The pin is optional now, and unique still.
        identity = _identity("south", "rad-s")
        await register_partner(store, PartnerChange("south", trust="north", identity=identity))
        with pytest.raises(BadRequest, match="already pinned for partner 'east'"):
            await register_partner(store, PartnerChange("south", cert_sha256="aa" * 32))
        await set_agreement(store, "north", "south", "rad-s", (Right.SEND,))
        assert len(await store.agreements()) == 1
    finally:
        await store.close()
    check = SQLiteDatabase(path, name="security", key=KEY)
    try:
        assert await check.read(schema_version) == len(MIGRATIONS) == 4
        assert await check.read(lambda c: c.execute("PRAGMA foreign_key_check").fetchall()) == []
    finally:
        await check.close()
