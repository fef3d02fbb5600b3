"""The one wiring point between HTTP handlers and the services built in the lifespan
(``app.services.wiring``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import Forbidden, Unauthorized
from app.services.security import Credentials, Principal, Role
from app.services.wiring import Services

# The dependencies here are ``async`` though most never await: FastAPI runs a plain ``def``
# dependency in a worker thread, a trip that costs more than the function.


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _root_url(request: Request) -> str:
    public: str | None = request.app.state.services.settings.public_url
    return public if public else str(request.base_url).rstrip("/")


async def get_root_url(request: Request) -> str:
    """Absolute URL of the gateway: the configured public URL, else the URL the client
    reached."""
    return _root_url(request)


async def get_base_url(request: Request) -> str:
    """Absolute URL of the DICOMweb root for Retrieve URLs and BulkDataURIs."""
    return _root_url(request) + "/dicomweb"


ServicesDep = Annotated[Services, Depends(get_services)]
BaseUrlDep = Annotated[str, Depends(get_base_url)]
RootUrlDep = Annotated[str, Depends(get_root_url)]

# -- authentication and authorisation -----------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    description="A token from `iex token issue`: `Authorization: Bearer iex_<id>_<secret>`.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

#: OpenAPI 3.1 ``mutualTLS`` scheme (FastAPI's models do not know it, so it is added to the
#: generated document by ``declare_security``).
MUTUAL_TLS_SCHEME = {
    "type": "mutualTLS",
    "description": "Partner gateways: a client certificate from the configured CA whose "
    "SHA-256 fingerprint is pinned with `iex partner add` (`iex serve --tls-client-ca`).",
}


def client_certificate(request: Request) -> str | None:
    """The pinned-certificate fingerprint the TLS server put into the ASGI scope's ``tls``
    extension (see ``app.http.tls``); None over plain HTTP or without a client certificate."""
    tls = request.scope.get("extensions", {}).get("tls") or {}
    fingerprint = tls.get("client_cert_sha256")
    return fingerprint if isinstance(fingerprint, str) else None


async def authenticate(request: Request, services: ServicesDep, bearer: BearerDep) -> Principal:
    """The caller as a ``Principal``, or 401. What it claimed and why it failed are left on
    ``request.state`` for the audit trail."""
    client = request.client.host if request.client else None
    credentials = Credentials(
        bearer.credentials if bearer else None, client_certificate(request), client
    )
    request.state.audit_actor = credentials.claimed_actor
    try:
        principal = await services.security.gate.authenticate(credentials)
    except Unauthorized as exc:
        request.state.audit_reason = exc.detail
        raise
    request.state.principal = principal
    return principal


def require(role: Role, *, operator: bool = False) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting principals holding ``role`` (of the operator trust if asked)."""

    async def dependency(
        request: Request,
        services: ServicesDep,
        principal: Annotated[Principal, Depends(authenticate)],
    ) -> Principal:
        try:
            services.security.gate.authorise(principal, role)
            if operator and not principal.is_operator:
                raise Forbidden("this needs an admin of the operator trust")
        except Forbidden as exc:
            request.state.audit_reason = exc.detail
            raise
        return principal

    return dependency


Reader = Annotated[Principal, Depends(require(Role.READER))]
Uploader = Annotated[Principal, Depends(require(Role.UPLOADER))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
Operator = Annotated[Principal, Depends(require(Role.ADMIN, operator=True))]


_SECURITY_RESPONSES = {
    "401": {"description": "No, unknown, expired or revoked credentials (WWW-Authenticate)"},
    "403": {"description": "The credentials lack the role this needs"},
}


def declare_security(app: FastAPI) -> None:
    """Complete the OpenAPI document: the ``mutualTLS`` scheme as an alternative to the
    bearer token wherever one is required, and the 401 and 403 answers there."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        document.setdefault("components", {}).setdefault("securitySchemes", {})["mutualTLS"] = (
            MUTUAL_TLS_SCHEME
        )
        for path in document.get("paths", {}).values():
            for operation in path.values():
                security = operation.get("security")
                if security and {"mutualTLS": []} not in security:
                    security.append({"mutualTLS": []})
                    for status, response in _SECURITY_RESPONSES.items():
                        operation.setdefault("responses", {}).setdefault(status, response)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
