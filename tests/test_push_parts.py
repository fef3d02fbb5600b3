"""How a bundle is cut into partial uploads, and which recorded parts a resumed push trusts."""

from __future__ import annotations

from typing import Any

import pytest

from app.services.packaging import StagedBundle
from app.services.push_parts import MIN_PART, layout, recorded_parts

MIB = 1024 * 1024


def _spans(parts: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(p["offset"], p["length"]) for p in parts]


@pytest.mark.parametrize(
    ("data", "streams", "lengths"),
    [
        (1000, 4, [1000]),  # small: one data part, however many streams
        (2 * MIN_PART - 1, 4, [2 * MIN_PART - 1]),
        (2 * MIN_PART, 4, [MIN_PART, MIN_PART]),
        (100 * MIB + 3, 4, [25 * MIB, 25 * MIB, 25 * MIB, 25 * MIB + 3]),
        (100 * MIB, 1, [100 * MIB]),
        (0, 4, [0]),
    ],
)
def test_the_head_then_consecutive_data_parts_of_at_least_the_minimum(
    data: int, streams: int, lengths: list[int]
) -> None:
    parts = layout(500, data, streams)
    assert _spans(parts)[0] == (0, 500)
    assert [length for _, length in _spans(parts)[1:]] == lengths
    position = 0
    for offset, length in _spans(parts):
        assert offset == position
        position += length
    assert position == 500 + data
    assert all(p["url"] is None for p in parts)


def test_recorded_parts_are_trusted_only_when_they_add_up_to_the_bundle() -> None:
    bundle = StagedBundle(b"h" * 500, "0" * 64, 20 * MIB)
    parts = layout(500, 20 * MIB, 4)
    parts[1]["url"] = "https://gw-b.example/transfers/uploads/" + "a" * 32
    assert recorded_parts({"parts": parts}, bundle) == parts
    assert recorded_parts({}, bundle) is None
    other = StagedBundle(b"h" * 501, "0" * 64, 20 * MIB)  # packaged again: another head
    assert recorded_parts({"parts": parts}, other) is None
    gap = [dict(p) for p in parts]
    gap[2]["offset"] += 1
    assert recorded_parts({"parts": gap}, bundle) is None
    assert recorded_parts({"parts": [{"offset": 0, "length": "500"}]}, bundle) is None
