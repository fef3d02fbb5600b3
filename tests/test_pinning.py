"""Calling a partner whose TLS certificate is pinned: exactly that certificate is accepted,
whoever issued it, and any other fails the connection before a byte of the request (and so
the bearer token) is sent. Against a real TLS server on loopback that records what it got."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.crypto.certs import file_fingerprint
from app.transfer.pinning import PinMismatch, pinned_context
from tests.helpers import TlsFiles
from tests.pki import server_tls

SECRET = "Bearer iex_0123456789abcdef_" + "5" * 64


class RecordingTlsServer:
    """Answers every request with ``200 ok`` and keeps the bytes it received."""

    def __init__(self, tls: TlsFiles) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tls.cert, tls.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(raw,), daemon=True).start()

    def _answer(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(10)
                data = conn.recv(65536)
                self.received += data
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        except (OSError, ssl.SSLError):
            raw.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return server_tls(tmp_path)


@pytest.fixture
def tls_server(tls: TlsFiles) -> Iterator[RecordingTlsServer]:
    server = RecordingTlsServer(tls)
    yield server
    server.close()


async def _get(context: ssl.SSLContext, port: int) -> httpx.Response:
    async with httpx.AsyncClient(verify=context, timeout=10) as client:
        return await client.get(f"https://127.0.0.1:{port}/x", headers={"Authorization": SECRET})


def test_the_pinned_certificate_is_accepted_whoever_issued_it(
    tls: TlsFiles, tls_server: RecordingTlsServer
) -> None:
    # The CA that issued it is not trusted here: the pin alone decides.
    response = asyncio.run(_get(pinned_context(file_fingerprint(tls.cert)), tls_server.port))
    assert response.text == "ok"
    assert SECRET.encode() in tls_server.received


def test_another_certificate_fails_before_the_request_is_sent(
    tls: TlsFiles, tls_server: RecordingTlsServer
) -> None:
    other = file_fingerprint(tls.server_ca)  # a real certificate, but not the one served
    with pytest.raises(httpx.ConnectError) as failed:
        asyncio.run(_get(pinned_context(other), tls_server.port))
    cause: BaseException | None = failed.value
    while cause is not None and not isinstance(cause, PinMismatch):
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, PinMismatch)
    assert file_fingerprint(tls.cert) in str(cause) and other in str(cause)
    assert tls_server.received == b""


def test_a_pin_is_64_hex_digits() -> None:
    with pytest.raises(ValueError):
        pinned_context("AB" * 32)
    with pytest.raises(ValueError):
        pinned_context("ab" * 31)
