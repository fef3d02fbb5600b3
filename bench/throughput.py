"""STOW-RS ingest and WADO-RS retrieval throughput of iex alone, with its CPU time per instance.

    python bench/throughput.py [--rounds 3] [--smoke]

The measures of ``bench/compare.py`` that the header parser and the read path decide, without
Orthanc, for comparing one tree of iex with another on the same machine. A fresh
``iex serve`` (``bench/peers.py``, encryption at rest and authentication on) gets the same
objects (``bench/dataset.py``):

* STOW-RS ingest of 200 instances (half 512x512 CT, half 1024x1024 MR) in requests of 20, with
  1 and with 8 concurrent clients (instances/s, fresh UIDs every run);
* WADO-RS retrieval of a study of 200 CT slices (``--study``) whole (MB/s), and of its
  instances one request each over 8 connections (instances/s), with the plain-socket client.

Beside each figure is the server's CPU time (user + system, ``/proc/PID/stat``) per instance:
what the gateway itself spends, which on a shared 2-core machine decides the rest. Medians of
``--rounds`` runs; MB is 10^6 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Awaitable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (  # noqa: E402
    _load,
    measure_stow,
    measure_wado_instances,
    measure_wado_study,
)
from dataset import ct_study_batches, ingest_batches, load_templates  # noqa: E402
from peers import Peer, start_iex  # noqa: E402
from report import Measure  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (``/proc/PID/stat``, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def _timed(peer: Peer, instances: int, run: Awaitable[Measure]) -> tuple[float, float]:
    """The measure's primary figure and the server's CPU ms per instance while it ran."""
    before = cpu_seconds(peer.process.pid)
    measure = await run
    return measure.primary, (cpu_seconds(peer.process.pid) - before) * 1000 / instances


def _line(label: str, unit: str, runs: list[tuple[float, float]]) -> str:
    figure = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    return f"{label}: {figure:,.1f} {unit}, server CPU {cpu:.2f} ms/instance"


async def run(stow_instances: int, per_request: int, study_instances: int, rounds: int) -> None:
    templates = load_templates()
    print(f"data: {templates.source}")
    work = Path(tempfile.mkdtemp(prefix="iex-throughput-"))
    peer = start_iex(work)
    stow: dict[int, list[tuple[float, float]]] = {1: [], 8: []}
    whole: list[tuple[float, float]] = []
    each: list[tuple[float, float]] = []
    try:
        for _ in range(rounds):
            for clients in (1, 8):
                batches = ingest_batches(templates, stow_instances, per_request)
                stow[clients].append(
                    await _timed(peer, stow_instances, measure_stow(peer, batches, clients))
                )
        study = ct_study_batches(templates, study_instances, 50)
        refs = [ref for batch in study for ref in batch.instances]
        await _load([peer], study, "the study")
        await measure_wado_study(peer, refs)  # once untimed: the first read of files just written
        for _ in range(rounds):
            whole.append(await _timed(peer, len(refs), measure_wado_study(peer, refs)))
            each.append(await _timed(peer, len(refs), measure_wado_instances(peer, refs, 8)))
    finally:
        peer.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{rounds} round(s), medians")
    print(_line("STOW-RS ingest, 1 client", "inst/s", stow[1]))
    print(_line("STOW-RS ingest, 8 clients", "inst/s", stow[8]))
    print(_line("WADO-RS whole study", "MB/s", whole))
    print(_line("WADO-RS instances, 8 clients", "inst/s", each))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per measure (3)")
    parser.add_argument("--study", type=int, default=200, help="CT slices in the study (200)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        asyncio.run(run(8, 4, 10, 1))
    else:
        asyncio.run(run(200, 20, args.study, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
