"""Signed requests between gateways: a pull of priors, a federated search.

A gateway calling a partner authenticates twice: with the bearer token the partner issued
for it (which says "some holder of a token of trust X") and with a request document signed
by its Ed25519 signing key (which says which gateway asks, and what exactly). The document
is canonical JSON, signed under a context of its own kind so that a signature made for one
kind never verifies as another, or as a manifest or receipt. On the wire, as receipts::

    {"request": "<canonical JSON text>", "signature": "<base64 of 64 bytes>"}

The holder reads the requester's gateway and key id from the text (not yet trusted), looks
the key up among its partners' keys, verifies the signature over the very bytes received,
then every field, then the time: a request more than ``MAX_CLOCK_SKEW`` seconds away from
its clock is refused, so a captured request cannot be played back later.

``docs/EXCHANGE.md`` (Pulls, Federated search) specifies the fields. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from app.crypto import exchange
from app.crypto.errors import SignatureInvalid
from app.crypto.exchange import SigningKey, VerifyKey
from app.errors import BadRequest
from app.transfer import canonical_json as cj
from app.transfer.canonical_json import FieldError
from app.transfer.manifest import Endpoint

PULL_FORMAT: Final = "iex-pull-request/1"
SEARCH_FORMAT: Final = "iex-search-request/1"
CONTEXTS = {PULL_FORMAT: b"iex-pull-request/1\n", SEARCH_FORMAT: b"iex-search-request/1\n"}
#: A request document is small; a larger one is refused before it is parsed.
MAX_REQUEST_SIZE = 64 * 1024
#: Seconds a request's time may be away from the holder's clock, either way.
MAX_CLOCK_SKEW = 300
#: The most studies one pull may ask for (a holder may answer fewer).
MAX_PULL_LIMIT = 1000
#: Matching keys of a pull, parameters of a search.
MAX_KEYS = 32
MAX_VALUE_LENGTH = 1024
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_PARAMETER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_COMMON = frozenset({"format", "id", "time", "requester", "holder"})

Kind = Literal["iex-pull-request/1", "iex-search-request/1"]
Priority = Literal["routine", "urgent"]


class RequestInvalid(BadRequest):
    """A request document that is malformed, stale, or addressed to another gateway."""


@dataclass(frozen=True)
class Holder:
    """The gateway asked, and the trust of it whose studies are asked for."""

    gateway: str
    trust: str

    def to_json(self) -> dict[str, str]:
        return {"gateway": self.gateway, "trust": self.trust}

    @staticmethod
    def from_json(value: object, path: str) -> Holder:
        d = cj.fields(value, path, frozenset({"gateway", "trust"}))
        return Holder(
            cj.name(d["gateway"], f"{path}.gateway"), cj.name(d["trust"], f"{path}.trust")
        )


@dataclass(frozen=True)
class PullRequest:
    """Queue, for the requester's trust, the holder trust's studies matching ``query``
    (QIDO-RS study matching keys by keyword), at most ``limit`` of them."""

    id: str
    time: str
    requester: Endpoint
    holder: Holder
    query: Mapping[str, str]
    limit: int
    priority: Priority = "routine"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PULL_FORMAT,
            "id": self.id,
            "time": self.time,
            "requester": self.requester.to_json(),
            "holder": self.holder.to_json(),
            "query": dict(self.query),
            "limit": self.limit,
            "priority": self.priority,
        }

    def digest(self) -> str:
        """SHA-256 of what the pull asks, without when or with which key: the same request
        id must always ask the same, whenever it is sent again."""
        document = self.to_json()
        del document["time"]
        document["requester"] = {"gateway": self.requester.gateway, "trust": self.requester.trust}
        return hashlib.sha256(cj.encode(document)).hexdigest()

    @staticmethod
    def from_document(d: dict[str, Any]) -> PullRequest:
        cj.fields(d, "request", _COMMON | {"query", "limit", "priority"})
        query = d["query"]
        if not isinstance(query, dict):
            raise FieldError("query is not an object")
        if not 1 <= len(query) <= MAX_KEYS:
            raise FieldError(f"query holds {len(query)} keys; 1 to {MAX_KEYS} are allowed")
        for key, value in query.items():
            cj.string(key, "query key", pattern=_KEYWORD)
            cj.string(value, f"query.{key}", max_length=MAX_VALUE_LENGTH)
        priority = cj.string(d["priority"], "priority")
        if priority not in ("routine", "urgent"):
            raise FieldError(f"priority {priority!r} is not 'routine' or 'urgent'")
        return PullRequest(
            **_common(d, PULL_FORMAT),
            query=dict(query),
            limit=cj.integer(d["limit"], "limit", 1, MAX_PULL_LIMIT),
            priority="urgent" if priority == "urgent" else "routine",
        )


@dataclass(frozen=True)
class SearchRequest:
    """Search the holder trust's studies with these QIDO-RS parameters, in order."""

    id: str
    time: str
    requester: Endpoint
    holder: Holder
    parameters: tuple[tuple[str, str], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SEARCH_FORMAT,
            "id": self.id,
            "time": self.time,
            "requester": self.requester.to_json(),
            "holder": self.holder.to_json(),
            "parameters": [[name, value] for name, value in self.parameters],
        }

    @staticmethod
    def from_document(d: dict[str, Any]) -> SearchRequest:
        cj.fields(d, "request", _COMMON | {"parameters"})
        parameters = []
        for i, item in enumerate(cj.array(d["parameters"], "parameters", MAX_KEYS)):
            pair = cj.array(item, f"parameters[{i}]", 2)
            if len(pair) != 2:
                raise FieldError(f"parameters[{i}] is not a [name, value] pair")
            name = cj.string(pair[0], f"parameters[{i}][0]", pattern=_PARAMETER)
            value = pair[1]
            if not isinstance(value, str) or len(value) > MAX_VALUE_LENGTH:
                raise FieldError(
                    f"parameters[{i}][1] is not a string of at most {MAX_VALUE_LENGTH} characters"
                )
            parameters.append((name, value))
        return SearchRequest(**_common(d, SEARCH_FORMAT), parameters=tuple(parameters))


GatewayRequest = PullRequest | SearchRequest


def _common(d: dict[str, Any], kind: str) -> dict[str, Any]:
    found = cj.string(d["format"], "format")
    if found != kind:
        raise FieldError(f"format {found!r} is not {kind!r}")
    return {
        "id": cj.name(d["id"], "id"),
        "time": cj.time_field(d["time"], "time"),
        "requester": Endpoint.from_json(d["requester"], "requester"),
        "holder": Holder.from_json(d["holder"], "holder"),
    }


def sign_request(request: GatewayRequest, private: SigningKey) -> bytes:
    """The request document: the request's canonical text and the signature over it."""
    document = request.to_json()
    text = cj.encode(document)
    signature = exchange.sign(private, CONTEXTS[document["format"]], text)
    return cj.encode({"request": text.decode("utf-8"), "signature": cj.b64(signature)})


@dataclass(frozen=True)
class SignedRequest:
    """A request document taken apart but not yet verified: who it claims to come from."""

    kind: Kind
    text: bytes
    signature: bytes
    document: dict[str, Any]
    requester: Endpoint


def read_request(document: bytes, kind: Kind) -> SignedRequest:
    """The parts of a request document of ``kind``; ``RequestInvalid`` naming the field."""
    if len(document) > MAX_REQUEST_SIZE:
        raise RequestInvalid(
            f"a request document of {len(document)} bytes is over the limit of {MAX_REQUEST_SIZE}"
        )
    try:
        outer = cj.fields(
            cj.decode(document, "the request document"),
            "request document",
            frozenset({"request", "signature"}),
        )
        text = cj.string(outer["request"], "request", max_length=MAX_REQUEST_SIZE).encode("utf-8")
        signature = cj.binary(outer["signature"], "signature", exchange.SIGNATURE_SIZE)
        inner = cj.decode(text, "the request")
        found = inner.get("format")
        if found != kind:
            raise FieldError(f"format {str(found)[:40]!r} is not {kind!r}")
        requester = Endpoint.from_json(inner.get("requester"), "requester")
    except FieldError as exc:
        raise RequestInvalid(f"request refused: {exc}") from None
    return SignedRequest(kind, text, signature, inner, requester)


def verify_request(
    signed: SignedRequest, public: VerifyKey, *, gateway: str, now: float
) -> GatewayRequest:
    """The request, once its signature verified against the requester's key ``public``,
    every field is as the format says, it is addressed to ``gateway`` and its time is
    within ``MAX_CLOCK_SKEW`` of ``now``."""
    try:
        exchange.verify(public, CONTEXTS[signed.kind], signed.text, signed.signature)
    except SignatureInvalid:
        raise SignatureInvalid(
            f"the request signature does not verify against key {signed.requester.key!r} of "
            f"gateway {signed.requester.gateway!r}"
        ) from None
    try:
        request: GatewayRequest = (
            PullRequest.from_document(signed.document)
            if signed.kind == PULL_FORMAT
            else SearchRequest.from_document(signed.document)
        )
    except FieldError as exc:
        raise RequestInvalid(f"request refused: {exc}") from None
    if request.holder.gateway != gateway:
        raise RequestInvalid(
            f"the request is addressed to gateway {request.holder.gateway!r}, not to this "
            f"gateway {gateway!r}"
        )
    at = datetime.strptime(request.time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    if abs(now - at) > MAX_CLOCK_SKEW:
        raise RequestInvalid(
            f"the request time {request.time} is {abs(now - at):.0f} s away from this "
            f"gateway's clock ({cj.timestamp(datetime.fromtimestamp(now, UTC))}); at most "
            f"{MAX_CLOCK_SKEW} s are accepted: check both clocks (NTP)"
        )
    return request
