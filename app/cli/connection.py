"""How a command reaches a gateway over HTTP: its URL, the bearer token and the CA that
verifies its certificate. ``iex upload`` and ``iex send`` take them alike:

    --server URL   --token T (or the environment's IEX_TOKEN, better)   --ca-cert PEM

The token is read from the option or the environment and goes nowhere but the
``Authorization`` header: never into messages.
"""

from __future__ import annotations

import argparse
import os
import ssl
from pathlib import Path
from urllib.parse import urlsplit


class UsageError(Exception):
    """The command cannot run as given; the message says what to fix."""


def server_url(text: str) -> str:
    """``--server``: an http(s) URL with a host (and a valid port, if any), without a
    trailing ``/``."""
    try:
        parts = urlsplit(text)
        # ``port`` parses the port, raising when it is not one.
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise UsageError(f"--server {text!r} is not an http:// or https:// URL")
    return text.rstrip("/")


def tls_verify(ca_cert: Path | None) -> bool | ssl.SSLContext:
    """How the gateway's certificate is verified: by ``--ca-cert``, else the system's CAs."""
    if ca_cert is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--ca-cert {ca_cert}: {exc}") from None


def bearer_token(given: str | None) -> str:
    """``--token``, else ``IEX_TOKEN``."""
    token = given or os.environ.get("IEX_TOKEN", "")
    if not token.strip():
        raise UsageError("no token: pass --token or set IEX_TOKEN")
    return token.strip()


def add_connection_arguments(parser: argparse.ArgumentParser, roles: str) -> None:
    """``--server``, ``--token`` (a token holding ``roles``, as "the uploader role") and
    ``--ca-cert``."""
    parser.add_argument(
        "--server", required=True, metavar="URL", help="the gateway, e.g. https://gw.example:8080"
    )
    parser.add_argument(
        "--token",
        metavar="T",
        help=f"bearer token with {roles} (default: IEX_TOKEN, which is better: "
        "other users can see command lines)",
    )
    parser.add_argument(
        "--ca-cert", metavar="PEM", type=Path, help="the CA that signed the gateway's certificate"
    )
