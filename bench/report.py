"""What ``bench/compare.py`` measured, as ratio lines, a table, and a docs/BENCHMARKS.md section."""

from __future__ import annotations

import os
import re
import statistics
import textwrap
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

SECTION = "## Side by side with Orthanc"


@dataclass(frozen=True)
class Measure:
    """One run's figure, and a second unit for throughputs counted both ways."""

    primary: float
    secondary: float | None = None


@dataclass(frozen=True)
class Kind:
    """How a measure reads: its label, units, and which way is better."""

    label: str
    unit: str
    secondary_unit: str | None = None
    higher_is_better: bool = True


KINDS: dict[str, Kind] = {
    "stow_1_client": Kind("STOW-RS ingest, 1 client", "inst/s", "MB/s"),
    "stow_8_clients": Kind("STOW-RS ingest, 8 clients", "inst/s", "MB/s"),
    "wado_study": Kind("WADO-RS whole study", "MB/s"),
    "wado_instances_8_clients": Kind("WADO-RS instances, 8 clients", "inst/s", "MB/s"),
    "metadata_study": Kind("study metadata", "ms", higher_is_better=False),
    "qido_p50": Kind("QIDO-RS by PatientID, p50", "ms", higher_is_better=False),
    "qido_p95": Kind("QIDO-RS by PatientID, p95", "ms", higher_is_better=False),
}

#: Each limit, and the iex figure (in MB/s) set against it.
LIMITS: dict[str, tuple[str, str]] = {
    "aes_256_gcm": ("raw AES-256-GCM encrypt, 1 core", "stow_8_clients"),
    "sequential_write": ("sequential write + fsync", "stow_8_clients"),
    "loopback_upload": ("loopback upload to a trivial sink, httpx, 8 clients", "stow_8_clients"),
    "loopback_upload_raw": ("loopback upload to a trivial sink, raw socket", "stow_8_clients"),
    "loopback_download": ("loopback download from a trivial source, raw socket", "wado_study"),
}


@dataclass
class Results:
    """Every round's figures per measure and server, the limits, and how they were made."""

    smoke: bool
    data: str
    rounds: int
    samples: dict[str, dict[str, list[Measure]]] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    sizes: str = ""
    seconds: float = 0.0
    iex_workers: int = 1

    def add(self, name: str, peer: str, measure: Measure) -> None:
        if name not in KINDS:
            raise KeyError(name)
        self.samples.setdefault(name, {}).setdefault(peer, []).append(measure)

    def median(self, name: str, peer: str) -> Measure | None:
        runs = self.samples.get(name, {}).get(peer)
        if not runs:
            return None
        seconds = [m.secondary for m in runs if m.secondary is not None]
        return Measure(
            statistics.median(m.primary for m in runs),
            statistics.median(seconds) if seconds else None,
        )

    def mb_s(self, name: str, peer: str) -> float | None:
        """A throughput in MB/s: the second unit when there is one."""
        measure = self.median(name, peer)
        if measure is None:
            return None
        return measure.secondary if measure.secondary is not None else measure.primary

    def ratio(self, name: str) -> float | None:
        """iex/orthanc, inverted for latencies: above 1 means iex is better."""
        iex, orthanc = self.median(name, "iex"), self.median(name, "orthanc")
        if iex is None or orthanc is None:
            return None
        if KINDS[name].higher_is_better:
            return iex.primary / orthanc.primary
        return orthanc.primary / iex.primary


def _figure(measure: Measure | None, kind: Kind) -> str:
    if measure is None:
        return "-"
    text = f"{measure.primary:,.1f} {kind.unit}"
    if measure.secondary is not None:
        text += f" ({measure.secondary:,.1f} {kind.secondary_unit})"
    return text


def _limit_rows(results: Results) -> list[tuple[str, str, str, str, str]]:
    """(key, label, limit, iex figure, iex / limit) for every limit measured."""
    rows = []
    for key, (label, against) in LIMITS.items():
        if key not in results.limits:
            continue
        limit = results.limits[key]
        iex = results.mb_s(against, "iex")
        rows.append(
            (
                key,
                label,
                f"{limit:,.0f} MB/s",
                f"{KINDS[against].label}: {iex:,.1f} MB/s" if iex is not None else "-",
                f"{iex / limit:.2f}" if iex is not None else "-",
            )
        )
    return rows


def print_report(results: Results) -> None:
    """Ratio lines first, then the absolute figures, then the limits."""
    print()
    peers = [p for p in ("iex", "orthanc") if any(p in s for s in results.samples.values())]
    if "orthanc" not in peers:
        print("iex only (no Orthanc in a smoke run): no ratios")
    for name in KINDS:
        ratio = results.ratio(name)
        if ratio is not None:
            print(f"ratio {name} iex/orthanc = {ratio:.2f}")
    print(f"\n{'measure':<30}" + "".join(f"{p:>34}" for p in peers))
    for name, kind in KINDS.items():
        cells = "".join(f"{_figure(results.median(name, p), kind):>34}" for p in peers)
        print(f"{kind.label:<30}{cells}")
    print(f"\nlimits of this machine, same run ({results.rounds} round(s), medians):")
    for key, label, limit, iex, share in _limit_rows(results):
        print(f"limit {key} = {limit} ({label}); iex {iex} / limit = {share}")
    print(f"\ntotal time: {results.seconds:.0f} s")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section(results: Results) -> str:
    """The docs section: the command, the date, the cores, the tables."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cores = len(os.sched_getaffinity(0))
    versions = ", ".join(f"{peer} {v}" for peer, v in results.versions.items())
    rows = []
    for name, kind in KINDS.items():
        ratio = results.ratio(name)
        rows.append(
            [
                kind.label,
                _figure(results.median(name, "iex"), kind),
                _figure(results.median(name, "orthanc"), kind),
                f"{ratio:.2f}" if ratio is not None else "-",
            ]
        )
    limits = [list(row[1:]) for row in _limit_rows(results)]
    about = textwrap.fill(
        f"`make bench-compare` (`.venv/bin/python bench/compare.py`), {when}, {cores} cores "
        f"(`nproc`), {results.seconds / 60:.0f} minutes in all. {versions}. Orthanc and its "
        "DICOMweb plugin come from Debian's packages and run with their defaults (so it fsyncs "
        "every stored file, like iex) except authentication, HTTP compression and storage "
        f"compression off (`bench/peers.py`); iex runs `iex serve --workers "
        f"{results.iex_workers}`, as Orthanc's threads use every core. Both servers listen on "
        "127.0.0.1 with an empty "
        f"data directory and receive the same objects: {results.data}, re-identified with "
        f"fresh UIDs per copy, and pydicom's `CT_small.dcm`. {results.sizes} STOW-RS, "
        "metadata and QIDO-RS are sent with httpx; retrievals are read with a plain-socket "
        "client (`bench/rawhttp.py`), as httpx itself tops out near 1 GB/s here. Runs "
        f"alternate between the servers, {results.rounds} rounds, medians; the ratio is "
        "iex/Orthanc, above 1 when iex is better (latencies inverted). MB is 10^6 bytes.",
        width=96,
        break_on_hyphens=False,
    )
    return f"""{SECTION}

{about}

{_table(["measure", "iex", "Orthanc", "iex/Orthanc"], rows)}

This machine's limits, measured in the same run with the servers stopped, and the iex figure
named set against each:

{_table(["limit", "value", "iex", "iex / limit"], limits)}
"""


def write_docs(results: Results, path: Path) -> Path:
    """Replace (or append) the section in ``path``, keeping every other section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    new = section(results)
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: new + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + new
    path.write_text(text)
    return path
