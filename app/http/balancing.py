"""Spreading connections evenly over the worker processes that share one listening socket.

With ``--workers N`` every worker waits on the same socket and the kernel hands a new
connection to whichever worker calls ``accept`` first. An event loop accepts everything
pending at once, so a burst of connections (a client opening its pool) tends to land on a
single worker while the others idle: measured here, eight clients' connections went all to
one of two workers in most runs, and ingest ran at the speed of one.

So each worker accepts one connection at a time and, the more connections it already
serves, the longer it waits before taking the next: a less loaded worker gets there first.
Nothing is shared between workers; a worker that is busy simply arrives later still.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import uvloop

log = logging.getLogger(__name__)

#: The wait before accepting, per connection this worker already serves, and its cap.
WAIT_PER_CONNECTION = 0.001
MAX_WAIT = 0.01
#: Out of descriptors or memory: accepting again at once would fail the same way.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESOURCE_RETRY = 1.0


class BalancedServer:
    """What ``create_server`` returns for a socket shared with sibling workers."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        tls: ssl.SSLContext | None,
        backlog: int,
    ) -> None:
        self._loop = loop
        self._protocol_factory = protocol_factory
        self._sock = sock
        self._tls = tls
        # The transport detaches a connection's socket when it closes (fileno() is then -1).
        self._connections: list[socket.socket] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        sock.listen(backlog)
        self._accepting = loop.create_task(self._accept())

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)

    def _open_connections(self) -> int:
        self._connections = [c for c in self._connections if c.fileno() != -1]
        return len(self._connections)

    async def _accept(self) -> None:
        while True:
            serving = self._open_connections()
            if serving:
                await asyncio.sleep(min(serving * WAIT_PER_CONNECTION, MAX_WAIT))
            try:
                conn, _ = await self._loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    log.error("cannot accept connections: %s", exc.strerror)
                    await asyncio.sleep(RESOURCE_RETRY)
                continue  # otherwise the client gave up before it was accepted
            self._connections.append(conn)
            task = self._loop.create_task(self._serve(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol_factory, conn, ssl=self._tls)
        except Exception as exc:  # a failed TLS handshake: the client's problem, not ours
            log.debug("connection dropped before it was served: %s", exc)
            conn.close()

    def close(self) -> None:
        self._accepting.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, return_exceptions=True)


class BalancingLoop(uvloop.Loop):
    """uvloop, serving a listening socket it is given (a worker's) the balanced way."""

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any, **kwargs: Any
    ) -> Any:
        sock = kwargs.get("sock")
        if sock is None or args:
            return await super().create_server(protocol_factory, *args, **kwargs)
        return BalancedServer(
            self, protocol_factory, sock, kwargs.get("ssl"), kwargs.get("backlog", 100)
        )
