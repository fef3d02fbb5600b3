"""The tus client's partial and final uploads (§Concatenation) against a real gateway, and the
sources a payload sent in parts is read through (a byte range of a file, bytes in memory).

A payload split into partial uploads sent at once and joined by a final upload is ingested
as the whole payload; a part resumes from the server's offset; a part the server no longer
knows is reported gone; a bundle's final upload carries the metadata its receiver needs.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from app.transfer.sources import BytesSource, FileRangeSource, SourceChanged, SourceError
from app.transfer.tus_client import ProtocolError, TusClient, UploadGone, UploadRejected
from app.transfer.uploads import BUNDLE, ZIP
from tests.helpers import IexServer
from tests.transfer_helpers import (
    STREAM,
    TUS,
    source_digests,
    stored_digests,
    study_files,
    wait_report,
    zip_of,
)

CHUNK = 64 * 1024


def _parts(path: Path, cuts: list[int]) -> list[FileRangeSource]:
    size = path.stat().st_size
    bounds = [0, *cuts, size]
    return [FileRangeSource(path, a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]


# -- the sources ------------------------------------------------------------------------------


def test_a_file_range_reads_its_bytes_from_any_offset(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "data"
    path.write_bytes(data)
    part = FileRangeSource(path, 100_000, 150_000)
    assert part.length == 150_000
    assert b"".join(part.chunks(0, 4096)) == data[100_000:250_000]
    pieces = list(part.chunks(70_001, 50_000))
    assert [len(p) for p in pieces] == [50_000, 29_999]
    assert b"".join(pieces) == data[170_001:250_000]
    assert list(part.chunks(150_000, 10)) == []
    assert part.fingerprint() != FileRangeSource(path, 100_000, 150_001).fingerprint()

    with pytest.raises(SourceError, match="outside"):
        FileRangeSource(path, 200_000, 100_001)
    path.write_bytes(data + b"more")
    with pytest.raises(SourceChanged):
        list(part.chunks(0, 4096))


def test_bytes_are_a_source_too() -> None:
    data = os.urandom(10_000)
    source = BytesSource(data, "head")
    assert (source.length, source.filename) == (10_000, "head")
    assert b"".join(source.chunks(1234, 1000)) == data[1234:]
    assert max(len(p) for p in source.chunks(0, 1000)) == 1000


# -- against a gateway -----------------------------------------------------------------------


def test_parts_sent_at_once_are_joined_and_ingested_as_one_payload(
    server: IexServer, tmp_path: Path
) -> None:
    members = study_files(6, rows=128)
    path = tmp_path / "study.zip"
    path.write_bytes(zip_of(members))
    size = path.stat().st_size
    parts = _parts(path, [size // 3, size // 3 + 1000])

    async def scenario() -> tuple[list[str], str]:
        async with TusClient(server.url, server.token, chunk_size=CHUNK) as client:
            urls = await asyncio.gather(*(client.upload(p, partial=True) for p in parts))
            for url, part in zip(urls, parts, strict=True):
                status = await client.status(url)
                assert (status.offset, status.length) == (part.length, part.length)
            final = await client.concatenate(urls, {"content-type": ZIP})
            return urls, final

    urls, final = asyncio.run(scenario())
    with httpx.Client(headers={**server.headers, **TUS}, timeout=60) as c:
        head = c.head(final)
        assert head.status_code == 200, head.text
        assert head.headers["upload-length"] == str(size)
        assert head.headers["upload-concat"].startswith("final;")
        assert head.headers["upload-concat"].split(";", 1)[1].split() == [
            "/transfers/uploads/" + url.rsplit("/", 1)[1] for url in urls
        ]
        for url in urls:
            assert c.head(url).headers["upload-concat"] == "partial"
        report = wait_report(c, final)
    assert report["state"] == "complete", report
    assert report["concat"] == "final"
    study = next(iter(report["studies"]))["study_uid"]
    assert stored_digests(server, study) == source_digests(members)


def test_a_part_resumes_from_the_servers_offset(server: IexServer, tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 123)
    path = tmp_path / "data"
    path.write_bytes(data)
    part = FileRangeSource(path, 1000, len(data) - 1000)

    async def scenario() -> list[int]:
        async with TusClient(server.url, server.token, chunk_size=CHUNK) as client:
            url = await client.create(part.length, {}, partial=True)
            # Two chunks arrived before the sender stopped.
            async with httpx.AsyncClient(headers={**server.headers, **TUS}) as raw:
                first = data[1000 : 1000 + 2 * CHUNK]
                r = await raw.patch(url, content=first, headers={**STREAM, "Upload-Offset": "0"})
                assert r.status_code == 204, r.text
            offsets: list[int] = []
            assert (
                await client.upload(
                    part, url, partial=True, on_progress=lambda o, _: offsets.append(o)
                )
                == url
            )
            final = await client.concatenate([url], {"content-type": BUNDLE, "transfer": "t-1"})
            assert (await client.status(final)).length == part.length
            return offsets

    offsets = asyncio.run(scenario())
    # Resumed from the server's offset: what it held was not sent again.
    assert offsets[0] == 2 * CHUNK and offsets[-1] == part.length


def test_a_bundle_final_upload_carries_its_transfer_and_reports(
    server: IexServer, tmp_path: Path
) -> None:
    head, data = BytesSource(os.urandom(5000), "head"), BytesSource(os.urandom(70_000), "data")

    async def scenario() -> tuple[str, str]:
        async with TusClient(server.url, server.token, chunk_size=CHUNK) as client:
            urls = [await client.upload(p, partial=True) for p in (head, data)]
            final = await client.concatenate(urls, {"content-type": BUNDLE, "transfer": "tr-9"})
            report = await client.report(final)
            return final, report.raw["content_type"]

    final, content_type = asyncio.run(scenario())
    assert content_type == BUNDLE
    with httpx.Client(headers={**server.headers, **TUS}, timeout=60) as c:
        head_response = c.head(final)
    assert head_response.headers["upload-length"] == str(75_000)
    metadata = dict(p.split(" ") for p in head_response.headers["upload-metadata"].split(","))
    assert metadata["transfer"] == "dHItOQ=="  # base64 of tr-9


def test_a_part_the_server_forgot_is_gone_and_bad_joins_are_refused(
    server: IexServer, tmp_path: Path
) -> None:
    data = BytesSource(os.urandom(1000))

    async def scenario() -> None:
        async with TusClient(server.url, server.token, chunk_size=CHUNK) as client:
            url = await client.create(data.length, {}, partial=True)
            await client.terminate(url)
            with pytest.raises(UploadGone):
                await client.upload(data, url, partial=True)
            # A part not complete yet cannot be joined.
            unfinished = await client.create(data.length, {}, partial=True)
            with pytest.raises(UploadRejected) as refused:
                await client.concatenate([unfinished], {"content-type": ZIP})
            assert refused.value.status == 400 and "not complete" in refused.value.detail
            # Nor can a part twice.
            done = await client.upload(data, partial=True)
            await client.concatenate([done], {"content-type": BUNDLE, "transfer": "tr-1"})
            with pytest.raises(UploadRejected) as refused:
                await client.concatenate([done], {"content-type": BUNDLE, "transfer": "tr-1"})
            assert "already belongs" in refused.value.detail

    asyncio.run(scenario())


def test_the_whole_of_a_plain_upload_still_goes_as_one(server: IexServer, tmp_path: Path) -> None:
    """``iex upload``'s way: no Upload-Concat, the source's own filename and content type."""
    members = study_files(2, rows=32)
    path = tmp_path / "one.zip"
    path.write_bytes(zip_of(members))
    source = FileRangeSource(path, 0, path.stat().st_size)

    async def scenario() -> str:
        async with TusClient(server.url, server.token, chunk_size=CHUNK) as client:
            return await client.upload(source, metadata={"content-type": ZIP})

    url = asyncio.run(scenario())
    with httpx.Client(headers={**server.headers, **TUS}, timeout=60) as c:
        assert "upload-concat" not in c.head(url).headers
        report = wait_report(c, url)
    assert report["state"] == "complete", report
    study = next(iter(report["studies"]))["study_uid"]
    assert stored_digests(server, study) == source_digests(members)


def test_a_get_beside_the_uploads_returns_any_answer_and_bounds_the_body(
    server: IexServer,
) -> None:
    async def scenario() -> None:
        async with TusClient(server.url, server.token) as client:
            ok = await client.get("/healthz")
            assert ok.status == 200 and ok.detail == ""
            missing = await client.get("/exchange/no-such-route")
            assert missing.status == 404 and missing.detail
            with pytest.raises(ProtocolError, match="more than 10 bytes"):
                await client.get("/openapi.json", max_bytes=10)

    asyncio.run(scenario())
