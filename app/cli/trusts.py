"""``iex trust`` and ``iex partner``: tenants, and the partner gateways pinned to them."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.cli.security_db import record_change, run, security_store
from app.cli.serve import add_data_dir
from app.crypto.certs import file_fingerprint, normalise_fingerprint
from app.errors import BadRequest
from app.names import check_name
from app.services.security import Role, parse_roles
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
    sys.stderr.write(f"trust {name} created\n")
    return 0


async def _trust_list(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        for name, created in await store.trusts():
            sys.stdout.write(f"{name}\t{_when(created)}\n")
    return 0


async def _partner_add(args: argparse.Namespace) -> int:
    name = check_name(args.name, "partner")
    if (args.cert is None) == (args.cert_sha256 is None):
        raise BadRequest("give the partner's certificate: --cert FILE or --cert-sha256 HEX")
    try:
        pin = (
            file_fingerprint(args.cert)
            if args.cert is not None
            else normalise_fingerprint(args.cert_sha256)
        )
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read the certificate {args.cert}: {exc}") from None
    roles = parse_roles(args.role or [Role.READER.value])
    partner = Partner(name, args.trust, tuple(sorted(r.value for r in roles)), pin, time.time())
    async with security_store(args) as store:
        await store.add_partner(partner)
        await record_change(
            args, store, "partner certificate pinned", args.trust, f"partner:{name}"
        )
    sys.stderr.write(
        f"partner {name} acts for trust {args.trust} as {', '.join(partner.roles)}; "
        f"certificate SHA-256 {pin}\n"
    )
    return 0


async def _partner_list(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        for p in await store.partners():
            sys.stdout.write(f"{p.name}\t{p.trust}\t{','.join(p.roles)}\t{p.cert_sha256}\n")
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

    partner = commands.add_parser("partner", help="pin partner gateways' client certificates")
    partners = partner.add_subparsers(dest="partner_command", required=True)
    add = partners.add_parser("add", help="pin a partner's client certificate to a trust")
    add.add_argument("name")
    add.add_argument("--trust", required=True, help="the trust the partner acts for")
    add.add_argument(
        "--role", action="append", help="role(s), repeatable or comma-separated (reader)"
    )
    add.add_argument("--cert", type=Path, help="the partner's certificate, PEM or DER")
    add.add_argument("--cert-sha256", help="or its SHA-256 fingerprint (hex, colons allowed)")
    add_data_dir(add)
    add.set_defaults(func=run(_partner_add))
    listing = partners.add_parser("list", help="list partners")
    add_data_dir(listing)
    listing.set_defaults(func=run(_partner_list))
    remove = partners.add_parser("remove", help="unpin a partner")
    remove.add_argument("name")
    add_data_dir(remove)
    remove.set_defaults(func=run(_partner_remove))
