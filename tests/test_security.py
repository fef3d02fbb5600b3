"""Trusts, tokens, roles and rate limits against a real gateway.

One gateway for the module: trust ``local`` (the first-start admin token) holds a study;
trust ``other`` holds tokens with every role. Every route is tried with every kind of bad
credential, and nothing may change what is stored.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from app.openapi import openapi_document
from tests.helpers import IexServer, make_instance

RATE_BURST = 3
CT = {"Content-Type": "application/dicom"}


@dataclass
class World:
    server: IexServer
    study: str
    series: str
    sop: str
    pid: str
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    srv = IexServer(
        tmp_path_factory.mktemp("security") / "data",
        env={"IEX_RATE_LIMIT_BURST": str(RATE_BURST), "IEX_RATE_LIMIT_PER_MINUTE": "1"},
    ).start()
    try:
        # First, the token that must be expired by the time the matrix runs.
        expired = srv.issue_token("local", "reader", "uploader", "admin", expires="1s")
        deadline = time.time() + 1.1
        study, series, sop, pid = generate_uid(), generate_uid(), generate_uid(), generate_uid()
        data = make_instance(study_uid=study, series_uid=series, sop_uid=sop, patient_id=pid)
        with srv.client() as c:
            assert c.post("/studies", content=data, headers=CT).status_code == 200
        srv.iex("trust", "add", "other")
        revoked = srv.issue_token("local", "reader", "uploader", "admin")
        srv.iex("token", "revoke", revoked.split("_")[1])
        tokens = {
            "admin": srv.token,
            "reader": srv.issue_token("local", "reader"),
            "uploader": srv.issue_token("local", "uploader"),
            "other": srv.issue_token("other", "reader", "uploader", "exporter", "admin"),
            "expired": expired,
            "revoked": revoked,
            "bad": "iex_" + "0" * 16 + "_" + "0" * 64,
        }
        time.sleep(max(0.0, deadline - time.time()))
        yield World(srv, study, series, sop, pid, tokens)
    finally:
        srv.stop()


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    role: str  # the token holding only the wrong role is the other one of reader/uploader
    other_trust: int  # what trust ``other`` gets: its own (empty) view, never local's data


def _routes(w: World) -> list[Route]:
    s, se, i = w.study, w.series, w.sop
    inst = f"/dicomweb/studies/{s}/series/{se}/instances/{i}"
    return [
        Route("GET", f"/dicomweb/studies?PatientID={w.pid}", "reader", 200),
        Route("GET", f"/dicomweb/series?PatientID={w.pid}", "reader", 200),
        Route("GET", f"/dicomweb/instances?PatientID={w.pid}", "reader", 200),
        Route("GET", f"/dicomweb/studies/{s}/series", "reader", 200),
        Route("GET", f"/dicomweb/studies/{s}/instances", "reader", 200),
        Route("GET", f"/dicomweb/studies/{s}/series/{se}/instances", "reader", 200),
        Route("GET", f"/dicomweb/studies/{s}", "reader", 404),
        Route("GET", f"/dicomweb/studies/{s}/series/{se}", "reader", 404),
        Route("GET", inst, "reader", 404),
        Route("GET", f"/dicomweb/studies/{s}/metadata", "reader", 404),
        Route("GET", f"/dicomweb/studies/{s}/series/{se}/metadata", "reader", 404),
        Route("GET", inst + "/metadata", "reader", 404),
        Route("GET", inst + "/frames/1", "reader", 404),
        Route("GET", inst + "/bulk/7FE00010", "reader", 404),
        # Storing is allowed for any trust: into its own trust, leaving local's copy alone.
        Route("POST", "/dicomweb/studies", "uploader", 200),
        Route("POST", f"/dicomweb/studies/{s}", "uploader", 200),
        Route("GET", f"/audit?study={s}", "admin", 200),
        Route("GET", "/metrics", "admin", 403),  # gateway-wide: operator trust only
    ]


def _send(w: World, http: httpx.Client, route: Route, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = None
    if route.method == "POST":
        headers.update(CT)
        # A fresh instance of the local study: a successful store would show.
        body = make_instance(study_uid=w.study, patient_id=w.pid)
    return http.request(route.method, w.server.url + route.path, headers=headers, content=body)


def _local_state(w: World) -> tuple[object, ...]:
    """What trust local holds, seen through the API."""
    with w.server.client() as c:
        instances = c.get("/instances", params={"PatientID": w.pid}).json()
        study = c.get(f"/studies/{w.study}", headers={"Accept": "*/*"})
    boundary = study.headers["content-type"].split("boundary=")[1].encode()
    content = study.content.replace(boundary, b"")  # the boundary is random per response
    return sorted(x["00080018"]["Value"][0] for x in instances), study.status_code, content


def _blobs(w: World) -> int:
    return sum(1 for p in (w.server.data_dir / "blobs").rglob("*") if p.is_file())


def test_every_route_refuses_bad_credentials_and_changes_nothing(world: World) -> None:
    w = world
    before, blobs = _local_state(w), _blobs(w)
    other_stores = 0
    with httpx.Client(timeout=60) as http:
        for route in _routes(w):
            wrong = {"reader": "uploader", "uploader": "reader", "admin": "reader"}[route.role]
            cases = {
                "no token": (None, 401),
                "unknown token": (w.tokens["bad"], 401),
                "malformed token": ("not-a-token", 401),
                "expired": (w.tokens["expired"], 401),
                "revoked": (w.tokens["revoked"], 401),
                "wrong role": (w.tokens[wrong], 403),
                "other trust": (w.tokens["other"], route.other_trust),
            }
            for case, (token, status) in cases.items():
                r = _send(w, http, route, token)
                assert r.status_code == status, (route.path, case, r.text)
                if status == 401:
                    assert r.headers["www-authenticate"] == 'Bearer realm="iex"'
                if case != "other trust" or status >= 400:
                    assert _blobs(w) == blobs + other_stores, (route.path, case)
                elif route.method == "POST":
                    other_stores += 1  # into the other trust's own namespace
                elif route.path.startswith("/dicomweb/"):
                    assert r.json() == [], (route.path, "the other trust sees local's data")
    # Local's study is exactly as it was; what the other trust stored is only in its trust.
    assert _local_state(w) == before
    assert other_stores == 2
    with w.server.client(w.tokens["other"]) as other:
        theirs = other.get("/instances", params={"PatientID": w.pid}).json()
    assert len(theirs) == 2 and not {x["00080018"]["Value"][0] for x in theirs} & set(before[0])


def test_other_trust_reads_none_of_local_audit(world: World) -> None:
    r = httpx.get(
        world.server.url + "/audit",
        params={"trust": "local"},
        headers={"Authorization": f"Bearer {world.tokens['other']}"},
    )
    assert r.status_code == 200 and r.json() == []
    r = httpx.get(
        world.server.url + "/audit",
        params={"study": world.study},
        headers={"Authorization": f"Bearer {world.tokens['other']}"},
    )
    assert all(rec["iex"]["trust"] == "other" for rec in r.json())


def test_a_token_may_hold_several_roles(world: World) -> None:
    token = world.server.issue_token("local", "reader", "uploader")
    with world.server.client(token) as c:
        assert c.post("/studies", content=make_instance(), headers=CT).status_code == 200
        assert c.get("/studies", params={"PatientID": world.pid}).status_code == 200
        assert c.get(world.server.url + "/audit").status_code == 403


def _comparable(r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = sorted((k, v) for k, v in r.headers.items() if k.lower() != "date")
    return r.status_code, headers, r.content


def test_another_trusts_study_is_a_byte_identical_404(world: World) -> None:
    srv = world.server
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    inst = f"/studies/{study}/series/{series}/instances/{sop}"
    paths = [
        f"/studies/{study}",
        f"/studies/{study}/series/{series}",
        inst,
        f"/studies/{study}/metadata",
        f"/studies/{study}/series/{series}/metadata",
        inst + "/metadata",
        inst + "/frames/1",
        inst + "/bulk/7FE00010",
        f"/studies/{study}/series",
        f"/studies/{study}/instances",
    ]
    with srv.client(world.tokens["other"]) as other:
        absent = [_comparable(other.get(p)) for p in paths]
        data = make_instance(study_uid=study, series_uid=series, sop_uid=sop)
        with srv.client() as local:
            assert local.post("/studies", content=data, headers=CT).status_code == 200
            assert local.get(inst + "/metadata").status_code == 200
        elsewhere = [_comparable(other.get(p)) for p in paths]
    assert elsewhere == absent
    assert [a[0] for a in absent] == [404] * 8 + [200] * 2


def test_two_trusts_hold_the_same_study_independently(world: World) -> None:
    srv = world.server
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    mine = make_instance(study_uid=study, series_uid=series, sop_uid=sop, patient_id="L-1")
    theirs = make_instance(study_uid=study, series_uid=series, sop_uid=sop, patient_id="O-1")
    assert mine != theirs
    inst = f"/studies/{study}/series/{series}/instances/{sop}"
    any_syntax = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    with srv.client() as local, srv.client(world.tokens["other"]) as other:
        assert local.post("/studies", content=mine, headers=CT).status_code == 200
        # Not a conflict with local's different bytes: the other trust has its own namespace.
        assert other.post("/studies", content=theirs, headers=CT).status_code == 200
        for client, data, pid in ((local, mine, "L-1"), (other, theirs, "O-1")):
            (found,) = client.get("/studies", params={"StudyInstanceUID": study}).json()
            assert found["00100020"]["Value"] == [pid]
            assert found["00201208"]["Value"] == [1]  # its own count, not both
            r = client.get(inst, headers=any_syntax)
            assert r.status_code == 200 and data in r.content
            other_data = theirs if data is mine else mine
            assert other_data not in r.content


def test_unfiltered_searches_are_rate_limited_per_token(world: World) -> None:
    srv = world.server
    token = srv.issue_token("local", "reader")
    with srv.client(token) as c:
        for _ in range(RATE_BURST):
            assert c.get("/studies", params={"limit": "1"}).status_code == 200
        r = c.get("/series")
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        # Searches with a matching key, and other tokens, are not held back.
        assert c.get("/studies", params={"PatientID": world.pid}).status_code == 200
    with srv.client(srv.issue_token("local", "reader")) as fresh:
        assert fresh.get("/studies").status_code == 200


def test_tokens_are_stored_as_hashes_and_never_listed(world: World) -> None:
    srv = world.server
    token = srv.issue_token("local", "reader")
    token_id, secret = token.split("_")[1:]
    listing = srv.iex("token", "list")
    assert token_id in listing and secret not in listing
    for path in srv.data_dir.glob("security.sqlite3*"):
        assert secret.encode() not in path.read_bytes()
    assert secret not in srv.log()


def test_first_start_writes_a_private_admin_token(world: World) -> None:
    path = world.server.data_dir / "admin.token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert str(path) in world.server.log()
    assert world.server.token not in world.server.log()
    assert "local" in world.server.iex("trust", "list")


def test_auth_off_is_loud(make_server: Callable[..., IexServer]) -> None:
    srv = make_server(IEX_AUTH="off")
    r = httpx.post(srv.dicomweb + "/studies", content=make_instance(), headers=CT)
    assert r.status_code == 200
    assert "AUTHENTICATION IS OFF" in srv.log()


def test_operations_endpoints_stay_open(world: World) -> None:
    assert httpx.get(world.server.url + "/healthz").status_code == 200
    assert httpx.get(world.server.url + "/readyz").status_code == 200
    assert httpx.get(world.server.url + "/metrics").status_code == 401


def test_openapi_declares_the_security_schemes() -> None:
    document = openapi_document()
    schemes = document["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["HTTPBearer"]["description"],
    }
    assert schemes["mutualTLS"]["type"] == "mutualTLS"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            # tus discovery (OPTIONS) only advertises capabilities, before any credentials.
            if path in ("/healthz", "/readyz") or (path, method) == (
                "/transfers/uploads",
                "options",
            ):
                assert "security" not in operation
            else:
                assert {"HTTPBearer": []} in operation["security"], path
                assert {"mutualTLS": []} in operation["security"], path


def test_cli_refuses_unknown_roles_and_trusts(tmp_path: Path) -> None:
    srv = IexServer(tmp_path / "data")
    srv.data_dir.mkdir()
    with pytest.raises(RuntimeError, match="no trust"):
        srv.issue_token("nowhere", "reader")
    srv.iex("trust", "add", "t1")
    with pytest.raises(RuntimeError, match="unknown role"):
        srv.issue_token("t1", "superuser")
    with pytest.raises(RuntimeError, match="already exists"):
        srv.iex("trust", "add", "t1")
