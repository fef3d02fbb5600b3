"""Peak memory of one large STOW-RS request: the server must stay under 200 MB of RSS.

Writes a ``multipart/related`` request of many ~2 MB CT instances with fresh UIDs to a
temporary file (one instance in memory at a time), starts ``iex serve`` on 127.0.0.1 with
an empty data directory, streams the file to it with httpx and watches the server's
resident set: sampled every 50 ms, and the kernel's high-water mark (VmHWM) at the end.

    .venv/bin/python bench/stow_memory.py               # the 1 GB run
    .venv/bin/python bench/stow_memory.py --size-mb 64  # a CI smoke run

Exits 1 when the peak reaches the budget or the request fails. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import httpx
from dataset import generated_image
from peers import free_port, wait_until_up
from pydicom.uid import generate_uid

BOUNDARY = "iex-bench-boundary"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SAMPLE_SECONDS = 0.05
MB = 1024 * 1024


def write_request(path: Path, size_bytes: int, instance_bytes: int) -> tuple[int, int]:
    """Write the multipart body to ``path``; return (instances, body bytes)."""
    side = max(16, int((instance_bytes / 2) ** 0.5))
    ds = generated_image(CT_IMAGE_STORAGE, "CT", side, side)  # pixels shared by all
    study, series = generate_uid(), generate_uid()
    count = 0
    with open(path, "wb") as out:
        while out.tell() < size_bytes or count == 0:
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series if count % 100 else (series := generate_uid())
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = count + 1
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            out.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            ds.save_as(out, enforce_file_format=True)
            out.write(b"\r\n")
            count += 1
        out.write(f"--{BOUNDARY}--\r\n".encode())
        return count, out.tell()


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/{pid}/status")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            try:
                self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))
            except (OSError, RuntimeError):
                return


def start_server(data_dir: Path, log: IO[bytes]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "app.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
    ]  # fmt: skip
    env = {**os.environ, "IEX_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url + "/healthz", "iex serve", Path(log.name))
    return proc, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="request size (1024)")
    parser.add_argument("--instance-mb", type=float, default=2.0, help="instance size (2)")
    parser.add_argument("--budget-mb", type=int, default=200, help="peak RSS budget (200)")
    parser.add_argument("--workdir", type=Path, help="where to put the request and data")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="iex-stow-bench-", dir=args.workdir))
    try:
        body_path = work / "request.multipart"
        t0 = time.perf_counter()
        count, size = write_request(body_path, args.size_mb * MB, int(args.instance_mb * MB))
        print(
            f"request: {count} instances, {size / MB:.0f} MB "
            f"(written in {time.perf_counter() - t0:.1f} s)"
        )
        with open(work / "server.log", "wb") as log:
            proc, url = start_server(work / "data", log)
        try:
            idle_kb = _status_kb(proc.pid, "VmRSS")
            sampler = RssSampler(proc.pid)
            sampler.start()
            ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
            token = (work / "data" / "admin.token").read_text().strip()
            headers = {"Content-Type": ctype, "Authorization": f"Bearer {token}"}
            with open(body_path, "rb") as body, httpx.Client(timeout=None) as client:
                start = time.perf_counter()
                # A file object: httpx streams it with a Content-Length.
                r = client.post(url + "/dicomweb/studies", content=body, headers=headers)
                elapsed = time.perf_counter() - start
            sampler.stopped.set()
            sampler.join()
            hwm_kb = _status_kb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(30)
        stored = len(r.json().get("00081199", {}).get("Value", [])) if r.content else 0
        peak_mb = max(hwm_kb, sampler.peak_kb) / 1024
        print(f"status: {r.status_code}, instances stored: {stored}/{count}")
        print(f"throughput: {size / MB / elapsed:.1f} MB/s ({count / elapsed:.1f} instances/s)")
        print(
            f"server RSS: idle {idle_kb / 1024:.0f} MB, peak sampled {sampler.peak_kb / 1024:.0f}"
            f" MB, VmHWM {hwm_kb / 1024:.0f} MB"
        )
        print(
            f"peak / budget: {peak_mb:.0f} / {args.budget_mb} MB = {peak_mb / args.budget_mb:.2f}"
        )
        if r.status_code != 200 or stored != count:
            print("FAIL: the request was not stored whole")
            return 1
        if peak_mb >= args.budget_mb:
            print("FAIL: peak RSS reached the budget")
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
