"""Names people give things: trusts, partners, the gateway itself (``IEX_NAME``).

One rule for all of them, so that a name is safe in a path, a log line and an audit record.
"""

from __future__ import annotations

import re

from app.errors import BadRequest

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def check_name(name: str, what: str = "trust") -> str:
    if not is_valid_name(name):
        raise BadRequest(f"a {what} name is 1-64 letters, digits, '.', '_' or '-'")
    return name


def name_from_host(host: str) -> str:
    """A host name made a valid name: other characters become ``-``; ``iex`` if nothing of
    it is left."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", host).lstrip("._-")[:64]
    return cleaned or "iex"
