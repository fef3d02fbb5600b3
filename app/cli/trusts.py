"""``iex trust`` and ``iex partner``: tenants, and the partner gateways known to them."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.cli.security_db import record_change, run, security_store
from app.cli.serve import add_data_dir, settings_from
from app.crypto.certs import file_fingerprint, normalise_fingerprint
from app.crypto.identity import IdentityDocument, decode_identity, encode_identity
from app.errors import BadRequest, NotFound
from app.names import check_name
from app.services.keys import make_trust_keys
from app.services.pairing import PartnerChange, check_outbound_token, register_partner
from app.services.security import parse_roles
from app.storage.security import Partner


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _trust_add(args: argparse.Namespace) -> int:
    name = check_name(args.name)
    async with security_store(args) as store:
        await store.add_trust(name)
        await record_change(args, store, "trust created", name, name)
    # Its exchange key, so that the identity exported from now on lists the trust.
    settings = settings_from(args)
    kek = settings.kek.get_secret_value() if settings.kek else None
    key_id = await asyncio.to_thread(make_trust_keys, settings.data_dir, kek, name)
    sys.stderr.write(f"trust {name} created (exchange key {key_id})\n")
    return 0


async def _trust_list(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        for name, created in await store.trusts():
            sys.stdout.write(f"{name}\t{_when(created)}\n")
    return 0


def _pin(args: argparse.Namespace) -> str | None:
    if args.cert is not None and args.cert_sha256 is not None:
        raise BadRequest("give the partner's certificate once: --cert FILE or --cert-sha256 HEX")
    if args.cert_sha256 is not None:
        return normalise_fingerprint(args.cert_sha256)
    if args.cert is None:
        return None
    try:
        return file_fingerprint(args.cert)
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read the certificate {args.cert}: {exc}") from None


def _identity(path: Path | None) -> IdentityDocument | None:
    if path is None:
        return None
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read the identity document {path}: {exc.strerror}") from None
    return decode_identity(text)


def _token(path: Path | None) -> str | None:
    """The token in ``path``. A secret: no message quotes what the file holds."""
    if path is None:
        return None
    try:
        return check_outbound_token(path.read_bytes().decode("ascii"))
    except OSError as exc:
        raise BadRequest(f"cannot read the token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BadRequest(f"the token file {path} holds more than ASCII text") from None


async def _partner_add(args: argparse.Namespace) -> int:
    change = PartnerChange(
        name=args.name,
        trust=args.trust,
        roles=parse_roles(args.role) if args.role else None,
        cert_sha256=_pin(args),
        identity=_identity(args.identity),
        outbound_token=_token(args.token_file),
    )
    async with security_store(args) as store:
        partner, created = await register_partner(store, change)
        what = "partner registered" if created else "partner updated"
        await record_change(args, store, what, partner.trust, f"partner:{partner.name}")
    sys.stderr.write(
        f"{what}: {partner.name} acts for trust {partner.trust} as {', '.join(partner.roles)}; "
        f"certificate SHA-256 {partner.cert_sha256 or 'none'}; "
        f"identity {'at ' + partner.url if partner.url else 'none'}; "
        f"outbound token {'set' if partner.outbound_token else 'not set'}\n"
    )
    return 0


def _partner_line(p: Partner) -> str:
    """Name, trust, roles, URL, certificate pin, whether we hold a token for calls to it,
    and the key ids of its identity on record (``-`` for what is not known)."""
    keys = ",".join(p.identity.key_ids) if p.identity else "-"
    token = "token:yes" if p.outbound_token else "token:no"
    cells = [p.name, p.trust, ",".join(p.roles), p.url or "-", p.cert_sha256 or "-", token, keys]
    return "\t".join(cells)


async def _partner_list(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        for p in await store.partners():
            sys.stdout.write(_partner_line(p) + "\n")
    return 0


async def _partner_show(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        partner = await store.partner(args.name)
    if partner is None:
        raise NotFound(f"no partner {args.name!r}")
    if partner.identity is None:
        raise NotFound(
            f"partner {args.name} has no identity on record (it is known by its certificate); "
            f"import it with iex partner add {args.name} --identity FILE"
        )
    sys.stdout.write(encode_identity(partner.identity))
    return 0


async def _partner_remove(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        await store.remove_partner(args.name)
        await record_change(args, store, "partner removed", None, f"partner:{args.name}")
    return 0


def register(commands: Any) -> None:
    trust = commands.add_parser("trust", help="manage trusts (tenants)")
    trusts = trust.add_subparsers(dest="trust_command", required=True)
    add = trusts.add_parser("add", help="create a trust")
    add.add_argument("name")
    add_data_dir(add)
    add.set_defaults(func=run(_trust_add))
    listing = trusts.add_parser("list", help="list trusts")
    add_data_dir(listing)
    listing.set_defaults(func=run(_trust_list))

    partner = commands.add_parser(
        "partner", help="register partner gateways: their identity, certificate and tokens"
    )
    partners = partner.add_subparsers(dest="partner_command", required=True)
    add = partners.add_parser(
        "add",
        help="register a partner gateway, or update one (options given replace those kept)",
    )
    add.add_argument("name", help="the partner's gateway name (its IEX_NAME)")
    add.add_argument("--trust", help="the local trust the partner acts for (needed to register it)")
    add.add_argument(
        "--identity",
        type=Path,
        metavar="FILE",
        help="its identity document (iex identity export on its side): URL and keys",
    )
    add.add_argument(
        "--token-file",
        type=Path,
        metavar="F",
        help="the token it issued for this gateway (iex token issue --partner <our name>), "
        "for calls to it; kept encrypted, never shown",
    )
    add.add_argument(
        "--role", action="append", help="role(s), repeatable or comma-separated (reader)"
    )
    add.add_argument("--cert", type=Path, help="its client certificate, PEM or DER, to pin")
    add.add_argument("--cert-sha256", help="or its SHA-256 fingerprint (hex, colons allowed)")
    add_data_dir(add)
    add.set_defaults(func=run(_partner_add))
    listing = partners.add_parser(
        "list",
        help="name, trust, roles, URL, certificate pin, outbound token set, identity key ids",
    )
    add_data_dir(listing)
    listing.set_defaults(func=run(_partner_list))
    show = partners.add_parser("show", help="print the partner's identity document on record")
    show.add_argument("name")
    add_data_dir(show)
    show.set_defaults(func=run(_partner_show))
    remove = partners.add_parser("remove", help="forget a partner (after its agreements)")
    remove.add_argument("name")
    add_data_dir(remove)
    remove.set_defaults(func=run(_partner_remove))
