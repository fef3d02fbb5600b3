"""``iex send``: what it shows of a transfer (progress lines, the receipt's summary), and the
command against a real gateway whose partner is down (``tests.transfers_api_helpers``):
queued with ``--no-wait``, refused with the gateway's reason, and followed to its end.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pydicom.uid import generate_uid

from app.cli.connection import UsageError
from app.cli.send import Watch, describe, destination, receipt_summary
from app.services.transfers import view
from app.transfer.jobs import Direction, JobState, Priority, delivered, new_job, progressed
from app.transfer.manifest import Endpoint
from app.transfer.receipts import Receipt, sign_receipt
from tests.bundle_helpers import SENDER_KEY
from tests.transfers_api_helpers import AGREEMENT_MISSING, World, paired_gateway

# -- what it shows --------------------------------------------------------------------------


_QUEUED = view(
    new_job(
        direction=Direction.OUT,
        trust="local",
        partner="gw-b",
        partner_trust="rad-b",
        study="1.2.3",
        priority=Priority.ROUTINE,
        now=0.0,
    )
)


def _job(**changes: object) -> dict[str, object]:
    """The view of one transfer as it changes."""
    return {**_QUEUED, **changes}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_line_rewritten_on_a_terminal_and_a_line_per_change_in_a_log() -> None:
    steps = [
        _job(),
        _job(state="sending", bytes_sent=0, bytes_total=4_000_000),
        _job(state="sending", bytes_sent=1_000_000, bytes_total=4_000_000),
        _job(state="sending", bytes_sent=1_000_000, bytes_total=4_000_000, paused=True),
        _job(state="sending", bytes_sent=2_000_000, bytes_total=4_000_000, attempts=2,
             last_error="connection refused"),
        _job(state="failed", last_error="gave up: connection refused"),
    ]  # fmt: skip
    log = io.StringIO()
    watch = Watch(log)
    for step in steps:
        watch.show(step)
    lines = log.getvalue().splitlines()
    transfer = steps[0]["id"]
    assert lines == [
        f"iex send: {transfer}: queued",
        f"iex send: {transfer}: sending  0.0 of 4.0 MB (0%)",
        f"iex send: {transfer}: sending (paused)  1.0 of 4.0 MB (25%)",
        f"iex send: {transfer}: sending  2.0 of 4.0 MB (50%)  attempt 2, last: connection refused",
        f"iex send: {transfer}: failed",
    ]

    terminal = _Terminal()
    watch = Watch(terminal)
    for step in steps[:3]:
        watch.show(step)
    watch.finish()
    assert terminal.getvalue().count("\r") == 3 and terminal.getvalue().endswith("\n")
    assert "sending  1.0 of 4.0 MB (25%)" in terminal.getvalue().rsplit("\r", 1)[1]


def test_the_receipt_summary_comes_from_the_partners_signed_receipt() -> None:
    receipt = Receipt(
        transfer="t-1",
        manifest_sha256="0" * 64,
        result="stored",
        instances=12,
        time="2026-12-02T10:00:00Z",
        receiver=Endpoint("gw-b", "rad-b", "sig-1"),
    )
    job = new_job(
        direction=Direction.OUT,
        trust="local",
        partner="gw-b",
        partner_trust="rad-b",
        study="1.2.3",
        priority=Priority.URGENT,
        now=0.0,
    )
    sent = progressed(job, 1.0, state=JobState.AWAITING_RECEIPT)
    done = view(delivered(sent, sign_receipt(receipt, SENDER_KEY), 2.0))
    assert receipt_summary(done) == f"{job.id}\t1.2.3\tgw-b/rad-b\t12 instances"
    assert receipt_summary({**done, "receipt": "bm90IGpzb24="}).endswith("\t? instances")
    assert describe(done) == "delivered"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("gw-b", "it is PARTNER/REMOTE_TRUST"),
        ("gw-b/", "a partner trust name is"),
        ("/rad-b", "a partner name is"),
        ("gw-b/rad-b/x", "a partner trust name is"),
    ],
)
def test_the_destination_is_two_names(text: str, problem: str) -> None:
    assert destination("gw-b/rad-b") == ("gw-b", "rad-b")
    with pytest.raises(UsageError, match=problem):
        destination(text)


# -- the command against a gateway ------------------------------------------------------------


@pytest.fixture(scope="module", name="w")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with paired_gateway(tmp_path_factory.mktemp("send")) as w:
        yield w


def _send(w: World, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "app.cli", "send", "--server", w.srv.url, *args,
    ]  # fmt: skip


def _env(w: World, token: str = "local") -> dict[str, str]:
    return {**os.environ, "IEX_TOKEN": w.tokens[token]}


def _run(w: World, *args: str, token: str = "local") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _send(w, *args), capture_output=True, text=True, timeout=120, env=_env(w, token)
    )


def test_no_wait_prints_the_transfer_once_queued(w: World) -> None:
    result = _run(w, "--study", w.study, "--to", "gw-b/rad-b", "--priority", "urgent", "--no-wait")
    assert result.returncode == 0, result.stderr
    transfer = result.stdout.strip()
    assert re.fullmatch("[0-9a-f]{32}", transfer), result.stdout
    assert f"transfer {transfer} queued" in result.stderr
    with w.client() as c:
        shown = c.get(f"/transfers/{transfer}").json()
    assert (shown["partner"], shown["partner_trust"], shown["priority"]) == (
        "gw-b",
        "rad-b",
        "urgent",
    )
    # The token is never shown.
    assert w.tokens["local"] not in result.stdout + result.stderr


def test_a_refused_push_exits_with_the_gateways_reason(w: World) -> None:
    with w.client() as c:
        before = c.get("/transfers").json()
    for args, status, reason in [
        (["--to", "gw-b/rad-x"], 403, AGREEMENT_MISSING.format(remote="rad-x")),
        (["--to", "gw-b/rad-b", "--study", generate_uid()], 404, "not found"),
    ]:
        if "--study" not in args:
            args += ["--study", w.study]
        result = _run(w, *args)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert f"the gateway refused the push ({status}): " in result.stderr
        assert reason in result.stderr
    with w.client() as c:
        assert c.get("/transfers").json() == before

    # Refused before asking the gateway anything: nothing to send to.
    for args, problem in [
        (["--study", "1.02", "--to", "gw-b/rad-b"], "--study '1.02' is not a DICOM UID"),
        (["--study", w.study, "--to", "gw-b"], "--to 'gw-b': it is PARTNER/REMOTE_TRUST"),
    ]:
        result = _run(w, *args)
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert problem in result.stderr
    result = subprocess.run(
        _send(w, "--study", w.study, "--to", "gw-b/rad-b"),
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "IEX_TOKEN"},
    )
    assert result.returncode == 2 and "no token: pass --token or set IEX_TOKEN" in result.stderr


def test_waiting_ends_non_zero_with_the_reason_when_the_transfer_does_not_arrive(
    w: World,
) -> None:
    """The partner is down, so the transfer either fails (no delivery configured) or keeps
    being retried until cancelled here: either way the command ends with 1 and says why."""
    process = subprocess.Popen(
        _send(w, "--study", w.study, "--to", "gw-b/rad-b"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(w),
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        found = re.search(r"transfer ([0-9a-f]{32}): study ", first)
        assert found, first
        transfer = found[1]
        with w.client() as c:
            # Queued, retrying or failed: each may be cancelled (it is never sent whole).
            assert c.delete(f"/transfers/{transfer}").status_code == 200
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, err
    assert out == ""
    assert re.search(rf"transfer {transfer} (failed|cancelled): \S", err), err
    # A line per change of state, not a progress bar: stderr is not a terminal.
    assert "\r" not in err
