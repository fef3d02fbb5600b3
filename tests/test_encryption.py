"""Encryption at rest, end to end: nothing readable on disk, tampering detected, keys rotate."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.helpers import IexServer, make_instance, multipart_related
from tests.pydicom_corpus import storable_files

ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SEGMENT = 4096
HEADER = 43  # the format header: 23 fixed bytes and a "dek-" + 16 hex digit key id


def _files(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


def _needles() -> tuple[list[bytes], list[bytes]]:
    """Patient names, IDs and birth dates long enough not to occur by chance in random bytes,
    and 64-byte runs of pixel data."""
    texts: set[bytes] = set()
    pixels: list[bytes] = []
    for f in storable_files():
        ds = f.dataset
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 6:
                texts.add(value.encode("utf-8", "replace"))
        data = ds.get("PixelData")
        if isinstance(data, bytes) and len(data) >= 256:
            middle = len(data) // 2
            run = data[middle : middle + 64]
            if len(set(run)) >= 8:
                pixels.append(run)
    return sorted(texts), pixels


def test_no_plaintext_patient_data_on_disk_or_in_logs(
    make_server: Callable[..., IexServer],
) -> None:
    srv = make_server()
    corpus = storable_files()
    body, ctype = multipart_related(f.data for f in corpus)
    with srv.client() as c:
        assert c.post("/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        for f in corpus[:10]:
            name = str(f.dataset.get("PatientName", "") or "")
            pid = str(f.dataset.get("PatientID", "") or "")
            assert c.get("/studies", params={"PatientName": name}).status_code == 200
            assert c.get("/studies", params={"PatientID": pid}).status_code == 200
            r = c.get(
                f"/studies/{f.study_uid}/series/{f.series_uid}/instances/{f.sop_uid}",
                headers={"Accept": ANY_SYNTAX},
            )
            assert r.status_code == 200
            assert f.data in r.content
    srv.stop()
    texts, pixels = _needles()
    assert len(texts) >= 10 and len(pixels) >= 10
    scanned = [*_files(srv.data_dir), srv.log_path]
    assert any(p.name == "index.sqlite3" for p in scanned)
    for path in scanned:
        assert path is not None
        content = path.read_bytes()
        for needle in texts + pixels:
            assert needle not in content, f"{needle[:20]!r} readable in {path.name}"


@pytest.fixture
def small_segments(make_server: Callable[..., IexServer]) -> IexServer:
    return make_server(IEX_SEGMENT_SIZE=str(SEGMENT))


def _store_one(srv: IexServer, **attrs: object) -> tuple[bytes, str, Path]:
    """Store one instance; its bytes, its WADO-RS URL and its blob file."""
    before = set(_blob_files(srv))
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = make_instance(study_uid=study, series_uid=series, sop_uid=sop, **attrs)
    with srv.client() as c:
        r = c.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200
    (blob,) = set(_blob_files(srv)) - before
    return data, f"/studies/{study}/series/{series}/instances/{sop}", blob


def _blob_files(srv: IexServer) -> list[Path]:
    return [p for p in (srv.data_dir / "blobs").glob("*/*/*") if p.is_file()]


def _retrieval_fails(srv: IexServer, url: str) -> None:
    """A retrieval answers an error status, or is cut off before it completes: never a whole
    200 response."""
    with srv.client() as c:
        try:
            r = c.get(url, headers={"Accept": ANY_SYNTAX})
        except httpx.RemoteProtocolError:
            return
    assert r.status_code == 500, r.status_code
    assert "integrity" in r.json()["detail"]


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


STRIDE = SEGMENT + 16
TAMPERINGS: dict[str, Callable[[bytes], bytes]] = {
    "header byte": lambda b: _flip(b, 16),
    "first segment": lambda b: _flip(b, HEADER + 100),
    "middle segment": lambda b: _flip(b, HEADER + STRIDE + 100),
    "last segment": lambda b: _flip(b, len(b) - 20),
    "truncated": lambda b: b[:-10],
    "truncated at a segment boundary": lambda b: b[: HEADER + 2 * STRIDE],
    "appended bytes": lambda b: b + b"\x00" * 32,
    "swapped segments": lambda b: (
        b[:HEADER] + b[HEADER + STRIDE : HEADER + 2 * STRIDE] + b[HEADER : HEADER + STRIDE]
        + b[HEADER + 2 * STRIDE :]
    ),
}  # fmt: skip


@pytest.mark.parametrize("how", list(TAMPERINGS))
def test_tampered_objects_are_never_served(small_segments: IexServer, how: str) -> None:
    srv = small_segments
    data, url, blob = _store_one(srv, rows=96, columns=96)
    original = blob.read_bytes()
    assert len(original) > HEADER + 3 * STRIDE  # several segments
    blob.write_bytes(TAMPERINGS[how](original))
    _retrieval_fails(srv, url)
    assert blob.name in srv.log(), "the failure log names the object"
    blob.write_bytes(original)
    with srv.client() as c:
        assert data in c.get(url, headers={"Accept": ANY_SYNTAX}).content


def test_objects_swapped_between_files_are_detected(small_segments: IexServer) -> None:
    srv = small_segments
    _, url_a, blob_a = _store_one(srv)
    _, url_b, blob_b = _store_one(srv)
    a, b = blob_a.read_bytes(), blob_b.read_bytes()
    blob_a.write_bytes(b)
    blob_b.write_bytes(a)
    _retrieval_fails(srv, url_a)
    _retrieval_fails(srv, url_b)


def test_tampered_frame_segment_fails_the_frame_request(small_segments: IexServer) -> None:
    srv = small_segments
    _, url, blob = _store_one(srv, rows=128, columns=128, frames=2)
    original = blob.read_bytes()
    # Frame 2 is the second half of the pixel data, near the end of the object.
    blob.write_bytes(_flip(original, len(original) - 3 * STRIDE))
    with srv.client() as c:
        try:
            r = c.get(url + "/frames/2")
            assert r.status_code == 500
        except httpx.RemoteProtocolError:
            pass
        assert c.get(url + "/frames/1").status_code == 200  # untouched segments still serve


@pytest.mark.parametrize("rows", [16, 400], ids=["one segment", "several segments"])
def test_objects_not_in_the_page_cache_are_served_whole(
    small_segments: IexServer, rows: int
) -> None:
    """Objects that would make the event loop wait for the disk are opened in a worker
    thread instead; either way the retrieval is the object stored."""
    data, url, blob = _store_one(small_segments, rows=rows, columns=rows)
    with open(blob, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with small_segments.client() as c:
        r = c.get(url, headers={"Accept": ANY_SYNTAX})
    assert r.status_code == 200
    assert data in r.content


def test_objects_larger_than_a_read_batch_stream_whole(small_segments: IexServer) -> None:
    """Objects of thousands of segments are decrypted a batch of segments per worker-thread
    trip (app.storage.encrypted.READ_BATCH, 4 MiB): whole objects, several in a row, and frame
    ranges that start and end inside batches all come back exact."""
    srv = small_segments
    study, series = generate_uid(), generate_uid()
    big = [
        make_instance(study_uid=study, series_uid=series, rows=1024, columns=1024, frames=3)
        for _ in range(2)
    ]
    with srv.client() as c:
        body, ctype = multipart_related(big)
        assert c.post("/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        r = c.get(f"/studies/{study}", headers={"Accept": ANY_SYNTAX})
        assert r.status_code == 200
        assert int(r.headers["content-length"]) == len(r.content)
        assert all(obj in r.content for obj in big)
        sop = dcmread(io.BytesIO(big[0])).SOPInstanceUID
        frame_bytes = 1024 * 1024 * 2
        pixels = big[0][-3 * frame_bytes :]
        for n in (1, 2, 3):
            r = c.get(f"/studies/{study}/series/{series}/instances/{sop}/frames/{n}")
            assert r.status_code == 200
            assert pixels[(n - 1) * frame_bytes : n * frame_bytes] in r.content


def _with(data: bytes, *, header_text: int = 0, padding: int = 0) -> bytes:
    """``data`` with a Reason for Visit (0032,1066) of ``header_text`` characters before
    Pixel Data, and Data Set Trailing Padding (FFFC,FFFC) of ``padding`` bytes after it."""
    ds = dcmread(io.BytesIO(data))
    if header_text:
        ds.add_new(0x00321066, "UT", "x" * header_text)
    if padding:
        ds.add_new(0xFFFCFFFC, "OB", bytes(padding))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "layout",
    [
        {"header_text": 150_000},  # a header well past the 64 KiB kept from the start
        {"padding": 100},  # what follows Pixel Data, within the 4 KiB kept from the end
        {"padding": 20_000},  # ... and past them
    ],
    ids=lambda layout: "-".join(f"{k}-{v}" for k, v in layout.items()),
)
def test_staged_objects_parse_whole_or_cut_from_memory_or_file(
    small_segments: IexServer, layout: dict[str, int]
) -> None:
    """A writer keeps the first 64 KiB and the last 4 KiB of plaintext for the header parse;
    whatever lies beyond them is read back from the staged, encrypted file. Either way the
    whole object is stored as sent, and a cut one is refused."""
    srv = small_segments
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = _with(make_instance(study_uid=study, series_uid=series, sop_uid=sop), **layout)
    url = f"/studies/{study}/series/{series}/instances/{sop}"
    with srv.client() as c:
        cut = c.post("/studies", content=data[:-3], headers={"Content-Type": "application/dicom"})
        assert cut.status_code == 409, cut.text
        assert cut.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        r = c.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200, r.text
        (meta,) = c.get(url + "/metadata").json()
        if "header_text" in layout:
            assert meta["00321066"]["Value"] == ["x" * layout["header_text"]]
        assert meta["7FE00010"]["BulkDataURI"].endswith("/bulk/7FE00010")
        assert c.get(url, headers={"Accept": ANY_SYNTAX}).content.count(data) == 1


def _iex(
    srv: IexServer, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--data-dir", str(srv.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_rotation_keeps_everything_readable(make_server: Callable[..., IexServer]) -> None:
    srv = make_server()
    first, url_first, _ = _store_one(srv)
    refused = _iex(srv, "keys", "rotate")
    assert refused.returncode == 2 and "stop it first" in refused.stderr
    srv.stop()

    status_before = _iex(srv, "keys", "status").stdout
    rotated = _iex(srv, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_key = _iex(srv, "keys", "rotate", "--trust", "local")
    assert new_key.returncode == 0, new_key.stderr
    status_after = _iex(srv, "keys", "status").stdout
    assert status_before.splitlines()[0] != status_after.splitlines()[0]  # a new KEK id

    srv.start()
    second, url_second, _ = _store_one(srv)
    srv.stop()
    srv.start()
    with srv.client() as c:
        for data, url in ((first, url_first), (second, url_second)):
            assert data in c.get(url, headers={"Accept": ANY_SYNTAX}).content
    srv.stop()
    local = [line.split() for line in _iex(srv, "keys", "status").stdout.splitlines()]
    local = [row for row in local if len(row) > 2 and row[1] == "local"]
    assert sorted((row[-2], row[-1]) for row in local) == [("active", "1"), ("retired", "1")]


def test_missing_or_wrong_key_refuses_to_start(make_server: Callable[..., IexServer]) -> None:
    srv = make_server()
    _store_one(srv)
    srv.stop()
    kek = srv.data_dir / "keys" / "kek"
    saved = kek.read_bytes()

    kek.unlink()
    run = _iex(srv, "serve", "--port", "1")
    assert run.returncode == 2
    assert "missing but encrypted data exists" in run.stderr
    assert not kek.exists(), "no new key is made over existing data"

    kek.write_bytes(saved)
    kek.chmod(0o600)
    other = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "generate-kek"], capture_output=True, text=True
    ).stdout
    assert other.startswith("{")
    run = _iex(srv, "serve", "--port", "1", env={"IEX_KEK": other})
    assert run.returncode == 2
    assert "wrong key" in run.stderr
