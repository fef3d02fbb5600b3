"""The domain error tree. Lower layers raise these; the HTTP layer maps them to responses.

::

    IexError                      500  (never raised directly)
     ├── BadRequest               400  malformed input the caller can fix
     │    ├── InvalidUID          400  not a PS3.5 §9 UID
     │    └── InvalidQuery        400  unknown or malformed QIDO-RS parameter
     ├── NotFound                 404  no such study/series/instance/frame/bulk data
     ├── NotAcceptable            406  no representation matches Accept
     ├── PayloadTooLarge          413  over a configured size limit
     ├── UnsupportedMediaType     415  request Content-Type not handled
     └── ServiceUnavailable       503  store or index not usable

The module is free of HTTP frameworks so that every layer may raise these.
"""

from __future__ import annotations


class IexError(Exception):
    status_code = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(IexError):
    status_code = 400


class InvalidUID(BadRequest):
    pass


class InvalidQuery(BadRequest):
    pass


class NotFound(IexError):
    status_code = 404


class NotAcceptable(IexError):
    status_code = 406


class PayloadTooLarge(IexError):
    status_code = 413


class UnsupportedMediaType(IexError):
    status_code = 415


class ServiceUnavailable(IexError):
    status_code = 503
