"""QIDO-RS study search latency at two index sizes (PS3.18 §10.6).

Fills a fresh data directory's index through ``SQLiteMetadataIndex.add_instances`` with
synthetic but realistic records (no DICOM files: headers are generated directly), starts a
real ``iex serve`` on 127.0.0.1 against it, and times study searches with httpx:

* by PatientID (two studies per patient),
* by a 90-day StudyDate range (limit 25, so both sizes return a full page),
* by a PatientName wildcard (``SURNAME^GIVE*``, one patient at either size),
* unfiltered, limit 100.

Growth is sub-linear when the ratio of latencies is far below the ratio of sizes (10).

    .venv/bin/python bench/qido_latency.py            # 10,000 and 100,000 instances
    .venv/bin/python bench/qido_latency.py --smoke    # 1,000 and 10,000 instances, quick
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from peers import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.dicom.instance import InstanceHeader, PixelDataLocation  # noqa: E402
from app.services.keys import open_data_keys  # noqa: E402
from app.storage.base import InstanceRecord  # noqa: E402
from app.storage.sqlite_index import SQLiteMetadataIndex  # noqa: E402

TRUST = "local"  # the trust created on first start; its admin token has every role
INSTANCES_PER_STUDY = 5
UID_ROOT = "1.2.826.0.1.3680043.10.1138"
FIRST_DAY = date(2015, 1, 1)
DAYS = 3650
SURNAMES = [a + b for a in ("Ab", "Bel", "Cor", "Dan", "Ev", "Far", "Gil", "Har", "Ing", "Jor",
            "Kel", "Lan", "Mor", "Nor", "Ol", "Pem", "Quin", "Ros", "Sel", "Tor")
            for b in ("ton", "ley", "man", "ford", "wick", "son", "by", "ham", "well", "ridge",
            "ard", "ick", "low", "mont", "er")]  # fmt: skip
GIVEN = [a + b for a in ("Al", "Be", "Ca", "Da", "El", "Fi", "Gr", "He", "Is", "Jo")
         for b in ("an", "ice", "ora", "vid", "na", "ona", "ace", "nry", "la", "hn")]  # fmt: skip
MODALITIES = ("CT", "MR", "CR", "US", "DX", "PT")
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}


def _patient(p: int) -> tuple[str, str]:
    """Patient ID and name; names are unique per patient up to 30,000 patients."""
    name = f"{SURNAMES[p % len(SURNAMES)].upper()}^{GIVEN[(p // len(SURNAMES)) % len(GIVEN)]}"
    return f"P{p:07d}", name


def _study_date(s: int) -> str:
    day = FIRST_DAY + timedelta(days=random.Random(s).randrange(DAYS))
    return day.strftime("%Y%m%d")


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def _records(studies: int) -> Iterator[InstanceRecord]:
    rng = random.Random(1138)
    for s in range(studies):
        pid, name = _patient(s // 2)
        study_uid = f"{UID_ROOT}.1.{s}"
        study_date = _study_date(s)
        study_time = f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}00"
        accession = f"A{s:08d}"
        modalities = (rng.choice(MODALITIES), rng.choice(MODALITIES))
        for n in range(INSTANCES_PER_STUDY):
            series_index = 0 if n < 3 else 1
            modality = modalities[series_index]
            series_uid = f"{study_uid}.{series_index + 1}"
            sop_uid = f"{series_uid}.{n + 1}"
            attributes: dict[str, str | int | None] = {
                "PatientName": name,
                "PatientID": pid,
                "PatientBirthDate": f"19{40 + s % 60:02d}0{1 + s % 9}1{s % 10}",
                "PatientSex": "MF"[s % 2],
                "StudyDate": study_date,
                "StudyTime": study_time,
                "AccessionNumber": accession,
                "ReferringPhysicianName": f"{SURNAMES[s % 97].upper()}^{GIVEN[s % 89]}",
                "StudyID": str(s % 10000),
                "StudyDescription": f"{modality} examination",
                "Modality": modality,
                "SeriesNumber": series_index + 1,
                "SeriesDescription": f"{modality} series {series_index + 1}",
                "PerformedProcedureStepStartDate": study_date,
                "PerformedProcedureStepStartTime": study_time,
                "InstanceNumber": n + 1,
                "NumberOfFrames": None,
                "Rows": 512,
                "Columns": 512,
                "BitsAllocated": 16,
            }
            metadata = {
                "00080005": _element("CS", "ISO_IR 100"),
                "00080008": _element("CS", "ORIGINAL", "PRIMARY", "AXIAL"),
                "00080016": _element("UI", SOP_CLASS[modality]),
                "00080018": _element("UI", sop_uid),
                "00080020": _element("DA", study_date),
                "00080030": _element("TM", study_time),
                "00080050": _element("SH", accession),
                "00080060": _element("CS", modality),
                "00080070": _element("LO", "ACME Imaging"),
                "00080080": _element("LO", "General Hospital"),
                "00080090": _element("PN", {"Alphabetic": attributes["ReferringPhysicianName"]}),
                "00081030": _element("LO", attributes["StudyDescription"]),
                "0008103E": _element("LO", attributes["SeriesDescription"]),
                "00100010": _element("PN", {"Alphabetic": name}),
                "00100020": _element("LO", pid),
                "00100030": _element("DA", attributes["PatientBirthDate"]),
                "00100040": _element("CS", attributes["PatientSex"]),
                "00180050": _element("DS", 1.25),
                "00181030": _element("LO", "ROUTINE"),
                "0020000D": _element("UI", study_uid),
                "0020000E": _element("UI", series_uid),
                "00200010": _element("SH", attributes["StudyID"]),
                "00200011": _element("IS", series_index + 1),
                "00200013": _element("IS", n + 1),
                "00200032": _element("DS", -250.0, -250.0, n * 1.25),
                "00200037": _element("DS", 1, 0, 0, 0, 1, 0),
                "00200052": _element("UI", f"{study_uid}.99"),
                "00280002": _element("US", 1),
                "00280004": _element("CS", "MONOCHROME2"),
                "00280010": _element("US", 512),
                "00280011": _element("US", 512),
                "00280030": _element("DS", 0.48828125, 0.48828125),
                "00280100": _element("US", 16),
                "00280101": _element("US", 12),
                "00280102": _element("US", 11),
                "00280103": _element("US", 0),
                "00281050": _element("DS", 40),
                "00281051": _element("DS", 400),
                "00400244": _element("DA", study_date),
                "00400245": _element("TM", study_time),
                "7FE00010": {"vr": "OW", "BulkDataURI": "bulk/7FE00010"},
            }
            header = InstanceHeader(
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=sop_uid,
                sop_class_uid=SOP_CLASS[modality],
                transfer_syntax="1.2.840.10008.1.2.1",
                attributes=attributes,
                metadata=orjson.dumps(metadata),
                pixel_data=PixelDataLocation(0x7FE00010, "OW", 1400, 512 * 512 * 2),
            )
            digest = hashlib.sha256(sop_uid.encode()).hexdigest()
            yield InstanceRecord(TRUST, header, f"bench/{digest[:32]}", 525_688)


async def _fill(data_dir: Path, studies: int) -> float:
    started = time.perf_counter()
    # The gateway's own keys: the index is encrypted as the server will open it.
    keys = open_data_keys(data_dir, None)
    index = SQLiteMetadataIndex(data_dir / "index.sqlite3", key=keys.index_key)
    await index.open()
    batch: list[InstanceRecord] = []
    for record in _records(studies):
        batch.append(record)
        if len(batch) == 2_000:
            await index.add_instances(batch)
            batch = []
    await index.add_instances(batch)
    await index.close()
    return time.perf_counter() - started


@contextmanager
def _serve(data_dir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir)]  # fmt: skip
    # The unfiltered query is rate limited per token; the benchmark measures latency, not that.
    env = {**os.environ, "IEX_LOG_LEVEL": "warning", "IEX_RATE_LIMIT_BURST": "1000000"}
    process = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, url + "/healthz", "iex serve")
        yield url + "/dicomweb"
    finally:
        process.terminate()
        process.wait(15)


QueryFactory = Callable[[random.Random, int], dict[str, str]]


def _by_patient_id(rng: random.Random, studies: int) -> dict[str, str]:
    return {"PatientID": _patient(rng.randrange(studies // 2))[0]}


def _by_date_range(rng: random.Random, studies: int) -> dict[str, str]:
    start = FIRST_DAY + timedelta(days=rng.randrange(DAYS - 90))
    end = start + timedelta(days=89)
    return {"StudyDate": f"{start:%Y%m%d}-{end:%Y%m%d}", "limit": "25"}


def _by_name_wildcard(rng: random.Random, studies: int) -> dict[str, str]:
    name = _patient(rng.randrange(studies // 2))[1]
    return {"PatientName": name[:-1] + "*"}


def _unfiltered(rng: random.Random, studies: int) -> dict[str, str]:
    return {"limit": "100"}


QUERIES: dict[str, QueryFactory] = {
    "PatientID": _by_patient_id,
    "StudyDate 90-day range": _by_date_range,
    "PatientName SURNAME^GIV*": _by_name_wildcard,
    "unfiltered limit=100": _unfiltered,
}


def _measure(
    base: str, token: str, studies: int, requests: int
) -> dict[str, tuple[float, float, float]]:
    """p50, p95 (ms) and mean results per query type."""
    out: dict[str, tuple[float, float, float]] = {}
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for label, factory in QUERIES.items():
            rng = random.Random(label)
            for _ in range(10):  # warm up connections, caches and the page cache
                client.get("/studies", params=factory(rng, studies))
            times: list[float] = []
            results = 0
            for _ in range(requests):
                params = factory(rng, studies)
                started = time.perf_counter()
                response = client.get("/studies", params=params)
                times.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{label}: {response.status_code} {response.text[:200]}")
                results += len(response.json())
            if results == 0:
                raise RuntimeError(f"{label}: no query matched anything")
            cuts = statistics.quantiles(times, n=20)
            out[label] = (statistics.median(times), cuts[18], results / requests)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, few requests")
    parser.add_argument("--requests", type=int, help="requests per query type and size")
    args = parser.parse_args(argv)
    sizes = (200, 2_000) if args.smoke else (2_000, 20_000)
    requests = args.requests or (30 if args.smoke else 200)
    results: dict[int, dict[str, tuple[float, float, float]]] = {}
    for studies in sizes:
        with tempfile.TemporaryDirectory(prefix="iex-bench-") as tmp:
            data_dir = Path(tmp) / "data"
            data_dir.mkdir(mode=0o700)
            took = asyncio.run(_fill(data_dir, studies))
            size_mb = (data_dir / "index.sqlite3").stat().st_size / 1e6
            print(
                f"{studies:,} studies / {studies * INSTANCES_PER_STUDY:,} instances indexed in "
                f"{took:.1f} s ({size_mb:.0f} MB); measuring {requests} requests per query",
                flush=True,
            )
            with _serve(data_dir) as base:
                token = (data_dir / "admin.token").read_text().strip()
                results[studies] = _measure(base, token, studies, requests)
    small, large = sizes
    head = (
        f"{'query':<26} {'results':>7} | {small * INSTANCES_PER_STUDY:>7,} inst p50 / p95 ms"
        f" | {large * INSTANCES_PER_STUDY:>7,} inst p50 / p95 ms"
        f" | p50 ratio (size x{large // small})"
    )
    print()
    print(head)
    print("-" * len(head))
    for label in QUERIES:
        s50, s95, _ = results[small][label]
        l50, l95, count = results[large][label]
        print(
            f"{label:<26} {count:>7.1f} | {s50:>12.2f} / {s95:>6.2f}    "
            f" | {l50:>12.2f} / {l95:>6.2f}     | {l50 / s50:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
