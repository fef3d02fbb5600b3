"""CPU time per instance of ``read_instance_header``, against a bare pydicom read of the header.

    python bench/parse_header.py [--repeat 5] [--seconds 1.0] [--profile]

STOW-RS parses every stored object once (``app.dicom.instance.read_instance_header``): the
header is read, the structure walked, the DICOM JSON metadata built. The peer is what pydicom
alone costs for the same bytes, ``dcmread(stop_before_pixels=True)``, so the ratio shows how
much the gateway adds to reading the header at all. For reference, the same header is also
read by the pydicom route (``read_instance_header_with_pydicom``: ``dcmread``, then each
element's JSON from pydicom), which every object took before the raw element route. The
files: pydicom's ``CT_small.dcm`` and ``MR_small.dcm``, the 512x512 CT of ``pydicom-data``
(``693_UNCR.dcm``) when it is installed, and a generated 512x512 CT.

Times are process CPU time (``time.process_time``), in memory (``io.BytesIO``), the best of
``--repeat`` runs of about ``--seconds`` each: this machine's cores are shared, and the
fastest run is the one least disturbed. ``--profile`` prints the cProfile hot spots of
``read_instance_header`` for each file.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataset import CT_IMAGE_STORAGE, generated_image  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from app.dicom.instance import (  # noqa: E402
    read_from_raw_elements,
    read_instance_header,
    read_instance_header_with_pydicom,
)

THRESHOLD = 1024


def _files() -> list[tuple[str, bytes]]:
    found = []
    for name in ("CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm"):
        path = get_testdata_file(name, download=False)
        if isinstance(path, str):
            found.append((name, Path(path).read_bytes()))
    buf = io.BytesIO()
    generated_image(CT_IMAGE_STORAGE, "CT", 512, 512).save_as(buf, enforce_file_format=True)
    found.append(("generated 512x512 CT", buf.getvalue()))
    return found


def cpu_ms_per_call(work: Callable[[], object], repeat: int, seconds: float) -> float:
    """The best of ``repeat`` runs of about ``seconds`` CPU seconds each, in ms per call."""
    start = time.process_time()
    calls = 0
    while time.process_time() - start < 0.05 or calls < 3:  # also warms caches
        work()
        calls += 1
    per_run = max(3, int(calls * seconds / max(time.process_time() - start, 1e-6)))
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(per_run):
            work()
        best = min(best, (time.process_time() - start) / per_run)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per measure (5)")
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per run (1.0)")
    parser.add_argument("--profile", action="store_true", help="print cProfile hot spots")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # odd corpus values warn in pydicom; not measured here

    print(
        f"{'file':<24}{'header ms':>11}{'pydicom route ms':>18}{'speed-up':>10}"
        f"{'dcmread ms':>12}{'header/dcmread':>16}"
    )
    for name, data in _files():
        if read_from_raw_elements(io.BytesIO(data), THRESHOLD) is None:
            print(f"{name}: the raw route declines this object; pydicom reads it")

        def header(data: bytes = data) -> object:
            return read_instance_header(io.BytesIO(data), THRESHOLD)

        def bare(data: bytes = data) -> object:
            return dcmread(io.BytesIO(data), stop_before_pixels=True)

        def pydicom_route(data: bytes = data) -> object:
            return read_instance_header_with_pydicom(io.BytesIO(data), THRESHOLD)

        ours = cpu_ms_per_call(header, args.repeat, args.seconds)
        before = cpu_ms_per_call(pydicom_route, args.repeat, args.seconds)
        peer = cpu_ms_per_call(bare, args.repeat, args.seconds)
        print(
            f"{name:<24}{ours:>11.3f}{before:>18.3f}{before / ours:>10.1f}"
            f"{peer:>12.3f}{ours / peer:>16.2f}"
        )
        print(f"ratio parse-header/dcmread {name} = {ours / peer:.2f}")
        print(f"ratio pydicom-route/parse-header {name} = {before / ours:.1f}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(200):
                header()
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
