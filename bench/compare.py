"""iex side by side with Orthanc (and its DICOMweb plugin) on this machine, in one run.

    make bench-compare                              # the full run, writes docs/BENCHMARKS.md
    .venv/bin/python bench/compare.py --smoke       # tiny sizes, iex only (CI)

Both servers run on 127.0.0.1 with throwaway data directories (``bench/peers.py``) and get the
same re-identified real images (``bench/dataset.py``); runs alternate between them, rounds
take medians. Measured, for each server:

* STOW-RS ingest of 200 instances (half 512x512 CT, half 1024x1024 MR) in requests of 20,
  with 1 and with 8 concurrent clients: instances/s and MB/s (fresh UIDs every run);
* WADO-RS retrieval of a 500-slice CT study whole (MB/s), and of its instances one by one
  with 8 concurrent clients (instances/s);
* study-level metadata of that 500-instance study (ms);
* QIDO-RS study search by PatientID with 2,000 one-instance studies stored: p50 and p95 (ms).

Uploads and searches go through httpx (AsyncClient); retrievals are read with a plain-socket
client (``bench/rawhttp.py``), since httpx itself tops out near 1 GB/s on this machine.

Each measure prints ``ratio NAME iex/orthanc = X`` (higher is better for iex: latencies are
inverted), then the absolute figures, then this machine's limits measured in the same run
(``bench/limits.py``) with iex's ratio to each. MB is 10^6 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataset import (  # noqa: E402
    STOW_CONTENT_TYPE,
    Batch,
    InstanceRef,
    Templates,
    ct_study_batches,
    ingest_batches,
    load_templates,
    patient_id,
    search_batches,
)
from limits import (  # noqa: E402
    MB,
    TrivialHttpServer,
    aes_gcm_mb_s,
    raw_upload_mb_s,
    sequential_write_mb_s,
)
from peers import Peer, ensure_orthanc, start_iex, start_orthanc  # noqa: E402
from rawhttp import RawHttpConnection  # noqa: E402
from report import Measure, Results, print_report, write_docs  # noqa: E402

WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON_ACCEPT = "application/dicom+json"


@dataclass(frozen=True)
class Sizes:
    """How much of everything; the defaults are the full run."""

    stow_instances: int = 200
    stow_per_request: int = 20
    study_instances: int = 500
    search_studies: int = 2_000
    search_requests: int = 200
    metadata_requests: int = 3
    rounds: int = 5
    write_mib: int = 1024
    aes_mib: int = 256


SMOKE = Sizes(
    stow_instances=8,
    stow_per_request=4,
    study_instances=10,
    search_studies=20,
    search_requests=20,
    metadata_requests=1,
    rounds=1,
    write_mib=32,
    aes_mib=16,
)


def _client(peer: Peer | None, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = peer.headers if peer else {}
    return httpx.AsyncClient(headers=headers, limits=limits, timeout=600)


def _check_stow(response: httpx.Response, expected: int) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"STOW-RS answered {response.status_code}: {response.text[:300]}")
    stored = orjson.loads(response.content).get("00081199", {}).get("Value", [])
    if len(stored) != expected:
        raise RuntimeError(f"STOW-RS stored {len(stored)} of {expected}: {response.text[:300]}")


async def post_all(
    client: httpx.AsyncClient, url: str, batches: Sequence[Batch], concurrency: int, stow: bool
) -> float:
    """POST every batch with ``concurrency`` workers; the seconds it took."""
    pending = iter(batches)
    headers = {"Content-Type": STOW_CONTENT_TYPE, "Accept": JSON_ACCEPT}

    async def worker() -> None:
        for batch in pending:
            response = await client.post(url, content=batch.body, headers=headers)
            if stow:
                _check_stow(response, len(batch.instances))
            elif response.status_code != 200:
                raise RuntimeError(f"{url} answered {response.status_code}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def _instances_mb(batches: Sequence[Batch]) -> tuple[int, float]:
    refs = [ref for batch in batches for ref in batch.instances]
    return len(refs), sum(ref.size for ref in refs) / MB


async def measure_stow(peer: Peer, batches: Sequence[Batch], concurrency: int) -> Measure:
    count, size_mb = _instances_mb(batches)
    async with _client(peer, concurrency) as client:
        took = await post_all(client, peer.dicomweb + "/studies", batches, concurrency, True)
    return Measure(count / took, size_mb / took)


def _fetch_all(base: str, headers: dict[str, str], paths: Sequence[str], clients: int) -> int:
    """GET every path over ``clients`` keep-alive connections, one thread each; bytes."""
    pending = iter(paths)
    lock = threading.Lock()
    totals: list[int] = []

    def client() -> None:
        received = 0
        with RawHttpConnection(base, headers) as connection:
            while True:
                with lock:
                    path = next(pending, None)
                if path is None:
                    break
                received += connection.get(path, WADO_ACCEPT)
        totals.append(received)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(totals) != clients:
        raise RuntimeError(f"{base}: a retrieval failed (see the traceback above)")
    return sum(totals)


async def measure_wado_study(peer: Peer, refs: Sequence[InstanceRef]) -> Measure:
    expected = sum(ref.size for ref in refs)
    path = f"{urlsplit(peer.dicomweb).path}/studies/{refs[0].study}"
    start = time.perf_counter()
    received = await asyncio.to_thread(_fetch_all, peer.dicomweb, peer.headers, [path], 1)
    took = time.perf_counter() - start
    if received < expected:  # multipart framing only adds to the instances' bytes
        raise RuntimeError(f"{peer.name}: study retrieval sent {received} of {expected} bytes")
    return Measure(received / MB / took)


async def measure_wado_instances(peer: Peer, refs: Sequence[InstanceRef], clients: int) -> Measure:
    root = urlsplit(peer.dicomweb).path
    paths = [f"{root}/studies/{r.study}/series/{r.series}/instances/{r.sop}" for r in refs]
    start = time.perf_counter()
    received = await asyncio.to_thread(_fetch_all, peer.dicomweb, peer.headers, paths, clients)
    took = time.perf_counter() - start
    if received < sum(ref.size for ref in refs):
        raise RuntimeError(f"{peer.name}: instance retrieval sent {received} bytes too few")
    return Measure(len(refs) / took, received / MB / took)


async def measure_metadata(peer: Peer, study: str, instances: int, requests: int) -> Measure:
    times = []
    async with _client(peer, 1) as client:
        for _ in range(requests):
            start = time.perf_counter()
            response = await client.get(
                f"{peer.dicomweb}/studies/{study}/metadata", headers={"Accept": JSON_ACCEPT}
            )
            times.append((time.perf_counter() - start) * 1000)
            if response.status_code != 200 or len(orjson.loads(response.content)) != instances:
                raise RuntimeError(f"{peer.name}: metadata {response.status_code}")
    return Measure(statistics.median(times))


async def measure_qido(peer: Peer, studies: int, requests: int, seed: int) -> tuple[float, float]:
    """p50 and p95 (ms) of study searches by Patient ID, each matching two studies."""
    rng = random.Random(seed)
    times = []
    async with _client(peer, 1) as client:
        for n in range(requests + 10):  # the first 10 warm up the connection
            params = {"PatientID": patient_id(2 * rng.randrange(studies // 2))}
            start = time.perf_counter()
            response = await client.get(
                peer.dicomweb + "/studies", params=params, headers={"Accept": JSON_ACCEPT}
            )
            elapsed = (time.perf_counter() - start) * 1000
            if response.status_code != 200 or len(orjson.loads(response.content)) != 2:
                raise RuntimeError(f"{peer.name}: QIDO-RS {response.status_code} {params}")
            if n >= 10:
                times.append(elapsed)
    cuts = statistics.quantiles(times, n=20)
    return statistics.median(times), cuts[18]


def _alternating(peers: Sequence[Peer], round_: int) -> list[Peer]:
    """Who goes first alternates between rounds, so neither always meets a warmer machine."""
    return list(peers) if round_ % 2 == 0 else list(reversed(peers))


async def _load(peers: Sequence[Peer], batches: Sequence[Batch], what: str) -> None:
    count, size_mb = _instances_mb(batches)
    for peer in peers:
        async with _client(peer, 4) as client:
            took = await post_all(client, peer.dicomweb + "/studies", batches, 4, True)
        print(f"  {peer.name}: loaded {what}: {count} instances, {size_mb:.0f} MB in {took:.1f} s")


async def compare(
    peers: Sequence[Peer], templates: Templates, sizes: Sizes, results: Results
) -> None:
    """Every measure for every peer, alternating, ``sizes.rounds`` rounds each."""
    print(f"QIDO-RS: {sizes.search_studies} studies", flush=True)
    await _load(peers, search_batches(templates, sizes.search_studies, 50), "search studies")
    for r in range(sizes.rounds):
        for peer in _alternating(peers, r):
            p50, p95 = await measure_qido(peer, sizes.search_studies, sizes.search_requests, r)
            results.add("qido_p50", peer.name, Measure(p50))
            results.add("qido_p95", peer.name, Measure(p95))

    print(f"WADO-RS and metadata: one study of {sizes.study_instances} CT slices", flush=True)
    study = ct_study_batches(templates, sizes.study_instances, 50)
    refs = [ref for batch in study for ref in batch.instances]
    await _load(peers, study, "the study")
    for peer in peers:  # once untimed: the first read of files just written
        await measure_wado_study(peer, refs)
    for r in range(sizes.rounds):
        for peer in _alternating(peers, r):
            metadata = await measure_metadata(
                peer, refs[0].study, len(refs), sizes.metadata_requests
            )
            results.add("metadata_study", peer.name, metadata)
            results.add("wado_study", peer.name, await measure_wado_study(peer, refs))
            results.add(
                "wado_instances_8_clients", peer.name, await measure_wado_instances(peer, refs, 8)
            )

    print(
        f"STOW-RS: {sizes.stow_instances} instances in requests of {sizes.stow_per_request}",
        flush=True,
    )
    for r in range(sizes.rounds):
        for concurrency in (1, 8):
            # Fresh UIDs each run; the same objects go to both servers (separate stores).
            batches = ingest_batches(templates, sizes.stow_instances, sizes.stow_per_request)
            for peer in _alternating(peers, r):
                name = "stow_1_client" if concurrency == 1 else "stow_8_clients"
                results.add(name, peer.name, await measure_stow(peer, batches, concurrency))


async def machine_limits(templates: Templates, sizes: Sizes, work: Path, results: Results) -> None:
    """AES-256-GCM, sequential write and loopback HTTP, with the servers stopped."""
    print("machine limits", flush=True)
    results.limits["aes_256_gcm"] = aes_gcm_mb_s(sizes.aes_mib)
    results.limits["sequential_write"] = sequential_write_mb_s(work, sizes.write_mib)
    batches = ingest_batches(templates, sizes.stow_instances, sizes.stow_per_request)
    _, size_mb = _instances_mb(batches)
    # As many bytes as the study retrieved whole.
    study_bytes = ct_study_batches(templates, 1, 1)[0].instances[0].size * sizes.study_instances
    uploads, raw_uploads, downloads = [], [], []
    with TrivialHttpServer() as trivial:
        async with _client(None, 8) as client:
            for _ in range(sizes.rounds):
                uploads.append(size_mb / await post_all(client, trivial.url, batches, 8, False))
                raw_uploads.append(raw_upload_mb_s(trivial.port, study_bytes))
                start = time.perf_counter()
                path = f"/bytes/{study_bytes}"
                received = await asyncio.to_thread(_fetch_all, trivial.url, {}, [path], 1)
                downloads.append(received / MB / (time.perf_counter() - start))
    results.limits["loopback_upload"] = statistics.median(uploads)
    results.limits["loopback_upload_raw"] = statistics.median(raw_uploads)
    results.limits["loopback_download"] = statistics.median(downloads)


async def run(args: argparse.Namespace) -> int:
    sizes = SMOKE if args.smoke else Sizes(rounds=args.rounds or Sizes.rounds)
    started = time.perf_counter()
    plugin = ensure_orthanc() if args.with_orthanc or not args.smoke else None
    templates = load_templates()
    print(f"data: {templates.source}, and pydicom's CT_small.dcm")
    work = Path(tempfile.mkdtemp(prefix="iex-compare-", dir=args.workdir))
    peers: list[Peer] = []
    results = Results(smoke=args.smoke, data=templates.source, rounds=sizes.rounds)
    results.iex_workers = args.iex_workers
    results.sizes = (
        f"STOW-RS: {sizes.stow_instances} instances (half CT, half MR) in requests of "
        f"{sizes.stow_per_request}, one study per request. WADO-RS and metadata: one study of "
        f"{sizes.study_instances} CT slices. QIDO-RS: {sizes.search_requests} searches per "
        f"round by PatientID (2 studies each) with {sizes.search_studies:,} one-instance "
        "studies stored."
    )
    try:
        try:
            peers.append(start_iex(work, args.iex_workers))
            if plugin is not None:
                peers.append(start_orthanc(work, plugin))
            for peer in peers:
                print(f"{peer.name} {peer.version} at {peer.dicomweb}")
                results.versions[peer.name] = peer.version
            await compare(peers, templates, sizes, results)
        except Exception:
            for peer in peers:
                print(f"--- {peer.name} log (tail)\n{peer.log_tail()}", file=sys.stderr)
            raise
        finally:
            for peer in peers:
                peer.stop()
        await machine_limits(templates, sizes, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.seconds = time.perf_counter() - started
    print_report(results)
    if not args.smoke and not args.no_docs:
        path = write_docs(results, Path(__file__).resolve().parent.parent / "docs/BENCHMARKS.md")
        print(f"\nwrote {path}")
    return 0


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """On uvloop, the loop iex runs on, when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, iex only (CI)")
    parser.add_argument(
        "--with-orthanc", action="store_true", help="with --smoke: Orthanc too (a quick check)"
    )
    parser.add_argument("--rounds", type=int, help="alternating rounds per measure (5)")
    parser.add_argument("--workdir", type=Path, help="where the servers store (a temp dir)")
    parser.add_argument("--no-docs", action="store_true", help="do not edit docs/BENCHMARKS.md")
    parser.add_argument(
        "--iex-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="iex serve --workers: processes serving iex (default: this machine's cores, as "
        "Orthanc's threads use them all)",
    )
    args = parser.parse_args(argv)
    return _run_loop(run(args))


if __name__ == "__main__":
    sys.exit(main())
