"""The checked-in OpenAPI document matches the code."""

from __future__ import annotations

from app.openapi import DEFAULT_PATH, render


def test_checked_in_openapi_matches_the_app() -> None:
    assert DEFAULT_PATH.read_text(encoding="utf-8") == render(), (
        "openapi/openapi.json is stale: run `.venv/bin/python -m app.openapi` and commit it"
    )
