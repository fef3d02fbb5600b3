"""A loopback TCP proxy that injects faults into the client-to-server stream.

It sits in front of a gateway on 127.0.0.1 and forwards bytes both ways, counting them.
Faults apply to the client-to-server direction of each connection, counted from that
connection's first byte:

* ``cut(after=N, every=False)``: once a connection has carried N bytes towards the server,
  close it both ways (the client sees the connection break mid-request, the server a body
  cut short). ``every=True`` cuts every connection that gets that far, else only the first.
* ``flip(at=N)``: invert the byte at position N of the first connection that reaches it.
* ``hold(after=N)``: once the first connection to get that far has carried N bytes (or a
  little more: whole reads are forwarded), forward nothing more from it until ``release()``;
  ``held`` is set then. The upload stands still at a known point. ``release(drop=True)``
  closes the held connection instead of forwarding the rest: what a client that died
  meanwhile had in flight is lost, so the server's offset stays where it stood.
* ``hold_after_marker(marker)``: like ``hold``, but the first connection to send
  ``marker`` towards the server is held just after forwarding the read that holds it.
* ``down = True``: every new connection is closed at once, as by a server that is not there.
* ``lose_answer(marker)``: the first answer (server to client) holding ``marker`` is never
  delivered: the connection is closed instead, as when a response is lost on the way.

``recording`` keeps a copy of every byte passed, both ways, when the proxy was made with
``record=True``: what a relay between two gateways could see.

Plain sockets and threads, so it runs beside synchronous and asyncio tests alike.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

_BUFFER = 64 * 1024


@dataclass
class _Fault:
    cut_after: int | None = None
    cut_every: bool = False
    flip_at: int | None = None
    hold_after: int | None = None
    lose_marker: bytes | None = None
    hold_marker: bytes | None = None


class FaultProxy:
    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", *, record: bool = False
    ) -> None:
        self.target = (target_host, target_port)
        self.record = record
        self.recording = bytearray()
        self.lost_answers = 0
        self.down = False
        self.port = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.cuts = 0
        self.flips = 0
        self.held = threading.Event()
        self._released = threading.Event()
        self._fault = _Fault()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._drop_held = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- faults -------------------------------------------------------------------------------

    def cut(self, after: int, *, every: bool = False) -> None:
        with self._lock:
            self._fault.cut_after, self._fault.cut_every = after, every

    def flip(self, at: int) -> None:
        with self._lock:
            self._fault.flip_at = at

    def hold(self, after: int) -> None:
        with self._lock:
            self._fault.hold_after = after
            self.held.clear()
            self._released.clear()

    def hold_after_marker(self, marker: bytes) -> None:
        with self._lock:
            self._fault.hold_marker = marker
            self.held.clear()
            self._released.clear()

    def lose_answer(self, marker: bytes) -> None:
        with self._lock:
            self._fault.lose_marker = marker

    def release(self, *, drop: bool = False) -> None:
        """End every fault and let held connections go on, or with ``drop`` close them."""
        with self._lock:
            self._fault = _Fault()
            self._drop_held = drop
        self._released.set()

    # -- running ------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stopping = True
        self._released.set()
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone may not.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _close(sock)
        for thread in list(self._threads):
            thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets.update((client, server))
            self._spawn(self._upstream, client, server)
            self._spawn(self._downstream, server, client)

    def _upstream(self, client: socket.socket, server: socket.socket) -> None:
        """Client to server, where the faults are."""
        position = 0
        try:
            while True:
                data = client.recv(_BUFFER)
                if not data:
                    break
                data, cut = self._apply(position, data)
                if data:
                    server.sendall(data)
                position += len(data)
                with self._lock:
                    self.bytes_up += len(data)
                    if self.record:
                        self.recording += data
                if cut:
                    break
                if self._should_hold(position, data):
                    self._released.wait()
                    if self._stopping or self._drop_held:
                        break
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)

    def _downstream(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = server.recv(_BUFFER)
                if not data:
                    break
                with self._lock:
                    marker = self._fault.lose_marker
                    lose = marker is not None and marker in data
                    if lose:
                        self._fault.lose_marker = None
                        self.lost_answers += 1
                if lose:
                    break
                client.sendall(data)
                with self._lock:
                    self.bytes_down += len(data)
                    if self.record:
                        self.recording += data
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)

    def _apply(self, position: int, data: bytes) -> tuple[bytes, bool]:
        """``data`` (at ``position`` of its connection) after the faults; whether to cut."""
        end = position + len(data)
        with self._lock:
            fault = self._fault
            if fault.flip_at is not None and position <= fault.flip_at < end:
                changed = bytearray(data)
                changed[fault.flip_at - position] ^= 0xFF
                data = bytes(changed)
                fault.flip_at = None
                self.flips += 1
            if fault.cut_after is not None and end > fault.cut_after:
                data = data[: max(0, fault.cut_after - position)]
                if not fault.cut_every:
                    fault.cut_after = None
                self.cuts += 1
                return data, True
        return data, False

    def _should_hold(self, position: int, data: bytes) -> bool:
        with self._lock:
            after, marker = self._fault.hold_after, self._fault.hold_marker
            if marker is not None and marker in data:
                self._fault.hold_marker = None
            elif after is None or position < after:
                return False
            else:
                self._fault.hold_after = None
        self.held.set()
        return True


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
