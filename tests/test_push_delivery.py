"""Pushing a study between two real gateways paired by the command line (``iex serve``
processes on loopback; B serves TLS, pinned by A).

What each test checks holds whether or not B has the receiving side of pushes: refusals
(no agreement here, our token revoked there, a certificate that is not the pinned one, no
agreement there), a partner that is down (tried again, then sent once it is up), and, when B
can answer receipts, the whole push: delivered, stored at B byte for byte, audited at A.
Tests that change how A and B are paired have a pair of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from app.services.push_parts import MIN_PART
from app.transfer.jobs import JobState
from tests.helpers import make_instance
from tests.push_helpers import (
    TRUST_A,
    TRUST_B,
    UNAGREED_A,
    UNWELCOME_A,
    Pair,
    final_uploads,
    introduce,
    push,
    serves_receipts,
    start_pair,
    store_study,
    transfer,
    transfer_events,
    wait_transfer,
)
from tests.transfer_helpers import source_digests, stored_digests, studies_found


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """A pair the tests share: none changes what A and B know of each other."""
    started = start_pair(tmp_path_factory.mktemp("paired"))
    introduce(started)
    yield started
    started.a.stop()
    started.b.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """A pair of its own, not introduced yet, for a test that changes how they are paired."""
    started = start_pair(tmp_path)
    yield started
    started.a.stop()
    started.b.stop()


def _study(
    srv_pair: Pair, count: int = 3, rows: int = 64, trust: str = TRUST_A
) -> tuple[str, dict[str, bytes]]:
    study = generate_uid()
    series = generate_uid()
    objects = {
        f"IM{i}": make_instance(
            study_uid=study, series_uid=series, instance_number=i + 1, rows=rows, columns=rows
        )
        for i in range(count)
    }
    store_study(srv_pair.a, trust, list(objects.values()))
    return study, objects


def _outbox(srv_pair: Pair, job_id: str) -> Path:
    return srv_pair.a.data_dir / "exchange" / "outbox" / job_id


def test_without_an_agreement_nothing_is_sent(paired: Pair) -> None:
    study = generate_uid()
    store_study(paired.a, UNAGREED_A, [make_instance(study_uid=study)])
    job_id = push(paired.a, study, trust=UNAGREED_A)
    job = wait_transfer(paired.a, job_id, lambda j: j.state is JobState.FAILED, "the refusal")
    assert job.last_error == (
        f"no agreement of trust {UNAGREED_A} with trust {TRUST_B} at partner gw-b: nothing "
        "crosses without one (iex agreement add)"
    )
    assert job.attempts == 1 and job.bytes_sent == 0
    assert not _outbox(paired, job_id).exists()
    assert transfer_events(paired.a, job_id) == [
        f"transfer failed: transfer {job_id} of trust {UNAGREED_A} to trust {TRUST_B} at "
        f"partner gw-b: {job.last_error}"
    ]


def test_a_study_the_trust_does_not_hold_fails(paired: Pair) -> None:
    missing = generate_uid()
    job_id = push(paired.a, missing)
    job = wait_transfer(paired.a, job_id, lambda j: j.state is JobState.FAILED, "the failure")
    assert job.last_error == f"study {missing} has no instances in trust {TRUST_A}"


def test_a_partner_that_refuses_the_bundle_fails_the_transfer(paired: Pair) -> None:
    # 22 MiB of 12-bit noise, some 19 MiB once compressed: the data travels as two parts
    # beside the head, sent at once.
    study, _ = _study(paired, count=11, rows=1024, trust=UNWELCOME_A)
    job_id = push(paired.a, study, trust=UNWELCOME_A)  # B does not receive from rad-a2
    job = wait_transfer(paired.a, job_id, lambda j: j.state is JobState.FAILED, "the refusal")
    assert job.last_error is not None
    assert job.last_error.startswith("partner gw-b refused the "), job.last_error
    assert not _outbox(paired, job_id).exists()
    assert studies_found(paired.b, study, paired.b.issue_token(TRUST_B, "reader")) == []
    events = transfer_events(paired.a, job_id)
    assert [e.split(":", 1)[0] for e in events] == ["transfer sent", "transfer failed"]
    # The bytes went as the head and two data parts, joined by one final upload.
    assert job.bytes_total is not None and job.bytes_total > 2 * MIN_PART
    assert [len(parts) for parts in final_uploads(paired.b, job_id)] == [3]


def test_a_token_the_partner_revoked_fails_the_transfer(pair: Pair) -> None:
    introduce(pair)
    for line in pair.b.iex("token", "list", "--trust", TRUST_B).splitlines():
        if "gw-a" in line:
            pair.b.iex("token", "revoke", line.split()[0])
    study, _ = _study(pair, count=1)
    job_id = push(pair.a, study)
    job = wait_transfer(pair.a, job_id, lambda j: j.state is JobState.FAILED, "the refusal")
    assert job.last_error is not None
    assert job.last_error.startswith("partner gw-b refused this gateway's token (401: ")
    assert "expired or revoked" in job.last_error
    assert "iex partner add gw-b --token-file FILE" in job.last_error
    assert not _outbox(pair, job_id).exists()


def test_a_certificate_other_than_the_pinned_one_fails_before_anything_is_sent(
    pair: Pair,
) -> None:
    assert pair.b.tls is not None
    introduce(pair, b_cert=pair.b.tls.server_ca)  # B's identity pins another certificate
    study, _ = _study(pair, count=1)
    job_id = push(pair.a, study)
    job = wait_transfer(pair.a, job_id, lambda j: j.state is JobState.FAILED, "the refusal")
    assert job.last_error is not None
    assert "is not the one pinned in its identity on record" in job.last_error
    assert "iex partner add gw-b --identity FILE" in job.last_error
    assert "PATCH" not in pair.b.log() and "/transfers/uploads" not in pair.b.log()


def test_a_partner_that_is_down_is_tried_again_and_sent_to_once_up(pair: Pair) -> None:
    introduce(pair)
    study, objects = _study(pair)
    pair.b.stop()
    job_id = push(pair.a, study)
    job = wait_transfer(pair.a, job_id, lambda j: j.failures >= 1, "a transient failure")
    assert job.state is JobState.SENDING and not job.state.final
    assert job.last_error is not None
    assert job.last_error.startswith("partner gw-b is unreachable or failing: "), job.last_error
    # Packaged once, and kept for the next attempt: the bundle and its head are recorded.
    staged = _outbox(pair, job_id)
    assert staged.stat().st_size == job.checkpoint["bundle"]["data_length"]
    assert job.bytes_total is not None and job.bytes_total > staged.stat().st_size

    pair.b.start()  # on the same port
    job = wait_transfer(
        pair.a, job_id, lambda j: j.state.final or j.state is JobState.AWAITING_RECEIPT, "a send"
    )
    job = wait_transfer(pair.a, job_id, lambda j: j.state.final, "the outcome")
    events = [e.split(":", 1)[0] for e in transfer_events(pair.a, job_id)]
    assert events[0] == "transfer sent"
    if serves_receipts(pair.b):
        assert job.state is JobState.DELIVERED, job.last_error
        token = pair.b.issue_token(TRUST_B, "reader")
        assert stored_digests(pair.b, study, token) == source_digests(objects)
    else:  # B cannot read bundles yet: its ingest fails the final upload
        assert job.state is JobState.FAILED
        assert job.last_error is not None and job.last_error.startswith("partner gw-b refused")


def test_a_push_is_delivered_and_stored_at_the_partner_byte_for_byte(paired: Pair) -> None:
    if not serves_receipts(paired.b):
        pytest.skip("needs the receiving side")
    # Some 19 MiB once compressed: the data travels as two parts beside the head.
    study, objects = _study(paired, count=11, rows=1024)
    job_id = push(paired.a, study)
    job = wait_transfer(paired.a, job_id, lambda j: j.state.final, "the delivery", timeout=300)
    assert job.state is JobState.DELIVERED, job.last_error
    assert job.receipt is not None and job.bytes_sent == job.bytes_total
    token = paired.b.issue_token(TRUST_B, "reader")
    assert stored_digests(paired.b, study, token) == source_digests(objects)
    assert not _outbox(paired, job_id).exists()
    events = [e.split(":", 1)[0] for e in transfer_events(paired.a, job_id)]
    assert events == ["transfer sent", "transfer delivered"]
    assert transfer(paired.a, job_id).checkpoint.get("final")
