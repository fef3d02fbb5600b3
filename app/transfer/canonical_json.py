"""Canonical JSON for signed documents (manifests, receipts), and strict field reading.

A signature covers exact bytes, so a signed document has one byte form: UTF-8, no
whitespace, object keys sorted, strings escaped only where JSON requires (``"``, ``\\`` and
control characters, as ``\\b \\f \\n \\r \\t`` or ``\\u00xx``), integers only, no floats. This
is RFC 8785 (JCS) restricted to integers, so a peer may use any JCS library. A reader refuses
any other form (whitespace, duplicate keys, escapes that need not be): two parsers can then
never see two different documents behind one signature.

Readers take the parsed document apart with the helpers below, which check every type and
bound and name the field (``instances[3].size``) when they refuse.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from app.names import is_valid_name


class FieldError(ValueError):
    """A document or one of its fields is not as the format says; the message names it."""


def encode(document: Mapping[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def decode(data: bytes, what: str) -> dict[str, Any]:
    """The object ``data`` holds, if ``data`` is its canonical form."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FieldError(f"{what} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise FieldError(f"{what} is not a JSON object")
    try:
        canonical = encode(document)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise FieldError(f"{what} holds a value outside the format: {exc}") from None
    if canonical != data:
        raise FieldError(
            f"{what} is not in canonical form (sorted keys, no whitespace, no duplicate keys, "
            "minimal escapes, integers only)"
        )
    return document


def fields(
    value: object, path: str, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``value`` as an object with exactly the ``required`` keys and some ``optional`` ones."""
    if not isinstance(value, dict):
        raise FieldError(f"{path} is not an object")
    missing = required - value.keys()
    if missing:
        raise FieldError(f"{path} lacks {', '.join(sorted(missing))}")
    unknown = value.keys() - required - optional
    if unknown:
        shown = ", ".join(sorted(repr(k[:64]) for k in unknown)[:5])
        raise FieldError(f"{path} has unknown fields: {shown}")
    return value


def string(
    value: object, path: str, *, pattern: re.Pattern[str] | None = None, max_length: int = 64
) -> str:
    if not isinstance(value, str):
        raise FieldError(f"{path} is not a string")
    if not value or len(value) > max_length:
        raise FieldError(f"{path} must be 1 to {max_length} characters")
    if pattern is not None and pattern.fullmatch(value) is None:
        raise FieldError(f"{path} is malformed")
    return value


def name(value: object, path: str) -> str:
    """A gateway, trust or transfer name (``app.names``): never holds ``/``."""
    text = string(value, path)
    if not is_valid_name(text):
        raise FieldError(f"{path} is not 1-64 letters, digits, '.', '_' or '-'")
    return text


def integer(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(f"{path} is not an integer")
    if not low <= value <= high:
        raise FieldError(f"{path} is {value}, outside {low}..{high}")
    return value


def array(value: object, path: str, max_items: int) -> list[Any]:
    if not isinstance(value, list):
        raise FieldError(f"{path} is not an array")
    if len(value) > max_items:
        raise FieldError(f"{path} has {len(value)} items; at most {max_items} are allowed")
    return value


_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
#: Ids that travel in documents: key ids. Printable ASCII without spaces, as the segment
#: header's key id requires.
KEY_ID = re.compile(r"[!-~]{1,64}")


def timestamp(moment: datetime) -> str:
    """A moment as the documents write it: UTC to the second, ``2024-05-01T12:00:00Z``."""
    if moment.tzinfo is None:
        raise ValueError("a timestamp needs a time zone")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def time_field(value: object, path: str) -> str:
    text = string(value, path, pattern=_TIMESTAMP, max_length=20)
    try:
        datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise FieldError(f"{path} is not a valid UTC time") from None
    return text


def binary(value: object, path: str, size: int) -> bytes:
    """Standard base64 with padding (RFC 4648 §4) of exactly ``size`` bytes."""
    text = string(value, path, pattern=_BASE64, max_length=4 * -(-size // 3))
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise FieldError(f"{path} is not base64") from None
    if len(raw) != size or base64.b64encode(raw).decode("ascii") != text:
        raise FieldError(f"{path} is not the base64 of {size} bytes")
    return raw


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
