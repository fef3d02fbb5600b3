"""Pulls and federated search between real gateways, paired with the real command line.

Three gateways: the holder ``gw-h`` (TLS, so its certificate is pinned by the others) with
trusts ``rad-h`` and ``other-h``; the requester ``gw-r`` with trusts ``rad-r`` (may pull
from ``rad-h``), ``multi-r`` (may pull from both holder trusts at its end) and ``ward-r``
(no agreement); and ``gw-x``, whose own agreement allows pulling from ``rad-h`` but whom
the holder never agreed to. The transfers a pull queues are asserted on the holder's
transfers database, and their delivery to the requester's trust once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.transfer.gateway_requests import Holder
from tests.exchange_helpers import gateway, pair
from tests.helpers import IexServer, free_port
from tests.pki import server_tls
from tests.pull_helpers import (
    agree,
    audit_descriptions,
    outbound_transfers,
    post_request,
    signed_pull,
    store_study,
)


@dataclass
class Net:
    holder: IexServer
    requester: IexServer
    outsider: IexServer
    #: The token the holder issued for gw-r (trust rad-h).
    holder_token_for_r: str
    #: Reader tokens of the requester's trusts, and of the outsider's.
    readers: dict[str, str]
    #: Studies at the holder: A, B (rad-h, P-1), C (rad-h, P-2), D (other-h, P-1).
    studies: dict[str, str]
    root: Path


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("pulls")
    # The holder serves TLS and its identity gives its certificate (IEX_TLS_CERT): the
    # others pin it.
    tls = server_tls(_dir(root / "pki"))
    holder = gateway(root, "gw-h", "rad-h", "other-h", IEX_TLS_CERT=str(tls.cert))
    holder.tls = tls
    requester = gateway(root, "gw-r", "rad-r", "multi-r", "ward-r")
    outsider = gateway(root, "gw-x", "rad-x")
    pair(requester, "rad-r", holder, "rad-h", rights_a=["pull"], rights_b=["pull"])
    pair(outsider, "rad-x", holder, "rad-h", rights_a=["pull"], rights_b=[])
    agree(requester, "multi-r", "gw-h", "rad-h", "pull")
    agree(requester, "multi-r", "gw-h", "other-h", "send,pull")
    agree(holder, "rad-h", "gw-r", "multi-r", "receive,pull")
    token_for_r = holder.iex(
        "token", "issue", "--trust", "rad-h", "--role", "reader", "--partner", "gw-r"
    ).strip()
    started: list[IexServer] = []
    try:
        for srv in (holder, requester, outsider):
            started.append(srv.start())
        uploader = holder.issue_token("rad-h", "uploader")
        studies = {
            "A": store_study(holder, uploader, "P-1", study_date="20190505", modality="CT"),
            "B": store_study(holder, uploader, "P-1", study_date="20210303", modality="MR"),
            "C": store_study(holder, uploader, "P-2"),
            "D": store_study(holder, holder.issue_token("other-h", "uploader"), "P-1"),
        }
        readers = {t: requester.issue_token(t, "reader") for t in ("rad-r", "multi-r", "ward-r")}
        readers["rad-x"] = outsider.issue_token("rad-x", "reader")
        yield Net(holder, requester, outsider, token_for_r, readers, studies, root)
    finally:
        for srv in started:
            srv.stop()


def _pull(srv: IexServer, token: str, body: Any) -> httpx.Response:
    return httpx.post(
        srv.url + "/pulls",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        verify=srv.verify,
        timeout=120,
    )


def _get(srv: IexServer, token: str, path: str, **params: str) -> httpx.Response:
    return httpx.get(
        srv.url + path,
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        verify=srv.verify,
        timeout=120,
    )


def _matched(response: httpx.Response) -> dict[str, str]:
    """study -> transfer of a pull's answer."""
    return {s["study"]: s["transfer"] for s in response.json()["studies"]}


def _study_uids(datasets: list[dict[str, Any]]) -> set[str]:
    return {d["0020000D"]["Value"][0] for d in datasets}


# -- pulls ----------------------------------------------------------------------------------


def test_a_pull_queues_one_transfer_per_matching_study_of_the_agreed_trust(net: Net) -> None:
    body = {"partner": "gw-h", "partner_trust": "rad-h", "query": {"PatientID": "P-1"}}
    r = _pull(net.requester, net.readers["rad-r"], body)
    assert r.status_code == 202, r.text
    pull = r.json()
    assert r.headers["location"] == f"/pulls/{pull['id']}"
    assert (pull["trust"], pull["partner"], pull["partner_trust"]) == ("rad-r", "gw-h", "rad-h")
    assert (pull["state"], pull["error"], pull["limit"]) == ("answered", None, 100)
    matched = _matched(r)
    # P-1 of rad-h only: not C (another patient), not D (another trust).
    assert set(matched) == {net.studies["A"], net.studies["B"]}
    assert {s["state"] for s in pull["studies"]} == {"pending"}

    queued = outbound_transfers(net.holder, "gw-r")
    for study, transfer in matched.items():
        assert queued[transfer] == ("rad-h", "rad-r", study, "routine")

    shown = _get(net.requester, net.readers["rad-r"], f"/pulls/{pull['id']}")
    assert shown.status_code == 200 and shown.json() == pull
    listed = _get(net.requester, net.readers["rad-r"], "/pulls").json()
    assert {"id": pull["id"], "studies": 2, "state": "answered"}.items() <= listed[0].items()
    # Another trust's pull reads as missing, and is not listed.
    other = _get(net.requester, net.readers["ward-r"], f"/pulls/{pull['id']}")
    assert other.status_code == 404, other.text
    assert _get(net.requester, net.readers["ward-r"], "/pulls").json() == []

    assert any(
        d.startswith("pull by trust rad-r at gw-r answered") and "2 studies queued" in d
        for d in audit_descriptions(net.holder, "rad-h")
    )
    assert "pull requested from trust rad-h at gw-h: 2 studies matched" in audit_descriptions(
        net.requester, "rad-r"
    )

    # The holder pushes what matched back under the pull agreement: the pull shows each
    # study delivered, and the requester's trust holds it, whole.
    deadline = time.monotonic() + 180
    while True:
        shown = _get(net.requester, net.readers["rad-r"], f"/pulls/{pull['id']}").json()
        states = {s["study"]: s["state"] for s in shown["studies"]}
        if set(states.values()) == {"delivered"} or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert states == dict.fromkeys(matched, "delivered"), shown
    for study in matched:
        found = _get(net.requester, net.readers["rad-r"], "/dicomweb/studies",
                     StudyInstanceUID=study)  # fmt: skip
        assert found.status_code == 200, found.text
        (dataset,) = found.json()
        assert dataset["00201208"]["Value"] == [2]  # NumberOfStudyRelatedInstances


@pytest.mark.parametrize(
    ("query", "extra", "expected"),
    [
        ({"PatientID": "P-1", "StudyDate": "20200101-"}, {}, ["B"]),
        ({"PatientID": "P-1", "ModalitiesInStudy": "CT"}, {}, ["A"]),
        ({"PatientID": "P-1"}, {"limit": 1}, None),
        ({"PatientID": "P-*", "StudyDate": "-20191231"}, {"priority": "urgent"}, ["A"]),
        ({"PatientID": "NOBODY"}, {}, []),
    ],
)
def test_the_query_and_limit_select_the_studies(
    net: Net, query: dict[str, str], extra: dict[str, Any], expected: list[str] | None
) -> None:
    body = {"partner": "gw-h", "partner_trust": "rad-h", "query": query, **extra}
    r = _pull(net.requester, net.readers["rad-r"], body)
    assert r.status_code == 202, r.text
    matched = _matched(r)
    if expected is None:
        assert len(matched) == 1 and set(matched) <= {net.studies["A"], net.studies["B"]}
    else:
        assert set(matched) == {net.studies[k] for k in expected}
    queued = outbound_transfers(net.holder, "gw-r")
    priority = extra.get("priority", "routine")
    assert all(queued[t][3] == priority for t in matched.values())


def test_the_same_request_gets_the_same_answer_and_queues_nothing_again(net: Net) -> None:
    holder = Holder("gw-h", "rad-h")
    request_id = f"again-{time.time_ns()}"
    document = signed_pull(net.requester, "rad-r", holder, {"PatientID": "P-2"},
                           request_id=request_id)  # fmt: skip
    first = post_request(net.holder, "/exchange/pulls", net.holder_token_for_r, document)
    assert first.status_code == 200, first.text
    assert set(_matched(first)) == {net.studies["C"]}
    queued = outbound_transfers(net.holder, "gw-r")

    again = post_request(net.holder, "/exchange/pulls", net.holder_token_for_r, document)
    assert again.status_code == 200 and again.json() == first.json()
    # Signed again later (another time), it is still the same pull.
    later = signed_pull(net.requester, "rad-r", holder, {"PatientID": "P-2"},
                        request_id=request_id, at=time.time() + 30)  # fmt: skip
    third = post_request(net.holder, "/exchange/pulls", net.holder_token_for_r, later)
    assert third.status_code == 200 and third.json() == first.json()
    assert outbound_transfers(net.holder, "gw-r") == queued

    # The id names one pull: another query under it is refused.
    other = signed_pull(net.requester, "rad-r", holder, {"PatientID": "P-1"},
                        request_id=request_id)  # fmt: skip
    refused = post_request(net.holder, "/exchange/pulls", net.holder_token_for_r, other)
    assert refused.status_code == 409, refused.text
    assert "was used for another pull" in refused.json()["detail"]
    assert outbound_transfers(net.holder, "gw-r") == queued
    assert any(
        "asked again" in d and request_id in d for d in audit_descriptions(net.holder, "rad-h")
    )


def test_without_an_agreement_nothing_is_pulled(net: Net) -> None:
    # The requester's own agreement is missing: refused there, with the reason.
    body = {"partner": "gw-h", "partner_trust": "other-h", "query": {"PatientID": "P-1"}}
    r = _pull(net.requester, net.readers["rad-r"], body)
    assert r.status_code == 403
    assert r.json()["detail"].startswith(
        "no agreement of trust rad-r with trust other-h at partner"
    )
    r = _pull(net.requester, net.readers["ward-r"], {**body, "partner_trust": "rad-h"})
    assert r.status_code == 403 and "trust ward-r" in r.json()["detail"]
    assert any(
        "no agreement of trust ward-r" in d for d in audit_descriptions(net.requester, "ward-r")
    )

    # The holder's is missing: answered as a pull matching nothing, and audited there.
    before = outbound_transfers(net.holder, "gw-x")
    r = _pull(net.outsider, net.readers["rad-x"], {**body, "partner_trust": "rad-h"})
    assert r.status_code == 202, r.text
    assert r.json()["studies"] == [] and r.json()["state"] == "answered"
    assert outbound_transfers(net.holder, "gw-x") == before == {}
    assert any(
        d.startswith("pull by trust rad-x at gw-x refused, answered as no match: no agreement")
        for d in audit_descriptions(net.holder, "rad-h")
    )


def test_forged_stale_and_misdirected_requests_are_refused(net: Net) -> None:
    holder = Holder("gw-h", "rad-h")
    query = {"PatientID": "P-1"}
    token = net.holder_token_for_r
    before = outbound_transfers(net.holder, "gw-r")

    def refused(document: bytes, status: int, words: str, **kwargs: Any) -> None:
        r = post_request(net.holder, "/exchange/pulls", kwargs.get("token", token), document)
        assert r.status_code == status, r.text
        assert words in r.json()["detail"], r.json()["detail"]

    forged = signed_pull(net.requester, "rad-r", holder, query,
                         key=("sig-forged", Ed25519PrivateKey.generate()))  # fmt: skip
    refused(forged, 403, "no signing key sig-forged on record")
    # gw-r's key is not gw-x's: a gateway cannot sign for another.
    outer = json.loads(signed_pull(net.requester, "rad-r", holder, query))
    outer["request"] = outer["request"].replace('"gateway":"gw-r"', '"gateway":"gw-x"')
    refused(
        json.dumps(outer, separators=(",", ":")).encode(), 403, "partner gw-x has no signing key"
    )
    tampered = json.loads(signed_pull(net.requester, "rad-r", holder, query))
    tampered["request"] = tampered["request"].replace("P-1", "P-2")
    refused(json.dumps(tampered, separators=(",", ":")).encode(), 400, "does not verify")
    stale = signed_pull(net.requester, "rad-r", holder, query, at=time.time() - 600)
    refused(stale, 400, "away from this gateway's clock")
    refused(signed_pull(net.requester, "rad-r", Holder("gw-z", "rad-h"), query), 400,
            "addressed to gateway 'gw-z'")  # fmt: skip
    refused(signed_pull(net.requester, "rad-r", Holder("gw-h", "other-h"), query), 403,
            "acts for trust rad-h")  # fmt: skip
    refused(signed_pull(net.requester, "rad-r", holder, query, limit=5000), 400,
            "limit is 5000, outside 1..1000")  # fmt: skip
    refused(b'{"request": 1}', 400, "not in canonical form")
    refused(b"[", 400, "not JSON")
    r = post_request(net.holder, "/exchange/pulls", "iex_" + "0" * 16 + "_" + "0" * 64, forged)
    assert r.status_code == 401
    big = post_request(net.holder, "/exchange/pulls", token, b"{" + b" " * 70_000)
    assert big.status_code == 413, big.text
    plain = httpx.post(
        net.holder.url + "/exchange/pulls",
        content=forged,
        verify=net.holder.verify,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"},
    )
    assert plain.status_code == 415, plain.text

    assert outbound_transfers(net.holder, "gw-r") == before
    refusals = [d for d in audit_descriptions(net.holder, "rad-h") if "request refused" in d]
    assert any("sig-forged" in d for d in refusals)
    assert any("away from this gateway's clock" in d for d in refusals)


# -- federated search -----------------------------------------------------------------------


def test_a_search_at_a_partner_answers_its_matching_studies_as_dicom_json(net: Net) -> None:
    r = _get(net.requester, net.readers["rad-r"], "/partners/gw-h/dicomweb/studies",
             PatientID="P-1", includefield="PatientID")  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    datasets = r.json()
    assert _study_uids(datasets) == {net.studies["A"], net.studies["B"]}
    assert {d["00100020"]["Value"][0] for d in datasets} == {"P-1"}
    # Retrieve URLs point at the holder, where the studies are.
    assert all(
        d["00081190"]["Value"][0].startswith(net.holder.url + "/dicomweb/studies/")
        for d in datasets
    )
    found = _get(net.requester, net.readers["rad-r"], "/partners/gw-h/dicomweb/studies",
                 StudyDate="20210101-", PatientID="P-1")  # fmt: skip
    assert _study_uids(found.json()) == {net.studies["B"]}
    assert "search of trust rad-h at gw-h: 2 studies" in audit_descriptions(net.requester, "rad-r")
    assert any(
        d.startswith("search by trust rad-r at gw-r answered")
        for d in audit_descriptions(net.holder, "rad-h")
    )


def test_a_search_finds_nothing_without_the_partners_agreement(net: Net) -> None:
    r = _get(net.outsider, net.readers["rad-x"], "/partners/gw-h/dicomweb/studies",
             PatientID="P-1")  # fmt: skip
    assert r.status_code == 200 and r.json() == []
    assert any(
        d.startswith("search by trust rad-x at gw-x refused, answered as no match")
        for d in audit_descriptions(net.holder, "rad-h")
    )
    r = _get(net.requester, net.readers["ward-r"], "/partners/gw-h/dicomweb/studies",
             PatientID="P-1")  # fmt: skip
    assert r.status_code == 403 and "trust ward-r has no agreement allowing pull" in r.text


def test_the_partner_trust_is_named_when_there_are_several(net: Net) -> None:
    path = "/partners/gw-h/dicomweb/studies"
    r = _get(net.requester, net.readers["multi-r"], path, PatientID="P-1")
    assert r.status_code == 400
    assert "several trusts at partner gw-h (other-h, rad-h)" in r.json()["detail"]
    r = _get(net.requester, net.readers["multi-r"], path, PatientID="P-1", partner_trust="rad-h")
    assert r.status_code == 200 and _study_uids(r.json()) == {net.studies["A"], net.studies["B"]}
    r = _get(net.requester, net.readers["multi-r"], path, PatientID="P-1", partner_trust="nope")
    assert r.status_code == 403 and "no agreement of trust multi-r with trust nope" in r.text


# -- hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"query": {"Foo": "1"}}, 400, "query key 'Foo' is not a QIDO-RS study matching key"),
        ({"query": {"Modality": "CT"}}, 400, "'Modality' is a series-level attribute"),
        ({"query": {"PatientID": "*"}}, 400, "matches everything"),
        ({"query": {}}, 400, "names at least one of"),
        ({"query": {"StudyDate": "2020-01-01"}}, 400, "StudyDate"),
        ({"query": {"StudyInstanceUID": "1.02"}}, 400, "not a valid UID"),
        ({"query": {"PatientID": "x\u0000"}}, 400, "control characters"),
        ({"query": {"PatientID": "x" * 2000}}, 400, "longer than"),
        ({"query": ["PatientID"]}, 400, "body.query"),
        ({"limit": 10**12}, 400, "body.limit"),
        ({"limit": 0}, 400, "body.limit"),
        ({"limit": "5"}, 400, "body.limit"),
        ({"priority": "stat"}, 400, "body.priority"),
        ({"partner": "../etc"}, 400, "a partner name is"),
        ({"partner": "x" * 65}, 400, "a partner name is"),
        ({"partner_trust": "a/b"}, 400, "a partner trust name is"),
        ({"partner": "nobody"}, 403, "no agreement of trust rad-r with trust rad-h at partner"),
        ({"extra": 1}, 400, "body.extra"),
    ],
)  # fmt: skip
def test_hostile_pulls_get_precise_refusals(
    net: Net, body: dict[str, Any], status: int, words: str
) -> None:
    base = {"partner": "gw-h", "partner_trust": "rad-h", "query": {"PatientID": "P-1"}}
    r = _pull(net.requester, net.readers["rad-r"], {**base, **body})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"], r.json()["detail"]


def test_hostile_requests_never_fail_with_500(net: Net) -> None:
    token = net.readers["rad-r"]
    url = net.requester.url
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(headers=headers, timeout=120) as c:
        for content in (b"not json", b"[]", b"null", b'{"partner": 1}'):
            r = c.post(
                url + "/pulls", content=content, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 400, r.text
        for path in ("/pulls/..%2F..%2Fetc", "/pulls/%00", "/pulls/" + "f" * 32, "/pulls/x" * 50):
            assert c.get(url + path).status_code == 404, path
        assert c.get(url + "/pulls", params={"limit": "-1"}).status_code == 400
        search = "/partners/{}/dicomweb/studies"
        assert c.get(url + search.format("bad$name")).status_code == 400
        # ".." itself would be resolved by the client; sent encoded, it reaches the route.
        assert c.get(url + search.format("%2E%2E")).status_code == 400
        assert c.get(url + "/partners/..%2F..%2Fdicomweb/dicomweb/studies").status_code == 404
        twice = {"partner_trust": ["rad-h", "rad-h"]}
        for params in (
            {"Foo": "1"},
            {"limit": "x"},
            {"Modality": "CT"},
            twice,
            {"includefield": "No"},
        ):
            r = c.get(url + search.format("gw-h"), params=params)
            assert r.status_code == 400, (params, r.text)
        r = c.get(url + search.format("gw-h"), headers={"Accept": "image/png"})
        assert r.status_code == 406
        assert c.delete(url + "/pulls").status_code == 405
        # A partner's routes want a partner's signed request, whoever calls them.
        r = c.post(url + "/exchange/search", json={"request": "{}", "signature": ""})
        assert r.status_code == 400, r.text


# -- a partner that does not answer ----------------------------------------------------------


def _unreachable_partner(net: Net, name: str, url: str, tls_cert: Path | None = None) -> None:
    """Register at gw-r a partner ``name`` (trust ``rad-d``) that lives at ``url``, with a
    pull agreement for ``rad-r``: its identity is made by a gateway never started."""
    ghost = gateway(net.root, name, "rad-d")
    args = ["identity", "export", "--url", url]
    if tls_cert is not None:
        args += ["--tls-cert", str(tls_cert)]
    identity = net.root / f"{name}.json"
    identity.write_text(ghost.iex(*args))
    net.requester.iex("partner", "add", name, "--trust", "rad-r", "--identity", str(identity))
    token = net.root / f"{name}.token"
    token.write_text("iex_" + "1" * 16 + "_" + "2" * 64 + "\n")
    net.requester.iex("partner", "add", name, "--token-file", str(token))
    agree(net.requester, "rad-r", name, "rad-d", "pull")


def test_an_unreachable_partner_fails_the_pull_with_502(net: Net) -> None:
    _unreachable_partner(net, "gw-down", f"http://127.0.0.1:{free_port()}")
    body = {"partner": "gw-down", "partner_trust": "rad-d", "query": {"PatientID": "P-1"}}
    r = _pull(net.requester, net.readers["rad-r"], body)
    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    assert "partner gw-down could not be reached at http://127.0.0.1:" in detail
    assert "recorded as failed" in detail
    failed = _get(net.requester, net.readers["rad-r"], "/pulls").json()[0]
    assert (failed["partner"], failed["state"], failed["studies"]) == ("gw-down", "failed", 0)
    assert failed["error"].startswith("partner gw-down could not be reached")
    r = _get(net.requester, net.readers["rad-r"], "/partners/gw-down/dicomweb/studies",
             PatientID="P-1")  # fmt: skip
    assert r.status_code == 502 and "could not be reached" in r.text


def test_a_partner_refusing_the_request_fails_the_pull_with_its_reason(net: Net) -> None:
    # A "partner" at the requester's own URL, which issued no such token: it answers 401.
    _unreachable_partner(net, "gw-refusing", net.requester.url)
    body = {"partner": "gw-refusing", "partner_trust": "rad-d", "query": {"PatientID": "P-1"}}
    r = _pull(net.requester, net.readers["rad-r"], body)
    assert r.status_code == 502, r.text
    assert r.json()["detail"].startswith(
        "partner gw-refusing refused the pull request with 401: invalid token"
    )


def test_a_partner_presenting_another_certificate_than_pinned_is_not_called(net: Net) -> None:
    # The identity on record pins a certificate the holder does not present.
    other = server_tls(_dir(net.root / "other-pki"))
    _unreachable_partner(net, "gw-pinned", net.holder.url, tls_cert=other.cert)
    body = {"partner": "gw-pinned", "partner_trust": "rad-d", "query": {"PatientID": "P-1"}}
    r = _pull(net.requester, net.readers["rad-r"], body)
    assert r.status_code == 502, r.text
    assert "presents a TLS certificate with SHA-256" in r.json()["detail"]
    assert "not the" in r.json()["detail"]
