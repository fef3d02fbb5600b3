"""This machine's limits, measured in the same run as the servers they bound.

* raw AES-256-GCM encryption on one core (``cryptography``'s AESGCM over 1 MiB buffers),
  which every byte iex stores or serves goes through;
* sequential write throughput: a file written in 8 MiB blocks and fsynced, in the directory
  the servers store to;
* loopback HTTP throughput: :class:`TrivialHttpServer` is an HTTP/1.1 server in its own
  process on 127.0.0.1 that discards request bodies (a sink for uploads) and answers
  ``GET /bytes/N`` with N bytes from memory (a source for downloads). Clients measure it with
  the same code they use against iex and Orthanc, so the ratio is the server's own cost.

    python bench/limits.py --serve PORT    # the trivial server alone (used by the class)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import cast

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MiB = 1024 * 1024
MB = 1_000_000
_BLOCK = memoryview(bytes(range(256)) * (MiB // 256))


def aes_gcm_mb_s(total_mib: int, runs: int = 3) -> float:
    """Raw AES-256-GCM encryption in MB/s on one core: the median of ``runs``."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    plain = memoryview(os.urandom(MiB))
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for i in range(total_mib):
            aead.encrypt(i.to_bytes(12, "big"), plain, None)
        rates.append(total_mib * MiB / MB / (time.perf_counter() - start))
    return statistics.median(rates)


def sequential_write_mb_s(directory: Path, total_mib: int) -> float:
    """Write ``total_mib`` MiB in 8 MiB blocks to a new file and fsync it; MB/s."""
    block = os.urandom(8 * MiB)
    path = directory / "sequential-write.bin"
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            written = 0
            while written < total_mib * MiB:
                written += f.write(block)
            os.fsync(f.fileno())
        return written / MB / (time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)


def raw_upload_mb_s(port: int, size: int) -> float:
    """POST ``size`` bytes to the trivial sink from a plain blocking socket; MB/s.

    No HTTP client library in the way: what loopback itself carries on this machine.
    """
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        sock.sendall(b"POST /sink HTTP/1.1\r\nhost: bench\r\ncontent-length: %d\r\n\r\n" % size)
        left = size
        while left:
            left -= sock.send(_BLOCK[: min(left, len(_BLOCK))])
        answer = sock.recv(4096)
        took = time.perf_counter() - start
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the trivial sink answered {answer[:40]!r}")
    return size / MB / took


class _TrivialHttp(asyncio.Protocol):
    """HTTP/1.1 with keep-alive: bodies are counted and dropped; ``GET /bytes/N`` sends N."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.body_left = 0
        self.pending_get: int | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.body_left:
                taken = min(self.body_left, len(view))
                self.body_left -= taken
                view = view[taken:]
                if not self.body_left:
                    self._answer()
                continue
            self.head += view
            view = memoryview(b"")
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            request, rest = bytes(self.head[:end]), bytes(self.head[end + 4 :])
            self.head.clear()
            lines = request.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            self.body_left = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    self.body_left = int(value)
            self.pending_get = (
                int(target.rsplit("/", 1)[1])
                if method == "GET" and target.startswith("/bytes/")
                else None
            )
            if not self.body_left:
                self._answer()
            view = memoryview(rest)

    def _answer(self) -> None:
        assert self.transport is not None
        if self.pending_get is None:
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        else:
            asyncio.get_running_loop().create_task(self._send(self.pending_get))

    async def _send(self, size: int) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: %d\r\n\r\n" % size
        )
        while size:
            n = min(size, len(_BLOCK))
            self.transport.write(_BLOCK[:n])
            size -= n
            await self.can_write.wait()


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_TrivialHttp, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


class TrivialHttpServer:
    """The trivial sink and source in a child process, so it has a core of its own as the
    servers do; use as a context manager, ``url`` is its root."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TrivialHttpServer:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.port)]
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the trivial HTTP server did not start") from None
                time.sleep(0.05)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", type=int, required=True, metavar="PORT")
    args = parser.parse_args()
    try:
        import uvloop  # the loop uvicorn runs iex on
    except ImportError:
        asyncio.run(_serve(args.serve))
        return
    uvloop.run(_serve(args.serve))


if __name__ == "__main__":
    main()
