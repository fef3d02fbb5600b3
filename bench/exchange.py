"""Pushing studies from one gateway to another: throughput and memory, beside Orthanc, and
over a slow link, in one run.

Two ``iex serve`` gateways (``gw-a`` sends, ``gw-b`` receives; one process each) start on
127.0.0.1 with empty data directories and are paired with the ``iex`` commands
(``bench/gateways.py``). Every study is copies of a real CT slice with fresh UIDs
(pydicom-data's ``693_UNCR.dcm``: 512x512, 16 bits, uncompressed, 0.5 MB an instance, whose
pixels compress as a CT's do; ``bench/dataset.py``). Measured:

1. **Push over loopback.** A 1 GiB study (about 2,000 instances) is stored into gw-a by a
   tus upload and its ingest, timed with ``bench/upload.py``'s functions: the single-gateway
   upload benchmark, on the same study in the same run. It is then pushed to gw-b
   (``POST /transfers``), timed until ``GET /transfers/{id}`` says ``delivered``: packaged,
   compressed, sealed, sent as parallel partial uploads, stored by gw-b, its receipt
   verified. MB/s of the study's instances each way, and push/upload. Each gateway's peak
   RSS in each phase (sampled every 50 ms, and the kernel's high-water mark, reset between
   phases) against a 200 MB budget.
2. **Beside Orthanc.** Two Orthancs from Debian's packages (``bench/peers.py``), each the
   other's peer (``OrthancPeers``), get the same study by STOW-RS into the first, which sends
   it with ``POST /peers/{peer}/store`` as an asynchronous job, timed until the job says
   ``Success`` (the peer has then stored every instance): the whole transfer, as its
   ``/jobs`` API reports it. Then 200 studies of 5 MB (10 instances each) go into both
   senders by STOW-RS and are all pushed at once: iex with 200 ``POST /transfers`` (each
   gateway runs ``IEX_TRANSFER_PARTNER_CONCURRENCY``, 2, at a time), Orthanc with 200
   asynchronous store jobs (its jobs engine runs ``ConcurrentJobs``, 2, at a time); timed
   until every one is delivered, or ``Success``. Both are polled every 0.2 s. Ratios
   iex/Orthanc of the rates, above 1 when iex is faster.
3. **Over a slow link.** gw-a's partner URL is pointed (``iex partner add --identity``) at a
   proxy in front of gw-b (``bench/slowlink.py``: 100 Mbit/s each way, 30 ms added each way)
   and a 256 MiB study (smaller than the first, so the run stays in minutes) is pushed
   through it. The link's rate (and what a raw socket gets through the same proxy); the
   bytes on the wire towards gw-b per second while they flowed, counted at the proxy; the
   study's bytes delivered per second from the POST to ``delivered``; wire/link, and
   study/link (above 1 only thanks to the compression).

    .venv/bin/python bench/exchange.py              # the full run (minutes; Orthanc, root)
    .venv/bin/python bench/exchange.py --smoke      # tiny sizes, iex only (CI)
    .venv/bin/python bench/exchange.py --size-mb 64 --studies 10 --slow-mb 16 --no-orthanc

Prints ``ratio NAME = X`` lines, then the figures. Exits 1 when a gateway's peak RSS
reaches the budget or a transfer, upload or store fails; the targets (push-study
iex/orthanc >= 1.5, push-studies iex/orthanc >= 1, wire/link >= 0.9, study/link > 1) are
reported, not enforced. MB is 10^6 bytes. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset import STOW_CONTENT_TYPE, Reidentifier, load_templates, multipart  # noqa: E402
from gateways import TRUST, Gateway, Peak, PeakRss, introduce, pair, start  # noqa: E402
from limits import TrivialHttpServer, raw_upload_mb_s  # noqa: E402
from peers import Peer, ensure_orthanc, free_port, start_orthanc  # noqa: E402
from slowlink import BIN, SlowLink, busy_rate  # noqa: E402
from upload import upload, wait_for_ingest  # noqa: E402

MiB = 1024 * 1024
MB = 1_000_000
#: Seconds between two looks at a transfer (iex) or a job (Orthanc).
POLL = 0.2
#: How long one transfer or one batch of them may take before the run gives up.
TIMEOUT = 3600.0
#: Instances per STOW-RS request when the large study is loaded into Orthanc.
STOW_BATCH = 40
T = TypeVar("T")


class Failed(Exception):
    """A step failed; the benchmark says why and exits 1."""


@dataclass(frozen=True)
class Sizes:
    """How much of everything; the defaults are the full run."""

    study_mib: int = 1024
    studies: int = 200
    study_mb: float = 5.0
    slow_mib: int = 256
    link_mbit: float = 100.0
    delay_ms: float = 30.0
    #: Seconds of the link's rate sent through the proxy by a raw socket, to check it.
    raw_link_s: float = 2.0


SMOKE = Sizes(study_mib=8, studies=2, study_mb=1.0, slow_mib=4, raw_link_s=0.3)


@dataclass(frozen=True)
class Study:
    """One study as written for the run: a zip (to upload) or a STOW-RS body."""

    uid: str
    path: Path
    instances: int
    #: Bytes of its Part 10 instances: what every MB/s here counts.
    size: int


# -- the data ----------------------------------------------------------------------------------


def write_zip(path: Path, size_bytes: int, ct: Reidentifier, patient: str) -> Study:
    """A stored zip of one study of CT slices, just under ``size_bytes`` (one slice short,
    as ``bench/upload.py`` stops: 1 GiB is also the gateway's default maximum upload)."""
    study, series = generate_uid(), generate_uid()
    count = size = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        while count == 0 or path.stat().st_size + 2 * size / count < size_bytes:
            if count and count % 500 == 0:
                series = generate_uid()
            data = ct.copy(
                study_uid=study,
                series_uid=series,
                patient_id=patient,
                patient_name=f"Exchange^{patient}",
                instance_number=count + 1,
            )
            z.writestr(f"DICOM/SE{count // 500:03d}/IM{count:05d}", data)
            count += 1
            size += len(data)
    return Study(study, path, count, size)


def write_body(path: Path, instances: int, ct: Reidentifier, patient: str) -> Study:
    """A STOW-RS body of one study of ``instances`` CT slices."""
    study, series = generate_uid(), generate_uid()
    parts = [
        ct.copy(
            study_uid=study,
            series_uid=series,
            patient_id=patient,
            patient_name=f"Exchange^{patient}",
            instance_number=n + 1,
        )
        for n in range(instances)
    ]
    path.write_bytes(multipart(parts))
    return Study(study, path, instances, sum(len(p) for p in parts))


# -- HTTP --------------------------------------------------------------------------------------


def post_each(
    url: str,
    headers: dict[str, str],
    items: Sequence[T],
    body: Callable[[T], tuple[bytes, str]],
    concurrency: int,
) -> list[httpx.Response]:
    """POST one request per item (``body`` gives its content and type), ``concurrency`` at
    a time; the answers in the items' order."""

    async def run() -> list[httpx.Response]:
        answers: list[httpx.Response | None] = [None] * len(items)
        pending = iter(enumerate(items))
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:

            async def worker() -> None:
                for n, item in pending:
                    content, content_type = body(item)
                    answers[n] = await client.post(
                        url, content=content, headers={"Content-Type": content_type}
                    )

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return [a for a in answers if a is not None]

    return asyncio.run(run())


def check_stow(response: httpx.Response, expected: int, where: str) -> None:
    if response.status_code != 200:
        raise Failed(f"{where}: STOW-RS answered {response.status_code}: {response.text[:300]}")
    stored = orjson.loads(response.content).get("00081199", {}).get("Value", [])
    if len(stored) != expected:
        raise Failed(f"{where}: STOW-RS stored {len(stored)} of {expected} instances")


def stow_studies(dicomweb: str, headers: dict[str, str], studies: Sequence[Study]) -> float:
    """STOW-RS every study's body, 4 at a time; the seconds it took."""
    start_at = time.perf_counter()
    answers = post_each(
        dicomweb + "/studies",
        headers,
        studies,
        lambda s: (s.path.read_bytes(), STOW_CONTENT_TYPE),
        4,
    )
    for study, answer in zip(studies, answers, strict=True):
        check_stow(answer, study.instances, dicomweb)
    return time.perf_counter() - start_at


def stow_zip(dicomweb: str, headers: dict[str, str], study: Study) -> float:
    """STOW-RS the zip's instances in requests of ``STOW_BATCH``, 4 at a time, each read
    from the zip as it is sent; the seconds it took."""
    start_at = time.perf_counter()
    with zipfile.ZipFile(study.path) as z:
        names = z.namelist()
        batches = [names[n : n + STOW_BATCH] for n in range(0, len(names), STOW_BATCH)]
        answers = post_each(
            dicomweb + "/studies",
            headers,
            batches,
            lambda batch: (multipart([z.read(name) for name in batch]), STOW_CONTENT_TYPE),
            4,
        )
    for batch, answer in zip(batches, answers, strict=True):
        check_stow(answer, len(batch), dicomweb)
    return time.perf_counter() - start_at


# -- iex ---------------------------------------------------------------------------------------


def receipt_instances(view: dict[str, Any]) -> int | None:
    """The instances the receipt says were stored, when it is an iex receipt."""
    document = view.get("receipt")
    if isinstance(document, dict) and isinstance(document.get("receipt"), str):
        instances = json.loads(document["receipt"]).get("instances")
        return instances if isinstance(instances, int) else None
    return None


def push(client: httpx.Client, receiver: Gateway, study: str) -> str:
    """``POST /transfers`` of ``study`` to the receiver's trust; the transfer's id."""
    asked = {"study": study, "partner": receiver.name, "partner_trust": TRUST}
    response = client.post("/transfers", json=asked)
    if response.status_code != 202:
        raise Failed(f"POST /transfers answered {response.status_code}: {response.text[:300]}")
    transfer: str = response.json()["id"]
    return transfer


def _check_final(view: dict[str, Any], study: Study) -> None:
    if view["state"] != "delivered":
        raise Failed(f"transfer {view['id']} ended {view['state']}: {view['last_error']}")
    stored = receipt_instances(view)
    if stored is not None and stored != study.instances:
        raise Failed(f"transfer {view['id']}: the receipt says {stored} of {study.instances}")


def wait_delivered(
    client: httpx.Client, transfer: str, study: Study
) -> tuple[dict[str, Any], dict[str, float]]:
    """Poll the transfer until it is final; its last view, and when (``perf_counter``)
    each state was first seen. A failure or cancellation is ``Failed``."""
    seen: dict[str, float] = {}
    last_error = None
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        response = client.get(f"/transfers/{transfer}")
        if response.status_code != 200:
            raise Failed(f"GET /transfers/{transfer} answered {response.status_code}")
        view: dict[str, Any] = response.json()
        seen.setdefault(view["state"], time.perf_counter())
        if view["state"] in ("delivered", "failed", "cancelled"):
            _check_final(view, study)
            return view, seen
        if view["last_error"] and view["last_error"] != last_error:
            last_error = view["last_error"]
            print(f"  retrying ({view['state']}): {last_error}", flush=True)
        time.sleep(POLL)
    raise Failed(f"transfer {transfer} was not delivered within {TIMEOUT:.0f} s")


def wait_all_delivered(client: httpx.Client, transfers: dict[str, Study]) -> None:
    """Poll the listing of outbound transfers until every one of ``transfers`` is final."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        response = client.get("/transfers", params={"direction": "out", "limit": 1000})
        if response.status_code != 200:
            raise Failed(f"GET /transfers answered {response.status_code}: {response.text}")
        views = [v for v in response.json()["transfers"] if v["id"] in transfers]
        final = [v for v in views if v["state"] in ("delivered", "failed", "cancelled")]
        for view in final:
            _check_final(view, transfers[view["id"]])
        if len(final) == len(transfers):
            return
        time.sleep(POLL)
    raise Failed(f"{len(transfers)} transfers were not all delivered within {TIMEOUT:.0f} s")


def upload_into(gateway: Gateway, study: Study) -> tuple[float, float]:
    """Upload the study's zip into the gateway over tus and wait for its ingest
    (``bench/upload.py``); seconds to the last byte, and to the ingest's end."""
    start_at = time.perf_counter()
    location = upload(gateway.url, gateway.token, study.path, 64 * MiB)
    uploaded = time.perf_counter()
    report = wait_for_ingest(location, gateway.token)
    if report["state"] != "complete":
        raise Failed(f"{gateway.name}: the upload's ingest ended {report['state']}: {report}")
    return uploaded - start_at, time.perf_counter() - start_at


@dataclass
class Phase:
    """A phase's peak RSS at the sender and at the receiver."""

    sender: Peak
    receiver: Peak | None


@dataclass
class IexFigures:
    upload_s: float = 0.0
    upload_ingest_s: float = 0.0
    push_s: float = 0.0
    push_steps: dict[str, float] = field(default_factory=dict)
    bundle_bytes: int = 0
    many_s: float = 0.0
    many_stow_s: float = 0.0
    phases: dict[str, Phase] = field(default_factory=dict)
    hwm_since_start: bool = False


@dataclass
class SlowFigures:
    rate: float  # bytes/s each way, as configured
    delay: float
    raw_mb_s: float
    push_s: float
    wire_bytes: int  # towards the receiver while the link carried the bundle
    wire_s: float
    wire_total: int  # towards the receiver during the whole push
    back_total: int  # from the receiver
    bundle_bytes: int
    steps: dict[str, float]


def _steps(seen: dict[str, float], started: float, ended: float) -> dict[str, float]:
    """Seconds spent in each state, as polling saw them."""
    marks = sorted(seen.items(), key=lambda item: item[1])
    out: dict[str, float] = {}
    for n, (state, at) in enumerate(marks):
        if state in ("delivered", "failed", "cancelled"):
            continue
        until = marks[n + 1][1] if n + 1 < len(marks) else ended
        out[state] = until - (started if n == 0 else at)
    return out


def run_iex(
    work: Path, big: Study, many: Sequence[Study], slow: Study | None, sizes: Sizes
) -> tuple[IexFigures, SlowFigures | None]:
    sender, receiver = Gateway(work, "gw-a"), Gateway(work, "gw-b")
    figures = IexFigures()
    memory: list[PeakRss] = []
    try:
        started = time.perf_counter()
        start(sender, receiver)
        pair(sender, receiver, work)
        took = time.perf_counter() - started
        print(
            f"gateways {sender.name} and {receiver.name} started and paired in {took:.1f} s",
            flush=True,
        )
        mem_s, mem_r = PeakRss(sender.pid), PeakRss(receiver.pid)
        memory += [mem_s, mem_r]

        def phase(name: str, receiver_too: bool = True) -> None:
            figures.phases[name] = Phase(mem_s.peak(), mem_r.peak() if receiver_too else None)
            mem_s.reset()
            mem_r.reset()

        mem_s.reset()
        figures.upload_s, figures.upload_ingest_s = upload_into(sender, big)
        phase("upload into gw-a", receiver_too=False)
        print(f"uploaded into gw-a: {big.size / MB / figures.upload_ingest_s:.0f} MB/s", flush=True)

        with httpx.Client(base_url=sender.url, headers=sender.headers, timeout=60) as client:
            started = time.perf_counter()
            view, seen = wait_delivered(client, push(client, receiver, big.uid), big)
            ended = time.perf_counter()
            figures.push_s = ended - started
            figures.push_steps = _steps(seen, started, ended)
            figures.bundle_bytes = view["bytes_total"] or 0
            phase("push of the study")
            print(f"pushed to gw-b: {big.size / MB / figures.push_s:.0f} MB/s", flush=True)

            figures.many_stow_s = stow_studies(sender.url + "/dicomweb", sender.headers, many)
            mem_s.reset()
            mem_r.reset()
            started = time.perf_counter()
            ids = post_each(
                sender.url + "/transfers",
                sender.headers,
                many,
                lambda s: (
                    json.dumps(
                        {"study": s.uid, "partner": receiver.name, "partner_trust": TRUST}
                    ).encode(),
                    "application/json",
                ),
                8,
            )
            transfers = {}
            for study, answer in zip(many, ids, strict=True):
                if answer.status_code != 202:
                    raise Failed(f"POST /transfers answered {answer.status_code}: {answer.text}")
                transfers[answer.json()["id"]] = study
            wait_all_delivered(client, transfers)
            figures.many_s = time.perf_counter() - started
            phase(f"push of {len(many)} studies")
            print(f"pushed {len(many)} studies: {len(many) / figures.many_s:.1f}/s", flush=True)

            slow_figures = None
            if slow is not None:
                slow_figures = run_slow_link(client, sender, receiver, slow, sizes, work)
                phase("upload, then push over the slow link")
        figures.hwm_since_start = mem_s.hwm_since_start or mem_r.hwm_since_start
        return figures, slow_figures
    except Exception:
        for gateway in (sender, receiver):
            print(f"--- {gateway.name} log (tail)\n{gateway.log_tail()}", file=sys.stderr)
        raise
    finally:
        for rss in memory:
            rss.stop()
        sender.stop()
        receiver.stop()


def run_slow_link(
    client: httpx.Client, sender: Gateway, receiver: Gateway, study: Study, sizes: Sizes, work: Path
) -> SlowFigures:
    rate = sizes.link_mbit * 1e6 / 8
    delay = sizes.delay_ms / 1000
    with TrivialHttpServer() as sink, SlowLink(sink.port, rate, delay) as raw:
        raw_mb_s = raw_upload_mb_s(raw.port, int(rate * sizes.raw_link_s))
    with SlowLink(receiver.port, rate, delay) as link:
        introduce(sender, receiver, link.url, work)  # its partner URL is now the link's
        upload_into(sender, study)
        up_before, _, down_before, _ = link.counts()
        since = time.monotonic()
        started = time.perf_counter()
        view, seen = wait_delivered(client, push(client, receiver, study.uid), study)
        ended = time.perf_counter()
        up_total, up_bins, down_total, _ = link.counts()
    # A bin counts as carrying the bundle when it holds a tenth of what the link can carry.
    wire_bytes, wire_s = busy_rate(up_bins, since, int(rate * BIN / 10))
    print(f"pushed over the slow link: {study.size / MB / (ended - started):.1f} MB/s", flush=True)
    return SlowFigures(
        rate=rate,
        delay=delay,
        raw_mb_s=raw_mb_s,
        push_s=ended - started,
        wire_bytes=wire_bytes,
        wire_s=wire_s,
        wire_total=up_total - up_before,
        back_total=down_total - down_before,
        bundle_bytes=view["bytes_total"] or 0,
        steps=_steps(seen, started, ended),
    )


# -- Orthanc -----------------------------------------------------------------------------------


@dataclass
class OrthancFigures:
    version: str = ""
    load_s: float = 0.0
    push_s: float = 0.0
    many_s: float = 0.0
    peaks: dict[str, Peak] = field(default_factory=dict)


def orthanc_study_id(peer: Peer, study_uid: str) -> str:
    response = httpx.post(peer.url + "/tools/lookup", content=study_uid, timeout=60)
    found = [str(r["ID"]) for r in response.json() if r.get("Type") == "Study"]
    if response.status_code != 200 or len(found) != 1:
        raise Failed(f"Orthanc does not find study {study_uid}: {response.text[:300]}")
    return found[0]


def orthanc_store_jobs(sender: Peer, peer: str, ids: Sequence[str]) -> list[str]:
    """One asynchronous ``POST /peers/{peer}/store`` per study; the jobs' ids."""
    answers = post_each(
        f"{sender.url}/peers/{peer}/store",
        {},
        ids,
        lambda i: (orjson.dumps({"Resources": [i], "Asynchronous": True}), "application/json"),
        8,
    )
    jobs = []
    for answer in answers:
        if answer.status_code != 200:
            raise Failed(f"Orthanc's peer store answered {answer.status_code}: {answer.text}")
        jobs.append(answer.json()["ID"])
    return jobs


def wait_jobs(sender: Peer, jobs: Sequence[str]) -> None:
    """Poll Orthanc's jobs until every one of ``jobs`` succeeded (``Failed`` if one failed)."""
    wanted = set(jobs)
    deadline = time.monotonic() + TIMEOUT
    with httpx.Client(base_url=sender.url, timeout=60) as client:
        while time.monotonic() < deadline:
            states = {
                job["ID"]: job
                for job in client.get("/jobs", params={"expand": ""}).json()
                if job["ID"] in wanted
            }
            failed = [j for j in states.values() if j["State"] == "Failure"]
            if failed:
                raise Failed(f"Orthanc's job failed: {failed[0].get('ErrorDescription')}")
            done = sum(1 for j in states.values() if j["State"] == "Success")
            if done == len(wanted):
                return
            time.sleep(POLL)
    raise Failed(f"Orthanc's {len(wanted)} store jobs did not all succeed in {TIMEOUT:.0f} s")


def orthanc_instances(peer: Peer) -> int:
    count: int = httpx.get(peer.url + "/statistics", timeout=60).json()["CountInstances"]
    return count


def run_orthanc(work: Path, plugin: Path, big: Study, many: Sequence[Study]) -> OrthancFigures:
    figures = OrthancFigures()
    port_a, port_b = free_port(), free_port()
    peers: list[Peer] = []
    memory: list[PeakRss] = []
    try:
        for folder in ("orthanc-a", "orthanc-b"):
            (work / folder).mkdir()
        receiver = start_orthanc(
            work / "orthanc-b",
            plugin,
            name="orthanc-b",
            orthanc_peers={"a": f"http://127.0.0.1:{port_a}"},
            port=port_b,
        )
        peers.append(receiver)
        sender = start_orthanc(
            work / "orthanc-a",
            plugin,
            name="orthanc-a",
            orthanc_peers={"b": receiver.url},
            port=port_a,
        )
        peers.append(sender)
        figures.version = sender.version
        print(f"orthanc {sender.version}: two servers, each the other's peer", flush=True)

        memory += [PeakRss(sender.process.pid), PeakRss(receiver.process.pid)]

        figures.load_s = stow_zip(sender.dicomweb, {}, big)
        for rss in memory:
            rss.reset()
        started = time.perf_counter()
        wait_jobs(sender, orthanc_store_jobs(sender, "b", [orthanc_study_id(sender, big.uid)]))
        figures.push_s = time.perf_counter() - started
        if orthanc_instances(receiver) != big.instances:
            raise Failed(f"Orthanc's peer holds {orthanc_instances(receiver)} of {big.instances}")
        print(f"orthanc sent the study: {big.size / MB / figures.push_s:.0f} MB/s", flush=True)

        stow_studies(sender.dicomweb, {}, many)
        ids = [orthanc_study_id(sender, study.uid) for study in many]
        started = time.perf_counter()
        wait_jobs(sender, orthanc_store_jobs(sender, "b", ids))
        figures.many_s = time.perf_counter() - started
        expected = big.instances + sum(study.instances for study in many)
        if orthanc_instances(receiver) != expected:
            raise Failed(f"Orthanc's peer holds {orthanc_instances(receiver)} of {expected}")
        print(f"orthanc sent {len(many)} studies: {len(many) / figures.many_s:.1f}/s", flush=True)
        figures.peaks = {"sender": memory[0].peak(), "receiver": memory[1].peak()}
        return figures
    except Exception:
        for peer in peers:
            print(f"--- {peer.name} log (tail)\n{peer.log_tail()}", file=sys.stderr)
        raise
    finally:
        for rss in memory:
            rss.stop()
        for peer in peers:
            peer.stop()


# -- the report --------------------------------------------------------------------------------


def _mb_s(size: int, seconds: float) -> float:
    return size / MB / seconds


def _peak_text(peak: Peak) -> str:
    return f"{peak.kb / 1024:.0f} ({peak.sampled_kb / 1024:.0f}: {peak.sampled_file_kb / 1024:.0f})"


def _steps_text(steps: dict[str, float]) -> str:
    return ", ".join(f"{state} {seconds:.1f} s" for state, seconds in steps.items())


def report(
    big: Study,
    many: Sequence[Study],
    iex: IexFigures,
    slow: SlowFigures | None,
    slow_study: Study | None,
    orthanc: OrthancFigures | None,
    budget_mb: int,
) -> bool:
    """Print the ratios, then the figures; whether every peak kept within the budget."""
    many_size = sum(study.size for study in many)
    push = _mb_s(big.size, iex.push_s)
    upload_ingest = _mb_s(big.size, iex.upload_ingest_s)
    peak_sender = max(p.sender.kb for p in iex.phases.values())
    peak_receiver = max(p.receiver.kb for p in iex.phases.values() if p.receiver)
    targets: list[tuple[str, float, str, bool]] = []
    print()
    print(f"ratio push/upload+ingest = {push / upload_ingest:.2f}")
    print(f"ratio peak-rss-sender/budget = {peak_sender / 1024 / budget_mb:.2f}")
    print(f"ratio peak-rss-receiver/budget = {peak_receiver / 1024 / budget_mb:.2f}")
    if orthanc is not None:
        study_ratio = orthanc.push_s / iex.push_s
        many_ratio = orthanc.many_s / iex.many_s
        print(f"ratio push-study iex/orthanc = {study_ratio:.2f}")
        print(f"ratio push-studies iex/orthanc = {many_ratio:.2f}")
        targets += [
            ("push-study iex/orthanc", study_ratio, ">= 1.5", study_ratio >= 1.5),
            ("push-studies iex/orthanc", many_ratio, ">= 1", many_ratio >= 1),
        ]
    if slow is not None and slow_study is not None:
        wire = slow.wire_bytes / slow.wire_s if slow.wire_s else 0.0
        delivered = slow_study.size / slow.push_s
        print(f"ratio slow-link wire/link = {wire / slow.rate:.2f}")
        print(f"ratio slow-link study/link = {delivered / slow.rate:.2f}")
        targets += [
            ("slow-link wire/link", wire / slow.rate, ">= 0.9", wire / slow.rate >= 0.9),
            ("slow-link study/link", delivered / slow.rate, "> 1", delivered / slow.rate > 1),
        ]
    for name, value, target, met in targets:
        print(f"target {name} {target}: {value:.2f}, {'met' if met else 'NOT MET'}")

    print(
        f"\nstudy: {big.instances} CT instances, {big.size / MB:.0f} MB "
        f"(a {big.path.stat().st_size / MiB:.0f} MiB zip)"
    )
    print(
        f"  upload into gw-a (tus, 64 MiB chunks): {_mb_s(big.size, iex.upload_s):.0f} MB/s "
        f"({iex.upload_s:.1f} s); with its ingest: {upload_ingest:.0f} MB/s "
        f"({iex.upload_ingest_s:.1f} s)"
    )
    print(
        f"  iex push gw-a -> gw-b, POST to delivered: {push:.0f} MB/s ({iex.push_s:.1f} s: "
        f"{_steps_text(iex.push_steps)}); bundle {iex.bundle_bytes / MB:.0f} MB "
        f"({big.size / max(iex.bundle_bytes, 1):.2f}x smaller)"
    )
    if orthanc is not None:
        print(
            f"  orthanc peer store, job queued to Success: {_mb_s(big.size, orthanc.push_s):.0f}"
            f" MB/s ({orthanc.push_s:.1f} s); loaded by STOW-RS in {orthanc.load_s:.1f} s"
        )
    print(
        f"{len(many)} studies of {many_size / len(many) / MB:.1f} MB "
        f"({many[0].instances} instances each), all pushed at once:"
    )
    print(
        f"  iex: {iex.many_s:.1f} s ({len(many) / iex.many_s:.1f} studies/s, "
        f"{_mb_s(many_size, iex.many_s):.0f} MB/s); loaded by STOW-RS in {iex.many_stow_s:.1f} s"
    )
    if orthanc is not None:
        print(
            f"  orthanc: {orthanc.many_s:.1f} s ({len(many) / orthanc.many_s:.1f} studies/s, "
            f"{_mb_s(many_size, orthanc.many_s):.0f} MB/s)"
        )
    if slow is not None and slow_study is not None:
        wire = slow.wire_bytes / slow.wire_s if slow.wire_s else 0.0
        print(
            f"slow link: {slow.rate * 8 / 1e6:.0f} Mbit/s ({slow.rate / MB:.2f} MB/s) each way, "
            f"{slow.delay * 1000:.0f} ms each way; a raw socket gets {slow.raw_mb_s:.2f} MB/s "
            "through it"
        )
        print(
            f"  study: {slow_study.instances} instances, {slow_study.size / MB:.0f} MB; bundle "
            f"{slow.bundle_bytes / MB:.0f} MB; on the wire towards gw-b "
            f"{slow.wire_total / MB:.0f} MB, back {slow.back_total / MB:.1f} MB"
        )
        print(
            f"  wire while the bundle flowed: {wire / MB:.2f} MB/s over {slow.wire_s:.1f} s; "
            f"study delivered: {slow_study.size / MB / slow.push_s:.2f} MB/s "
            f"({slow.push_s:.1f} s: {_steps_text(slow.steps)})"
        )
    since = " (high-water marks since each process started)" if iex.hwm_since_start else ""
    print(
        f"peak RSS, MB, the larger of the samples (every 50 ms) and VmHWM{since}; in brackets "
        f"the sampled peak and the file pages mapped in it; budget {budget_mb} MB:"
    )
    for name, phase in iex.phases.items():
        receiver = f", gw-b {_peak_text(phase.receiver)}" if phase.receiver else ""
        print(f"  {name}: gw-a {_peak_text(phase.sender)}{receiver}")
    if orthanc is not None:
        print(
            f"  orthanc (no budget), both pushes: sender {_peak_text(orthanc.peaks['sender'])}, "
            f"receiver {_peak_text(orthanc.peaks['receiver'])}"
        )
    within = max(peak_sender, peak_receiver) / 1024 < budget_mb
    if not within:
        print("FAIL: a gateway's peak RSS reached the budget")
    return within


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, iex only (CI)")
    parser.add_argument("--size-mb", type=int, help="MiB of the study pushed over loopback (1024)")
    parser.add_argument("--studies", type=int, help="small studies pushed at once (200)")
    parser.add_argument("--study-mb", type=float, help="MB of each small study (5)")
    parser.add_argument(
        "--slow-mb", type=int, help="MiB of the study sent over the slow link (256)"
    )
    parser.add_argument("--link-mbit", type=float, help="the slow link's rate each way (100)")
    parser.add_argument("--delay-ms", type=float, help="the slow link's delay each way (30)")
    parser.add_argument("--no-orthanc", action="store_true", help="iex only")
    parser.add_argument("--no-slow-link", action="store_true", help="skip the slow link")
    parser.add_argument("--budget-mb", type=int, default=200, help="peak RSS budget (200)")
    parser.add_argument("--workdir", type=Path, help="where the data and servers go (a temp dir)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    overrides = {
        "study_mib": args.size_mb,
        "studies": args.studies,
        "study_mb": args.study_mb,
        "slow_mib": args.slow_mb,
        "link_mbit": args.link_mbit,
        "delay_ms": args.delay_ms,
    }
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if not 1 <= sizes.studies <= 900:
        parser.error("--studies: 1 to 900 (they are followed in one listing of 1000)")

    plugin = None if args.smoke or args.no_orthanc else ensure_orthanc()
    templates = load_templates()
    print(f"data: {templates.source}; the CT slice only, re-identified per copy")
    ct = Reidentifier(templates.ct)
    work = Path(tempfile.mkdtemp(prefix="iex-bench-exchange-", dir=args.workdir))
    try:
        started = time.perf_counter()
        big = write_zip(work / "study.zip", sizes.study_mib * MiB, ct, "EXCHANGE-1")
        per_study = max(1, round(sizes.study_mb * MB / (big.size / big.instances)))
        (work / "studies").mkdir()
        many = [
            write_body(work / "studies" / f"{n:04d}", per_study, ct, f"EXCHANGE-M{n:04d}")
            for n in range(sizes.studies)
        ]
        slow_study = None
        if not args.no_slow_link:
            slow_study = write_zip(work / "slow.zip", sizes.slow_mib * MiB, ct, "EXCHANGE-S")
        print(f"data written in {time.perf_counter() - started:.1f} s", flush=True)

        iex, slow = run_iex(work, big, many, slow_study, sizes)
        shutil.rmtree(work / "gw-a", ignore_errors=True)  # room for Orthanc's copies
        shutil.rmtree(work / "gw-b", ignore_errors=True)
        orthanc = run_orthanc(work, plugin, big, many) if plugin is not None else None
        within = report(big, many, iex, slow, slow_study, orthanc, args.budget_mb)
        print(f"run: {time.perf_counter() - started:.0f} s")
        return 0 if within else 1
    except Failed as failure:
        print(f"FAIL: {failure}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
