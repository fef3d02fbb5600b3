"""UID validation (PS3.5 §9.1), and the UIDs that place an instance in its study.

A UID is at most 64 characters of digits and dots; each component is a number without a
leading zero (a component may be the single digit ``0``). Validated UIDs are safe to use
in SQL parameters, URLs and log lines; they never name files (blob keys are ours).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.errors import InvalidUID

MAX_UID_LENGTH = 64
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(value: str) -> bool:
    return len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def validate_uid(value: str, what: str = "UID") -> str:
    """Return ``value`` unchanged if it is a valid UID, else raise ``InvalidUID``."""
    if not value:
        raise InvalidUID(f"{what} is empty")
    if len(value) > MAX_UID_LENGTH:
        raise InvalidUID(f"{what} is {len(value)} characters long; at most 64 are allowed")
    if _UID.fullmatch(value) is None:
        shown = value if len(value) <= MAX_UID_LENGTH else value[:MAX_UID_LENGTH] + "..."
        raise InvalidUID(
            f"{what} {shown!r} is not a DICOM UID: digits and dots only, "
            "no empty components, no leading zeros (PS3.5 §9.1)"
        )
    return value


@dataclass(frozen=True)
class InstanceRef:
    """A stored instance by its place in the hierarchy (PS3.3 C.7): study, series, SOP
    Instance, and its SOP Class. A reference taken from a request path (``/studies/{study}``)
    may stop at the study or the series and not know the class."""

    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_class_uid: str | None = None
