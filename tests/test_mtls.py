"""Mutual TLS: partner gateways are pinned by their client certificate's fingerprint."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import IexServer, TlsFiles, make_instance
from tests.pki import certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = certificate(d, "ca", None)
    certificate(d, "server", ca, server=True)
    certificate(d, "partner-a", ca)
    certificate(d, "partner-b", ca)  # same CA, never pinned
    rogue_ca = certificate(d, "rogue-ca", None)
    certificate(d, "rogue", rogue_ca)
    return d


# With several workers, connections are accepted by iex itself (``app/http/balancing.py``)
# rather than by the event loop's server: TLS and its client certificates must hold there too.
@pytest.fixture(scope="module", params=["1", "2"], ids=["one-worker", "two-workers"])
def tls_server(
    pki: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[IexServer]:
    files = TlsFiles(pki / "server.pem", pki / "server.key", pki / "ca.pem", pki / "ca.pem")
    data = tmp_path_factory.mktemp("mtls") / "data"
    srv = IexServer(data, env={"IEX_WORKERS": request.param}, tls=files).start()
    srv.iex("partner", "add", "partner-a", "--trust", "local", "--role", "reader",
            "--cert", str(pki / "partner-a.pem"))  # fmt: skip
    yield srv
    srv.stop()


def _context(pki: Path, client: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client is not None:
        context.load_cert_chain(pki / f"{client}.pem", pki / f"{client}.key")
    return context


def _search(srv: IexServer, pki: Path, client: str | None, **headers: str) -> httpx.Response:
    with httpx.Client(verify=_context(pki, client), timeout=30) as c:
        return c.get(srv.dicomweb + "/studies", params={"PatientID": "P-TLS"}, headers=headers)


def test_the_pinned_partner_connects(tls_server: IexServer, pki: Path) -> None:
    r = _search(tls_server, pki, "partner-a")
    assert r.status_code == 200 and r.json() == []
    with tls_server.client() as admin:
        records = admin.get(tls_server.url + "/audit", params={"actor": "partner:partner-a"})
    (record,) = records.json()
    assert record["iex"]["status"] == 200 and record["iex"]["trust"] == "local"


def test_another_certificate_of_the_same_ca_is_refused(tls_server: IexServer, pki: Path) -> None:
    r = _search(tls_server, pki, "partner-b")
    assert r.status_code == 401
    assert "not pinned" in r.json()["detail"]


def test_the_partners_roles_are_its_pin_s(tls_server: IexServer, pki: Path) -> None:
    with httpx.Client(verify=_context(pki, "partner-a"), timeout=30) as c:
        r = c.post(
            tls_server.dicomweb + "/studies",
            content=make_instance(),
            headers={"Content-Type": "application/dicom"},
        )
    assert r.status_code == 403


def test_a_certificate_of_another_ca_fails_the_handshake(tls_server: IexServer, pki: Path) -> None:
    with pytest.raises(httpx.HTTPError):
        _search(tls_server, pki, "rogue")


def test_bearer_tokens_work_over_tls_without_a_client_certificate(
    tls_server: IexServer, pki: Path
) -> None:
    assert _search(tls_server, pki, None).status_code == 401
    r = _search(tls_server, pki, None, Authorization=f"Bearer {tls_server.token}")
    assert r.status_code == 200
