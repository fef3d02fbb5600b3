"""Helpers of the pull and federated search tests (gateways are paired by
``tests.exchange_helpers``): studies stored by STOW-RS, the holder's outbound transfers, its
audit trail, and a partner's signed requests made by hand."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import httpx
import pydicom
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.services.keys import open_data_keys
from app.transfer.gateway_requests import GatewayRequest, Holder, PullRequest, sign_request
from app.transfer.manifest import Endpoint
from tests.helpers import IexServer, make_instance, multipart_related, open_db


def agree(srv: IexServer, trust: str, partner: str, partner_trust: str, rights: str) -> None:
    srv.iex("agreement", "add", "--trust", trust, "--partner", partner,
            "--partner-trust", partner_trust, "--allow", rights)  # fmt: skip


def store_study(srv: IexServer, token: str, patient_id: str, **attributes: Any) -> str:
    """One study of two instances stored by STOW-RS; its Study Instance UID."""
    first = make_instance(patient_id=patient_id, **attributes)
    study = _study_uid(first)
    second = make_instance(patient_id=patient_id, study_uid=study, instance_number=2, **attributes)
    body, content_type = multipart_related([first, second])
    with srv.client(token) as c:
        r = c.post("/studies", content=body, headers={"Content-Type": content_type})
        assert r.status_code == 200, r.text
    return study


def _study_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID)


def outbound_transfers(srv: IexServer, partner: str) -> dict[str, tuple[str, str, str, str]]:
    """The gateway's outbound transfers to ``partner``: id -> (trust, partner trust, study,
    priority), read from its transfers database."""
    conn = open_db(srv.data_dir, "transfers.sqlite3")
    try:
        rows = conn.execute(
            "SELECT id, trust, partner_trust, study, priority FROM transfers "
            "WHERE direction = 'out' AND partner = ?",
            (partner,),
        ).fetchall()
    finally:
        conn.close()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def signed_pull(
    requester: IexServer,
    requester_trust: str,
    holder: Holder,
    query: dict[str, str],
    *,
    request_id: str = "req-1",
    at: float | None = None,
    key: tuple[str, Ed25519PrivateKey] | None = None,
    limit: int = 10,
) -> bytes:
    """A pull request signed as ``requester`` would sign it (with its own signing key, read
    from its data directory, unless ``key`` is given)."""
    if key is None:
        signing = open_data_keys(requester.data_dir, None).signing_key()
        key = (signing.id, signing.private_key())
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if at is None else at))
    request: GatewayRequest = PullRequest(
        request_id,
        when,
        Endpoint(requester.env["IEX_NAME"], requester_trust, key[0]),
        holder,
        query,
        limit,
    )
    return sign_request(request, key[1])


def post_request(srv: IexServer, path: str, token: str, document: bytes) -> httpx.Response:
    return httpx.post(
        srv.url + path,
        content=document,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        verify=srv.verify,
        timeout=60,
    )


def audit_descriptions(srv: IexServer, trust: str) -> list[str]:
    """The ``EventOutcomeDescription`` of the trust's audit records, oldest first."""
    r = httpx.get(
        srv.url + "/audit",
        params={"trust": trust},
        headers=srv.headers,
        verify=srv.verify,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return [
        str(record["EventIdentification"].get("EventOutcomeDescription", ""))
        for record in json.loads(r.content)
    ]
