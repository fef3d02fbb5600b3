"""``iex token``: issue, list and revoke bearer tokens. A token is printed once; only the
SHA-256 of its secret is kept."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from app.cli.security_db import record_change, run, security_store
from app.cli.serve import add_data_dir
from app.services.security import new_token, parse_duration, parse_roles


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _issue(args: argparse.Namespace) -> int:
    roles = parse_roles(args.role)
    expires = parse_duration(args.expires) if args.expires else None
    label = f"partner {args.partner}" if args.partner else args.label
    issued = new_token(args.trust, roles, expires, label)
    async with security_store(args) as store:
        await store.add_token(issued.record)
        await record_change(args, store, "token issued", args.trust, issued.record.id)
    record = issued.record
    sys.stderr.write(
        f"token {record.id} for trust {record.trust} ({', '.join(record.roles)}), "
        f"expires {_when(record.expires_at) if record.expires_at else 'never'}. "
        "It is shown only this once:\n"
    )
    sys.stdout.write(issued.secret + "\n")
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        for t in await store.tokens(args.trust):
            state = "revoked" if t.revoked_at else "active"
            sys.stdout.write(
                f"{t.id}\t{t.trust}\t{','.join(t.roles)}\t{state}\t"
                f"created {_when(t.created_at)}\texpires {_when(t.expires_at)}\t{t.label or ''}\n"
            )
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    async with security_store(args) as store:
        token = await store.revoke_token(args.id)
        await record_change(args, store, "token revoked", token.trust, token.id)
    sys.stderr.write(f"token {token.id} revoked\n")
    return 0


def register(commands: Any) -> None:
    token = commands.add_parser("token", help="issue, list and revoke bearer tokens")
    tokens = token.add_subparsers(dest="token_command", required=True)
    issue = tokens.add_parser("issue", help="issue a token (printed once)")
    issue.add_argument("--trust", required=True, help="the trust the token acts for")
    issue.add_argument(
        "--role",
        action="append",
        required=True,
        help="reader, uploader, exporter or admin; repeatable or comma-separated",
    )
    issue.add_argument("--expires", help="lifetime such as 30d, 12h or 15m (default: never)")
    issue.add_argument("--label", help="a note on who holds it")
    issue.add_argument("--partner", help="the partner gateway that will hold it")
    add_data_dir(issue)
    issue.set_defaults(func=run(_issue))
    listing = tokens.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--trust", help="only this trust's tokens")
    add_data_dir(listing)
    listing.set_defaults(func=run(_list))
    revoke = tokens.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id")
    add_data_dir(revoke)
    revoke.set_defaults(func=run(_revoke))
