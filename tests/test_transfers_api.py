"""``/transfers`` on a real gateway: pushes refused without an agreement (audited, nothing
queued) and queued with one, reading and filtering them, another trust's view, cancel,
pause, resume and retry, hostile input, and the tus endpoint that shares the prefix.

The partner is down (``tests.transfers_api_helpers``): a push to it never arrives. So only
what is certain is asserted of a queued push's state: one that a transfer to a partner that
is down can be in, never ``awaiting-receipt`` or ``delivered``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.transfers_api_helpers import (
    AGREEMENT_MISSING,
    NOT_ARRIVED,
    World,
    paired_gateway,
    store_study,
)


@pytest.fixture(scope="module", name="w")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with paired_gateway(tmp_path_factory.mktemp("transfers-api")) as w:
        yield w


def _ids(w: World, who: str = "local", **filters: str) -> list[str]:
    with w.client(who) as c:
        r = c.get("/transfers", params=filters)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["transfers"]]


def _objects(record: dict[str, Any]) -> set[str]:
    return {o["ParticipantObjectID"] for o in record.get("ParticipantObjectIdentification", [])}


# -- pushing ---------------------------------------------------------------------------------


def test_a_push_without_an_agreement_is_refused_audited_and_queues_nothing(w: World) -> None:
    study = generate_uid()
    store_study(w.srv, w.tokens["local"], study)
    before = _ids(w)
    refusals = {
        "rad-x": AGREEMENT_MISSING.format(remote="rad-x"),
        # An agreement that allows receiving only is no leave to send.
        "rad-r": "the agreement of trust local with trust rad-r at partner gw-b allows "
        "receive, not send",
    }
    for remote, reason in refusals.items():
        r = w.push(remote, study=study)
        assert r.status_code == 403, r.text
        assert r.json() == {"detail": reason}
    assert _ids(w) == before

    records = w.audit(study)
    assert [r["iex"]["route"] for r in records] == ["POST /transfers"] * 2
    for record, (remote, reason) in zip(records, refusals.items(), strict=True):
        event = record["EventIdentification"]
        assert event["EventID"]["csd-code"] == "110113"  # Security Alert
        assert event["EventOutcomeIndicator"] == "4"
        assert event["EventOutcomeDescription"] == reason
        assert _objects(record) == {study, f"partner:gw-b/{remote}"}
        assert record["iex"]["status"] == 403


def test_a_push_with_an_agreement_is_queued_and_followed(w: World) -> None:
    r = w.push(priority="urgent")
    assert r.status_code == 202, r.text
    assert r.headers["content-type"] == "application/json"
    view = r.json()
    transfer = view["id"]
    assert len(transfer) == 32 and int(transfer, 16) >= 0
    assert r.headers["location"] == f"{w.srv.url}/transfers/{transfer}"
    expected = {
        "direction": "out",
        "trust": "local",
        "partner": "gw-b",
        "partner_trust": "rad-b",
        "study": w.study,
        "priority": "urgent",
    }
    assert {k: view[k] for k in expected} == expected
    assert view["state"] in NOT_ARRIVED and view["receipt"] is None

    with w.client() as c:
        got = c.get(r.headers["location"])
    assert got.status_code == 200, got.text
    assert got.headers["cache-control"] == "no-store"
    assert {k: got.json()[k] for k in expected} == expected
    assert got.json()["state"] in NOT_ARRIVED

    (record,) = [x for x in w.audit(w.study) if f"transfer:{transfer}" in _objects(x)]
    event = record["EventIdentification"]
    assert event["EventID"]["csd-code"] == "110102"  # Begin Transferring DICOM Instances
    assert (event["EventActionCode"], event["EventOutcomeIndicator"]) == ("E", "0")
    assert event["EventOutcomeDescription"] == "push queued (urgent)"
    assert _objects(record) == {w.study, "partner:gw-b/rad-b", f"transfer:{transfer}"}
    assert record["iex"]["status"] == 202


def test_the_study_must_be_stored_in_the_callers_trust(w: World) -> None:
    before = _ids(w)
    missing = generate_uid()
    theirs = w.push(study=w.theirs)
    nowhere = w.push(study=missing)
    assert theirs.status_code == nowhere.status_code == 404
    # Another trust's study answers exactly like one that does not exist.
    assert theirs.json() == {"detail": f"study {w.theirs} not found"}
    assert nowhere.json() == {"detail": f"study {missing} not found"}
    assert _ids(w) == before


def test_roles(w: World) -> None:
    assert w.push(who="reader").status_code == 403
    with w.client("uploader") as c:
        assert c.get("/transfers").status_code == 403
    with httpx.Client(base_url=w.srv.url, timeout=60) as anonymous:
        assert anonymous.get("/transfers").status_code == 401
        assert anonymous.post("/transfers", json={}).status_code == 401


# -- reading ---------------------------------------------------------------------------------


def test_listing_is_newest_first_and_filtered(w: World) -> None:
    first = w.queued()["id"]
    second = w.queued()["id"]
    listed = _ids(w)
    assert listed.index(second) < listed.index(first)
    assert {first, second} <= set(_ids(w, direction="out"))
    assert {first, second} <= set(_ids(w, partner="gw-b"))
    assert _ids(w, direction="in") == []
    assert _ids(w, partner="gw-elsewhere") == []
    assert _ids(w, limit="1") == [listed[0]]
    with w.client() as c:
        assert c.delete(f"/transfers/{first}").status_code == 200
    assert first in _ids(w, state="cancelled") and second not in _ids(w, state="cancelled")
    assert second in _ids(w, direction="out", partner="gw-b")

    with w.client() as c:
        for params, detail in [
            ({"direction": "sideways"}, "direction 'sideways' is not one of: out, in"),
            (
                {"state": "lost"},
                "state 'lost' is not one of: queued, packaging, sending, awaiting-receipt, "
                "delivered, failed, cancelled",
            ),
            ({"partner": "../etc"}, "a partner name is 1-64 letters, digits, '.', '_' or '-'"),
            (
                {"sort": "id"},
                "unknown parameter 'sort'; the filters are direction, state, partner, limit",
            ),
        ]:
            r = c.get("/transfers", params=params)
            assert (r.status_code, r.json()) == (400, {"detail": detail}), params
        for limit in ("0", "1001", "many"):
            r = c.get("/transfers", params={"limit": limit})
            assert r.status_code == 400 and "limit" in r.json()["detail"], r.text
        r = c.get("/transfers?state=failed&state=queued")
        assert (r.status_code, r.json()) == (
            400,
            {"detail": "parameter 'state' is given more than once"},
        )


def test_another_trust_sees_nothing_of_it(w: World) -> None:
    transfer = w.queued()["id"]
    missing = "f" * 32
    with w.client("other") as c:
        theirs = c.get(f"/transfers/{transfer}")
        nowhere = c.get(f"/transfers/{missing}")
        assert theirs.status_code == nowhere.status_code == 404
        assert theirs.json()["detail"].replace(transfer, "X") == nowhere.json()["detail"].replace(
            missing, "X"
        )
        assert c.delete(f"/transfers/{transfer}").status_code == 404
        for action in ("pause", "resume", "retry"):
            assert c.post(f"/transfers/{transfer}/{action}").status_code == 404
        assert c.get("/transfers").json() == {"transfers": []}
    with w.client() as c:
        assert c.get(f"/transfers/{transfer}").json()["state"] != "cancelled"


# -- changing ---------------------------------------------------------------------------------


def test_cancel_is_final_and_idempotent(w: World) -> None:
    transfer = w.queued()["id"]
    with w.client() as c:
        first = c.delete(f"/transfers/{transfer}")
        assert first.status_code == 200, first.text
        assert (first.json()["state"], first.json()["paused"]) == ("cancelled", False)
        # Again (an answer lost, say): nothing changes, and the answer says so.
        again = c.delete(f"/transfers/{transfer}")
        assert (again.status_code, again.json()) == (200, first.json())
        assert c.get(f"/transfers/{transfer}").json()["state"] == "cancelled"
        for action, detail in [
            ("pause", f"transfer {transfer} is cancelled: there is nothing to pause"),
            ("resume", f"transfer {transfer} is cancelled: there is nothing to resume"),
            ("retry", f"transfer {transfer} is cancelled: only a failed transfer can be retried"),
        ]:
            r = c.post(f"/transfers/{transfer}/{action}")
            assert (r.status_code, r.json()) == (409, {"detail": detail})

    records = [x for x in w.audit(w.study) if f"transfer:{transfer}" in _objects(x)]
    changes = [
        (
            x["iex"]["route"],
            x["EventIdentification"]["EventActionCode"],
            x["EventIdentification"]["EventOutcomeIndicator"],
            x["EventIdentification"]["EventOutcomeDescription"],
        )
        for x in records[1:]
    ]
    assert (
        changes[:2]
        == [("DELETE /transfers/{transfer_id}", "U", "0", "transfer cancelled: now cancelled")] * 2
    )
    assert changes[2] == (
        "POST /transfers/{transfer_id}/pause",
        "U",
        "4",
        f"transfer {transfer} is cancelled: there is nothing to pause",
    )
    assert all(
        _objects(x) == {w.study, "partner:gw-b/rad-b", f"transfer:{transfer}"} for x in records
    )


def test_pause_resume_and_retry(w: World) -> None:
    """Whether the transfer is still being tried (a delivery retrying a partner that is
    down) or has failed already (no delivery configured) is not up to the test: each case
    is checked for what it must answer."""
    transfer = w.queued()["id"]
    with w.client() as c:
        paused = c.post(f"/transfers/{transfer}/pause")
        if paused.status_code == 200:
            assert paused.json()["paused"] is True
            assert paused.json()["state"] in NOT_ARRIVED - {"failed"}
            assert c.get(f"/transfers/{transfer}").json()["paused"] is True
            resumed = c.post(f"/transfers/{transfer}/resume")
            assert resumed.status_code == 200, resumed.text
            assert resumed.json()["paused"] is False
        else:
            assert (paused.status_code, paused.json()) == (
                409,
                {"detail": f"transfer {transfer} is failed: there is nothing to pause"},
            )
            retried = c.post(f"/transfers/{transfer}/retry")
            assert retried.status_code == 200, retried.text
            assert (retried.json()["state"], retried.json()["paused"]) == ("queued", False)
        assert c.get(f"/transfers/{transfer}").json()["state"] in NOT_ARRIVED
    descriptions = [
        x["EventIdentification"]["EventOutcomeDescription"]
        for x in w.audit(w.study)
        if f"transfer:{transfer}" in _objects(x)
    ]
    assert descriptions[0] == "push queued (routine)"
    assert descriptions[1].startswith(("transfer paused: now ", f"transfer {transfer} is failed"))
    assert descriptions[2].startswith(("transfer resumed: now ", "transfer retried: now queued"))


# -- hostile input ----------------------------------------------------------------------------


def _post(
    w: World, content: bytes | Any, content_type: str | None = "application/json"
) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    with w.client() as c:
        return c.post("/transfers", content=content, headers=headers)


def test_hostile_bodies_get_precise_4xx_and_queue_nothing(w: World) -> None:
    before = _ids(w)
    good = {"study": w.study, "partner": "gw-b", "partner_trust": "rad-b"}
    fields = "study, partner, partner_trust, priority"

    def body(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    cases: list[tuple[bytes | Any, str | None, int, str]] = [
        (body(study="1.02.3"), "application/json", 400, "not a DICOM UID"),
        (body(study="1." * 40 + "1"), "application/json", 400, "at most 64 are allowed"),
        (body(partner="../../etc"), "application/json", 400, "a partner name is 1-64"),
        (body(partner_trust="a/b"), "application/json", 400, "a partner trust name is 1-64"),
        (body(priority="asap"), "application/json", 400,
         "priority 'asap' is not one of: routine, urgent"),
        (body(study=123), "application/json", 400, "study must be a string"),
        (body(extra=1), "application/json", 400,
         f"unknown field 'extra' (the fields are: {fields})"),
        (json.dumps({"study": w.study}).encode(), "application/json", 400,
         "partner is required; partner_trust is required"),
        (b"[1, 2]", "application/json", 400, "the body is a JSON list, not an object"),
        (b'{"study": ', "application/json", 400, "not JSON (Expecting value"),
        (b"", "application/json", 400, "the body is empty"),
        (b'{"study": "1.2", "study": "1.3"}', "application/json", 400, "'study' appears twice"),
        (b'{"study": NaN}', "application/json", 400, "NaN is not a JSON number"),
        (b"[" * 16000, "application/json", 400, "nested too deeply"),
        (b'{"study": "\xff"}', "application/json", 400, "the body is not UTF-8"),
        (body(), "text/plain", 415,
         "Content-Type 'text/plain' is not supported; send application/json"),
        (body(), None, 415, "Content-Type '' is not supported"),
        (body(), "application/", 415, "the Content-Type is malformed"),
        (body(), "application/json; charset=latin-1", 415, "charset 'latin-1' is not supported"),
        (b"{" + b" " * (1 << 20) + b"}", "application/json", 413,
         "a transfer request of 1048578 bytes exceeds 16384 bytes"),
        # Without Content-Length (chunked): refused once the bound is passed.
        (iter([b"{", b" " * (1 << 20), b"}"]), "application/json", 413,
         "the request body exceeds the limit of 16384 bytes"),
    ]  # fmt: skip
    for content, ctype, status, detail in cases:
        r = _post(w, content, ctype)
        assert r.status_code == status, (detail, r.text)
        assert detail in r.json()["detail"], (detail, r.text)
    assert _ids(w) == before


def test_hostile_ids_and_paths_get_precise_4xx(w: World) -> None:
    not_an_id = "is not a transfer id: transfer ids are 32 lower-case hexadecimal digits"
    not_a_resource = "is not a transfer resource: they are /transfers/{id} and"
    with w.client() as c:
        for method, path, status, detail in [
            ("GET", "/transfers/nothex", 400, f"'nothex' {not_an_id}"),
            ("GET", "/transfers/" + "A" * 32, 400, not_an_id),
            ("DELETE", "/transfers/" + "0" * 33, 400, not_an_id),
            ("POST", "/transfers/%2e%2e/pause", 400, not_an_id),
            (
                "GET",
                "/transfers/..%2F..%2Fetc%2Fpasswd",
                400,
                f"'../../etc/passwd' {not_a_resource}",
            ),
            ("DELETE", "/transfers/..%2Fsecurity.sqlite3", 400, not_a_resource),
            ("POST", "/transfers/x%2F..%2Fy/retry", 400, not_a_resource),
            ("GET", "/transfers/" + "0" * 32, 404, f"no transfer '{'0' * 32}'"),
        ]:
            r = c.request(method, path)
            assert r.status_code == status, (method, path, r.text)
            assert detail in r.json()["detail"], (method, path, r.text)


def test_the_tus_endpoint_under_the_prefix_still_works(w: World) -> None:
    tus = {"Tus-Resumable": "1.0.0"}
    with w.client() as c:
        options = c.options("/transfers/uploads")
        assert options.status_code == 204 and options.headers["tus-version"] == "1.0.0"
        zip_type = base64.b64encode(b"application/zip").decode()
        created = c.post(
            "/transfers/uploads",
            headers={**tus, "Upload-Length": "10", "Upload-Metadata": f"content-type {zip_type}"},
        )
        assert created.status_code == 201, created.text
        upload = created.headers["location"]
        assert upload.startswith(f"{w.srv.url}/transfers/uploads/")
        chunk = {**tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        assert c.patch(upload, content=b"01234", headers=chunk).status_code == 204
        head = c.head(upload, headers=tus)
        assert (head.status_code, head.headers["upload-offset"]) == (200, "5")
        assert c.delete(upload, headers=tus).status_code == 204
        assert c.head(upload, headers=tus).status_code == 404
