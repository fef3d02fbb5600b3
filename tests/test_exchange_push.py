"""Pushes between two real gateway processes on loopback (docs/EXCHANGE.md).

Gateway A (trust ``rad-a``) pushes to gateway B (trust ``rad-b``, and ``rad-other`` beside
it) through a relay that records every byte and injects faults. Each fault ends with the
transfer delivered exactly once or failed with a clear reason; nothing partial is ever
visible at B.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.exchange_helpers import api, gateway, pair, wait_transfer
from tests.helpers import IexServer, make_instance
from tests.proxy import FaultProxy
from tests.transfer_helpers import multipart_of, split_multipart

pytestmark = pytest.mark.xdist_group("exchange-push")

PATIENT_NAME = "Exchangeman^Secretia"
PATIENT_ID = "PID-EXCH-77"


@dataclass
class Pair:
    a: IexServer
    b: IexServer
    relay: FaultProxy
    #: Tokens acting for rad-a at A, and for rad-b / rad-other at B.
    token_a: str
    token_b: str
    token_other: str
    root: Path


def _pixels(seed: int, side: int) -> bytes:
    # Pseudo-random, so that no run of it occurs by chance in ciphertext or headers.
    return random.Random(seed).randbytes(side * side * 2)


def _study(series: int = 2, per_series: int = 3, side: int = 64) -> tuple[str, dict[str, bytes]]:
    study = generate_uid()
    files: dict[str, bytes] = {}
    for s in range(series):
        series_uid = generate_uid()
        for n in range(per_series):
            sop = generate_uid()
            files[sop] = make_instance(
                study_uid=study,
                series_uid=series_uid,
                sop_uid=sop,
                patient_name=PATIENT_NAME,
                patient_id=PATIENT_ID,
                rows=side,
                columns=side,
                instance_number=n + 1,
                PixelData=_pixels(hash((study, s, n)) & 0xFFFF, side),
            )
    return study, files


def _store(srv: IexServer, token: str, files: dict[str, bytes]) -> None:
    body = multipart_of({f"{sop}.dcm": data for sop, data in files.items()})
    with srv.client(token) as c:
        response = c.post(
            "/studies",
            content=body,
            headers={
                "Content-Type": 'multipart/related; type="application/dicom"; '
                "boundary=iex-upload-boundary"
            },  # fmt: skip
        )
    assert response.status_code == 200, response.text


def _retrieved(srv: IexServer, token: str, study: str) -> dict[str, bytes] | None:
    """The study's instances as B serves them, by SOP Instance UID; None when not found."""
    with srv.client(token) as c:
        response = c.get(
            f"/studies/{study}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    parts = split_multipart(response)
    return {str(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID): p for p in parts}


@pytest.fixture(scope="module")
def pair_ab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("exchange")
    a = gateway(root, "gw-a", "rad-a", IEX_TRANSFER_RETRY_WINDOW="8")
    b = gateway(root, "gw-b", "rad-b", "rad-other")
    relay = FaultProxy(b.port, record=True).start()
    try:
        pair(a, "rad-a", b, "rad-b", url_b=relay.url)
        # A may also address rad-other at B, which B's token for A does not act for.
        a.iex("agreement", "add", "--trust", "rad-a", "--partner", "gw-b",
              "--partner-trust", "rad-other", "--allow", "send")  # fmt: skip
        a.start()
        b.start()
        yield Pair(
            a,
            b,
            relay,
            a.issue_token("rad-a", "uploader", "reader"),
            b.issue_token("rad-b", "uploader", "reader"),
            b.issue_token("rad-other", "uploader", "reader"),
            root,
        )
    finally:
        a.stop()
        b.stop()
        relay.stop()


def _push(p: Pair, study: str, partner_trust: str = "rad-b", **extra: Any) -> str:
    with api(p.a, p.token_a) as c:
        response = c.post(
            "/transfers",
            json={"study": study, "partner": "gw-b", "partner_trust": partner_trust, **extra},
        )
    assert response.status_code == 202, response.text
    assert response.headers["location"].endswith("/transfers/" + response.json()["id"])
    transfer: str = response.json()["id"]
    return transfer


def _final(p: Pair, transfer: str) -> dict[str, Any]:
    with api(p.a, p.token_a) as c:
        return wait_transfer(c, transfer)


def _inbound(p: Pair, token: str | None = None) -> list[dict[str, Any]]:
    with api(p.b, token or p.token_b) as c:
        response = c.get("/transfers", params={"direction": "in"})
    assert response.status_code == 200, response.text
    transfers: list[dict[str, Any]] = response.json()["transfers"]
    return transfers


def _receipt(view: dict[str, Any]) -> dict[str, Any]:
    document = view["receipt"]
    inner: dict[str, Any] = json.loads(document["receipt"])
    return inner


def _assert_delivered_once(p: Pair, transfer: str, study: str, files: dict[str, bytes]) -> None:
    view = _final(p, transfer)
    assert view["state"] == "delivered", view
    receipt = _receipt(view)
    assert receipt["result"] == "stored" and receipt["instances"] == len(files)
    assert receipt["transfer"] == transfer
    assert (receipt["receiver"]["gateway"], receipt["receiver"]["trust"]) == ("gw-b", "rad-b")
    assert _retrieved(p.b, p.token_b, study) == files
    arrived = [t for t in _inbound(p) if t["id"] == transfer]
    assert len(arrived) == 1 and arrived[0]["state"] == "delivered", arrived
    assert arrived[0]["receipt"] == view["receipt"]  # the one receipt both sides keep


def test_push_multi_series_study(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=3, per_series=3)
    _store(p.a, p.token_a, files)
    recorded_from = len(p.relay.recording)
    transfer = _push(p, study)
    _assert_delivered_once(p, transfer, study, files)
    view = _final(p, transfer)
    assert view["bytes_sent"] == view["bytes_total"] and view["attempts"] >= 1
    # Only the recipient trust sees it.
    assert _retrieved(p.b, p.token_other, study) is None
    assert [t for t in _inbound(p, p.token_other) if t["id"] == transfer] == []
    # Nothing a relay saw gives the patient away, nor any run of pixel bytes.
    seen = bytes(p.relay.recording[recorded_from:])
    assert len(seen) > sum(len(f) for f in files.values()) // 4  # it did see the study
    for secret in (PATIENT_NAME.encode(), PATIENT_ID.encode(), b"Exchangeman"):
        assert secret not in seen
    for data in files.values():
        pixels = data[-64 * 64 * 2 :]  # the studies here are 64 x 64
        for at in range(0, len(pixels) - 32, 512):
            assert pixels[at : at + 32] not in seen


def test_push_without_agreement_is_refused_before_a_byte_leaves(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=1, per_series=1)
    _store(p.a, p.token_a, files)
    before = p.relay.bytes_up
    with api(p.a, p.token_a) as c:
        response = c.post(
            "/transfers", json={"study": study, "partner": "gw-b", "partner_trust": "nowhere"}
        )
        assert response.status_code == 403, response.text
        assert "agreement" in response.json()["detail"]
        listed = c.get("/transfers", params={"direction": "out"}).json()["transfers"]
        assert [t for t in listed if t["study"] == study] == []
    assert p.relay.bytes_up == before
    with p.a.client() as admin:
        trail = json.dumps(admin.get(p.a.url + "/audit").json())
    assert "nowhere" in trail


def test_receiver_without_agreement_refuses_and_both_sides_audit(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=1, per_series=2)
    _store(p.a, p.token_a, files)
    p.b.iex("agreement", "remove", "--trust", "rad-b", "--partner", "gw-a",
            "--partner-trust", "rad-a")  # fmt: skip
    try:
        transfer = _push(p, study)
        view = _final(p, transfer)
    finally:
        p.b.iex("agreement", "add", "--trust", "rad-b", "--partner", "gw-a",
                "--partner-trust", "rad-a", "--allow", "send,receive,pull")  # fmt: skip
    assert view["state"] == "failed", view
    assert "agreement" in view["last_error"], view
    assert _retrieved(p.b, p.token_b, study) is None
    with p.b.client() as admin:
        trail_b = json.dumps(admin.get(p.b.url + "/audit").json())
    assert transfer in trail_b
    with p.a.client() as admin:
        trail_a = json.dumps(admin.get(p.a.url + "/audit").json())
    assert transfer in trail_a


def test_bundle_for_another_trust_fails_with_the_reason(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=1, per_series=1)
    _store(p.a, p.token_a, files)
    view = _final(p, _push(p, study, partner_trust="rad-other"))
    assert view["state"] == "failed", view
    assert "rad-other" in view["last_error"] and "rad-b" in view["last_error"], view
    assert _retrieved(p.b, p.token_b, study) is None
    assert _retrieved(p.b, p.token_other, study) is None


def test_lost_receipt_is_asked_for_again_never_sent_again(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=2, per_series=2)
    _store(p.a, p.token_a, files)
    p.relay.lose_answer(b"iex-receipt/1")
    up = p.relay.bytes_up
    transfer = _push(p, study)
    _assert_delivered_once(p, transfer, study, files)
    assert p.relay.lost_answers == 1
    total = _final(p, transfer)["bytes_total"]
    assert p.relay.bytes_up - up < 1.5 * total + 200_000  # the bundle crossed once


def test_connection_cut_repeatedly(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=2, per_series=4)
    _store(p.a, p.token_a, files)
    cuts = 4
    done = threading.Event()

    def cutter() -> None:
        for n in range(cuts):
            p.relay.cut(after=20_000 + 7_000 * n)
            while p.relay.cuts <= n and not done.is_set():
                time.sleep(0.01)

    start = p.relay.cuts
    p.relay.cuts = 0
    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    try:
        transfer = _push(p, study)
        _assert_delivered_once(p, transfer, study, files)
    finally:
        done.set()
        thread.join(10)
        p.relay.release()
        p.relay.cuts += start
    assert p.relay.cuts >= 1


def test_a_byte_changed_in_transit(pair_ab: Pair) -> None:
    p = pair_ab
    # Large enough that the data part's PATCH carries byte 200,000 of its connection.
    study, files = _study(series=1, per_series=3, side=256)
    _store(p.a, p.token_a, files)
    flips = p.relay.flips
    p.relay.flip(at=200_000)
    transfer = _push(p, study)
    view = _final(p, transfer)
    p.relay.release()
    assert p.relay.flips == flips + 1
    # Caught (a chunk checksum, a signature, a hash) and sent again, or failed saying so:
    # never stored altered.
    if view["state"] == "delivered":
        _assert_delivered_once(p, transfer, study, files)
    else:
        assert view["state"] == "failed" and view["last_error"], view
        assert _retrieved(p.b, p.token_b, study) is None


def test_partner_token_revoked_then_replaced(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=1, per_series=1)
    _store(p.a, p.token_a, files)
    tokens = [
        line.split("\t") for line in p.b.iex("token", "list", "--trust", "rad-b").splitlines()
    ]
    (for_a,) = [t[0] for t in tokens if t[-1] == "partner gw-a" and t[3] == "active"]
    p.b.iex("token", "revoke", for_a)
    transfer = _push(p, study)
    view = _final(p, transfer)
    assert view["state"] == "failed", view
    assert "token" in view["last_error"] and "gw-b" in view["last_error"], view
    # B issues a new one; A takes it; a retry delivers.
    token = p.b.iex("token", "issue", "--trust", "rad-b", "--role", "uploader,reader",
                    "--partner", "gw-a").strip()  # fmt: skip
    token_file = p.root / "new-token"
    token_file.write_text(token + "\n")
    p.a.iex("partner", "add", "gw-b", "--token-file", str(token_file))
    token_file.unlink()
    with api(p.a, p.token_a) as c:
        assert c.post(f"/transfers/{transfer}/retry").status_code == 200
    _assert_delivered_once(p, transfer, study, files)


def test_partner_down_past_the_retry_window_then_retried(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=1, per_series=2)
    _store(p.a, p.token_a, files)
    p.relay.down = True
    try:
        transfer = _push(p, study)
        view = _final(p, transfer)
    finally:
        p.relay.down = False
    assert view["state"] == "failed", view
    assert view["attempts"] >= 2 and view["last_error"], view
    with api(p.a, p.token_a) as c:
        assert c.post(f"/transfers/{transfer}/retry").status_code == 200
    _assert_delivered_once(p, transfer, study, files)


def test_sender_killed_mid_send(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=2, per_series=3)
    _store(p.a, p.token_a, files)
    p.relay.hold(after=40_000)
    transfer = _push(p, study)
    assert p.relay.held.wait(120), "the push never got going"
    p.a.kill()
    p.relay.release(drop=True)
    p.a.start()
    _assert_delivered_once(p, transfer, study, files)


def test_receiver_killed_mid_receive(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=2, per_series=3)
    _store(p.a, p.token_a, files)
    p.relay.hold(after=40_000)
    transfer = _push(p, study)
    assert p.relay.held.wait(120), "the push never got going"
    p.b.kill()
    p.relay.release(drop=True)
    p.b.start()
    _assert_delivered_once(p, transfer, study, files)


def test_receiver_killed_as_the_bundle_completes(pair_ab: Pair) -> None:
    p = pair_ab
    study, files = _study(series=2, per_series=3)
    _store(p.a, p.token_a, files)
    # Held once the final upload's request has reached B: B verifies and stores it now.
    p.relay.hold_after_marker(b"Upload-Concat: final")
    transfer = _push(p, study)
    assert p.relay.held.wait(120), "the final upload never came"
    p.b.kill()
    p.relay.release(drop=True)
    # Whatever B had done of the ingest, it finishes it or does it again: never half.
    p.b.start()
    _assert_delivered_once(p, transfer, study, files)
