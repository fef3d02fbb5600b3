"""What encrypting the index (SQLCipher) costs QIDO-RS searches, measured in one run.

    python bench/index_encryption.py [--studies 2000] [--requests 300]

Fills two indexes with the same synthetic instances, one plain SQLite and one SQLCipher,
and runs the same study searches against each through ``SQLiteMetadataIndex.search`` (no
HTTP, so only the storage cost differs). Prints p50/p95 per query and the ratio of the
encrypted to the plain latency (1.00 = free).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qido_latency import QUERIES, TRUST, _records  # noqa: E402

from app.dicom.query import PagingLimits, QueryLevel, parse_query  # noqa: E402
from app.storage.sqlite_index import SQLiteMetadataIndex  # noqa: E402

PAGING = PagingLimits(default=1000, maximum=10_000)


async def _fill(index: SQLiteMetadataIndex, studies: int) -> None:
    await index.open()
    batch = []
    for record in _records(studies):
        batch.append(record)
        if len(batch) == 2_000:
            await index.add_instances(batch)
            batch = []
    await index.add_instances(batch)


async def _measure(
    index: SQLiteMetadataIndex, studies: int, requests: int, seed: int
) -> dict[str, list[float]]:
    rng = random.Random(seed)
    out: dict[str, list[float]] = {label: [] for label in QUERIES}
    for label, factory in QUERIES.items():
        for _ in range(requests):
            query = parse_query(factory(rng, studies).items(), QueryLevel.STUDY, PAGING)
            start = time.perf_counter()
            await index.search(TRUST, query)
            out[label].append((time.perf_counter() - start) * 1000)
    return out


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


async def main_async(studies: int, requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain = SQLiteMetadataIndex(Path(tmp) / "plain.sqlite3")
        sealed = SQLiteMetadataIndex(Path(tmp) / "sealed.sqlite3", key=os.urandom(32))
        for index in (plain, sealed):
            await _fill(index, studies)
        results: dict[str, dict[str, list[float]]] = {"plain": {}, "sealed": {}}
        # Alternate rounds so that drift on a shared machine hits both alike.
        for round_ in range(4):
            for name, index in (("plain", plain), ("sealed", sealed)):
                got = await _measure(index, studies, requests // 4, seed=round_)
                for label, values in got.items():
                    results[name].setdefault(label, []).extend(values)
        for index in (plain, sealed):
            await index.close()
    print(f"{studies:,} studies / {studies * 5:,} instances, {requests} searches per query")
    print(f"{'query':<28}{'plain p50/p95 ms':>20}{'SQLCipher p50/p95 ms':>24}{'ratio p50':>11}")
    for label in QUERIES:
        p, s = results["plain"][label], results["sealed"][label]
        print(
            f"{label:<28}{_p(p, 50):>9.2f} / {_p(p, 95):<8.2f}"
            f"{_p(s, 50):>11.2f} / {_p(s, 95):<10.2f}{_p(s, 50) / _p(p, 50):>8.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main_async(args.studies, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
