"""Transfer jobs: the rules that move them (``app.transfer.jobs``), their SQLite store, and
what a trust may do with its own (``TransferService``) without a runner."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from app.crypto.sqlcipher import connect
from app.errors import BadRequest, Conflict, NotFound
from app.services.transfers import TransferService, view
from app.storage.sqlite_db import schema_version
from app.transfer.job_store import JobFilter
from app.transfer.jobs import (
    Backoff,
    Direction,
    IllegalTransition,
    JobExists,
    JobState,
    Priority,
    TransferJob,
    after_transient_failure,
    can_move,
    check_move,
    new_job,
    new_job_id,
    progressed,
)
from app.transfer.sqlite_jobs import MIGRATIONS, SQLiteTransferJobs
from tests.transfer_jobs_helpers import KEY, RECEIPT, Clock, open_store

Q, P, S, A = JobState.QUEUED, JobState.PACKAGING, JobState.SENDING, JobState.AWAITING_RECEIPT
D, F, C = JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteTransferJobs]:
    s = await open_store(tmp_path / "transfers.sqlite3")
    yield s
    await s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(store: SQLiteTransferJobs, clock: Clock) -> TransferService:
    return TransferService(store, clock=clock)


# -- the rules ------------------------------------------------------------------------------


def test_jobs_move_forward_and_may_fail_or_be_cancelled_until_final() -> None:
    forward = [(Q, P), (Q, S), (P, S), (S, A), (A, D), (Q, D)]
    assert all(can_move(a, b) for a, b in forward)
    assert all(can_move(a, F) for a in (Q, P, S, A))
    assert all(can_move(a, C) for a in (Q, P, S))
    # Sent whole, the partner may hold it already: a cancel would lie.
    assert not can_move(A, C)
    # Back, sideways, or out of a final state: refused.
    assert not any(can_move(a, b) for a, b in [(S, P), (A, Q), (S, S), (D, C), (C, Q), (D, F)])
    # A failed job can only be queued again or cancelled.
    assert can_move(F, Q) and can_move(F, C)
    assert not can_move(F, S) and not can_move(F, D)


def test_an_illegal_move_says_what_the_job_is() -> None:
    with pytest.raises(IllegalTransition, match="is delivered, which is final") as refused:
        check_move("j1", D, C)
    assert refused.value.status_code == 409
    with pytest.raises(IllegalTransition, match="sending: .* not go back to packaging"):
        check_move("j1", S, P)
    with pytest.raises(IllegalTransition, match="failed: it can only be queued again"):
        check_move("j1", F, S)
    with pytest.raises(IllegalTransition, match="j1 was sent whole and awaits the partner's"):
        check_move("j1", A, C)


def test_backoff_grows_to_its_cap_and_jitter_stays_within_half_a_step() -> None:
    backoff = Backoff(base=2, cap=60, window=3600)
    low = [backoff.delay(n, 0.0) for n in range(1, 12)]
    high = [backoff.delay(n, 0.999999) for n in range(1, 12)]
    assert low[:6] == [1, 2, 4, 8, 16, 30] and set(low[6:]) == {30}
    assert all(h <= 60 for h in high) and high[0] == pytest.approx(2)
    # Equal jitter: below the cap, the shortest wait of one step is the longest of the one
    # before, so the waits grow whatever the jitter.
    assert all(low[i + 1] >= high[i] - 1e-3 for i in range(4))
    assert backoff.delay(10_000, 0.5) == 45  # no overflow however many failures


def test_transient_failures_give_up_when_the_window_has_passed(clock: Clock) -> None:
    backoff = Backoff(base=10, cap=100, window=300)
    job = _job(clock)
    job = after_transient_failure(job, "partner unreachable", clock.now, backoff, 0.0)
    assert (job.state, job.failures, job.failing_since) == (Q, 1, clock.now)
    assert job.next_attempt_at == clock.now + 5 and job.last_error == "partner unreachable"
    clock.now += 299
    job = after_transient_failure(job, "partner unreachable", clock.now, backoff, 0.0)
    assert job.state is Q and job.failures == 2
    clock.now += 1
    job = after_transient_failure(job, "HTTP 503 from the partner", clock.now, backoff, 0.0)
    assert job.state is F
    assert job.last_error == "gave up after 3 failed attempts over 5 min: HTTP 503 from the partner"


def test_progress_resets_the_failures_a_backoff_grows_from(clock: Clock) -> None:
    job = after_transient_failure(_job(clock), "timeout", clock.now, Backoff(), 0.5)
    same = progressed(job, clock.now, bytes_sent=0, checkpoint={"offset": 0})
    assert same.failures == 1 and same.checkpoint == {"offset": 0}
    moved = progressed(job, clock.now, state=S, bytes_sent=10)
    assert (moved.state, moved.failures, moved.failing_since) == (S, 0, None)
    with pytest.raises(IllegalTransition):
        progressed(moved, clock.now, state=P)
    with pytest.raises(ValueError, match="by its outcome"):
        progressed(moved, clock.now, state=D)


# -- the store ------------------------------------------------------------------------------


async def test_the_store_is_encrypted_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "transfers.sqlite3"
    store = await open_store(path)
    await store.insert(_job(Clock()))
    await store.close()
    assert not path.read_bytes().startswith(b"SQLite format 3")
    conn = connect(path, KEY)
    assert schema_version(conn) == len(MIGRATIONS)
    conn.close()


async def test_a_change_to_a_job_that_moved_meanwhile_is_refused(
    store: SQLiteTransferJobs, clock: Clock
) -> None:
    job = _job(clock)
    await store.insert(job)
    first = await store.replace(job, dataclasses.replace(job, bytes_sent=5))
    assert first is not None and first.version == job.version + 1 and first.bytes_sent == 5
    assert await store.replace(job, dataclasses.replace(job, state=C)) is None
    assert (await store.get(job.id)) == first
    # With an owner, only the runner holding the lease may change it.
    assert await store.replace(first, dataclasses.replace(first, bytes_sent=6), owner="x") is None


async def test_the_store_keeps_every_field(store: SQLiteTransferJobs, clock: Clock) -> None:
    job = dataclasses.replace(
        _job(clock),
        state=A,
        bytes_sent=7,
        bytes_total=9,
        failures=2,
        failing_since=clock.now - 1,
        last_error="x",
        receipt=b"\x00\xff",
        checkpoint={"upload": "https://p/u/1", "offset": 7},
        attempts=3,
    )
    await store.insert(job)
    assert await store.get(job.id) == job


# -- the service ----------------------------------------------------------------------------


async def test_a_trust_sees_only_its_own_transfers(service: TransferService, clock: Clock) -> None:
    study = generate_uid()
    mine = await service.create(
        "north", study=study, partner="east-gw", partner_trust="east", priority="urgent"
    )
    clock.now += 1
    theirs = await service.create("south", study=study, partner="east-gw", partner_trust="east")
    assert (mine.state, mine.priority, mine.direction) == (Q, Priority.URGENT, Direction.OUT)
    assert await service.get("north", mine.id) == mine
    with pytest.raises(NotFound) as other:
        await service.get("north", theirs.id)
    with pytest.raises(NotFound) as missing:
        await service.get("north", "0" * 32)
    assert other.value.detail.replace(theirs.id, "X") == missing.value.detail.replace("0" * 32, "X")
    with pytest.raises(NotFound):
        await service.get("north", "../../etc")
    assert [j.id for j in await service.list("north")] == [mine.id]
    for change in (service.cancel, service.pause, service.resume, service.retry):
        with pytest.raises(NotFound):
            await change("north", theirs.id)


async def test_listing_filters_by_direction_state_and_partner(
    service: TransferService, store: SQLiteTransferJobs, clock: Clock
) -> None:
    to_east = await service.create(
        "north", study=generate_uid(), partner="east-gw", partner_trust="east"
    )
    clock.now += 1
    to_west = await service.create(
        "north", study=generate_uid(), partner="west-gw", partner_trust="west"
    )
    clock.now += 1
    arrived = await service.record_arrival(
        "north", partner="west-gw", partner_trust="west", study=generate_uid(), bytes_total=10
    )
    await service.cancel("north", to_west.id)
    ids = [j.id for j in await service.list("north")]
    assert ids == [arrived.id, to_west.id, to_east.id]  # newest first
    assert [j.id for j in await service.list("north", direction="out")] == [to_west.id, to_east.id]
    assert [j.id for j in await service.list("north", direction="in")] == [arrived.id]
    assert [j.id for j in await service.list("north", state="cancelled")] == [to_west.id]
    assert [j.id for j in await service.list("north", partner="west-gw")] == [
        arrived.id,
        to_west.id,
    ]
    assert await service.list("north", direction="out", state="queued", partner="west-gw") == []
    assert len(await store.find(JobFilter(limit=2))) == 2
    with pytest.raises(BadRequest, match="direction 'sideways' is not one of: out, in"):
        await service.list("north", direction="sideways")
    with pytest.raises(BadRequest, match="state 'lost' is not one of: queued, packaging"):
        await service.list("north", state="lost")


async def test_creation_refuses_what_is_not_a_study_partner_or_priority(
    service: TransferService,
) -> None:
    good = {"study": generate_uid(), "partner": "east-gw", "partner_trust": "east"}
    for bad, match in [
        ({"study": "1.02.3"}, "not a DICOM UID"),
        ({"partner": "east gw/.."}, "partner name"),
        ({"partner_trust": ""}, "partner trust name"),
        ({"priority": "asap"}, "priority 'asap' is not one of: routine, urgent"),
    ]:
        with pytest.raises(BadRequest, match=match):
            await service.create("north", **{**good, **bad})  # type: ignore[arg-type]
    assert await service.list("north") == []


async def test_cancel_pause_resume_and_retry(
    service: TransferService, store: SQLiteTransferJobs, clock: Clock
) -> None:
    job = await service.create("north", study=generate_uid(), partner="e", partner_trust="e")
    paused = await service.pause("north", job.id)
    assert paused.paused and paused.state is Q
    assert await store.due(clock.now) == []
    assert (await service.pause("north", job.id)).version == paused.version  # no change
    clock.now += 5
    resumed = await service.resume("north", job.id)
    assert not resumed.paused and resumed.next_attempt_at == clock.now
    assert [j.id for j in await store.due(clock.now)] == [job.id]
    with pytest.raises(IllegalTransition, match="only a failed transfer can be retried"):
        await service.retry("north", (await service.cancel("north", job.id)).id)
    assert (await service.cancel("north", job.id)).state is C  # cancelling again: no change
    for change in (service.pause, service.resume):
        with pytest.raises(IllegalTransition, match="is cancelled: there is nothing to"):
            await change("north", job.id)

    # A failed transfer is queued again, with a new retry window; a delivered one is final.
    other = await service.create("north", study=generate_uid(), partner="e", partner_trust="e")
    failed = dataclasses.replace(
        other, state=F, last_error="refused", failures=4, failing_since=clock.now - 60
    )
    assert await store.replace(other, failed) is not None
    clock.now += 1
    retried = await service.retry("north", other.id)
    assert (retried.state, retried.failures, retried.failing_since) == (Q, 0, None)
    assert retried.next_attempt_at == clock.now
    current = await service.get("north", other.id)
    assert await store.replace(current, dataclasses.replace(current, state=D)) is not None
    with pytest.raises(Conflict, match="was delivered: it can no longer be cancelled"):
        await service.cancel("north", other.id)


async def test_a_transfer_awaiting_its_receipt_cannot_be_cancelled(
    service: TransferService, store: SQLiteTransferJobs
) -> None:
    """Its bundle was sent whole: the partner may store it already, so "cancelled" would lie.
    It may still be paused, and fails or is delivered as its receipt says."""
    job = await service.create("north", study=generate_uid(), partner="e", partner_trust="e")
    sent = progressed(progressed(job, 1.0, state=S), 2.0, state=A)
    assert await store.replace(job, sent) is not None
    with pytest.raises(
        Conflict,
        match=f"transfer {job.id} was sent whole and awaits the partner's receipt: the "
        "partner may have stored it already, so it can no longer be cancelled",
    ):
        await service.cancel("north", job.id)
    current = await service.get("north", job.id)
    assert current.state is A and not current.paused
    assert (await service.pause("north", job.id)).paused


async def test_a_waiting_transfer_retried_runs_now(
    service: TransferService, store: SQLiteTransferJobs, clock: Clock
) -> None:
    job = await service.create("north", study=generate_uid(), partner="e", partner_trust="e")
    waiting = after_transient_failure(job, "timeout", clock.now, Backoff(), 0.0)
    assert await store.replace(job, waiting) is not None
    assert await store.due(clock.now) == []
    retried = await service.retry("north", job.id)
    assert retried.state is Q and retried.failures == 1
    assert [j.id for j in await store.due(clock.now)] == [job.id]


async def test_arrivals_are_recorded_with_their_receipt(service: TransferService) -> None:
    arrived = await service.record_arrival(
        "north", partner="east-gw", partner_trust="east", study=generate_uid(), bytes_total=100
    )
    assert (arrived.direction, arrived.state) == (Direction.IN, S)
    assert (await service.record_arrival_progress("north", arrived.id, 60)).bytes_sent == 60
    done = await service.record_arrived("north", arrived.id, RECEIPT)
    assert (done.state, done.receipt, done.bytes_sent) == (D, RECEIPT, 100)
    shown = view(done)
    assert shown["direction"] == "in" and shown["state"] == "delivered"
    assert view(arrived)["next_attempt_at"] is None  # no runner runs an arrival
    assert shown["receipt"] == {"receipt": '{"result":"stored"}', "signature": "c2ln"}
    assert "checkpoint" not in shown
    with pytest.raises(IllegalTransition):
        await service.record_refused("north", arrived.id, "too late")
    out = await service.create("north", study=generate_uid(), partner="e", partner_trust="e")
    with pytest.raises(Conflict, match="is outbound"):
        await service.record_arrived("north", out.id, RECEIPT)


async def test_an_arrival_takes_the_id_its_sender_gave_it(service: TransferService) -> None:
    """A partner asks for its receipt by its own transfer id: the arrival is recorded under
    it, once, with what the receiver keeps of it, and a refusal keeps its receipt too."""
    sender_id = new_job_id()
    study = generate_uid()
    arrived = await service.record_arrival(
        "north",
        job_id=sender_id,
        partner="east-gw",
        partner_trust="east",
        study=study,
        checkpoint={"manifest_sha256": "ab" * 32},
    )
    assert arrived.id == sender_id and arrived.checkpoint == {"manifest_sha256": "ab" * 32}
    assert (await service.arrival("north", sender_id)).id == sender_id
    with pytest.raises(JobExists):
        await service.record_arrival(
            "south", job_id=sender_id, partner="east-gw", partner_trust="east", study=study
        )
    with pytest.raises(NotFound):
        await service.arrival("south", sender_id)  # another trust's reads like none
    refused = await service.record_refused("north", sender_id, "no agreement", RECEIPT)
    assert (refused.state, refused.last_error, refused.receipt) == (F, "no agreement", RECEIPT)
    for odd in ("tr-1", "AB" * 16, "0" * 33):
        with pytest.raises(BadRequest, match="32 lower-case hexadecimal digits"):
            await service.record_arrival(
                "north", job_id=odd, partner="east-gw", partner_trust="east", study=study
            )
    out = await service.create("north", study=study, partner="e", partner_trust="e")
    with pytest.raises(NotFound):
        await service.arrival("north", out.id)  # an outbound transfer has no receipt here


def test_the_view_shows_what_a_person_follows(clock: Clock) -> None:
    job = dataclasses.replace(
        _job(clock), state=S, bytes_sent=5, bytes_total=10, attempts=2, last_error="timeout"
    )
    shown = view(job)
    assert {k: shown[k] for k in ("state", "paused", "bytes_sent", "bytes_total")} == {
        "state": "sending",
        "paused": False,
        "bytes_sent": 5,
        "bytes_total": 10,
    }
    assert shown["attempts"] == 2 and shown["last_error"] == "timeout"
    assert shown["receipt"] is None and shown["next_attempt_at"].endswith("Z")
    assert view(dataclasses.replace(job, receipt=b"\xff"))["receipt"] == "/w=="


def _job(clock: Clock) -> TransferJob:
    return new_job(
        direction=Direction.OUT,
        trust="north",
        partner="east-gw",
        partner_trust="east",
        study=generate_uid(),
        priority=Priority.ROUTINE,
        now=clock.now,
    )
