"""This gateway's identity document: what ``iex identity export`` prints for partners.

The keys are made on first use (``iex serve`` makes them at start), so exporting from a data
directory whose gateway never ran still gives a complete document. Only public keys leave.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from app.crypto.certs import file_fingerprint
from app.crypto.identity import IdentityDocument, check_url, identity_document
from app.errors import BadRequest
from app.services.keys import key_lock, open_data_keys


def export_identity(
    data_dir: Path,
    kek: str | None,
    *,
    gateway: str,
    url: str,
    trusts: Sequence[str],
    tls_cert: Path | None,
) -> IdentityDocument:
    """The document of the gateway on ``data_dir``: its signing keys (retired ones marked
    inactive), the active exchange key of each of ``trusts``, and the SHA-256 of the TLS
    certificate ``tls_cert`` when it serves TLS. Blocking."""
    url = check_url(url, "the URL")
    tls_sha256 = None
    if tls_cert is not None:
        try:
            tls_sha256 = file_fingerprint(tls_cert)
        except (OSError, ValueError) as exc:
            raise BadRequest(f"cannot read the TLS certificate {tls_cert}: {exc}") from None
    with key_lock(data_dir, "export the identity", shared=True):
        keys = open_data_keys(data_dir, kek)
        keys.ensure_identity(trusts)
        signing = keys.signing_keys()
        exchange = [keys.exchange_key(t) for t in trusts]
    return identity_document(gateway, url, signing, exchange, tls_sha256)
