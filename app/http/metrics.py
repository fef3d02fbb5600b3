"""Request metrics: counts and latencies by route template, and the access log.

A pure ASGI middleware (not ``BaseHTTPMiddleware``) so streamed bodies are not buffered and
the per-request cost stays a dictionary lookup and two counter updates.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics

access_log = logging.getLogger("iex.access")


def _route_template(scope: Scope) -> str:
    # The router records the matched route in the scope; its path template keeps the
    # label set small (no UIDs in labels).
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            method = scope["method"]
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(elapsed)
            # The route template, never the path or query: those carry UIDs, names and IDs.
            access_log.info("%s %s %d %.1fms", method, route, status, elapsed * 1000)
