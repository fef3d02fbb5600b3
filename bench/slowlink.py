"""A slow link between two gateways: a TCP proxy on 127.0.0.1 that carries each direction at
a set rate and delivers every byte a set delay after it was sent.

Each direction of the link is a token bucket shared by every connection through it (one
wire, however many connections use it), followed by a delay line per connection: a chunk
read from one side first waits for its tokens (its time on the wire at the link's rate),
then is held for the delay (the propagation time) before it is written to the other side. A
new connection waits one round trip before it is connected upstream, as a TCP handshake
would make it.

Memory stays bounded whatever the senders do: a connection reads a chunk only once the link
has taken the previous one and its delay line has room (at most ``QUEUE_CHUNKS`` chunks of
``CHUNK`` bytes, more than the link carries in its delay), so a sender faster than the link
is held back by TCP's own flow control, as it is on a real slow link.

Bytes are counted per direction as the link transmits them, in bins of ``BIN`` seconds, so a
caller can tell the rate while data flowed from the pauses around it (``busy_rate``). The
proxy runs its own event loop in a thread: ``with SlowLink(port, rate, delay) as link:``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass
from types import TracebackType

#: Bytes read from a socket at a time, and the largest burst the link sends at once.
CHUNK = 64 * 1024
#: Chunks a connection's delay line holds at most, per direction.
QUEUE_CHUNKS = 32
#: Seconds per bin of the byte counts.
BIN = 0.1


class TokenBucket:
    """``rate`` bytes a second, at most ``capacity`` of them saved up; waiters in FIFO
    order (``asyncio.Lock`` wakes them in the order they came)."""

    def __init__(self, rate: float, capacity: int) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes (at most the capacity) may go."""
        async with self.lock:
            self._refill()
            while self.tokens < n:
                await asyncio.sleep((n - self.tokens) / self.rate)
                self._refill()
            self.tokens -= n


@dataclass
class Direction:
    """One direction of the link: its bucket and what it carried, by bin."""

    name: str
    bucket: TokenBucket
    total: int = 0

    def __post_init__(self) -> None:
        self.bins: Counter[int] = Counter()
        self.lock = threading.Lock()  # the counts are read from another thread

    def count(self, n: int) -> None:
        with self.lock:
            self.total += n
            self.bins[int(time.monotonic() / BIN)] += n

    def snapshot(self) -> tuple[int, dict[int, int]]:
        with self.lock:
            return self.total, dict(self.bins)


def busy_rate(bins: dict[int, int], since: float, threshold: int) -> tuple[int, float]:
    """Bytes and seconds over the span that carried data: from the first to the last bin
    after ``since`` (a ``time.monotonic()`` value) holding at least ``threshold`` bytes, the
    bins between them included whatever they hold. The span's first and last bins are
    usually part-filled, so the rate it gives errs low by up to two bins' worth."""
    first_bin = int(since / BIN)
    busy = sorted(b for b, n in bins.items() if b >= first_bin and n >= threshold)
    if not busy:
        return 0, 0.0
    start, end = busy[0], busy[-1]
    carried = sum(n for b, n in bins.items() if start <= b <= end)
    return carried, (end - start + 1) * BIN


class SlowLink:
    """The proxy to ``127.0.0.1:upstream_port``: ``rate`` bytes a second and ``delay``
    seconds each way. ``port`` and ``url`` are where to connect, once entered."""

    def __init__(self, upstream_port: int, rate: float, delay: float) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.delay = delay
        self.port = 0
        self.up: Direction | None = None  # towards the upstream server
        self.down: Direction | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="slow-link", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> SlowLink:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self.port:
            raise RuntimeError(f"the slow link did not start: {self._error!r}")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__ when it happens at start
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        capacity = 2 * CHUNK  # a little slack for the timer's lateness, no real burst
        self.up = Direction("up", TokenBucket(self.rate, capacity))
        self.down = Direction("down", TokenBucket(self.rate, capacity))
        connections: set[asyncio.Task[None]] = set()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await self._connection(reader, writer)
            except asyncio.CancelledError:
                pass  # the link is stopping; the task's end is all that is awaited
            finally:
                connections.discard(task)

        server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.up is not None and self.down is not None
        upstream: asyncio.StreamWriter | None = None
        try:
            await asyncio.sleep(2 * self.delay)  # the handshake's round trip
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            pipes = [
                asyncio.create_task(self._pipe(reader, upstream, self.up)),
                asyncio.create_task(self._pipe(up_reader, writer, self.down)),
            ]
            try:
                # A failure one way (a reset) ends both: the other side may never close.
                await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except OSError:
            pass
        finally:
            writer.close()
            if upstream is not None:
                upstream.close()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: Direction
    ) -> None:
        """Carry one direction until its end of stream, which is passed on (delayed too);
        raises what broke either side."""
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)

        async def send() -> None:
            while data := await src.read(CHUNK):
                await direction.bucket.take(len(data))
                direction.count(len(data))
                await line.put((time.monotonic() + self.delay, data))
            await line.put(None)

        async def deliver() -> None:
            while (item := await line.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()
            await asyncio.sleep(self.delay)
            if dst.can_write_eof():
                dst.write_eof()

        tasks = [asyncio.create_task(send()), asyncio.create_task(deliver())]
        try:
            # Until both end, or one fails: a sender blocked on a full line must not wait
            # for a delivery that died.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def counts(self) -> tuple[int, dict[int, int], int, dict[int, int]]:
        """Bytes carried up (towards the upstream server) in all and by bin, then down."""
        assert self.up is not None and self.down is not None
        return (*self.up.snapshot(), *self.down.snapshot())
