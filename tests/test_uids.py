"""UID validation (PS3.5 §9.1)."""

from __future__ import annotations

import pytest

from app.dicom.uids import is_valid_uid, validate_uid
from app.errors import InvalidUID


@pytest.mark.parametrize(
    "uid",
    ["1.2.3", "0", "1.2.840.10008.1.2.1", "2.25.0", "1." + "2" * 62, "1.0.3"],
)
def test_valid(uid: str) -> None:
    assert is_valid_uid(uid)
    assert validate_uid(uid) == uid


@pytest.mark.parametrize(
    ("uid", "message"),
    [
        ("", "empty"),
        ("1.2.3.", "not a DICOM UID"),
        (".1.2", "not a DICOM UID"),
        ("1..2", "not a DICOM UID"),
        ("01.2", "not a DICOM UID"),
        ("1.02", "not a DICOM UID"),
        ("../../etc", "not a DICOM UID"),
        ("1.2.3/4", "not a DICOM UID"),
        ("1.2.a", "not a DICOM UID"),
        ("1.2 ", "not a DICOM UID"),
        ("1.2\x00", "not a DICOM UID"),
        ("1." + "2" * 63, "65 characters"),
        ("１.２", "not a DICOM UID"),
    ],
)
def test_invalid(uid: str, message: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID, match=message):
        validate_uid(uid, "Study Instance UID")
