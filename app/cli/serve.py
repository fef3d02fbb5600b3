"""``iex serve``: run the gateway."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from app.settings import Settings


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the options given on the command line."""
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("host", getattr(args, "host", None)),
            ("port", getattr(args, "port", None)),
            ("data_dir", getattr(args, "data_dir", None)),
            ("tls_cert", getattr(args, "tls_cert", None)),
            ("tls_key", getattr(args, "tls_key", None)),
            ("tls_client_ca", getattr(args, "tls_client_ca", None)),
        )
        if v is not None
    }
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.cli.tls import uvicorn_tls_options
    from app.main import create_app

    settings = settings_from(args)
    problem = _keys_problem(settings)
    if problem:
        sys.stderr.write(f"iex serve: cannot start: {problem}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        # Query strings carry patient names and IDs; requests are logged by route instead.
        access_log=False,
        **uvicorn_tls_options(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
    )
    return 0


def _keys_problem(settings: Settings) -> str | None:
    """Why the keys cannot be opened, said before the server starts, or ``None``."""
    from app.crypto.errors import KeyUnavailable
    from app.services.keys import exclusive, open_data_keys

    kek = settings.kek.get_secret_value() if settings.kek else None
    try:
        with exclusive(settings.data_dir, "start the gateway"):
            open_data_keys(settings.data_dir, kek)
    except KeyUnavailable as exc:
        return exc.detail
    return None


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where data lives (IEX_DATA_DIR, ./var)")


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to listen on (IEX_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (IEX_PORT, default 8080)")
    add_data_dir(serve)
    serve.add_argument("--tls-cert", type=Path, help="server certificate, PEM (IEX_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, help="its private key, PEM (IEX_TLS_KEY)")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        help="CA of partner client certificates; enables mutual TLS (IEX_TLS_CLIENT_CA)",
    )
    serve.set_defaults(func=_serve)
