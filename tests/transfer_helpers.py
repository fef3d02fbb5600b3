"""Building upload payloads (zip, tar, multipart of generated DICOM) and checking what a
gateway made of them: the report, QIDO-RS, and the stored bytes through WADO-RS."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import zipfile
from typing import Any

import httpx
from pydicom.uid import generate_uid

from tests.helpers import IexServer, make_instance, wait_until

TUS = {"Tus-Resumable": "1.0.0"}
STREAM = {"Content-Type": "application/offset+octet-stream"}
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ZIP = "application/zip"
TAR = "application/x-tar"
MULTIPART = 'multipart/related; type="application/dicom"'


def metadata(**values: str) -> str:
    """``Upload-Metadata`` from keyword arguments (``content_type`` -> ``content-type``)."""
    return ",".join(
        f"{k.replace('_', '-')} {base64.b64encode(v.encode()).decode()}" for k, v in values.items()
    )


def study_files(count: int, *, rows: int = 32, **attributes: Any) -> dict[str, bytes]:
    """``count`` instances of one new study in two series, named like a CD's folders."""
    study = generate_uid()
    series = [generate_uid(), generate_uid()]
    return {
        f"DICOM/S{i % 2}/IM{i:04d}.dcm": make_instance(
            study_uid=study,
            series_uid=series[i % 2],
            instance_number=i + 1,
            rows=rows,
            columns=rows,
            **attributes,
        )
        for i in range(count)
    }


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def tar_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def multipart_of(members: dict[str, bytes], boundary: str = "iex-upload-boundary") -> bytes:
    out = io.BytesIO()
    for data in members.values():
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def tus_client(server: IexServer, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token or server.token}", **TUS}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def upload(
    c: httpx.Client, payload: bytes, meta: str, chunk: int = 1024 * 1024
) -> tuple[str, httpx.Response]:
    """Create an upload and send ``payload`` in chunks; the URL and the last response."""
    r = c.post(
        "/transfers/uploads", headers={"Upload-Length": str(len(payload)), "Upload-Metadata": meta}
    )
    assert r.status_code == 201, r.text
    url = r.headers["location"]
    offset = 0
    while offset < len(payload) or offset == 0:
        piece = payload[offset : offset + chunk]
        r = c.patch(url, content=piece, headers={**STREAM, "Upload-Offset": str(offset)})
        assert r.status_code == 204, r.text
        offset = int(r.headers["upload-offset"])
        if not piece:
            break
    return url, r


def wait_report(c: httpx.Client, url: str, timeout: float = 120) -> dict[str, Any]:
    """Poll the upload's report until ingest ended; the final report."""
    seen: list[dict[str, Any]] = []

    def ended() -> dict[str, Any] | None:
        r = c.get(url + "/report")
        assert r.status_code == 200, r.text
        seen.append(r.json())
        return seen[-1] if seen[-1]["state"] in ("complete", "failed") else None

    return wait_until(ended, timeout=timeout, message=lambda: f"ingest to end: {seen[-1]}")


def studies_found(server: IexServer, study_uid: str, token: str | None = None) -> list[Any]:
    with server.client(token) as c:
        r = c.get("/studies", params={"StudyInstanceUID": study_uid})
        assert r.status_code in (200, 204), r.text
        return r.json() if r.status_code == 200 else []


def stored_digests(server: IexServer, study_uid: str, token: str | None = None) -> dict[str, str]:
    """sha256 of every instance of the study as stored (WADO-RS, transfer-syntax=*), by
    SOP Instance UID."""
    from pydicom import dcmread

    with server.client(token) as c:
        r = c.get(f"/studies/{study_uid}", headers={"Accept": AS_STORED})
        assert r.status_code == 200, r.text
    out = {}
    for part in split_multipart(r):
        out[dcmread(io.BytesIO(part)).SOPInstanceUID] = hashlib.sha256(part).hexdigest()
    return out


def source_digests(members: dict[str, bytes]) -> dict[str, str]:
    """sha256 of each generated instance by SOP Instance UID (read from the bytes)."""
    from pydicom import dcmread

    return {
        dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID: hashlib.sha256(
            data
        ).hexdigest()
        for data in members.values()
    }


def split_multipart(response: httpx.Response) -> list[bytes]:
    """The part bodies of a ``multipart/related`` response, strictly per RFC 2046."""
    params = [p.strip() for p in response.headers["content-type"].split(";")[1:]]
    boundary = next(p.split("=", 1)[1].strip('"') for p in params if p.startswith("boundary="))
    body = response.content
    opening, closing = f"--{boundary}\r\n".encode(), f"\r\n--{boundary}--\r\n".encode()
    assert body.startswith(opening) and body.endswith(closing)
    parts = body[len(opening) : -len(closing)].split(f"\r\n--{boundary}\r\n".encode())
    return [p.partition(b"\r\n\r\n")[2] for p in parts]
