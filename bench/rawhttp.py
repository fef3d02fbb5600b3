"""A minimal blocking HTTP/1.1 GET client that counts response bodies and drops them.

Retrieval throughput is measured with this instead of httpx: on this 2-core machine httpx
itself receives at about 0.8 GB/s from a trivial source (h11 parsing 64 KiB reads), which
would cap both servers' WADO-RS figures, while a plain socket receives at several GB/s.
Bodies with Content-Length, chunked transfer coding, or ended by closing are all read; the
connection is kept alive between requests. One connection per thread.
"""

from __future__ import annotations

import socket
from io import BufferedReader
from typing import cast
from urllib.parse import urlsplit

_SINK = 4 * 1024 * 1024


class RawHttpConnection:
    """One keep-alive connection to ``base`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(base)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"not a plain http://host:port URL: {base}")
        self.host, self.port = parts.hostname, parts.port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sink = memoryview(bytearray(_SINK))
        self.sock: socket.socket | None = None

    def _connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port))
        self.file = cast(BufferedReader, self.sock.makefile("rb", buffering=256 * 1024))

    def close(self) -> None:
        if self.sock is not None:
            self.file.close()
            self.sock.close()
            self.sock = None

    def __enter__(self) -> RawHttpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _discard(self, size: int) -> int:
        left = size
        while left:
            n = self.file.readinto(self.sink[: min(left, _SINK)])
            if not n:
                raise ConnectionError("the server closed the connection mid-body")
            left -= n
        return size

    def _discard_to_eof(self) -> int:
        total = 0
        while n := self.file.readinto(self.sink):
            total += n
        return total

    def _line(self) -> bytes:
        line = self.file.readline(65536)
        if not line.endswith(b"\n"):
            raise ConnectionError("the server closed the connection mid-head")
        return line

    def get(self, path: str, accept: str) -> int:
        """GET ``path``; the body's length. Raises unless the status is 200."""
        if self.sock is None:
            self._connect()
        assert self.sock is not None
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: {accept}\r\n"
        self.sock.sendall((request + self.headers + "\r\n").encode("latin-1"))
        status = int(self._line().split()[1])
        fields: dict[str, str] = {}
        while (line := self._line()) not in (b"\r\n", b"\n"):
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        if "content-length" in fields:
            size = self._discard(int(fields["content-length"]))
        elif "chunked" in fields.get("transfer-encoding", ""):
            size = 0
            while chunk := int(self._line().split(b";")[0], 16):
                size += self._discard(chunk)
                self._line()  # the CRLF after the chunk's data
            while self._line() not in (b"\r\n", b"\n"):  # trailers
                pass
        else:
            size = self._discard_to_eof()
            fields["connection"] = "close"
        if fields.get("connection") == "close":
            self.close()
        if status != 200:
            raise RuntimeError(f"GET {path}: status {status}")
        return size
