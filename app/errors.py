"""The domain error tree. Lower layers raise these; the HTTP layer maps them to responses.

::

    IexError                      500  (never raised directly)
     ├── BadRequest               400  malformed input the caller can fix
     │    ├── InvalidUID          400  not a PS3.5 §9 UID
     │    └── InvalidQuery        400  unknown or malformed QIDO-RS parameter
     ├── Unauthorized             401  no, unknown, expired or revoked credentials
     ├── Forbidden                403  authenticated, but the role does not allow it
     ├── NotFound                 404  no such study/series/instance/frame/bulk data
     ├── NotAcceptable            406  no representation matches Accept
     ├── Conflict                 409  the request does not fit the resource's current state
     ├── Gone                     410  the resource existed but has expired
     ├── PreconditionFailed       412  a request precondition (e.g. Tus-Resumable) fails
     ├── PayloadTooLarge          413  over a configured size limit
     ├── UnsupportedMediaType     415  request Content-Type not handled
     ├── TooManyRequests          429  a rate limit is exhausted (with Retry-After)
     ├── ChecksumMismatch         460  a tus chunk does not match its Upload-Checksum
     ├── BadGateway               502  a partner gateway could not be reached or failed
     └── ServiceUnavailable       503  store or index not usable
          └── AuditUnavailable    503  the audit trail cannot be written: no access to
                                       patient data is answered unrecorded

The module is free of HTTP frameworks so that every layer may raise these.
"""

from __future__ import annotations


class IexError(Exception):
    status_code = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def headers(self) -> dict[str, str]:
        """Response headers the status requires (RFC 9110 §11.6.1, RFC 6585 §4)."""
        return {}


class BadRequest(IexError):
    status_code = 400


class InvalidUID(BadRequest):
    pass


class InvalidQuery(BadRequest):
    pass


class Unauthorized(IexError):
    """Every 401 carries the same challenge (RFC 6750 §3); the detail never says whether a
    token exists, so a guess learns nothing."""

    status_code = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="iex"'}


class Forbidden(IexError):
    status_code = 403


class NotFound(IexError):
    status_code = 404


class NotAcceptable(IexError):
    status_code = 406


class Conflict(IexError):
    status_code = 409


class Gone(IexError):
    status_code = 410


class PreconditionFailed(IexError):
    status_code = 412


class PayloadTooLarge(IexError):
    status_code = 413


class UnsupportedMediaType(IexError):
    status_code = 415


class TooManyRequests(IexError):
    status_code = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ChecksumMismatch(IexError):
    """tus 1.0.0 checksum extension: 460 Checksum Mismatch (not an IANA status)."""

    status_code = 460


class BadGateway(IexError):
    """A call this gateway made to a partner gateway on the caller's behalf failed: the
    partner was unreachable, answered an error, or answered something malformed."""

    status_code = 502


class ServiceUnavailable(IexError):
    status_code = 503


class AuditUnavailable(ServiceUnavailable):
    pass
