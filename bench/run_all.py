"""Run every benchmark in turn: ``make bench`` (full sizes) or ``--smoke`` (CI sizes).

Each benchmark is its own script and prints its own ratios; this only runs them in order
and fails when one fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = [
    ["crypto.py"],
    ["parse_header.py"],
    ["stow_memory.py"],
    ["upload.py"],
    ["qido_latency.py"],
    ["audit_latency.py"],
    ["throughput.py"],
    ["filesystems.py"],
    ["exchange.py"],
]
SMOKE = [
    ["crypto.py", "--size-mb", "8", "--runs", "1"],
    ["parse_header.py", "--repeat", "1", "--seconds", "0.02"],
    ["throughput.py", "--smoke"],
    ["filesystems.py", "--smoke"],
    ["stow_memory.py", "--size-mb", "16"],
    ["upload.py", "--size-mb", "16"],
    ["qido_latency.py", "--smoke"],
    ["audit_latency.py", "--smoke"],
    ["compare.py", "--smoke"],
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    args = parser.parse_args()
    failed = []
    for script, *rest in SMOKE if args.smoke else FULL:
        print(f"\n=== {script} {' '.join(rest)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *rest]).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
