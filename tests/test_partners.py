"""``iex partner add/list/remove`` beside a running gateway with mutual TLS: what the list
shows, what removing does to a partner's connections, a clear error for an unknown name, and
the audit record of every change."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.helpers import IexServer, TlsFiles
from tests.pki import certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = certificate(d, "ca", None)
    certificate(d, "server", ca, server=True)
    for partner in ("east", "west", "north"):
        certificate(d, partner, ca)
    return d


@pytest.fixture(scope="module")
def gateway(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IexServer]:
    files = TlsFiles(pki / "server.pem", pki / "server.key", pki / "ca.pem", pki / "ca.pem")
    srv = IexServer(tmp_path_factory.mktemp("partners") / "data", tls=files).start()
    srv.iex("trust", "add", "north-trust")
    yield srv
    srv.stop()


def _fingerprint(pki: Path, name: str) -> str:
    cert = x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def _search(srv: IexServer, pki: Path, client: str) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(pki / f"{client}.pem", pki / f"{client}.key")
    with httpx.Client(verify=context, timeout=30) as c:
        return c.get(srv.dicomweb + "/studies", params={"PatientID": "P-PARTNERS"})


def _iex(srv: IexServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--data-dir", str(srv.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _changes(srv: IexServer) -> list[tuple[str, str, str | None]]:
    """(what, subject, trust) of the audit records of changes to partners, oldest first."""
    with srv.client() as admin:
        r = admin.get(srv.url + "/audit")
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()
    changes = [
        rec
        for rec in records
        if rec["iex"]["route"] == "cli"
        and rec["ParticipantObjectIdentification"][0]["ParticipantObjectID"].startswith("partner:")
    ]
    assert all(rec["ActiveParticipant"][0]["UserID"].startswith("cli") for rec in changes)
    return [
        (
            rec["EventIdentification"]["EventOutcomeDescription"],
            rec["ParticipantObjectIdentification"][0]["ParticipantObjectID"],
            rec["iex"]["trust"],
        )
        for rec in changes
    ]


def test_list_remove_and_their_audit_records(gateway: IexServer, pki: Path) -> None:
    east, west = _fingerprint(pki, "east"), _fingerprint(pki, "west")
    assert _iex(gateway, "partner", "list").stdout == ""
    colons = ":".join(west[i : i + 2].upper() for i in range(0, 64, 2))  # as openssl prints it
    gateway.iex("partner", "add", "west", "--trust", "north-trust", "--role", "reader,uploader",
                "--cert-sha256", colons)  # fmt: skip
    gateway.iex("partner", "add", "east", "--trust", "local", "--cert", str(pki / "east.pem"))
    # One line per partner, by name (tab-separated): name, trust, roles, URL, certificate
    # SHA-256, whether it gave us a token, the key ids of its identity (none here).
    assert gateway.iex("partner", "list").splitlines() == [
        f"east\tlocal\treader\t-\t{east}\ttoken:no\t-",
        f"west\tnorth-trust\treader,uploader\t-\t{west}\ttoken:no\t-",
    ]
    assert _search(gateway, pki, "east").status_code == 200
    assert _search(gateway, pki, "west").status_code == 200

    removed = _iex(gateway, "partner", "remove", "east")
    assert removed.returncode == 0, removed.stderr
    assert gateway.iex("partner", "list").splitlines() == [
        f"west\tnorth-trust\treader,uploader\t-\t{west}\ttoken:no\t-"
    ]
    # The running gateway looks the pin up on every request: the very next one is refused.
    refused = _search(gateway, pki, "east")
    assert refused.status_code == 401
    assert "not pinned" in refused.json()["detail"]
    assert _search(gateway, pki, "west").status_code == 200

    assert _changes(gateway) == [
        ("partner registered", "partner:west", "north-trust"),
        ("partner registered", "partner:east", "local"),
        ("partner removed", "partner:east", None),
    ]


def test_removing_an_unknown_partner_fails_clearly(gateway: IexServer, pki: Path) -> None:
    before = _iex(gateway, "partner", "list").stdout
    changes = _changes(gateway)
    result = _iex(gateway, "partner", "remove", "nobody")
    assert result.returncode == 2
    assert result.stderr == "iex: no partner 'nobody'\n"
    assert result.stdout == ""
    assert _iex(gateway, "partner", "list").stdout == before
    assert _changes(gateway) == changes  # nothing changed, nothing recorded


def test_a_removed_partner_can_be_pinned_again(gateway: IexServer, pki: Path) -> None:
    gateway.iex("partner", "add", "north", "--trust", "local", "--cert", str(pki / "north.pem"))
    assert _search(gateway, pki, "north").status_code == 200
    gateway.iex("partner", "remove", "north")
    assert _search(gateway, pki, "north").status_code == 401
    gateway.iex("partner", "add", "north", "--trust", "local", "--cert", str(pki / "north.pem"))
    assert _search(gateway, pki, "north").status_code == 200
    assert (
        f"north\tlocal\treader\t-\t{_fingerprint(pki, 'north')}\ttoken:no\t-"
        in gateway.iex("partner", "list").splitlines()
    )
