"""WADO-RS retrieval with the data directory on each file system iex is tested on.

    python bench/filesystems.py [--study 200] [--rounds 3] [--smoke]      (as root: it mounts)

For each of a loop-mounted ext4, a tmpfs and an overlayfs (upper layer on the root file
system), a fresh ``iex serve`` (``bench/peers.py``) gets one study of ``--study`` 512x512 CT
slices; it is retrieved once untimed, then ``--rounds`` times one instance per request over 8
connections (instances/s) and whole (MB/s), with the server's CPU time per instance. On ext4
an instance whose pages are cached is opened and decrypted on the event loop
(``preadv(RWF_NOWAIT)``); tmpfs and overlayfs refuse that flag, so every instance there is
opened in a worker thread. "ext4, not cached" drops the study's pages (``posix_fadvise``)
before each round: the worker-thread path on ext4, reading from the disk. Medians; MB is 10^6
bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import _load, measure_wado_instances, measure_wado_study  # noqa: E402
from dataset import InstanceRef, ct_study_batches, load_templates  # noqa: E402
from mounts import KINDS, CannotMount, drop_cached_pages, mounted  # noqa: E402
from peers import Peer, start_iex  # noqa: E402
from throughput import cpu_seconds  # noqa: E402

Runs = dict[str, list[tuple[float, float]]]


async def _instances(peer: Peer, refs: Sequence[InstanceRef]) -> tuple[float, float]:
    """Instances/s retrieving each of ``refs`` (8 connections), server CPU ms per instance."""
    before = cpu_seconds(peer.process.pid)
    measure = await measure_wado_instances(peer, refs, 8)
    return measure.primary, (cpu_seconds(peer.process.pid) - before) * 1000 / len(refs)


async def _study(peer: Peer, refs: Sequence[InstanceRef]) -> tuple[float, float]:
    """MB/s retrieving the whole study, server CPU ms per instance."""
    before = cpu_seconds(peer.process.pid)
    measure = await measure_wado_study(peer, refs)
    return measure.primary, (cpu_seconds(peer.process.pid) - before) * 1000 / len(refs)


async def measure(kind: str, study_instances: int, rounds: int) -> Runs:
    templates = load_templates()
    runs: Runs = {}
    size_mb = max(256, study_instances * 2)  # 0.5 MB a slice, and room for the indexes
    with tempfile.TemporaryDirectory(prefix=f"iex-fs-{kind}-") as base:
        with mounted(kind, Path(base), size_mb) as target:
            peer = start_iex(target)
            try:
                study = ct_study_batches(templates, study_instances, 50)
                refs = [ref for batch in study for ref in batch.instances]
                await _load([peer], study, f"the study on {kind}")
                await measure_wado_study(peer, refs)  # once untimed
                for _ in range(rounds):
                    runs.setdefault(f"{kind}: instances", []).append(await _instances(peer, refs))
                    runs.setdefault(f"{kind}: whole study", []).append(await _study(peer, refs))
                    if kind == "ext4-loop":
                        drop_cached_pages(target / "iex-data")
                        cold = await _instances(peer, refs)
                        runs.setdefault(f"{kind}, not cached: instances", []).append(cold)
            finally:
                peer.stop()
                shutil.rmtree(target / "iex-data", ignore_errors=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=int, default=200, help="CT slices in the study (200)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per measure (3)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round (CI)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("skipped: mounting the file systems needs root")
        return 0
    study, rounds = (10, 1) if args.smoke else (args.study, args.rounds)
    print(f"WADO-RS retrieval of a study of {study} CT slices, 8 connections, {rounds} round(s)")
    lines = []
    for kind in KINDS:
        try:
            measured = asyncio.run(measure(kind, study, rounds))
        except CannotMount as exc:  # a container may forbid mounting
            lines.append(f"{kind}: not measured, cannot mount here: {exc}")
            continue
        for name, runs in measured.items():
            figure = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            unit = "MB/s" if name.endswith("whole study") else "inst/s"
            lines.append(f"{name}: {figure:,.1f} {unit}, server CPU {cpu:.2f} ms/instance")
    print("\nmedians")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
