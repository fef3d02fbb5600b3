"""Media type parsing and Accept ordering."""

from __future__ import annotations

from app.dicom.media import parse_accept, parse_media_type


def test_parses_quoted_parameters_case_insensitively() -> None:
    m = parse_media_type('Multipart/Related; Type="application/dicom"; boundary="a;b"')
    assert m is not None
    assert m.mime == "multipart/related"
    assert m.params == {"type": "application/dicom", "boundary": "a;b"}


def test_rejects_malformed() -> None:
    assert parse_media_type("nonsense") is None
    assert parse_media_type("a/b; broken") is None
    assert parse_media_type("/json") is None


def test_accept_orders_by_quality_and_drops_q0() -> None:
    ranges = parse_accept("application/json;q=0.5, application/dicom+json, text/html;q=0")
    assert [r.mime for r in ranges] == ["application/dicom+json", "application/json"]


def test_missing_accept_means_anything() -> None:
    assert [r.mime for r in parse_accept(None)] == ["*/*"]
    assert parse_accept("")[0].matches("application/dicom")


def test_wildcards() -> None:
    (r,) = parse_accept("application/*")
    assert r.matches("application/dicom") and not r.matches("image/jpeg")
