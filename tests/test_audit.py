"""The audit trail: a record per request, PS3.15 A.5 fields, no names, a verifiable chain."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from pydicom.uid import generate_uid

from app.names import name_from_host
from app.settings import Settings
from tests.helpers import IexServer, make_instance, open_db

CT = {"Content-Type": "application/dicom"}
NAME = "Confidential^Patient"


@dataclass
class Session:
    srv: IexServer
    mark: int
    study: str
    series: str
    sop: str
    data: bytes
    reader_id: str
    expected: list[Any]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """A scripted session: every request and what its record must say."""
    srv = IexServer(tmp_path_factory.mktemp("audit") / "data").start()
    reader = srv.issue_token("local", "reader")
    revoked = srv.issue_token("local", "reader")
    srv.iex("token", "revoke", revoked.split("_")[1])
    admin_id = srv.token.split("_")[1]
    reader_id = reader.split("_")[1]
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = make_instance(study_uid=study, series_uid=series, sop_uid=sop, patient_name=NAME)
    inst = f"/studies/{study}/series/{series}/instances/{sop}"
    with srv.client() as admin:
        mark = admin.get(srv.url + "/audit").json()[-1]["seq"]
    expected: list[Any] = []

    def run(
        token: str | None, method: str, path: str, status: int, actor: str | None, **kw: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))
        r = httpx.request(method, srv.dicomweb + path, headers=headers, timeout=60, **kw)
        assert r.status_code == status, (path, r.text)
        expected.append((method, path, status, actor, r))
        return r

    run(srv.token, "POST", "/studies", 200, admin_id, content=data, headers=CT)
    run(reader, "GET", "/studies", 200, reader_id, params={"PatientName": NAME})
    run(reader, "GET", f"/studies/{study}", 200, reader_id, headers={"Accept": "*/*"})
    run(reader, "GET", inst + "/metadata", 200, reader_id)
    run(reader, "GET", inst + "/frames/1", 200, reader_id)
    run(reader, "GET", f"/studies/{generate_uid()}", 404, reader_id)
    run(None, "GET", f"/studies/{study}/metadata", 401, None)
    run("iex_" + "f" * 16 + "_" + "0" * 64, "GET", "/studies", 401, "f" * 16)
    run(revoked, "GET", f"/studies/{study}", 401, revoked.split("_")[1])
    run(reader, "POST", "/studies", 403, reader_id, content=data, headers=CT)
    yield Session(srv, mark, study, series, sop, data, reader_id, expected)
    srv.stop()


def test_every_request_of_a_session_has_its_record(session: Session) -> None:
    srv, study, series, sop, data = (
        session.srv,
        session.study,
        session.series,
        session.sop,
        session.data,
    )
    expected = session.expected
    with srv.client() as admin:
        records = admin.get(srv.url + "/audit", params={"after": session.mark}).json()
    # The admin's own reads of the trail are records too, but not part of the session.
    records = [r for r in records if r["iex"]["route"] != "GET /audit"]
    assert len(records) == len(expected)
    for record, (method, path, status, actor, response) in zip(records, expected, strict=True):
        event = record["EventIdentification"]
        requestor, gateway = record["ActiveParticipant"]
        assert record["iex"]["status"] == status
        assert record["iex"]["route"].split(" ")[0] == method
        assert requestor["UserID"] == (actor or "unknown")
        assert requestor["UserIsRequestor"] is True and gateway["UserIsRequestor"] is False
        assert requestor["NetworkAccessPointID"] == "127.0.0.1"
        assert event["EventOutcomeIndicator"] == ("0" if status == 200 else "4")
        assert event["EventDateTime"].endswith("Z")
        assert record["iex"]["bytesSent"] == response.num_bytes_downloaded  # on the wire
        # The gateway's name (IEX_NAME, by default the host's) is the source of its records.
        assert gateway["UserID"] == record["AuditSourceIdentification"]["AuditSourceID"]
        assert gateway["UserID"] == name_from_host(socket.gethostname())
        if status == 401:
            assert event["EventID"]["csd-code"] == "110114"  # User Authentication
        if status == 403:
            assert event["EventID"]["csd-code"] == "110113"  # Security Alert
        if status in (200, 404) and path.startswith("/studies/"):
            objects = record["ParticipantObjectIdentification"]
            assert objects[0]["ParticipantObjectID"] == path.split("/")[2]
            assert objects[0]["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    store, search, retrieve, metadata, frames = records[:5]
    assert store["EventIdentification"]["EventID"]["csd-code"] == "110104"
    assert store["EventIdentification"]["EventActionCode"] == "C"
    assert store["iex"]["bytesReceived"] == len(data)
    (stored,) = store["ParticipantObjectIdentification"]
    assert stored["ParticipantObjectID"] == study
    assert stored["ParticipantObjectDetail"] == [{"type": "SeriesInstanceUID", "value": series}]
    (klass,) = stored["ParticipantObjectDescription"]["SOPClass"]
    assert klass["Instance"] == [{"UID": sop}] and klass["NumberOfInstances"] == 1
    assert search["EventIdentification"]["EventID"]["csd-code"] == "110112"
    query = base64.b64decode(search["ParticipantObjectIdentification"][0]["ParticipantObjectQuery"])
    assert query == b"PatientName=*"
    assert retrieve["EventIdentification"]["EventActionCode"] == "R"
    assert metadata["EventIdentification"]["EventID"]["csd-code"] == "110103"
    (obj,) = frames["ParticipantObjectIdentification"]
    assert obj["ParticipantObjectDescription"]["SOPClass"][0]["Instance"] == [{"UID": sop}]
    for record in records:
        assert "Confidential" not in json.dumps(record)


def test_audit_filters(session: Session) -> None:
    srv, study, reader_id = session.srv, session.study, session.reader_id
    with srv.client() as admin:
        by_study = admin.get(srv.url + "/audit", params={"study": study}).json()
        assert {
            r["ParticipantObjectIdentification"][0]["ParticipantObjectID"] for r in by_study
        } == {study}
        by_actor = admin.get(srv.url + "/audit", params={"actor": reader_id}).json()
        assert by_actor and all(r["ActiveParticipant"][0]["UserID"] == reader_id for r in by_actor)
        assert admin.get(srv.url + "/audit", params={"since": "2000-01-01"}).json()
        assert admin.get(srv.url + "/audit", params={"since": "2999-01-01"}).json() == []
        assert admin.get(srv.url + "/audit", params={"trust": "local", "limit": 2}).json()
        assert admin.get(srv.url + "/audit", params={"since": "yesterday"}).status_code == 400


def _iex(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _copy(srv: IexServer, dest: Path) -> Path:
    """A consistent copy of the live security database (the server keeps running)."""
    dest.mkdir()
    shutil.copytree(srv.data_dir / "keys", dest / "keys")
    (dest / "keys" / "lock").unlink(missing_ok=True)
    with closing(open_db(srv.data_dir, "security.sqlite3")) as src:
        with closing(open_db(dest, "security.sqlite3")) as dst:
            src.backup(dst)
    return dest


def test_verify_catches_an_edited_line_of_an_export(session: Session, tmp_path: Path) -> None:
    srv = session.srv
    export = tmp_path / "trail.jsonl"
    assert (
        _iex(srv.data_dir, "audit", "export", "--since", "1h", "--output", str(export)).returncode
        == 0
    )
    assert _iex(srv.data_dir, "audit", "verify", "--file", str(export)).returncode == 0
    lines = export.read_text().splitlines()
    assert len(lines) >= 10
    target = json.loads(lines[4])
    lines[4] = (
        lines[4].replace('"status":200', '"status":500').replace('"status":401', '"status":200')
    )
    assert lines[4] != export.read_text().splitlines()[4]
    export.write_text("\n".join(lines) + "\n")
    result = _iex(srv.data_dir, "audit", "verify", "--file", str(export))
    assert result.returncode == 1
    assert f"first bad: record {target['seq']}:" in result.stdout


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "truncate"])
def test_verify_names_the_first_bad_record_in_the_database(
    session: Session, tmp_path: Path, tamper: str
) -> None:
    srv = session.srv
    copy = _copy(srv, tmp_path / "copy")
    ok = _iex(copy, "audit", "verify")
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stdout + ok.stderr
    with closing(open_db(copy, "security.sqlite3")) as db:
        (last,) = db.execute("SELECT max(seq) FROM audit").fetchone()
        k = 5
        if tamper == "edit":
            db.execute(
                "UPDATE audit SET entry = replace(entry, '127.0.0.1', '10.0.0.9') WHERE seq = ?",
                (k,),
            )
            bad = k
        elif tamper == "delete":
            db.execute("DELETE FROM audit WHERE seq = ?", (k,))
            bad = k + 1
        elif tamper == "reorder":
            a, b = (
                db.execute("SELECT entry, hash FROM audit WHERE seq = ?", (s,)).fetchone()
                for s in (k, k + 1)
            )
            db.execute("UPDATE audit SET entry = ?, hash = ? WHERE seq = ?", (*b, k))
            db.execute("UPDATE audit SET entry = ?, hash = ? WHERE seq = ?", (*a, k + 1))
            bad = k + 1  # the record found where record k belongs
        else:
            db.execute("DELETE FROM audit WHERE seq = ?", (last,))
            bad = last
    result = _iex(copy, "audit", "verify")
    assert result.returncode == 1, result.stdout
    assert f"first bad: record {bad}:" in result.stdout, result.stdout


def test_cli_changes_are_audited(session: Session, tmp_path: Path) -> None:
    srv = session.srv
    token = srv.issue_token("local", "reader")
    srv.iex("token", "revoke", token.split("_")[1])
    copy = _copy(srv, tmp_path / "copy")
    lines = _iex(copy, "audit", "export").stdout.splitlines()
    changes = [json.loads(line) for line in lines if '"route":"cli"' in line]
    subjects = [c["ParticipantObjectIdentification"][0]["ParticipantObjectID"] for c in changes]
    assert subjects.count(token.split("_")[1]) == 2
    assert all(c["ActiveParticipant"][0]["UserID"].startswith("cli") for c in changes[1:])


def test_records_survive_a_restart(tmp_path: Path) -> None:
    srv = IexServer(tmp_path / "data").start()
    with srv.client() as c:
        assert c.get("/studies", params={"PatientID": "x"}).status_code == 200
    srv.kill()  # no queue to flush: the record was durable before the answer
    lines = _iex(srv.data_dir, "audit", "export").stdout.splitlines()
    assert any('"route":"GET /dicomweb/studies"' in line for line in lines)
    assert _iex(srv.data_dir, "audit", "verify").returncode == 0


def test_the_gateways_name_is_the_source_of_its_records(
    make_server: Callable[..., IexServer],
) -> None:
    srv = make_server(IEX_NAME="royal-north.gw")
    srv.issue_token("local", "reader")  # the command line reads IEX_NAME too
    with srv.client() as c:
        assert c.get("/studies", params={"PatientID": "x"}).status_code == 200
        records = c.get(srv.url + "/audit").json()
    search = next(r for r in records if r["iex"]["route"] == "GET /dicomweb/studies")
    assert search["ActiveParticipant"][1]["UserID"] == "royal-north.gw"
    sources = {r["AuditSourceIdentification"]["AuditSourceID"] for r in records}
    assert sources == {"royal-north.gw"}
    issued = [r for r in records if r["iex"]["route"] == "cli"]
    assert len(issued) == 2  # the first admin token, and the one issued above


@pytest.mark.parametrize("name", ["", "-north", "north gw", "n" * 65, "north/gw"])
def test_a_bad_gateway_name_is_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="IEX_NAME"):
        Settings(name=name)


def test_a_gateway_will_not_start_under_a_bad_name(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="IEX_NAME"):
        IexServer(tmp_path / "data", env={"IEX_NAME": "north gw"}).start()


@pytest.mark.parametrize(
    ("host", "name"),
    [("pacs-gw.trust.example", "pacs-gw.trust.example"), ("gw_1", "gw_1"),
     ("-odd host!", "odd-host-"), ("!!!", "iex"), ("h" * 80, "h" * 64)],
)  # fmt: skip
def test_the_default_name_is_the_host_name_made_valid(host: str, name: str) -> None:
    assert name_from_host(host) == name


def test_a_paging_mark_past_any_seq_is_refused(server: IexServer) -> None:
    """``after`` beyond what a record's seq can hold (SQLite INTEGER) is refused, not a 500."""
    with httpx.Client(base_url=server.url, headers=server.headers) as c:
        assert c.get("/audit", params={"after": 2**63}).status_code == 400
        r = c.get("/audit", params={"after": 2**63 - 1})
        assert r.status_code == 200, r.text
        assert r.json() == []
