"""Cryptographic failures, kept free of HTTP so any layer can raise or catch them."""

from __future__ import annotations

from app.errors import IexError


class IntegrityError(IexError):
    """An encrypted object failed authentication: tampered, truncated, swapped or misfiled.

    Its message names the object and never includes plaintext.
    """

    status_code = 500

    def __init__(self, object_id: str, reason: str) -> None:
        super().__init__(f"stored object {object_id} failed its integrity check: {reason}")
        self.object_id = object_id
        self.reason = reason


class KeyUnavailable(IexError):
    """A key is missing, malformed or does not open what it should."""

    status_code = 500


class SignatureInvalid(IexError):
    """A signature does not verify: the signed bytes or the signature were altered, or
    another key made it. The message names what was signed and by which key id."""

    status_code = 400


class UnknownKey(IexError):
    """A signed document names a key id that is not known for the gateway that claims it."""

    status_code = 400

    def __init__(self, gateway: str, key_id: str) -> None:
        super().__init__(f"no signing key {key_id!r} is known for gateway {gateway!r}")
        self.gateway = gateway
        self.key_id = key_id
