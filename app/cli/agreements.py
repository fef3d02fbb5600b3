"""``iex agreement``: what may cross between a local trust and a trust of a partner gateway.

    iex agreement add --trust LOCAL --partner NAME --partner-trust REMOTE --allow send,pull
    iex agreement list [--trust T] [--partner P]
    iex agreement remove --trust LOCAL --partner NAME --partner-trust REMOTE

Adding an agreement that exists changes its rights. The rights are described in
``app.services.exchange_directory``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from app.cli.security_db import record_change, run, security_store
from app.cli.serve import add_data_dir
from app.services.exchange_directory import describe, parse_rights
from app.services.pairing import set_agreement


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _subject(partner: str, partner_trust: str) -> str:
    return f"agreement:{partner}/{partner_trust}"


async def _add(args: argparse.Namespace) -> int:
    allow = parse_rights(args.allow)
    async with security_store(args) as store:
        agreement, created = await set_agreement(
            store, args.trust, args.partner, args.partner_trust, allow
        )
        rights = ",".join(agreement.allow)
        change = "agreement added" if created else "agreement updated"
        await record_change(
            args,
            store,
            f"{change}: {rights}",
            args.trust,
            _subject(args.partner, args.partner_trust),
        )
    where = describe(args.trust, args.partner, args.partner_trust)
    sys.stderr.write(f"{change}: {where} allows {rights}\n")
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        for a in await store.agreements(args.trust, args.partner):
            sys.stdout.write(
                f"{a.trust}\t{a.partner}\t{a.partner_trust}\t{','.join(a.allow)}\t"
                f"{_when(a.updated_at)}\n"
            )
    return 0


async def _remove(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        await store.remove_agreement(args.trust, args.partner, args.partner_trust)
        await record_change(
            args,
            store,
            "agreement removed",
            args.trust,
            _subject(args.partner, args.partner_trust),
        )
    where = describe(args.trust, args.partner, args.partner_trust)
    sys.stderr.write(f"agreement removed: nothing crosses any more between {where}\n")
    return 0


def _agreement_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust", required=True, help="the local trust")
    parser.add_argument("--partner", required=True, help="the partner gateway's name")
    parser.add_argument("--partner-trust", required=True, help="the trust at the partner gateway")


def register(commands: Any) -> None:
    agreement = commands.add_parser(
        "agreement", help="what may cross between a local trust and a partner's trust"
    )
    agreements = agreement.add_subparsers(dest="agreement_command", required=True)
    add = agreements.add_parser("add", help="agree, or change the rights of an agreement")
    _agreement_options(add)
    add.add_argument(
        "--allow",
        action="append",
        required=True,
        help="send, receive and/or pull; repeatable or comma-separated",
    )
    add_data_dir(add)
    add.set_defaults(func=run(_add))
    listing = agreements.add_parser(
        "list", help="trust, partner, partner trust, rights, last change (UTC)"
    )
    listing.add_argument("--trust", help="only this local trust's agreements")
    listing.add_argument("--partner", help="only the agreements with this partner")
    add_data_dir(listing)
    listing.set_defaults(func=run(_list))
    remove = agreements.add_parser("remove", help="end an agreement")
    _agreement_options(remove)
    add_data_dir(remove)
    remove.set_defaults(func=run(_remove))
