"""The ``iex`` command line. Each command group lives in its own module with a ``register``.

Only the module of the command being run is imported: importing every one of them (the
gateway's settings, FastAPI, httpx, the keystore) cost each ``iex`` call more than a second
before it did anything. ``COMMANDS`` names each command's module and its one-line help, which
``iex --help`` lists without importing any; ``tests/test_cli.py`` keeps it in step with what
the modules register.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = "iex, the imaging exchange gateway"

#: Every command, in the order ``iex --help`` lists them: the module under ``app.cli`` that
#: registers it, and its help.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "run the gateway"),
    "trust": ("trusts", "manage trusts (tenants)"),
    "partner": (
        "trusts",
        "register partner gateways: their identity, certificate and tokens",
    ),
    "token": ("tokens", "issue, list and revoke bearer tokens"),
    "agreement": ("agreements", "what may cross between a local trust and a partner's trust"),
    "identity": ("identity", "this gateway's identity, for partners"),
    "audit": ("audit", "export and verify the audit trail"),
    "keys": ("keys", "inspect and rotate encryption keys"),
    "upload": ("upload", "send a folder, zip or tar to a gateway (resumable)"),
    "send": ("send", "push a study to a partner trust and follow it to the receipt"),
}


def _command_in(argv: list[str]) -> str | None:
    """The command ``argv`` runs, if it names one before asking for the general help."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None, *, every: bool = False) -> argparse.ArgumentParser:
    """The parser for ``argv``: with the command it names registered by its module, or
    (``iex --help``, an unknown command) every command by name and help only. ``every``
    registers every module, as a test compares them."""
    parser = argparse.ArgumentParser(prog="iex", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    command = None if every else _command_in(sys.argv[1:] if argv is None else argv)
    if command is None and not every:
        for name, (_, text) in COMMANDS.items():
            commands.add_parser(name, help=text)
        return parser
    names = list(COMMANDS) if command is None else [command]
    for module in dict.fromkeys(COMMANDS[name][0] for name in names):
        importlib.import_module(f"app.cli.{module}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
