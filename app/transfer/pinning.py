"""Calling a partner gateway whose TLS certificate is pinned by its SHA-256.

A partner's identity document names the SHA-256 of the DER certificate it serves
(``tls_sha256``, ``docs/EXCHANGE.md``). That pin, carried between the operators by a channel
they trust, says more than any CA could: exactly this certificate, so a self-signed one is
fine and a certificate some CA issued to someone else for that host is not.

``pinned_context`` makes an ``ssl.SSLContext`` that accepts the handshake only when the
server's certificate is the pinned one. The check runs at the end of the handshake itself
(``SSLContext.sslobject_class``, a subclass of ``ssl.SSLObject`` whose ``do_handshake``
compares the certificate before returning), so a mismatch fails the connection before a
single byte of a request (and the bearer token in it) is sent. Checking a response's
certificate afterwards would be too late for the token.

Both ways a context makes connections are covered: memory BIOs (``wrap_bio``, as anyio and
so httpx's async client use it) and sockets (``wrap_socket``, httpx's sync client).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl

_HEX64 = re.compile(r"[0-9a-f]{64}")


class PinMismatch(ssl.SSLCertVerificationError):
    """The server's certificate is not the pinned one (or it sent none)."""


def pinned_context(sha256: str) -> ssl.SSLContext:
    """A client context that trusts exactly the certificate whose DER SHA-256 is ``sha256``
    (64 lower-case hex digits), whatever its issuer, names or dates: the pin replaces CA
    and host name verification."""
    if not _HEX64.fullmatch(sha256):
        raise ValueError("a certificate pin is 64 lower-case hex digits (SHA-256 of its DER)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The pin is the verification: OpenSSL's own would refuse a self-signed certificate.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    expected = bytes.fromhex(sha256)

    def check(der: bytes | None) -> None:
        if der is None:
            raise PinMismatch("the partner presented no TLS certificate")
        found = hashlib.sha256(der).digest()
        if not hmac.compare_digest(found, expected):
            raise PinMismatch(
                f"the partner's TLS certificate (SHA-256 {found.hex()}) is not the one "
                f"pinned in its identity on record ({sha256})"
            )

    class PinnedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()  # SSLWantReadError and the like pass on while it runs
            check(self.getpeercert(binary_form=True))

    class PinnedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            check(self.getpeercert(binary_form=True))

    context.sslobject_class = PinnedObject
    context.sslsocket_class = PinnedSocket
    return context
