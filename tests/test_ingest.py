"""Ingest of completed uploads against a real gateway: zip, tar and multipart payloads become
stored studies, all or nothing, with a report that says what happened."""

from __future__ import annotations

import hashlib
import io
import tarfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import IexServer, make_instance, wait_until
from tests.transfer_helpers import (
    MULTIPART,
    TAR,
    ZIP,
    metadata,
    multipart_of,
    source_digests,
    stored_digests,
    studies_found,
    study_files,
    tar_of,
    tus_client,
    upload,
    wait_report,
    zip_of,
)


@pytest.fixture
def tus(server: IexServer) -> Iterator[httpx.Client]:
    with tus_client(server) as c:
        yield c


def study_of(members: dict[str, bytes]) -> str:
    from pydicom import dcmread

    first = next(iter(members.values()))
    return str(dcmread(io.BytesIO(first), stop_before_pixels=True).StudyInstanceUID)


def assert_stored_whole(
    server: IexServer, members: dict[str, bytes], report: dict[str, Any]
) -> None:
    study = study_of(members)
    assert report["state"] == "complete", report
    assert report["error"] is None and report["failures"] == []
    assert report["counts"]["stored"] + report["counts"]["already_stored"] == len(members)
    assert [s["study_uid"] for s in report["studies"]] == [study]
    assert sorted(report["studies"][0]["instances"]) == sorted(source_digests(members))
    found = studies_found(server, study)
    assert len(found) == 1
    assert found[0]["00201208"]["Value"] == [len(members)]
    # Byte-identical: each instance as stored has the sha256 of its source file.
    assert stored_digests(server, study) == source_digests(members)


def assert_nothing_stored(
    server: IexServer, members: dict[str, bytes], report: dict[str, Any]
) -> None:
    assert report["state"] == "failed", report
    assert report["error"]
    assert report["studies"] == []
    assert studies_found(server, study_of(members)) == []


# -- the three payload kinds -----------------------------------------------------------------


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_becomes_a_stored_study(server: IexServer, tus: httpx.Client, compression: int) -> None:
    members = study_files(12)
    payload = zip_of(members, compression)
    url, _ = upload(tus, payload, metadata(content_type=ZIP, filename="ct.zip"), chunk=50_000)
    report = wait_report(tus, url)
    assert_stored_whole(server, members, report)
    assert report["filename"] == "ct.zip" and report["content_type"] == ZIP
    assert report["progress"]["bytes_read"] == report["progress"]["bytes_total"] == len(payload)
    assert report["finished_at"] is not None


def test_tar_becomes_a_stored_study(server: IexServer, tus: httpx.Client) -> None:
    members = study_files(7)
    url, _ = upload(tus, tar_of(members), metadata(content_type=TAR))
    assert_stored_whole(server, members, wait_report(tus, url))


#: As Orthanc's DICOMweb client makes them: longer than the 70 characters of RFC 2046.
LONG_BOUNDARY = "c511d8f6-f5c2-487b-a8d6-81c21d4be285-c511d8f6-f5c2-487b-a8d6-81c21d4be285"


@pytest.mark.parametrize(
    ("kind", "boundary"),
    [
        (f"{MULTIPART}; boundary=iex-upload-boundary", "iex-upload-boundary"),
        (MULTIPART, "iex-upload-boundary"),  # found on the payload's first line
        (MULTIPART, LONG_BOUNDARY),
        (f"multipart/related; boundary={LONG_BOUNDARY}; start=<x>", LONG_BOUNDARY),  # no type
    ],
    ids=["given", "found", "long-found", "long-given-without-type"],
)
def test_multipart_becomes_a_stored_study(
    server: IexServer, tus: httpx.Client, kind: str, boundary: str
) -> None:
    members = study_files(5)
    url, _ = upload(tus, multipart_of(members, boundary), metadata(content_type=kind))
    assert_stored_whole(server, members, wait_report(tus, url))


def test_payload_sha256_is_verified(server: IexServer, tus: httpx.Client) -> None:
    members = study_files(3)
    payload = zip_of(members)
    right = hashlib.sha256(payload).hexdigest()
    url, _ = upload(tus, payload, metadata(content_type=ZIP, sha256=right))
    assert_stored_whole(server, members, wait_report(tus, url))

    members = study_files(3)
    payload = zip_of(members)
    wrong = hashlib.sha256(payload + b"x").hexdigest()
    url, _ = upload(tus, payload, metadata(content_type=ZIP, sha256=wrong))
    report = wait_report(tus, url)
    assert_nothing_stored(server, members, report)
    assert "sha256" in report["error"] and wrong in report["error"]


def test_concatenated_partials_are_ingested_as_one(server: IexServer, tus: httpx.Client) -> None:
    members = study_files(8)
    payload = zip_of(members, zipfile.ZIP_STORED)
    quarter = -(-len(payload) // 4)
    parts = []
    for i in range(4):
        parts.append(_partial(tus, payload[i * quarter : (i + 1) * quarter]))
    r = tus.post(
        "/transfers/uploads",
        headers={
            "Upload-Concat": "final;" + " ".join(parts),
            "Upload-Metadata": metadata(content_type=ZIP),
        },
    )
    assert r.status_code == 201, r.text
    assert_stored_whole(server, members, wait_report(tus, r.headers["location"]))


def _partial(tus: httpx.Client, piece: bytes) -> str:
    r = tus.post(
        "/transfers/uploads",
        headers={"Upload-Length": str(len(piece)), "Upload-Concat": "partial"},
    )
    assert r.status_code == 201, r.text
    url = r.headers["location"]
    r = tus.patch(
        url,
        content=piece,
        headers={"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"},
    )
    assert r.status_code == 204, r.text
    report = tus.get(url + "/report").json()
    assert report["state"] == "complete" and report["concat"] == "partial"
    assert report["studies"] == []
    return url


# -- all or nothing ----------------------------------------------------------------------------


def test_one_bad_object_stores_nothing_and_is_named(server: IexServer, tus: httpx.Client) -> None:
    members = study_files(6)
    # A DICOM preamble and prefix, then nonsense: DICOM by its looks, not parseable.
    members["DICOM/S0/BROKEN.dcm"] = b"\0" * 128 + b"DICM" + b"\xff" * 300
    url, _ = upload(tus, zip_of(members), metadata(content_type=ZIP))
    report = wait_report(tus, url)
    assert_nothing_stored(server, members, report)
    assert report["counts"]["failed"] == 1
    [failure] = report["failures"]
    assert failure["member"] == "DICOM/S0/BROKEN.dcm"
    assert failure["code"] == 0xC000 and failure["reason"] == "Error: Cannot understand"


def test_a_conflicting_sop_instance_stores_nothing(server: IexServer, tus: httpx.Client) -> None:
    members = study_files(4)
    first_name, first = next(iter(members.items()))
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(first))
    with server.client() as c:  # already stored, with other bytes, by STOW-RS
        other = make_instance(
            study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            sop_uid=ds.SOPInstanceUID,
            patient_name="Other^Bytes",
        )
        r = c.post("/studies", content=other, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200, r.text
    url, _ = upload(tus, tar_of(members), metadata(content_type=TAR))
    report = wait_report(tus, url)
    assert report["state"] == "failed"
    [failure] = report["failures"]
    assert failure["member"] == first_name and failure["sop_uid"] == ds.SOPInstanceUID
    assert failure["code"] == 0x0111
    # Only the instance stored before is there; none of the upload's other instances.
    assert set(stored_digests(server, str(ds.StudyInstanceUID))) == {ds.SOPInstanceUID}


def test_the_same_upload_twice_is_already_stored(server: IexServer, tus: httpx.Client) -> None:
    members = study_files(3)
    payload = zip_of(members)
    for expect_stored in (3, 0):
        url, _ = upload(tus, payload, metadata(content_type=ZIP))
        report = wait_report(tus, url)
        assert_stored_whole(server, members, report)
        assert report["counts"]["stored"] == expect_stored
        assert report["counts"]["already_stored"] == 3 - expect_stored


def test_an_upload_partly_stored_before_stores_the_rest(
    server: IexServer, tus: httpx.Client
) -> None:
    """All or nothing, with some instances already there byte for byte (sent before by
    STOW-RS): those are retries, the others are stored."""
    members = study_files(4)
    with server.client() as c:
        for data in list(members.values())[:2]:
            r = c.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
            assert r.status_code == 200, r.text
    url, _ = upload(tus, zip_of(members), metadata(content_type=ZIP))
    report = wait_report(tus, url)
    assert_stored_whole(server, members, report)
    assert report["counts"]["stored"] == 2
    assert report["counts"]["already_stored"] == 2


def test_non_dicom_members_are_skipped_and_listed(server: IexServer, tus: httpx.Client) -> None:
    members = study_files(3)
    extra = {"README.txt": b"Patient CD. Insert into a DICOM viewer.\n", "DICOMDIR": b"x" * 300}
    url, _ = upload(tus, zip_of({**members, **extra}), metadata(content_type=ZIP))
    report = wait_report(tus, url)
    assert_stored_whole(server, members, report)
    assert sorted(s["member"] for s in report["skipped"]) == ["DICOMDIR", "README.txt"]
    assert report["counts"]["skipped"] == 2


def test_non_dicom_members_refused_by_policy(make_server: Callable[..., IexServer]) -> None:
    srv = make_server(IEX_NON_DICOM_MEMBERS="refuse")
    members = study_files(2)
    with tus_client(srv) as tus:
        url, _ = upload(
            tus, zip_of({**members, "notes.txt": b"hello" * 100}), metadata(content_type=ZIP)
        )
        report = wait_report(tus, url)
    assert_nothing_stored(srv, members, report)
    assert "notes.txt" in report["error"]


def test_an_empty_archive_fails_clearly(tus: httpx.Client) -> None:
    url, _ = upload(tus, zip_of({"README.txt": b"nothing here" * 20}), metadata(content_type=ZIP))
    report = wait_report(tus, url)
    assert report["state"] == "failed"
    assert report["error"] == "the upload holds no DICOM objects"


def test_a_payload_that_is_not_what_it_claims_fails(tus: httpx.Client) -> None:
    for kind in (ZIP, TAR, MULTIPART):
        url, _ = upload(tus, b"certainly not an archive " * 40, metadata(content_type=kind))
        report = wait_report(tus, url)
        assert report["state"] == "failed", kind
        assert "nothing was stored" in report["error"]


# -- hostile archives through the gateway ------------------------------------------------------


def _zip_with(name: str, data: bytes, *, mode: int | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for member_name, member in study_files(2).items():
            z.writestr(member_name, member)
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        z.writestr(info, data, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _tar_with(kind: bytes, name: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        for member_name, member in study_files(2).items():
            info = tarfile.TarInfo(member_name)
            info.size = len(member)
            t.addfile(info, io.BytesIO(member))
        link = tarfile.TarInfo(name)
        link.type = kind
        link.linkname = "/etc/passwd"
        t.addfile(link)
    return out.getvalue()


HOSTILE = {
    "path traversal": (ZIP, lambda: _zip_with("../../etc/cron.d/evil.dcm", make_instance()), ".."),
    "absolute path": (ZIP, lambda: _zip_with("/etc/evil.dcm", make_instance()), "/etc/evil.dcm"),
    "zip symlink": (ZIP, lambda: _zip_with("link.dcm", b"/etc/passwd", mode=0o120777), "link"),
    "tar symlink": (TAR, lambda: _tar_with(tarfile.SYMTYPE, "evil.dcm"), "evil.dcm"),
    "tar hard link": (TAR, lambda: _tar_with(tarfile.LNKTYPE, "hard.dcm"), "hard.dcm"),
    "zip bomb": (ZIP, lambda: _zip_with("bomb.dcm", b"\0" * 30_000_000), "bomb.dcm"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_store_nothing(server: IexServer, tus: httpx.Client, case: str) -> None:
    kind, build, named = HOSTILE[case]
    payload = build()
    url, _ = upload(tus, payload, metadata(content_type=kind))
    report = wait_report(tus, url)
    assert report["state"] == "failed", report
    assert named in report["error"], report["error"]
    assert report["studies"] == []
    # The valid members that came first are not visible either.
    if kind == ZIP:
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            first = z.read(z.namelist()[0])
    else:
        with tarfile.open(fileobj=io.BytesIO(payload)) as t:
            first = t.extractfile(t.getmembers()[0]).read()  # type: ignore[union-attr]
    assert studies_found(server, study_of({"first": first})) == []


def test_too_many_members(make_server: Callable[..., IexServer]) -> None:
    srv = make_server(IEX_ARCHIVE_MAX_MEMBERS="5")
    members = study_files(6)
    with tus_client(srv) as tus:
        url, _ = upload(tus, zip_of(members), metadata(content_type=ZIP))
        report = wait_report(tus, url)
    assert_nothing_stored(srv, members, report)
    assert "more than 5 entries" in report["error"]


# -- the report itself -----------------------------------------------------------------------


def test_report_visibility_and_errors(server: IexServer, tus: httpx.Client) -> None:
    members = study_files(2)
    url, _ = upload(tus, zip_of(members), metadata(content_type=ZIP))
    wait_report(tus, url)
    r = tus.get(url + "/report")
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"].startswith("application/json")
    assert httpx.get(url + "/report").status_code == 401
    trust = "ingest-" + uuid.uuid4().hex[:8]
    server.iex("trust", "add", trust)
    other = server.issue_token(trust, "uploader")
    with tus_client(server, other) as stranger:
        r = stranger.get(url + "/report")
        assert r.status_code == 404
        assert r.json()["detail"] == "no such upload"
    assert tus.get("/transfers/uploads/../../etc/report").status_code == 404
    assert tus.get("/transfers/uploads/" + "0" * 32 + "/report").status_code == 404
    # Terminated after ingest: the report goes, the study stays.
    assert tus.delete(url).status_code == 204
    assert tus.get(url + "/report").status_code == 404
    assert len(studies_found(server, study_of(members))) == 1


def test_report_while_receiving(tus: httpx.Client) -> None:
    r = tus.post(
        "/transfers/uploads",
        headers={"Upload-Length": "1000", "Upload-Metadata": metadata(content_type=ZIP)},
    )
    url = r.headers["location"]
    report = tus.get(url + "/report").json()
    assert report["state"] == "receiving"
    assert report["offset"] == 0 and report["length"] == 1000
    assert report["counts"] == {"stored": 0, "already_stored": 0, "failed": 0, "skipped": 0}
    assert report["error"] is None and report["finished_at"] is None


def test_ingest_is_audited(server: IexServer, tus: httpx.Client) -> None:
    members = study_files(2)
    url, _ = upload(tus, zip_of(members), metadata(content_type=ZIP))
    wait_report(tus, url)
    study = study_of(members)
    with httpx.Client(base_url=server.url, headers=server.headers) as c:
        # Audit records are appended in the background: wait for this one.
        [record] = wait_until(
            lambda: [
                rec
                for rec in c.get("/audit", params={"study": study}).json()
                if rec["iex"]["route"].startswith("INGEST ")
            ],
            message="the ingest's audit record",
        )
    assert record["EventIdentification"]["EventActionCode"] == "C"
    assert record["EventIdentification"]["EventOutcomeIndicator"] == "0"
    assert record["ActiveParticipant"][0]["AlternativeUserID"] == "local"
