"""The ``iex`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from app.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    overrides = {
        k: v
        for k, v in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir))
        if v
    }
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop="auto",
        http="auto",
        timeout_graceful_shutdown=10,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iex", description="iex, the imaging exchange gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to listen on (IEX_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (IEX_PORT, default 8080)")
    serve.add_argument("--data-dir", type=Path, help="where data lives (IEX_DATA_DIR, ./var)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
