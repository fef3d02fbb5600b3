"""What the security commands share: the data directory's security database, opened
directly (SQLite WAL lets this run beside a serving gateway), and error reporting."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from app.cli.serve import settings_from
from app.errors import IexError
from app.services.audit import seal, security_change
from app.services.keys import read_data_keys
from app.services.security import SECURITY_FILE
from app.storage.security import SecurityStore
from app.storage.sqlite_security import SQLiteSecurityStore


@asynccontextmanager
async def security_store(args: argparse.Namespace) -> AsyncIterator[SecurityStore]:
    settings = settings_from(args)
    kek = settings.kek.get_secret_value() if settings.kek else None
    keys = await asyncio.to_thread(
        read_data_keys, settings.data_dir, kek, "open the security database"
    )
    store = SQLiteSecurityStore(settings.data_dir / SECURITY_FILE, key=keys.index_key)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def actor() -> str:
    """Who ran a command, for the audit trail: the operating system user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def record_change(
    args: argparse.Namespace,
    store: SecurityStore,
    what: str,
    trust: str | None,
    subject: str,
) -> None:
    """Append the record of a change (durably: the security database syncs every commit),
    its source the gateway's name (``IEX_NAME``)."""
    source = settings_from(args).name
    await store.append_audit([security_change(what, actor(), trust, subject, source)], seal)


def run(command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> Callable[..., int]:
    """An argparse ``func`` running an async command; domain errors become exit status 2."""

    def func(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(command(args))
        except IexError as exc:
            sys.stderr.write(f"iex: {exc.detail}\n")
            return 2

    return func
