"""Calling a partner gateway over HTTP: ``PartnerClient``.

Every call carries the bearer token the partner issued for this gateway, in the
``Authorization`` header and nowhere else (not in messages, logs or reprs). Redirects are
not followed, so the token never goes to another host. Answers are read up to a bound the
caller gives, decompressed as they arrive, so a partner cannot make this gateway hold more.

**TLS pinning.** When the partner's identity on record has a ``tls_sha256``, the partner's
certificate must be exactly that one, whoever issued it: the client first connects once
to fetch the certificate the partner presents and compares its SHA-256 with the pin, then
trusts that certificate alone (as the only trust anchor, host name not checked) for its
calls. A server presenting another certificate later fails the handshake, before any byte
of a request, token included, is sent. Without a pin, ``https`` URLs are verified against
the system's CAs as usual.

Failures raise ``PartnerUnreachable`` (502), saying which partner and why.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from app.errors import BadGateway

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class PartnerTarget(Protocol):
    """Where and how to call a partner (``PartnerEndpoint`` of the exchange directory)."""

    @property
    def partner(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def token(self) -> str: ...

    @property
    def tls_sha256(self) -> str | None: ...


class PartnerUnreachable(BadGateway):
    """The partner could not be reached, or its answer could not be read."""


@dataclass(frozen=True)
class PartnerAnswer:
    status: int
    content_type: str
    headers: httpx.Headers
    body: bytes


class PartnerClient:
    """One client for every call to partners; TLS contexts of pinned partners are kept."""

    def __init__(self, timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        self._timeout = timeout
        self._pinned: dict[tuple[str, int, str], ssl.SSLContext] = {}

    async def post(
        self,
        target: PartnerTarget,
        path: str,
        body: bytes,
        *,
        content_type: str = "application/json",
        accept: str = "application/json",
        max_bytes: int,
    ) -> PartnerAnswer:
        """``POST`` ``body`` to ``path`` at the partner; its answer, whatever the status,
        with at most ``max_bytes`` of body."""
        url = target.url + path
        verify = await self._verify(target)
        headers = {
            "Authorization": f"Bearer {target.token}",
            "Content-Type": content_type,
            "Accept": accept,
        }
        try:
            async with httpx.AsyncClient(
                verify=verify, timeout=self._timeout, follow_redirects=False
            ) as client:
                async with client.stream("POST", url, content=body, headers=headers) as answer:
                    data = await _read(answer, max_bytes, target.partner)
                    return PartnerAnswer(
                        answer.status_code,
                        answer.headers.get("content-type", ""),
                        answer.headers,
                        data,
                    )
        except httpx.TimeoutException:
            raise PartnerUnreachable(
                f"partner {target.partner} did not answer at {target.url} in time"
            ) from None
        except httpx.HTTPError as exc:
            raise PartnerUnreachable(
                f"partner {target.partner} could not be reached at {target.url}: {_reason(exc)}"
            ) from None

    async def _verify(self, target: PartnerTarget) -> ssl.SSLContext | bool:
        if target.tls_sha256 is None or not target.url.startswith("https://"):
            return True
        parts = urlsplit(target.url)
        host = parts.hostname or ""
        port = parts.port or 443
        pin = (host, port, target.tls_sha256)
        context = self._pinned.get(pin)
        if context is None:
            der = await self._presented_certificate(target, host, port)
            context = ssl.create_default_context(cadata=der)
            # The pinned certificate is the one trust anchor: a leaf, whatever its issuer.
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            context.check_hostname = False
            if len(self._pinned) > 256:
                self._pinned.clear()
            self._pinned[pin] = context
        return context

    async def _presented_certificate(self, target: PartnerTarget, host: str, port: int) -> bytes:
        """The DER certificate the partner presents, once its SHA-256 is the pin."""
        probe = ssl.create_default_context()
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE  # only compared with the pin below, never trusted
        timeout = self._timeout.connect or 10.0
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=probe, server_hostname=host
                )
        except (OSError, TimeoutError) as exc:
            raise PartnerUnreachable(
                f"partner {target.partner} could not be reached at {target.url}: {_reason(exc)}"
            ) from None
        try:
            tls = writer.get_extra_info("ssl_object")
            der = tls.getpeercert(binary_form=True) if tls is not None else None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass
        del reader
        if not der:
            raise PartnerUnreachable(f"partner {target.partner} presented no TLS certificate")
        found = hashlib.sha256(der).hexdigest()
        pin = target.tls_sha256 or ""
        if not hmac.compare_digest(found, pin):
            raise PartnerUnreachable(
                f"partner {target.partner} presents a TLS certificate with SHA-256 {found}, "
                f"not the {pin} of its identity on record: import its current identity "
                f"(iex partner add {target.partner} --identity FILE) if it changed it"
            )
        return bytes(der)


async def _read(answer: httpx.Response, limit: int, partner: str) -> bytes:
    declared = answer.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit and "content-encoding" not in answer.headers:
        raise PartnerUnreachable(
            f"partner {partner} answered {declared} bytes; at most {limit} are read"
        )
    data = bytearray()
    async for chunk in answer.aiter_bytes():
        data += chunk
        if len(data) > limit:
            raise PartnerUnreachable(f"partner {partner} answered more than {limit} bytes")
    return bytes(data)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text[:300] if text else type(exc).__name__
