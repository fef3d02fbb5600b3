"""Certificate fingerprints for pinning partner gateways.

A partner's client certificate is pinned by the SHA-256 of its DER encoding, the same value
``openssl x509 -noout -fingerprint -sha256`` prints (colons and case do not matter here).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from app.errors import BadRequest

_HEX64 = re.compile(r"[0-9a-f]{64}")


def der_fingerprint(der: bytes) -> str:
    """Lower-case hex SHA-256 of a DER certificate."""
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(pem: str | bytes) -> str:
    """The fingerprint of the first certificate in a PEM text."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    cert = x509.load_pem_x509_certificate(data)
    return cert.fingerprint(hashes.SHA256()).hex()


def file_fingerprint(path: Path) -> str:
    """The fingerprint of a certificate file, PEM or DER."""
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return pem_fingerprint(data)
    cert = x509.load_der_x509_certificate(data)
    return der_fingerprint(cert.public_bytes(serialization.Encoding.DER))


def normalise_fingerprint(text: str) -> str:
    """``AB:CD:…`` or ``abcd…`` as 64 lower-case hex digits; anything else is refused."""
    value = text.replace(":", "").strip().lower()
    if not _HEX64.fullmatch(value):
        raise BadRequest("a certificate SHA-256 fingerprint is 64 hex digits")
    return value
