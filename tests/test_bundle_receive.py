"""Receiving bundles pushed by a partner gateway, on a real gateway: the sender ``gw-a``
(a data directory and its keys) is paired with the running receiver ``gw-b`` through the
command line, its bundles are built from real DICOM with its own keys, pushed as tus
partial uploads joined by a final one, and their receipts asked for as a sender would.

Checked: a bundle is stored byte for byte into the recipient trust only and its signed
receipt verifies; the same bundle again is stored once and keeps its receipt; every refusal
(unknown key, bad signature, corrupt data, misaddressed, no agreement, a transfer id taken)
stores nothing, says why, and is audited; the receipts route refuses malformed ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import httpx
import pytest
from pydicom.uid import generate_uid

from app.crypto.identity import IdentityDocument
from app.transfer.jobs import new_job_id
from tests.bundle_sending import (
    Sender,
    build,
    digests,
    flipped,
    identity_of,
    instance_count,
    make_sender,
    pair,
    pushed,
    receipt_response,
    study_instances,
    verified_receipt,
)
from tests.helpers import IexServer, make_instance
from tests.transfer_helpers import stored_digests


@dataclass(frozen=True)
class Pairing:
    receiver: IexServer
    identity: IdentityDocument
    sender: Sender
    #: The partner's token: uploader (and reader, to look) for trust rad-b.
    token: str
    #: A token of trust other-b, which has no agreement with anyone.
    other: str


@pytest.fixture(scope="module")
def p(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pairing]:
    """Sender ``gw-a`` (trusts rad-a and rad-x) registered at the running receiver ``gw-b``,
    whose trust rad-b receives from rad-a only."""
    tmp = tmp_path_factory.mktemp("exchange")
    sender = make_sender(tmp / "gw-a", "gw-a", "rad-a", "rad-x")
    receiver = IexServer(tmp / "gw-b", env={"IEX_NAME": "gw-b"}).start()
    try:
        receiver.iex("trust", "add", "rad-b")
        receiver.iex("trust", "add", "other-b")
        pair(receiver, sender, "rad-b", tmp)
        receiver.iex(
            "agreement", "add", "--trust", "rad-b", "--partner", "gw-a",
            "--partner-trust", "rad-a", "--allow", "receive",
        )  # fmt: skip
        token = receiver.iex(
            "token", "issue", "--trust", "rad-b", "--role", "uploader,reader", "--partner", "gw-a"
        ).strip()
        other = receiver.issue_token("other-b", "uploader", "reader")
        yield Pairing(receiver, identity_of(receiver), sender, token, other)
    finally:
        receiver.stop()


def _events(p: Pairing, trust: str, mention: str) -> list[str]:
    """The words of the audit records of bundles received by ``trust`` that mention
    ``mention``, oldest first. An ingest's record is durable before its report says it
    ended, so no wait is needed."""
    with httpx.Client(base_url=p.receiver.url, headers=p.receiver.headers, timeout=60) as c:
        r = c.get("/audit", params={"trust": trust})
        assert r.status_code == 200, r.text
    return [
        words
        for rec in r.json()
        if rec["iex"]["route"].startswith("INGEST ")
        and mention in (words := rec["EventIdentification"].get("EventOutcomeDescription", ""))
    ]


def test_bundle_is_stored_in_the_recipient_trust_with_a_verified_receipt(p: Pairing) -> None:
    instances = study_instances(3)
    built = build(p.sender, "rad-a", p.identity, "rad-b", instances)
    report = pushed(p.receiver, p.token, built, parts=3)
    assert report["state"] == "complete", report
    assert report["content_type"] == "application/vnd.iex.bundle"
    assert report["counts"]["stored"] == 4 and report["error"] is None

    r = receipt_response(p.receiver, p.token, built.transfer)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    receipt = verified_receipt(r.content, p.identity, built, "rad-b")
    assert (receipt.result, receipt.instances, receipt.reason) == ("stored", 4, None)

    # Byte for byte, in the recipient trust and nowhere else.
    assert stored_digests(p.receiver, built.study, p.token) == digests(instances)
    assert instance_count(p.receiver, p.other, built.study) == 0
    assert instance_count(p.receiver, p.receiver.token, built.study) == 0

    [event] = _events(p, "rad-b", built.transfer)
    assert "from trust rad-a at partner gw-a stored: 4 instances" in event

    # The same bundle again: not stored again, and the receipt given stands.
    again = pushed(p.receiver, p.token, built)
    assert again["state"] == "complete", again
    assert again["counts"] == {"stored": 0, "already_stored": 4, "failed": 0, "skipped": 0}
    r2 = receipt_response(p.receiver, p.token, built.transfer)
    assert r2.status_code == 200 and r2.content == r.content
    assert instance_count(p.receiver, p.token, built.study) == 4
    assert "received again: stored before" in _events(p, "rad-b", built.transfer)[-1]


def test_a_partner_key_not_on_record_is_refused_without_a_receipt(p: Pairing) -> None:
    built = build(
        p.sender, "rad-a", p.identity, "rad-b", study_instances(1), sender_key_id="sig-unknown"
    )
    report = pushed(p.receiver, p.token, built)
    assert report["state"] == "failed"
    assert "no signing key 'sig-unknown' is known for gateway 'gw-a'" in report["error"]
    assert receipt_response(p.receiver, p.token, built.transfer).status_code == 404
    assert instance_count(p.receiver, p.token, built.study) == 0
    [event] = _events(p, "rad-b", "key sig-unknown")
    assert "claiming to be from trust rad-a at gateway gw-a" in event
    assert "refused before it was identified" in event


def test_an_altered_head_fails_its_signature(p: Pairing) -> None:
    built = build(p.sender, "rad-a", p.identity, "rad-b", study_instances(1))
    # One byte of the manifest: the "created" time's last digit, still canonical JSON.
    at = built.head.index(b'"created":"') + len(b'"created":"2024-01-01T00:00:0')
    head = flipped(built.head, at)
    report = pushed(p.receiver, p.token, replace(built, head=head))
    assert report["state"] == "failed"
    assert "signature" in report["error"] and "does not verify" in report["error"]
    assert receipt_response(p.receiver, p.token, built.transfer).status_code == 404
    assert instance_count(p.receiver, p.token, built.study) == 0


def test_one_byte_flipped_in_the_data_stores_nothing_and_is_refused(p: Pairing) -> None:
    instances = study_instances(2)
    built = build(p.sender, "rad-a", p.identity, "rad-b", instances)
    # In the last instance: the first ones are whole and would stage, then be discarded.
    altered = replace(built, data=flipped(built.data, len(built.data) - 100))
    report = pushed(p.receiver, p.token, altered)
    assert report["state"] == "failed", report
    assert "instance 2 (" in report["error"] and "nothing was stored" in report["error"]
    assert instance_count(p.receiver, p.token, built.study) == 0

    r = receipt_response(p.receiver, p.token, built.transfer)
    assert r.status_code == 200, r.text
    receipt = verified_receipt(r.content, p.identity, built, "rad-b")
    assert (receipt.result, receipt.instances) == ("refused", 0)
    assert receipt.reason is not None and "instance 2 (" in receipt.reason
    [event] = _events(p, "rad-b", built.transfer)
    assert "refused, receipt sent" in event and "partner gw-a" in event


def test_an_instance_the_store_refuses_refuses_the_whole_bundle(p: Pairing) -> None:
    first = build(p.sender, "rad-a", p.identity, "rad-b", study_instances(1))
    assert pushed(p.receiver, p.token, first)["state"] == "complete"
    # Another object under a SOP Instance UID the trust holds, beside a new one.
    taken = next(iter(first.instances))
    study = generate_uid()
    instances = {
        uid: make_instance(study_uid=study, sop_uid=uid, patient_id="PID-2")
        for uid in (generate_uid(), taken)
    }
    built = build(p.sender, "rad-a", p.identity, "rad-b", instances)
    report = pushed(p.receiver, p.token, built)
    assert report["state"] == "failed", report
    assert report["counts"]["failed"] == 1
    assert f"instance 1 ({taken}) cannot be stored" in report["error"]
    assert instance_count(p.receiver, p.token, study) == 0
    r = receipt_response(p.receiver, p.token, built.transfer)
    receipt = verified_receipt(r.content, p.identity, built, "rad-b")
    assert receipt.result == "refused" and "already stored under this SOP" in (receipt.reason or "")
    assert stored_digests(p.receiver, first.study, p.token) == digests(first.instances)


def test_a_bundle_for_another_trust_is_misaddressed(p: Pairing) -> None:
    built = build(p.sender, "rad-a", p.identity, "other-b", study_instances(1))
    report = pushed(p.receiver, p.token, built)  # as rad-b's partner
    assert report["state"] == "failed"
    assert "is for trust 'other-b' at gateway 'gw-b', not for trust 'rad-b'" in report["error"]
    assert receipt_response(p.receiver, p.token, built.transfer).status_code == 404
    assert instance_count(p.receiver, p.other, built.study) == 0
    assert instance_count(p.receiver, p.token, built.study) == 0


def test_a_bundle_sealed_to_another_trusts_key_is_refused(p: Pairing) -> None:
    built = build(p.sender, "rad-a", p.identity, "rad-b", study_instances(1), sealed_for="other-b")
    report = pushed(p.receiver, p.token, built)
    assert report["state"] == "failed"
    assert "which is not a key of trust 'rad-b'" in report["error"]
    r = receipt_response(p.receiver, p.token, built.transfer)
    assert r.status_code == 200
    assert verified_receipt(r.content, p.identity, built, "rad-b").result == "refused"


def test_without_an_agreement_the_bundle_is_refused_and_audited(p: Pairing) -> None:
    built = build(p.sender, "rad-x", p.identity, "rad-b", study_instances(1))
    report = pushed(p.receiver, p.token, built)
    assert report["state"] == "failed"
    assert "no agreement of trust rad-b with trust rad-x at partner gw-a" in report["error"]
    assert instance_count(p.receiver, p.token, built.study) == 0
    r = receipt_response(p.receiver, p.token, built.transfer)
    assert r.status_code == 200
    receipt = verified_receipt(r.content, p.identity, built, "rad-b")
    assert receipt.result == "refused" and "no agreement" in (receipt.reason or "")
    with httpx.Client(base_url=p.receiver.url, headers=p.receiver.headers, timeout=60) as c:
        records = [
            rec
            for rec in c.get("/audit", params={"trust": "rad-b"}).json()
            if built.transfer in rec["EventIdentification"].get("EventOutcomeDescription", "")
        ]
    [record] = records
    assert record["iex"]["status"] == 403
    assert record["EventIdentification"]["EventID"]["originalText"] == "Security Alert"
    assert (
        "from trust rad-x at partner gw-a refused"
        in (record["EventIdentification"]["EventOutcomeDescription"])
    )


def test_a_refused_transfer_sent_again_once_agreed_is_stored(p: Pairing) -> None:
    """A refusal stored nothing: the sender's retry under the same id, in a new upload once
    the cause is fixed, is received afresh and its receipt replaces the refusal."""
    instances = study_instances(2)
    first = build(p.sender, "rad-x", p.identity, "rad-b", instances)
    assert pushed(p.receiver, p.token, first)["state"] == "failed"
    refused = receipt_response(p.receiver, p.token, first.transfer).content
    assert verified_receipt(refused, p.identity, first, "rad-b").result == "refused"
    p.receiver.iex("agreement", "add", "--trust", "rad-b", "--partner", "gw-a",
                   "--partner-trust", "rad-x", "--allow", "receive")  # fmt: skip
    try:
        again = build(p.sender, "rad-x", p.identity, "rad-b", instances, transfer=first.transfer)
        assert pushed(p.receiver, p.token, again)["state"] == "complete"
    finally:
        p.receiver.iex("agreement", "remove", "--trust", "rad-b", "--partner", "gw-a",
                       "--partner-trust", "rad-x")  # fmt: skip
    r = receipt_response(p.receiver, p.token, first.transfer)
    receipt = verified_receipt(r.content, p.identity, again, "rad-b")
    assert (receipt.result, receipt.instances) == ("stored", len(instances))
    assert stored_digests(p.receiver, first.study, p.token) == digests(instances)


def test_a_transfer_id_is_one_bundle(p: Pairing) -> None:
    first = build(p.sender, "rad-a", p.identity, "rad-b", study_instances(1))
    assert pushed(p.receiver, p.token, first)["state"] == "complete"
    receipt = receipt_response(p.receiver, p.token, first.transfer).content
    headers = {"Authorization": f"Bearer {p.token}"}
    with httpx.Client(base_url=p.receiver.url, headers=headers, timeout=60) as c:
        held = c.get(f"/exchange/receipts/{first.transfer}", params={"wait": "30"})
    assert held.status_code == 200 and held.content == receipt  # there already: no hold
    # Another bundle (another manifest) under the same id: refused, the first one's receipt
    # stays.
    second = build(
        p.sender, "rad-a", p.identity, "rad-b", study_instances(1), transfer=first.transfer
    )
    report = pushed(p.receiver, p.token, second)
    assert report["state"] == "failed"
    assert "was received already with another manifest" in report["error"]
    assert instance_count(p.receiver, p.token, second.study) == 0
    assert receipt_response(p.receiver, p.token, first.transfer).content == receipt
    # An id that is not a job id cannot be recorded: refused with the report's word only.
    odd = build(p.sender, "rad-a", p.identity, "rad-b", study_instances(1), transfer="tr-1")
    report = pushed(p.receiver, p.token, odd)
    assert report["state"] == "failed" and "32 lower-case hexadecimal" in report["error"]


def test_receipts_route_refuses_what_is_not_a_transfer_id(p: Pairing) -> None:
    headers = {"Authorization": f"Bearer {p.token}"}
    with httpx.Client(base_url=p.receiver.url, headers=headers, timeout=60) as c:
        for bad in ("%2e%2e", "a" * 65, "-x", "a%00b", "caf%C3%A9"):
            r = c.get(f"/exchange/receipts/{bad}")
            assert r.status_code == 400, (bad, r.text)
            assert "transfer id is 1-64 letters" in r.json()["detail"]
        for missing in ("tr-1", new_job_id()):
            r = c.get(f"/exchange/receipts/{missing}")
            assert r.status_code == 404, r.text
            assert r.json()["detail"].startswith("no transfer")
        # Held answers: a missing one is still 404 once the time is up; the bound is 30 s.
        r = c.get(f"/exchange/receipts/{new_job_id()}", params={"wait": "1"})
        assert r.status_code == 404, r.text
        for bad_wait in ("31", "-1", "soon"):
            r = c.get(f"/exchange/receipts/{new_job_id()}", params={"wait": bad_wait})
            assert r.status_code == 400, (bad_wait, r.text)
        # A slash, encoded or not, is never part of the parameter.
        for path in ("/exchange/receipts/a%2Fb", "/exchange/receipts/a/b"):
            r = c.get(path)
            assert r.status_code == 404 and "detail" in r.json()
        assert c.get("/exchange/receipts/x", headers={"Authorization": ""}).status_code == 401


def test_another_trust_reads_a_receipt_like_a_missing_one(p: Pairing) -> None:
    built = build(p.sender, "rad-a", p.identity, "rad-b", study_instances(1))
    assert pushed(p.receiver, p.token, built)["state"] == "complete"
    r = receipt_response(p.receiver, p.other, built.transfer)
    assert r.status_code == 404
    assert r.json()["detail"] == f"no transfer {built.transfer!r}"


def test_a_reader_cannot_ask_for_receipts(p: Pairing) -> None:
    reader = p.receiver.issue_token("rad-b", "reader")
    assert receipt_response(p.receiver, reader, new_job_id()).status_code == 403
