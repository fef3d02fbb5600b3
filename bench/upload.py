"""A resumable (tus) upload of a 1 GiB study over loopback: throughput, and the server's memory.

Writes a zip (stored, as CD exports usually are) of ~2 MB CT instances with fresh UIDs to a
temporary directory, then measures in the same run:

* the practical limit of this machine: the same file copied through the at-rest encryption
  (read, AES-256-GCM in the gateway's segment format, write, fsync), i.e. ``cp`` plus the
  encryption every stored byte needs;
* the upload: tus creation then PATCH chunks with a sha256 ``Upload-Checksum`` each, to
  ``iex serve`` on 127.0.0.1 with an empty data directory; then the ingest that follows
  (unpack, parse, store every instance), timed until the report says ``complete``;
* the server's resident set throughout: sampled every 50 ms, and the kernel's high-water
  mark (VmHWM) at the end, against a 200 MB budget.

    .venv/bin/python bench/upload.py                 # the 1 GiB run
    .venv/bin/python bench/upload.py --size-mb 32    # a CI smoke run

Prints ``ratio NAME = X`` lines. Exits 1 when the peak reaches the budget or ingest fails.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset import generated_image  # noqa: E402
from stow_memory import CT_IMAGE_STORAGE, RssSampler, _status_kb, start_server  # noqa: E402

from app.crypto.segments import Sealer  # noqa: E402

MiB = 1024 * 1024
MB = 1_000_000


def write_zip(path: Path, size_bytes: int, instance_bytes: int) -> int:
    """A stored zip of one study, just under ``size_bytes``; the number of instances."""
    side = max(16, int((instance_bytes / 2) ** 0.5))
    ds = generated_image(CT_IMAGE_STORAGE, "CT", side, side)  # pixels shared by all
    ds.StudyInstanceUID = generate_uid()
    count = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        # Stop one instance short of the size: 1 GiB is also the gateway's default maximum.
        while path.stat().st_size + 2 * instance_bytes < size_bytes or count == 0:
            if count % 200 == 0:
                ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = count + 1
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            z.writestr(f"DICOM/SE{count // 200:03d}/IM{count:05d}", buf.getvalue())
            count += 1
    return count


def copy_through_encryption(source: Path, target: Path) -> float:
    """``cp`` with the at-rest encryption in the middle; MB/s."""
    sealer = Sealer(os.urandom(32), "bench", "copy", segment_size=MiB)
    start = time.perf_counter()
    with open(source, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
        dst.write(sealer.header)
        while block := src.read(8 * MiB):
            dst.writelines(sealer.update(block))
        dst.writelines(sealer.finish())
        os.fsync(dst.fileno())
    took = time.perf_counter() - start
    target.unlink()
    return source.stat().st_size / MB / took


def upload(url: str, token: str, path: Path, chunk: int) -> str:
    """Create the upload and PATCH the file in ``chunk``-sized pieces; the upload URL."""
    size = path.stat().st_size
    meta = ",".join(
        f"{k} {base64.b64encode(v.encode()).decode()}"
        for k, v in (("content-type", "application/zip"), ("filename", path.name))
    )
    headers = {"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"}
    with httpx.Client(headers=headers, timeout=600) as c:
        r = c.post(
            url + "/transfers/uploads",
            headers={"Upload-Length": str(size), "Upload-Metadata": meta},
        )
        r.raise_for_status()
        location = r.headers["location"]
        offset = 0
        with open(path, "rb") as f:
            while offset < size:
                data = f.read(chunk)
                digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
                r = c.patch(
                    location,
                    content=data,
                    headers={
                        "Content-Type": "application/offset+octet-stream",
                        "Upload-Offset": str(offset),
                        "Upload-Checksum": f"sha256 {digest}",
                    },
                )
                if r.status_code != 204:
                    raise RuntimeError(f"PATCH answered {r.status_code}: {r.text}")
                offset = int(r.headers["upload-offset"])
    return location


def wait_for_ingest(location: str, token: str) -> dict[str, object]:
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        while True:
            report: dict[str, object] = c.get(location + "/report").json()
            if report["state"] in ("complete", "failed"):
                return report
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="payload MiB (1024)")
    parser.add_argument("--instance-mb", type=float, default=2.0, help="MiB per instance (2)")
    parser.add_argument("--chunk-mb", type=int, default=64, help="MiB per PATCH (64)")
    parser.add_argument("--budget-mb", type=int, default=200, help="peak RSS budget (200)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="iex-bench-upload-"))
    try:
        payload = work / "study.zip"
        count = write_zip(payload, args.size_mb * MiB, int(args.instance_mb * MiB))
        size = payload.stat().st_size
        print(f"payload: {size / MiB:.0f} MiB zip of {count} instances", flush=True)
        limit = copy_through_encryption(payload, work / "copy.enc")
        print(f"limit: cp through AES-256-GCM at rest: {limit:.0f} MB/s", flush=True)

        data_dir = work / "data"
        with open(work / "server.log", "wb") as log:
            proc, url = start_server(data_dir, log)
            try:
                token = (data_dir / "admin.token").read_text().strip()
                idle_kb = _status_kb(proc.pid, "VmRSS")
                sampler = RssSampler(proc.pid)
                sampler.start()
                start = time.perf_counter()
                location = upload(url, token, payload, args.chunk_mb * MiB)
                uploaded = time.perf_counter()
                upload_peak_kb = sampler.peak_kb
                report = wait_for_ingest(location, token)
                ingested = time.perf_counter()
                sampler.stopped.set()
                sampler.join()
                hwm_kb = _status_kb(proc.pid, "VmHWM")
            finally:
                proc.terminate()
                proc.wait(30)
        if report["state"] != "complete":
            print(f"FAIL: ingest ended {report['state']}: {report.get('error')}")
            print((work / "server.log").read_text()[-3000:])
            return 1
        upload_rate = size / MB / (uploaded - start)
        total_rate = size / MB / (ingested - start)
        ingest_s = ingested - uploaded
        peak_kb = max(sampler.peak_kb, hwm_kb)
        print(f"ratio upload/cp-through-encryption = {upload_rate / limit:.2f}")
        print(f"ratio upload+ingest/cp-through-encryption = {total_rate / limit:.2f}")
        print(f"ratio peak-rss/budget = {peak_kb / 1024 / args.budget_mb:.2f}")
        print(
            f"upload: {upload_rate:.0f} MB/s ({uploaded - start:.1f} s); ingest: "
            f"{ingest_s:.1f} s ({count / ingest_s:.0f} instances/s); end to end: "
            f"{total_rate:.0f} MB/s"
        )
        print(
            f"server RSS: idle {idle_kb / 1024:.0f} MB, peak sampled while uploading "
            f"{upload_peak_kb / 1024:.0f} MB and overall {sampler.peak_kb / 1024:.0f} MB, "
            f"high-water {hwm_kb / 1024:.0f} MB (budget {args.budget_mb} MB)"
        )
        if peak_kb / 1024 >= args.budget_mb:
            print("FAIL: peak RSS reached the budget")
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
