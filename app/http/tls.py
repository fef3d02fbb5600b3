"""TLS for ``iex serve``: the peer certificate of a mutual-TLS connection, made visible to the
app.

Uvicorn verifies client certificates against ``--tls-client-ca`` but does not tell the app
which certificate the client presented, and pinning a partner needs exactly that. This
protocol puts it into the ASGI scope's ``tls`` extension (the ASGI TLS extension's
``client_cert_chain``, plus ``client_cert_sha256``, the fingerprint partners are pinned by).
The scope is built by the server from the TLS session, so no request header can forge it.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.crypto.certs import der_fingerprint


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "tls_version": ssl_object.version(),
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_sha256": der_fingerprint(der) if der else None,
    }


class PeerCertificateProtocol(HttpToolsProtocol):
    """HTTP/1.1 (httptools) that adds the ``tls`` extension to every request's scope."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._tls = tls_extension(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            extensions: dict[str, Any] = dict(self.scope.get("extensions") or {})
            extensions["tls"] = self._tls
            self.scope["extensions"] = extensions


def uvicorn_tls_options(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> dict[str, Any]:
    """``uvicorn.run`` keyword arguments for TLS, and for optional client certificates.

    Client certificates are optional (``CERT_OPTIONAL``): one that is presented must chain to
    the client CA, and callers without one can still use bearer tokens.
    """
    if cert is None:
        if key is not None or client_ca is not None:
            raise SystemExit("--tls-key and --tls-client-ca need --tls-cert")
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(cert), "ssl_keyfile": key and str(key)}
    if client_ca is not None:
        options.update(
            ssl_ca_certs=str(client_ca),
            ssl_cert_reqs=ssl.CERT_OPTIONAL,
            http=PeerCertificateProtocol,
        )
    return options
