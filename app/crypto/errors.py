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
