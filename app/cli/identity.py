"""``iex identity export``: print this gateway's identity document for its partners.

    iex identity export --url https://gw.example:8443 [--tls-cert PEM] [--data-dir D]

The document holds public keys only. ``--url`` defaults to ``IEX_PUBLIC_URL``; the TLS
certificate's fingerprint is included when the gateway serves TLS (``--tls-cert`` or
``IEX_TLS_CERT``, as ``iex serve`` takes it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from app.cli.security_db import run, security_store
from app.cli.serve import add_data_dir, settings_from
from app.crypto.identity import encode_identity
from app.errors import BadRequest
from app.services.identity import export_identity


async def _export(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    url = args.url or settings.public_url
    if url is None:
        raise BadRequest(
            "give --url, this gateway's URL as its partners reach it, or set IEX_PUBLIC_URL"
        )
    async with security_store(args) as store:
        trusts = [name for name, _ in await store.trusts()]
    kek = settings.kek.get_secret_value() if settings.kek else None
    document = await asyncio.to_thread(
        export_identity,
        settings.data_dir,
        kek,
        gateway=settings.name,
        url=url,
        trusts=trusts,
        tls_cert=settings.tls_cert,
    )
    sys.stdout.write(encode_identity(document))
    return 0


def register(commands: Any) -> None:
    identity = commands.add_parser("identity", help="this gateway's identity, for partners")
    sub = identity.add_subparsers(dest="identity_command", required=True)
    export = sub.add_parser(
        "export", help="print the identity document (public keys, URL) partners import"
    )
    export.add_argument(
        "--url", help="this gateway's URL as partners reach it (default: IEX_PUBLIC_URL)"
    )
    export.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="the certificate the gateway serves (IEX_TLS_CERT), whose SHA-256 partners pin",
    )
    add_data_dir(export)
    export.set_defaults(func=run(_export))
