"""``iex serve``: run the gateway."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from app.settings import Settings


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the options given on the command line."""
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("host", getattr(args, "host", None)),
            ("port", getattr(args, "port", None)),
            ("data_dir", getattr(args, "data_dir", None)),
            ("workers", getattr(args, "workers", None)),
            ("tls_cert", getattr(args, "tls_cert", None)),
            ("tls_key", getattr(args, "tls_key", None)),
            ("tls_client_ca", getattr(args, "tls_client_ca", None)),
        )
        if v is not None
    }
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.http.tls import uvicorn_tls_options
    from app.main import create_app

    settings = settings_from(args)
    problem = _keys_problem(settings)
    if problem:
        sys.stderr.write(f"iex serve: cannot start: {problem}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app: Any
    if settings.workers > 1:
        # Each worker process builds its own app from the environment, where the options
        # given on the command line are put first.
        os.environ.update(_as_environment(settings))
        app = "app.main:app_from_environment"
    else:
        app = create_app(settings)
    uvicorn.run(
        app,
        factory=settings.workers > 1,
        workers=settings.workers,
        loop="app.http.balancing:BalancingLoop" if settings.workers > 1 else "auto",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        # Query strings carry patient names and IDs; requests are logged by route instead.
        access_log=False,
        **uvicorn_tls_options(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
    )
    return 0


def _as_environment(settings: Settings) -> dict[str, str]:
    """The settings given on the command line, as the environment variables that give them."""
    return {
        f"IEX_{name.upper()}": str(value.resolve() if isinstance(value, Path) else value)
        for name, value in settings.model_dump(exclude_unset=True).items()
        if value is not None and not isinstance(value, (list, dict, SecretStr))
    }


def _keys_problem(settings: Settings) -> str | None:
    """Why the keys cannot be opened, said before the server starts, or ``None``."""
    from app.crypto.errors import KeyUnavailable
    from app.services.keys import key_lock, open_data_keys

    kek = settings.kek.get_secret_value() if settings.kek else None
    try:
        with key_lock(settings.data_dir, "start the gateway"):
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
    serve.add_argument(
        "--workers", type=int, help="processes serving requests (IEX_WORKERS, default 1)"
    )
    serve.add_argument("--tls-cert", type=Path, help="server certificate, PEM (IEX_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, help="its private key, PEM (IEX_TLS_KEY)")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        help="CA of partner client certificates; enables mutual TLS (IEX_TLS_CLIENT_CA)",
    )
    serve.set_defaults(func=_serve)
