"""The benchmarks still run: each in its smallest form, so their code cannot rot.

Nothing here asserts a speed; the benchmarks print figures and ratios, CI only needs them to
finish and to keep their own budgets (the STOW memory benchmark fails above 200 MB).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
def test_benchmarks_run_in_smoke_mode() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "ratio format-encrypt/raw" in result.stdout
    assert "peak" in result.stdout.lower()
    assert "limit loopback_download" in result.stdout  # bench/compare.py, iex only
    assert "tmpfs: instances" in result.stdout or "needs root" in result.stdout
    assert "records per fsync" in result.stdout  # bench/audit_latency.py
