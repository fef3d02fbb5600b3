"""Resumable uploads over HTTP: tus 1.0.0 conformance against a real ``iex serve``.

Each test names the tus 1.0.0 rule it checks (https://tus.io/protocols/resumable-upload).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest
from tusclient.client import TusClient

from app.openapi import openapi_document
from tests.helpers import IexServer, wait_until
from tests.transfer_helpers import STREAM, TUS, metadata, tus_client, wait_report

MISSING = "0123456789abcdef0123456789abcdef"


ZIP_META = metadata(content_type="application/zip", filename="scan.zip")


@pytest.fixture
def tus(server: IexServer) -> Iterator[httpx.Client]:
    with tus_client(server) as c:
        yield c


def create(c: httpx.Client, length: int, meta: str = ZIP_META, **headers: str) -> str:
    r = c.post(
        "/transfers/uploads",
        headers={"Upload-Length": str(length), "Upload-Metadata": meta, **headers},
    )
    assert r.status_code == 201, r.text
    return r.headers["location"]


def patch(c: httpx.Client, url: str, offset: int, data: bytes, **headers: str) -> httpx.Response:
    return c.patch(url, content=data, headers={**STREAM, "Upload-Offset": str(offset), **headers})


def offset_of(c: httpx.Client, url: str) -> int:
    r = c.head(url)
    assert r.status_code == 200, r.status_code
    return int(r.headers["upload-offset"])


def digest(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


# -- discovery and versions (§Core Protocol) ------------------------------------------------


def test_options_advertises_capabilities_without_credentials(server: IexServer) -> None:
    r = httpx.options(server.url + "/transfers/uploads")
    assert r.status_code == 204
    assert r.headers["tus-resumable"] == "1.0.0"
    assert r.headers["tus-version"] == "1.0.0"
    assert set(r.headers["tus-extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "expiration",
        "checksum",
        "termination",
        "concatenation",
    }
    assert r.headers["tus-max-size"] == str(1024**3)
    assert r.headers["tus-checksum-algorithm"].split(",") == ["sha1", "sha256"]


def test_missing_or_unsupported_version_is_412(server: IexServer, tus: httpx.Client) -> None:
    url = create(tus, 10)
    for version in (None, "0.2.2", "1.0"):
        headers = {**server.headers, **({"Tus-Resumable": version} if version else {})}
        for method in ("POST", "HEAD", "PATCH", "DELETE"):
            target = server.url + "/transfers/uploads" if method == "POST" else url
            r = httpx.request(method, target, headers={**headers, **STREAM, "Upload-Offset": "0"})
            assert r.status_code == 412, (method, version)
            assert r.headers["tus-version"] == "1.0.0"
            assert r.headers["tus-resumable"] == "1.0.0"
    assert offset_of(tus, url) == 0  # nothing happened to the upload


def test_the_document_declares_the_412_and_400_answers() -> None:
    """What the routes answer above is in the OpenAPI document, for clients and fuzzers."""
    paths = openapi_document()["paths"]
    for path in ("/transfers/uploads", "/transfers/uploads/{upload_id}"):
        for method, operation in paths[path].items():
            if method != "options":
                assert "412" in operation["responses"], (method, path)
    assert "400" in paths["/transfers/uploads/{upload_id}"]["patch"]["responses"]


# -- creation, HEAD and PATCH ---------------------------------------------------------------


def test_create_head_and_patch_to_completion(server: IexServer, tus: httpx.Client) -> None:
    meta = metadata(content_type='multipart/related; type="application/dicom"', trust="local")
    url = create(tus, 10, meta)
    assert url.startswith(server.url + "/transfers/uploads/")
    head = tus.head(url)
    assert head.status_code == 200
    assert head.headers["cache-control"] == "no-store"
    assert head.headers["upload-offset"] == "0"
    assert head.headers["upload-length"] == "10"
    assert head.headers["upload-metadata"] == meta
    assert head.headers["tus-resumable"] == "1.0.0"
    assert parsedate_to_datetime(head.headers["upload-expires"]).timestamp() > time.time()
    first = patch(tus, url, 0, b"01234")
    assert first.status_code == 204
    assert first.headers["upload-offset"] == "5"
    assert first.headers["tus-resumable"] == "1.0.0"
    assert "upload-expires" in first.headers
    assert patch(tus, url, 5, b"56789").headers["upload-offset"] == "10"
    assert offset_of(tus, url) == 10


def test_creation_with_upload(tus: httpx.Client) -> None:
    r = tus.post(
        "/transfers/uploads",
        content=b"hello",
        headers={**STREAM, "Upload-Length": "8", "Upload-Metadata": ZIP_META},
    )
    assert r.status_code == 201
    assert r.headers["upload-offset"] == "5"
    assert offset_of(tus, r.headers["location"]) == 5


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Upload-Metadata": ZIP_META}, "Upload-Length is required"),
        ({"Upload-Length": "1", "Upload-Defer-Length": "1"}, "creation-defer-length"),
        ({"Upload-Length": "-1", "Upload-Metadata": ZIP_META}, "non-negative integer"),
        ({"Upload-Length": "1", "Upload-Metadata": "filename"}, "content-type"),
        ({"Upload-Length": "1", "Upload-Metadata": "content-type !!"}, "not base64"),
        ({"Upload-Length": "1", "Upload-Metadata": "a b c"}, "not 'key base64'"),
        ({"Upload-Length": "1", "Upload-Metadata": metadata(content_type="text/plain")}, "text"),
        (
            {"Upload-Length": "1", "Upload-Metadata": ZIP_META + "," + metadata(sha256="x")},
            "64 hexadecimal",
        ),
        ({"Upload-Length": "1", "Upload-Concat": "final;/elsewhere/x"}, "not an upload URL"),
    ],
)
def test_malformed_creation_is_400(
    tus: httpx.Client, headers: dict[str, str], message: str
) -> None:
    r = tus.post("/transfers/uploads", headers=headers)
    assert r.status_code == 400
    assert message in r.json()["detail"]
    assert r.headers["tus-resumable"] == "1.0.0"


def test_metadata_for_another_trust_is_refused(tus: httpx.Client) -> None:
    meta = metadata(content_type="application/x-tar", trust="elsewhere")
    r = tus.post("/transfers/uploads", headers={"Upload-Length": "1", "Upload-Metadata": meta})
    assert r.status_code == 403


def test_offset_mismatch_is_409_with_the_current_offset(tus: httpx.Client) -> None:
    url = create(tus, 10)
    patch(tus, url, 0, b"abc")
    for wrong in (0, 2, 4):
        r = patch(tus, url, wrong, b"zz")
        assert r.status_code == 409
        assert r.headers["upload-offset"] == "3"
    assert offset_of(tus, url) == 3


def test_patch_without_offset_octet_stream_is_415(tus: httpx.Client) -> None:
    url = create(tus, 10)
    for content_type in ("application/octet-stream", None):
        headers = {"Upload-Offset": "0", **({"Content-Type": content_type} if content_type else {})}
        r = tus.patch(url, content=b"abc", headers=headers)
        assert r.status_code == 415
    assert offset_of(tus, url) == 0


def test_patch_without_upload_offset_is_400(tus: httpx.Client) -> None:
    url = create(tus, 10)
    assert tus.patch(url, content=b"abc", headers=STREAM).status_code == 400


# -- checksum (§Checksum) -------------------------------------------------------------------


def test_checksum_verified_and_mismatch_discards_the_chunk(tus: httpx.Client) -> None:
    url = create(tus, 12)
    assert patch(tus, url, 0, b"abcd", **{"Upload-Checksum": digest("sha1", b"abcd")}).is_success
    assert patch(tus, url, 4, b"efgh", **{"Upload-Checksum": digest("sha256", b"efgh")}).is_success
    bad = patch(tus, url, 8, b"ijkl", **{"Upload-Checksum": digest("sha256", b"ijkX")})
    assert bad.status_code == 460
    assert offset_of(tus, url) == 8
    unsupported = patch(tus, url, 8, b"ijkl", **{"Upload-Checksum": digest("md5", b"ijkl")})
    assert unsupported.status_code == 400
    assert offset_of(tus, url) == 8
    assert patch(tus, url, 8, b"ijkl", **{"Upload-Checksum": digest("sha1", b"ijkl")}).is_success
    assert offset_of(tus, url) == 12


# -- sizes ----------------------------------------------------------------------------------


def test_over_the_maximum_is_413(tus: httpx.Client) -> None:
    r = tus.post(
        "/transfers/uploads",
        headers={"Upload-Length": str(1024**3 + 1), "Upload-Metadata": ZIP_META},
    )
    assert r.status_code == 413
    url = create(tus, 10)
    assert patch(tus, url, 0, b"x" * 11).status_code == 413
    assert patch(tus, url, 0, b"x" * 6).status_code == 204
    assert patch(tus, url, 6, b"x" * 5).status_code == 413
    assert offset_of(tus, url) == 6


# -- termination and expiration (§Termination, §Expiration) ---------------------------------


def test_terminated_upload_is_404(tus: httpx.Client) -> None:
    url = create(tus, 10)
    patch(tus, url, 0, b"abc")
    r = tus.delete(url)
    assert r.status_code == 204
    assert r.headers["tus-resumable"] == "1.0.0"
    assert tus.head(url).status_code == 404
    assert patch(tus, url, 3, b"def").status_code == 404
    assert tus.delete(url).status_code == 404


def test_expired_upload_is_410(make_server: Callable[..., IexServer]) -> None:
    srv = make_server(IEX_UPLOAD_EXPIRY="1")
    with tus_client(srv) as c:
        url = create(c, 10)
        wait_until(lambda: c.head(url).status_code != 200, interval=0.2, message="expiry")
        assert c.head(url).status_code == 410
        assert patch(c, url, 0, b"abc").status_code == 410
        assert c.delete(url).status_code == 204
        assert c.head(url).status_code == 404


def test_malformed_upload_ids_are_404(tus: httpx.Client) -> None:
    # ".." escaped: a client resolves a literal one, and "/transfers/uploads/.." is
    # "/transfers", the transfers to partners (HEAD there is 405).
    for bad in (MISSING, "%2e%2e", "%2e%2e%2fkeys", MISSING.upper(), MISSING + "0"):
        assert tus.head(f"/transfers/uploads/{bad}").status_code == 404


# -- concatenation (§Concatenation) ---------------------------------------------------------


def test_parallel_partials_joined_by_a_final_upload(server: IexServer, tus: httpx.Client) -> None:
    pieces = [os.urandom(50_000 + i) for i in range(4)]

    async def upload_partial(c: httpx.AsyncClient, data: bytes) -> str:
        r = await c.post(
            "/transfers/uploads",
            headers={"Upload-Length": str(len(data)), "Upload-Concat": "partial"},
        )
        assert r.status_code == 201
        url = r.headers["location"]
        half = len(data) // 2
        for offset, chunk in ((0, data[:half]), (half, data[half:])):
            r = await c.patch(url, content=chunk, headers={**STREAM, "Upload-Offset": str(offset)})
            assert r.status_code == 204
        return url

    async def upload_all() -> list[str]:
        headers = {**server.headers, **TUS}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as c:
            return list(await asyncio.gather(*(upload_partial(c, p) for p in pieces)))

    partials = asyncio.run(upload_all())
    # Absolute URLs and paths both name a partial upload.
    concat = "final;" + " ".join([partials[0], *(p.removeprefix(server.url) for p in partials[1:])])
    r = tus.post(
        "/transfers/uploads", headers={"Upload-Concat": concat, "Upload-Metadata": ZIP_META}
    )
    assert r.status_code == 201, r.text
    final = r.headers["location"]
    head = tus.head(final)
    assert head.status_code == 200
    total = str(sum(len(p) for p in pieces))
    assert head.headers["upload-length"] == head.headers["upload-offset"] == total
    assert head.headers["upload-concat"] == "final;" + " ".join(
        p.removeprefix(server.url) for p in partials
    )
    assert tus.head(partials[0]).headers["upload-concat"] == "partial"
    assert patch(tus, final, int(total), b"x").status_code == 403
    # A partial belongs to its final upload now: not joinable twice, not terminable alone.
    again = tus.post("/transfers/uploads", headers={"Upload-Concat": "final;" + partials[0]})
    assert again.status_code == 400
    assert tus.delete(partials[1]).status_code == 409
    # The joined bytes are no zip: the ingest that started on creation fails. An upload
    # under ingest is not terminable (409), so wait for its report to be final first.
    assert wait_report(tus, final)["state"] == "failed"
    assert tus.delete(final).status_code == 204
    assert all(tus.head(url).status_code == 404 for url in [final, *partials])


def test_final_upload_needs_complete_partials(tus: httpx.Client) -> None:
    partial = create(tus, 10, "", **{"Upload-Concat": "partial"})
    r = tus.post(
        "/transfers/uploads",
        headers={"Upload-Concat": "final;" + partial, "Upload-Metadata": ZIP_META},
    )
    assert r.status_code == 400
    assert "not complete" in r.json()["detail"]
    plain = create(tus, 0)
    r = tus.post(
        "/transfers/uploads",
        headers={"Upload-Concat": "final;" + plain, "Upload-Metadata": ZIP_META},
    )
    assert r.status_code == 400


# -- ownership and roles --------------------------------------------------------------------


def test_another_trusts_upload_answers_like_a_missing_one(
    server: IexServer, tus: httpx.Client
) -> None:
    url = create(tus, 10)
    server.iex("trust", "add", "strangers")
    stranger = server.issue_token("strangers", "uploader")
    with tus_client(server, stranger) as other:
        missing = url.rsplit("/", 1)[0] + "/" + MISSING
        for method in ("HEAD", "PATCH", "DELETE"):
            kwargs = {"content": b"abc", "headers": {**STREAM, "Upload-Offset": "0"}}
            theirs, nothing = (other.request(method, u, **kwargs) for u in (url, missing))
            assert theirs.status_code == nothing.status_code == 404
            assert theirs.content == nothing.content
            assert {k: v for k, v in theirs.headers.items() if k != "date"} == {
                k: v for k, v in nothing.headers.items() if k != "date"
            }
    assert offset_of(tus, url) == 0


def test_uploads_need_the_uploader_role(server: IexServer) -> None:
    reader = server.issue_token("local", "reader")
    with tus_client(server, reader) as c:
        r = c.post(
            "/transfers/uploads", headers={"Upload-Length": "1", "Upload-Metadata": ZIP_META}
        )
        assert r.status_code == 403
        assert r.headers["tus-resumable"] == "1.0.0"
    r = httpx.post(server.url + "/transfers/uploads", headers={**TUS, "Upload-Length": "1"})
    assert r.status_code == 401


# -- one writer per upload ------------------------------------------------------------------


def test_concurrent_patches_at_one_offset(server: IexServer, tus: httpx.Client) -> None:
    size = 4 * 1024 * 1024
    url = create(tus, 2 * size)
    data = [os.urandom(size), os.urandom(size)]
    statuses: list[int] = []
    start = threading.Barrier(2)

    def send(chunk: bytes) -> None:
        with tus_client(server) as c:
            start.wait()
            statuses.append(patch(c, url, 0, chunk).status_code)

    threads = [threading.Thread(target=send, args=(d,)) for d in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [204, 409]
    assert offset_of(tus, url) == size


# -- durability and encryption at rest ------------------------------------------------------


def _contains_run(root: Path, payload: bytes, run: int = 64) -> bool:
    needles = {payload[i : i + run] for i in range(0, len(payload) - run, 4096)}
    for path in root.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            if any(n in blob for n in needles):
                return True
    return False


def test_acknowledged_chunks_survive_sigkill(
    make_server: Callable[..., IexServer], tmp_path: Path
) -> None:
    srv = make_server()
    payload = os.urandom(3 * 1024 * 1024 + 123)
    half = len(payload) // 2
    with tus_client(srv) as c:
        url = create(c, len(payload))
        assert patch(c, url, 0, payload[:half]).status_code == 204
    srv.kill()
    srv.start()
    with tus_client(srv) as c:
        assert offset_of(c, url) == half
        r = patch(
            c, url, half, payload[half:], **{"Upload-Checksum": digest("sha1", payload[half:])}
        )
        assert r.status_code == 204
        assert offset_of(c, url) == len(payload)
    assert not _contains_run(srv.data_dir, payload)


def test_tuspy_uploads_as_an_independent_client(server: IexServer, tus: httpx.Client) -> None:
    payload = os.urandom(300_000)
    client = TusClient(server.url + "/transfers/uploads", headers=server.headers)
    uploader = client.uploader(
        file_stream=io.BytesIO(payload),
        chunk_size=64 * 1024,
        metadata={"content-type": "application/zip", "filename": "study.zip"},
    )
    uploader.upload()
    assert uploader.url is not None
    assert offset_of(tus, uploader.url) == len(payload)
