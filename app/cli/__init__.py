"""The ``iex`` command line. Each command group lives in its own module with a ``register``."""

from __future__ import annotations

import argparse
import sys

from app.cli import agreements, audit, identity, keys, send, serve, tokens, trusts, upload

COMMAND_GROUPS = (serve, trusts, tokens, agreements, identity, audit, keys, upload, send)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iex", description="iex, the imaging exchange gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
