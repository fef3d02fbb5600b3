"""Throughput of the encrypted object format against raw AES-256-GCM on this machine.

    python bench/crypto.py [--size-mb 256] [--runs 3]

The physical limit is raw AES-256-GCM over the same object in memory, in 1 MiB pieces (no
framing, no associated data, no copies). In the same run the format encrypts that object
(``Sealer``) and decrypts it from a file in the page cache (``DecryptingReader``), so the
ratios show the cost of the format itself; disk speed belongs to the other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from app.crypto.reader import DecryptingReader  # noqa: E402
from app.crypto.segments import DEFAULT_SEGMENT_SIZE, Sealer  # noqa: E402

MiB = 1024 * 1024
KEY = bytes(range(32))


def raw_encrypt(plain: memoryview) -> float:
    aead = AESGCM(KEY)
    start = time.perf_counter()
    for i, off in enumerate(range(0, len(plain), MiB)):
        aead.encrypt(i.to_bytes(12, "big"), plain[off : off + MiB], None)
    return len(plain) / (time.perf_counter() - start)


def raw_decrypt(ciphertext: memoryview) -> float:
    aead = AESGCM(KEY)
    stride = MiB + 16
    start = time.perf_counter()
    total = 0
    for i, off in enumerate(range(0, len(ciphertext), stride)):
        total += len(aead.decrypt(i.to_bytes(12, "big"), ciphertext[off : off + stride], None))
    return total / (time.perf_counter() - start)


def raw_ciphertext(plain: memoryview) -> memoryview:
    aead = AESGCM(KEY)
    return memoryview(
        b"".join(
            aead.encrypt(i.to_bytes(12, "big"), plain[off : off + MiB], None)
            for i, off in enumerate(range(0, len(plain), MiB))
        )
    )


def format_encrypt(plain: memoryview, path: Path | None) -> float:
    """Encrypt; write to ``path`` when given (untimed runs produce the file to decrypt)."""
    sink = open(path, "wb") if path else None  # noqa: SIM115
    start = time.perf_counter()
    sealer = Sealer(KEY, "dek-bench", "bench-object")
    if sink:
        sink.write(sealer.header)
    for off in range(0, len(plain), MiB):
        sealed = sealer.update(plain[off : off + MiB])
        if sink:
            sink.writelines(sealed)
    last = sealer.finish()
    rate = len(plain) / (time.perf_counter() - start)
    if sink:
        sink.writelines(last)
        sink.close()
    return rate


def format_decrypt(path: Path, size: int) -> float:
    start = time.perf_counter()
    with DecryptingReader(open(path, "rb"), lambda _kid: KEY, "bench-object") as reader:
        got = sum(len(chunk) for chunk in reader.iter_range(0, reader.size))
    rate = size / (time.perf_counter() - start)
    assert got == size
    return rate


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb * MiB
    plain = memoryview(os.urandom(size))
    ciphertext = raw_ciphertext(plain)
    raw_e, raw_d, fmt_e, fmt_d = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "object.iexenc"
        format_encrypt(plain, path)  # the object decrypted below, read from the page cache
        format_decrypt(path, size)  # warm the page cache
        for _ in range(args.runs):
            raw_e.append(raw_encrypt(plain))
            fmt_e.append(format_encrypt(plain, None))
            raw_d.append(raw_decrypt(ciphertext))
            fmt_d.append(format_decrypt(path, size))
    re_, rd, fe, fd = (statistics.median(x) / MiB for x in (raw_e, raw_d, fmt_e, fmt_d))
    segment_kib = DEFAULT_SEGMENT_SIZE // 1024
    print(f"object {args.size_mb} MiB, segment {segment_kib} KiB, median of {args.runs}")
    print(f"raw AES-256-GCM encrypt  {re_:8.0f} MiB/s")
    print(f"raw AES-256-GCM decrypt  {rd:8.0f} MiB/s")
    print(f"format encrypt           {fe:8.0f} MiB/s")
    print(f"format decrypt           {fd:8.0f} MiB/s")
    print(f"ratio format-encrypt/raw = {fe / re_:.2f}")
    print(f"ratio format-decrypt/raw = {fd / rd:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
