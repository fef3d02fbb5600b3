"""Content coding of JSON responses (RFC 9110 §12.5.3) against a real gateway: gzip when the
client's Accept-Encoding weighs it above 0, never otherwise, and never a 500 for a header
that does not parse."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from pydicom import dcmread

from tests.helpers import IexServer, make_instance, multipart_related

GZIP = [
    "gzip",
    "GZIP;Q=0.5",
    "x-gzip",
    "gzip;q=1.000",
    "gzip;q=0.001",
    "*",
    "br, *;q=0.1",
    "deflate;q=0, gzip ; q=0.8",
    "gzip, identity;q=0",
]
NOT_GZIP = [
    "",
    "gzip;q=0",
    "gzip;q=0.000",
    "gzip; q=0, *",
    "*;q=0",
    "deflate, br",
    "identity",
    "identity;q=0",
    # Weights that do not parse take nothing for acceptance.
    "gzip;q=abc",
    "gzip;q=2",
    "gzip;q=nan",
    "gzip;q=1.5",
    "gzip;q=",
    "gzip;q=0.0001",
    ";;,,q=1, ;",
]


@pytest.fixture(scope="module")
def server_client(server: IexServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def metadata_path(server_client: httpx.Client) -> str:
    """A metadata document well above the size worth compressing."""
    data = make_instance()
    body, ctype = multipart_related([data])
    r = server_client.post("/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    return f"/studies/{dcmread(io.BytesIO(data)).StudyInstanceUID}/metadata"


def _get(c: httpx.Client, path: str, accept_encoding: str) -> httpx.Response:
    r = c.get(path, headers={"Accept-Encoding": accept_encoding})
    assert r.status_code == 200, r.text
    assert r.headers["vary"] == "Accept-Encoding"
    assert len(r.content) > 1024 and r.json()[0]["00080018"]["vr"] == "UI"
    return r


@pytest.mark.parametrize("accept_encoding", GZIP)
def test_gzip_when_weighted_above_zero(
    server_client: httpx.Client, metadata_path: str, accept_encoding: str
) -> None:
    r = _get(server_client, metadata_path, accept_encoding)
    assert r.headers.get("content-encoding") == "gzip"


@pytest.mark.parametrize("accept_encoding", NOT_GZIP)
def test_no_gzip_when_refused_or_not_asked(
    server_client: httpx.Client, metadata_path: str, accept_encoding: str
) -> None:
    r = _get(server_client, metadata_path, accept_encoding)
    assert "content-encoding" not in r.headers
