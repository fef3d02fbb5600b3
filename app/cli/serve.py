"""``iex serve``: run the gateway."""

from __future__ import annotations

import argparse
import logging
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
        )
        if v is not None
    }
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    settings = settings_from(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
    return 0


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where data lives (IEX_DATA_DIR, ./var)")


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to listen on (IEX_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (IEX_PORT, default 8080)")
    add_data_dir(serve)
    serve.set_defaults(func=_serve)
