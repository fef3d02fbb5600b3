"""What ``/transfers`` reads and answers, as models: the push request, strictly decoded, and
the view of a transfer (``app.services.transfers.view``) as the OpenAPI document shows it.

The request is decoded here rather than by FastAPI's body parameter, which would read a body
of any size into memory first: ``read_push_request`` takes bytes already bounded, refuses
what JSON allows but a request should not hold (a repeated member, ``NaN``), and names the
field and the rule in every refusal.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.config import JsonDict

from app.errors import BadRequest
from app.transfer.jobs import JobState, Priority

#: A push request is four short strings; anything longer is not one.
MAX_REQUEST_BYTES = 16 * 1024

_NAME: JsonDict = {"pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", "maxLength": 64}
_UID: JsonDict = {"pattern": "^(0|[1-9][0-9]*)(\\.(0|[1-9][0-9]*))*$", "maxLength": 64}


class PushRequest(BaseModel):
    """``POST /transfers``: push ``study`` of the caller's trust to ``partner_trust`` at
    ``partner``. The patterns are documentation: the UID and the names are checked by the
    rules of the whole gateway (PS3.5 §9.1; ``app.names``), which say why one is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    study: str = Field(
        description="Study Instance UID of a study stored in the caller's trust",
        json_schema_extra=_UID,
    )
    partner: str = Field(description="The partner gateway's name", json_schema_extra=_NAME)
    partner_trust: str = Field(
        description="The trust at the partner that receives the study", json_schema_extra=_NAME
    )
    priority: Literal["routine", "urgent"] = Field(
        default="routine",
        description="`urgent` transfers go before `routine` ones and may use one connection "
        "more to the partner",
    )


_FIELDS = ", ".join(PushRequest.model_fields)


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BadRequest(f"invalid transfer request: member {key[:40]!r} appears twice")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise BadRequest(f"invalid transfer request: {name} is not a JSON number")


def _problem(error: Any) -> str:
    """One pydantic error in the words of this API: which field, which rule."""
    loc = error.get("loc") or ()
    field = str(loc[0]) if loc else "the body"
    kind = error.get("type")
    if kind == "missing":
        return f"{field} is required"
    if kind == "extra_forbidden":
        return f"unknown field {field[:40]!r} (the fields are: {_FIELDS})"
    if kind == "literal_error" and field == "priority":
        shown = str(error.get("input"))[:40]
        values = ", ".join(p.value for p in Priority)
        return f"priority {shown!r} is not one of: {values}"
    if kind in ("string_type", "literal_error"):
        return f"{field} must be a string"
    return f"{field}: {error.get('msg')}"


def read_push_request(body: bytes) -> PushRequest:
    """The request in ``body`` (UTF-8 JSON), or ``BadRequest`` naming every problem."""
    if not body.strip():
        raise BadRequest(
            f"invalid transfer request: the body is empty; send a JSON object with {_FIELDS}"
        )
    try:
        document = json.loads(
            body.decode("utf-8"), object_pairs_hook=_no_repeats, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise BadRequest("invalid transfer request: the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"invalid transfer request: not JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno})"
        ) from None
    except RecursionError:
        raise BadRequest("invalid transfer request: the JSON is nested too deeply") from None
    if not isinstance(document, dict):
        raise BadRequest(
            f"invalid transfer request: the body is a JSON {type(document).__name__}, not an "
            f"object with {_FIELDS}"
        )
    try:
        return PushRequest.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise BadRequest(f"invalid transfer request: {problems}") from None


# -- what is answered ------------------------------------------------------------------------


class TransferView(BaseModel):
    """A transfer as its trust sees it (``GET /transfers/{transfer_id}``)."""

    id: str = Field(description="The transfer id: 32 lower-case hexadecimal digits")
    direction: Literal["out", "in"] = Field(
        description="`out`: pushed by this trust; `in`: received from a partner"
    )
    trust: str = Field(description="The local trust")
    partner: str = Field(description="The partner gateway")
    partner_trust: str = Field(description="The trust at the partner")
    study: str = Field(description="Study Instance UID")
    priority: Literal["routine", "urgent"]
    state: str = Field(
        description="Where the transfer is (docs/TRANSFERS.md): "
        + ", ".join(f"`{s.value}`" for s in JobState),
        json_schema_extra={"enum": [s.value for s in JobState]},
    )
    paused: bool = Field(description="Held where it is until resumed")
    bytes_sent: int = Field(description="Bytes the partner acknowledged")
    bytes_total: int | None = Field(description="Bytes to send, once known")
    attempts: int = Field(description="Runs started so far")
    last_error: str | None = Field(description="Why the last attempt failed")
    next_attempt_at: str | None = Field(
        description="When the runner tries next (UTC), for an outbound transfer it will run"
    )
    created_at: str = Field(description="UTC, `YYYY-MM-DDTHH:MM:SSZ`")
    updated_at: str = Field(description="UTC, `YYYY-MM-DDTHH:MM:SSZ`")
    receipt: dict[str, Any] | str | None = Field(
        description="The partner's signed receipt once delivered: `{receipt, signature}`, "
        "`receipt` the canonical JSON text that was signed (docs/EXCHANGE.md, Receipts)"
    )


class TransferList(BaseModel):
    """``GET /transfers``: the trust's transfers matching the filters, newest first."""

    transfers: list[TransferView]
