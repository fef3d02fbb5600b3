"""Test helpers: a real ``iex serve`` process, generated DICOM objects, multipart bodies, and
waiting for what happens in another process."""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from app.crypto.sqlcipher import connect
from app.services.keys import open_data_keys

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = 30,
    interval: float = 0.05,
    message: str | Callable[[], str] = "the condition",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    The timeout only keeps a stuck gateway from hanging the run: nothing is asserted about
    how long the wait takes. ``message`` says what was awaited (a callable is asked only on
    failure, so it can describe the last state seen).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def iex(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run an ``iex`` command on a data directory; its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(f"iex {' '.join(args)} failed: {result.stderr}{result.stdout}")
    return result.stdout


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files ``iex serve`` needs for TLS, and the CA that verifies its certificate."""

    cert: Path
    key: Path
    client_ca: Path
    server_ca: Path


#: Every gateway started and not yet stopped: the session stops what a failed fixture left.
RUNNING: list[IexServer] = []


@dataclass(eq=False)
class IexServer:
    """An ``iex serve`` subprocess on a loopback port with its own data directory.

    ``token`` is the admin token written on first start (every role, trust ``local``).
    """

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """How clients verify the server: its CA under TLS."""
        if self.tls is None:
            return True
        return ssl.create_default_context(cafile=str(self.tls.server_ca))

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """A client of the DICOMweb root sending ``token`` (default: the admin token)."""
        headers = {"Authorization": f"Bearer {token or self.token}"}
        kwargs.setdefault("verify", self.verify)
        return httpx.Client(base_url=self.dicomweb, headers=headers, timeout=60, **kwargs)

    def iex(self, *args: str) -> str:
        return iex(self.data_dir, *args, env=self.env)

    def issue_token(self, trust: str, *roles: str, expires: str | None = None) -> str:
        args = ["token", "issue", "--trust", trust, "--role", ",".join(roles)]
        return self.iex(*args, *(["--expires", expires] if expires else [])).strip()

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicomweb"

    def start(self, timeout: float = 120) -> IexServer:
        self.port = self.port or free_port()
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        env = {**os.environ, **self.env}
        cmd = [
            sys.executable, "-m", "app.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
        ]  # fmt: skip
        if self.tls is not None:
            cmd += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
            cmd += ["--tls-client-ca", str(self.tls.client_ca)]
        verify = self.verify
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        RUNNING.append(self)
        try:
            wait_until(lambda: self._answers(verify), timeout=timeout, message="/healthz")
        except AssertionError:
            self.kill()
            raise RuntimeError(
                f"iex serve did not start within {timeout}s:\n{self.log()}"
            ) from None
        return self

    def _answers(self, verify: ssl.SSLContext | bool) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"iex serve exited early:\n{self.log()}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1, verify=verify).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        self._forget()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None
        self._forget()

    def _forget(self) -> None:
        if self in RUNNING:
            RUNNING.remove(self)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


def make_instance(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "Doe^Jane",
    patient_id: str = "PID-1",
    modality: str = "CT",
    rows: int = 16,
    columns: int = 16,
    frames: int = 1,
    instance_number: int = 1,
    study_date: str = "20240102",
    **attributes: object,
) -> bytes:
    """A valid Part 10 object with pixel data, fresh UIDs unless given."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + ds.SOPInstanceUID[-6:]
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.StudyID = "S1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attributes.items():
        setattr(ds, key, value)
    rng = np.random.default_rng(int(ds.SOPInstanceUID.replace(".", "")[-9:]))
    pixels = rng.integers(0, 4096, size=(frames, rows, columns), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart_related(
    parts: Iterable[bytes],
    boundary: str = "iex-test-boundary",
    content_type: str = "application/dicom",
) -> tuple[bytes, str]:
    """A ``multipart/related`` body and its Content-Type header."""
    body = io.BytesIO()
    for part in parts:
        body.write(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode())
        body.write(part)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    header = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return body.getvalue(), header


def open_db(data_dir: Path, name: str) -> sqlite3.Connection:
    """A connection to one of a gateway's encrypted databases (``index.sqlite3``,
    ``security.sqlite3``), opened with the data directory's own keys."""
    keys = open_data_keys(data_dir, os.environ.get("IEX_KEK"))
    return connect(data_dir / name, keys.index_key)
