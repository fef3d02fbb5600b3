"""``iex keys``: inspect and rotate the encryption keys of a data directory.

    iex keys status [--data-dir D]           key ids, owners, dates, objects sealed by each
    iex keys rotate [--data-dir D]           new KEK; every data key re-wrapped, data untouched
    iex keys rotate --trust NAME             new data key for the trust's new writes
    iex keys rotate --identity               new signing key, new exchange key per trust
    iex keys generate-kek                    print a new KEK for IEX_KEK / IEX_NEW_KEK

Rotation needs the gateway stopped (it holds the keys' lock while running).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime
from typing import Any

from app.cli.security_db import security_store
from app.cli.serve import add_data_dir, settings_from
from app.crypto.errors import KeyUnavailable
from app.crypto.keys import encode_kek, new_kek
from app.errors import IexError
from app.services.keys import (
    key_usage,
    read_data_keys,
    rotate_identity,
    rotate_kek,
    rotate_trust_key,
)


def _kek(args: argparse.Namespace) -> tuple[Any, str | None]:
    settings = settings_from(args)
    return settings, settings.kek.get_secret_value() if settings.kek else None


def _status(args: argparse.Namespace) -> int:
    settings, kek = _kek(args)
    keys = read_data_keys(settings.data_dir, kek, "read the keys")
    sys.stdout.write(f"key-encryption key: {keys.ring.kek.id}\n")
    usage = key_usage(settings.data_dir, keys)
    width = max([16] + [len(u.owner) for u in usage])
    sys.stdout.write(
        f"{'key id':<22} {'owner':<{width}} {'created (UTC)':<20} {'state':<8} objects\n"
    )
    for u in usage:
        created = (
            datetime.fromtimestamp(u.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            if u.created_at
            else "-"
        )
        state = "active" if u.active else "retired"
        sys.stdout.write(
            f"{u.key_id:<22} {u.owner:<{width}} {created:<20} {state:<8} {u.objects}\n"
        )
    return 0


def _rotate(args: argparse.Namespace) -> int:
    settings, kek = _kek(args)
    if args.identity:
        trusts = asyncio.run(_trust_names(args))
        rotated = rotate_identity(settings.data_dir, kek, trusts)
        sys.stdout.write(f"signing key: {rotated.signing_key}\n")
        for trust, key_id in rotated.exchange_keys.items():
            sys.stdout.write(f"trust {trust}: exchange key {key_id}\n")
        sys.stderr.write(
            "the old keys are kept, retired; export the identity again (iex identity export) "
            "and give it to every partner\n"
        )
        return 0
    if args.trust:
        key_id = rotate_trust_key(settings.data_dir, kek, args.trust)
        sys.stdout.write(f"trust {args.trust}: new writes now use data key {key_id}\n")
        return 0
    new = rotate_kek(settings.data_dir, kek, os.environ.get("IEX_NEW_KEK"))
    where = "IEX_NEW_KEK (now set IEX_KEK to it)" if kek else "the key file"
    sys.stdout.write(f"every data key is now wrapped by {new.id}, held in {where}\n")
    return 0


async def _trust_names(args: argparse.Namespace) -> list[str]:
    async with security_store(args) as store:
        return [name for name, _ in await store.trusts()]


def _generate(args: argparse.Namespace) -> int:
    sys.stdout.write(encode_kek(new_kek()))
    return 0


def _run(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            result: int = handler(args)
            return result
        except KeyUnavailable as exc:
            sys.stderr.write(f"iex keys: {exc.detail}\n")
            return 2
        except IexError as exc:
            sys.stderr.write(f"iex: {exc.detail}\n")
            return 2

    return run


def register(commands: Any) -> None:
    keys = commands.add_parser("keys", help="inspect and rotate encryption keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    status = sub.add_parser("status", help="key ids, dates and the objects each seals")
    add_data_dir(status)
    status.set_defaults(func=_run(_status))
    rotate = sub.add_parser(
        "rotate", help="rotate the KEK, a trust's data key, or the gateway's identity keys"
    )
    add_data_dir(rotate)
    which = rotate.add_mutually_exclusive_group()
    which.add_argument("--trust", help="start a new data key for this trust's new writes")
    which.add_argument(
        "--identity",
        action="store_true",
        help="a new signing key and a new exchange key for every trust (the old ones retire)",
    )
    rotate.set_defaults(func=_run(_rotate))
    generate = sub.add_parser("generate-kek", help="print a new KEK (for IEX_KEK)")
    generate.set_defaults(func=_run(_generate))
