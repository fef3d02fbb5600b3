"""``iex audit``: export the trail as JSON lines and verify its hash chain."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from app.cli.security_db import run, security_store
from app.cli.serve import add_data_dir
from app.services.audit import ChainVerifier, export_line, parse_time
from app.storage.security import AuditFilter

PAGE = 5000


async def _export(args: argparse.Namespace) -> int:
    out: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        async with security_store(args) as store:
            after = 0
            while True:
                rows = await store.audit(
                    AuditFilter(
                        since=parse_time(args.since) if args.since else None,
                        until=parse_time(args.until) if args.until else None,
                        trust=args.trust,
                        after_seq=after,
                        limit=PAGE,
                    )
                )
                for row in rows:
                    out.write(export_line(row.entry, row.hash) + "\n")
                if len(rows) < PAGE:
                    break
                after = rows[-1].seq
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


async def _verify(args: argparse.Namespace) -> int:
    if args.file is not None:
        # An export: a whole trail from seq 1, or a part (--since) anchored on its first line.
        verifier = ChainVerifier(anchored=False)
        with open(args.file, encoding="utf-8") as lines:
            for line in lines:
                if line.strip() and not verifier.feed(line, None):
                    break
        verifier.finish()
    else:
        verifier = ChainVerifier(anchored=True)
        async with security_store(args) as store:
            head = await store.audit_head()
            after = 0
            while verifier.ok:
                rows = await store.audit(AuditFilter(after_seq=after, limit=PAGE))
                for row in rows:
                    if not verifier.feed(row.entry, row.hash):
                        break
                if len(rows) < PAGE:
                    break
                after = rows[-1].seq
            verifier.finish(head)
    if verifier.ok:
        sys.stdout.write(
            f"ok: {verifier.checked} records, chain intact up to record {verifier.last_seq}\n"
        )
        return 0
    where = f"record {verifier.first_bad}" if verifier.first_bad is not None else "the trail"
    sys.stdout.write(f"TAMPERED: first bad: {where}: {verifier.problem}\n")
    return 1


def register(commands: Any) -> None:
    audit = commands.add_parser("audit", help="export and verify the audit trail")
    audits = audit.add_subparsers(dest="audit_command", required=True)
    export = audits.add_parser("export", help="write audit records as JSON lines")
    export.add_argument("--since", help="ISO 8601 time, epoch seconds or an age such as 24h")
    export.add_argument("--until", help="the same forms; records before this time")
    export.add_argument("--trust", help="only this trust's records")
    export.add_argument("--output", type=Path, help="file to write (default: standard output)")
    add_data_dir(export)
    export.set_defaults(func=run(_export))
    verify = audits.add_parser(
        "verify", help="check the hash chain; names the first edited, deleted or moved record"
    )
    verify.add_argument("--file", type=Path, help="verify an export instead of the database")
    add_data_dir(verify)
    verify.set_defaults(func=run(_verify))
