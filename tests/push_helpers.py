"""Two real gateways paired with the real command line, and pushes between them, followed
in the sender's transfer records.

Gateway A (``gw-a``, trust ``rad-a``) pushes to gateway B (``gw-b``, trust ``rad-b``),
which serves TLS and is pinned by A through B's identity document. A transfer is queued the
way the HTTP API will queue it, through a ``TransferService`` on A's transfers database;
A's own runner (in its ``iex serve`` process) claims it and runs the push.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.services.keys import read_data_keys
from app.services.transfers import TransferService
from app.transfer.jobs import TransferJob
from app.transfer.sqlite_jobs import TRANSFERS_FILE, SQLiteTransferJobs
from app.transfer.state import UPLOADS_FILE
from app.transfer.uploads import parse_metadata
from tests.helpers import IexServer, multipart_related, open_db, wait_until
from tests.pki import server_tls

TRUST_A, TRUST_B = "rad-a", "rad-b"
#: Trusts at A: one that may send to ``rad-b`` but from which B agreed to receive nothing,
#: and one with no agreement at all.
UNWELCOME_A, UNAGREED_A = "rad-a2", "rad-a3"


@dataclass
class Pair:
    a: IexServer
    b: IexServer
    directory: Path

    def identity(self, srv: IexServer, *extra: str) -> Path:
        """The gateway's identity document, exported to a file as an operator would."""
        path = self.directory / f"{srv.env['IEX_NAME']}-{len(list(self.directory.iterdir()))}.json"
        path.write_text(srv.iex("identity", "export", "--url", srv.url, *extra))
        return path

    def token_for_a(self, roles: str = "uploader,reader") -> str:
        return self.b.iex(
            "token", "issue", "--trust", TRUST_B, "--role", roles, "--partner", "gw-a"
        ).strip()


def start_pair(directory: Path) -> Pair:
    """A (plain HTTP) and B (TLS) running, each with its trust, not yet introduced."""
    for name in ("gw-a", "gw-b", "pki", "documents"):
        (directory / name).mkdir(parents=True)
    a = IexServer(directory / "gw-a" / "data", env={"IEX_NAME": "gw-a"})
    pki = directory / "pki"
    b = IexServer(directory / "gw-b" / "data", env={"IEX_NAME": "gw-b"}, tls=server_tls(pki))
    a.start()
    b.start()
    for trust in (TRUST_A, UNWELCOME_A, UNAGREED_A):
        a.iex("trust", "add", trust)
    b.iex("trust", "add", TRUST_B)
    return Pair(a, b, directory / "documents")


def introduce(
    pair: Pair,
    *,
    b_cert: Path | None = None,
) -> None:
    """Pair A and B as ``docs/EXCHANGE.md`` tells operators to: identities, partners, the
    token B issues for A, agreements. ``b_cert`` is the certificate B's identity names
    (default: the one it serves). ``rad-a2`` may send to ``rad-b`` too, which does not
    receive from it."""
    a, b = pair.a, pair.b
    assert b.tls is not None
    b_identity = pair.identity(b, "--tls-cert", str(b_cert or b.tls.cert))
    a_identity = pair.identity(a)
    a.iex("partner", "add", "gw-b", "--trust", TRUST_A, "--identity", str(b_identity))
    b.iex("partner", "add", "gw-a", "--trust", TRUST_B, "--identity", str(a_identity))
    token_file = pair.directory / "for-gw-a.token"
    token_file.write_text(pair.token_for_a() + "\n")
    a.iex("partner", "add", "gw-b", "--token-file", str(token_file))
    token_file.unlink()
    for local in (TRUST_A, UNWELCOME_A):
        args = ["--partner", "gw-b", "--partner-trust", TRUST_B, "--allow", "send"]
        a.iex("agreement", "add", "--trust", local, *args)
    args = ["--partner", "gw-a", "--partner-trust", TRUST_A, "--allow", "receive"]
    b.iex("agreement", "add", "--trust", TRUST_B, *args)


def store_study(srv: IexServer, trust: str, objects: list[bytes]) -> None:
    token = srv.issue_token(trust, "uploader", "reader")
    body, content_type = multipart_related(objects)
    with srv.client(token) as c:
        r = c.post("/studies", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


def _store(srv: IexServer) -> SQLiteTransferJobs:
    keys = read_data_keys(srv.data_dir, None, "queue a transfer")
    return SQLiteTransferJobs(srv.data_dir / TRANSFERS_FILE, key=keys.index_key)


def push(srv: IexServer, study: str, trust: str = TRUST_A, partner_trust: str = TRUST_B) -> str:
    """Queue the push of ``study`` of ``trust`` to ``partner_trust`` at ``gw-b``; the
    transfer id."""

    async def create() -> str:
        store = _store(srv)
        await store.open()
        try:
            job = await TransferService(store).create(
                trust, study=study, partner="gw-b", partner_trust=partner_trust
            )
            return job.id
        finally:
            await store.close()

    return asyncio.run(create())


def transfer(srv: IexServer, job_id: str) -> TransferJob:
    async def get() -> TransferJob:
        store = _store(srv)
        await store.open()
        try:
            job = await store.get(job_id)
            assert job is not None
            return job
        finally:
            await store.close()

    return asyncio.run(get())


def wait_transfer(
    srv: IexServer,
    job_id: str,
    done: Callable[[TransferJob], bool],
    what: str,
    timeout: float = 180,
) -> TransferJob:
    seen: list[TransferJob] = []

    def check() -> TransferJob | None:
        seen.append(transfer(srv, job_id))
        return seen[-1] if done(seen[-1]) else None

    def describe() -> str:
        last = seen[-1] if seen else None
        detail = f"{last!r} last_error={last.last_error!r}" if last else "nothing"
        return f"{what}; last seen: {detail}\n{srv.log()[-3000:]}"

    return wait_until(check, timeout=timeout, interval=0.2, message=describe)


def transfer_events(srv: IexServer, job_id: str) -> list[str]:
    """The descriptions of the gateway's audit records of a transfer, oldest first."""
    with srv.client() as admin:
        r = admin.get(srv.url + "/audit")
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()
    return [
        rec["EventIdentification"]["EventOutcomeDescription"]
        for rec in sorted(records, key=lambda rec: rec["seq"])
        if rec["iex"].get("transfer") == job_id
    ]


def final_uploads(srv: IexServer, job_id: str) -> list[list[str]]:
    """The final uploads the gateway received for transfer ``job_id``: the ids of the parts
    each joined, in order."""
    with closing(open_db(srv.data_dir, UPLOADS_FILE)) as db:
        rows = db.execute("SELECT metadata, parts FROM uploads WHERE concat = 'final'").fetchall()
    return [
        json.loads(parts) for metadata, parts in rows if parse_metadata(metadata).transfer == job_id
    ]


def serves_receipts(srv: IexServer) -> bool:
    """Whether the gateway has the receiving side of pushes (its receipts route)."""
    assert srv.tls is not None
    r = httpx.get(srv.url + "/openapi.json", verify=srv.verify, timeout=30)
    return r.status_code == 200 and any(
        path.startswith("/exchange/receipts/") for path in json.loads(r.text)["paths"]
    )
