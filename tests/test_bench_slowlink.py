"""The exchange benchmark's slow link (``bench/slowlink.py``) carries every byte both ways,
unchanged and in order, passes an end of stream on, and counts what it carried.

Nothing here measures its rate or delay: the link is set fast (1 GB/s, 1 ms) so that the
tests only see what it does with the bytes.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from bench.slowlink import BIN, SlowLink, busy_rate

RATE = 1e9
DELAY = 0.001


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP server on loopback that sends back what it reads, and closes its side after
    the client's end of stream."""
    server = socket.create_server(("127.0.0.1", 0))
    port: int = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    server.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone would not)
    server.close()
    thread.join(10)


def _exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload``, end the stream, and read back everything until the other end
    closes (or resets: a proxy that closes with unread bytes resets)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the other end is gone: what was read says what came of it

        sender = threading.Thread(target=send)
        sender.start()
        received = bytearray()
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:
            pass
        sender.join(30)
    return bytes(received)


def test_bytes_cross_unchanged_both_ways_and_are_counted(echo_port: int) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)  # many chunks, the last one short
    with SlowLink(echo_port, RATE, DELAY) as link:
        assert _exchange(link.port, payload) == payload
        assert _exchange(link.port, b"second connection") == b"second connection"
        up, up_bins, down, down_bins = link.counts()
    expected = len(payload) + len(b"second connection")
    assert up == down == expected
    assert sum(up_bins.values()) == sum(down_bins.values()) == expected


def test_a_connection_refused_upstream_is_closed(echo_port: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()[1]  # nothing listens there once closed
    with SlowLink(nobody, RATE, DELAY) as link:
        assert _exchange(link.port, b"anyone?") == b""
    with SlowLink(echo_port, RATE, DELAY) as link:  # and a link works after one that failed
        assert _exchange(link.port, b"still here") == b"still here"


def test_busy_rate_spans_the_bins_that_carried_data() -> None:
    bins = {9: 10_000, 10: 100, 11: 1_000, 12: 1_000, 13: 50, 14: 1_000, 20: 5}
    # Bin 9 is before ``since``; 13 is inside the span although quiet; 20 is below the
    # threshold and after the span.
    carried, seconds = busy_rate(bins, since=10 * BIN + BIN / 2, threshold=500)
    assert carried == 1_000 + 1_000 + 50 + 1_000
    assert seconds == pytest.approx(4 * BIN)
    assert busy_rate({}, since=0.0, threshold=1) == (0, 0.0)
