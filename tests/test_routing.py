"""A 405 names every method of its resource (RFC 9110 §15.5.6), not only one route's."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import IexServer


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("OPTIONS", "/dicomweb/studies", "GET, POST"),  # QIDO-RS and STOW-RS
        ("DELETE", "/dicomweb/studies/1.2.3", "GET, POST"),  # WADO-RS and STOW-RS
        ("PUT", "/dicomweb/studies/1.2.3/metadata", "GET"),
        ("PUT", "/transfers/uploads", "OPTIONS, POST"),
        ("PUT", "/transfers/uploads/0123abcd", "DELETE, HEAD, PATCH"),
        # The transfers share the prefix; "uploads" is the tus resource, never a transfer id.
        ("DELETE", "/transfers/uploads", "OPTIONS, POST"),
        ("PATCH", "/transfers/uploads", "OPTIONS, POST"),
        ("POST", "/transfers/uploads/pause", "DELETE, HEAD, PATCH"),
        ("GET", "/transfers/uploads/0123abcd", "DELETE, HEAD, PATCH"),
        ("PUT", "/transfers", "GET, POST"),
        ("PUT", "/transfers/" + "0" * 32, "DELETE, GET"),
        ("GET", "/transfers/" + "0" * 32 + "/pause", "POST"),
        ("POST", "/healthz", "GET"),
    ],
)
def test_405_allows_every_method_of_the_resource(
    server: IexServer, method: str, path: str, allow: str
) -> None:
    r = httpx.request(method, server.url + path, headers=server.headers)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allow
