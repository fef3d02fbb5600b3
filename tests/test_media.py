"""Media type parsing and Accept ordering."""

from __future__ import annotations

import pytest

from app.dicom.media import (
    MalformedMediaType,
    is_dicom_multipart,
    parse_accept,
    parse_media_type,
    read_media_type,
)


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


# -- how lenient the parser is, and where it stops (docs/CONFORMANCE.md) --------------------

STOW = 'multipart/related; type="application/dicom"; boundary=b'


@pytest.mark.parametrize(
    "text",
    [
        'multipart/related; type="application/dicom"; boundary="b"',  # quoted
        "multipart/related; type=application/dicom; boundary=b",  # "/" unquoted, as sent
        'MULTIPART/Related; TYPE="application/dicom"; Boundary=b',  # case of names
        'multipart/related;type="application/dicom";boundary=b',  # no spaces
        'multipart/related ;  type = "application/dicom" ;boundary= b ;',  # spaces, empty
        'multipart/related; type="Application/DICOM"; boundary=b; start="<root>"; charset=x',
    ],
)
def test_forms_real_senders_use_read_the_same(text: str) -> None:
    media = read_media_type(text)
    assert media.mime == "multipart/related"
    assert media.params["boundary"] == "b"
    assert is_dicom_multipart(media)


def test_quoted_values_keep_separators_and_escapes() -> None:
    media = read_media_type(r'a/b; x="semi;colon, comma"; y="a \"quoted\" \\ word"; z=""')
    assert media.params == {"x": "semi;colon, comma", "y": 'a "quoted" \\ word', "z": ""}


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("nonsense", "'nonsense' is not a media type (type/subtype)"),
        ("multi part/related", "'multi part/related' is not a media type (type/subtype)"),
        ("a/b; broken", "media type parameter 'broken' is not name=value"),
        ("a/b; =x", "media type parameter '=x' is not name=value"),
        ("a/b; boundary=x; Boundary=y", "media type parameter 'boundary' is given twice"),
        ('a/b; boundary="x', "the value of parameter 'boundary' has no closing quote"),
        (
            'a/b; boundary="x"y',
            "the value of parameter 'boundary' has text after its closing quote",
        ),
        ('a/b; boundary=x"y"', "the value of parameter 'boundary' has a stray quote"),
    ],
)
def test_ambiguous_media_types_are_refused_with_the_reason(text: str, detail: str) -> None:
    with pytest.raises(MalformedMediaType) as info:
        read_media_type(text)
    assert info.value.detail == detail
    assert parse_media_type(text) is None


@pytest.mark.parametrize(
    ("text", "dicom"),
    [
        (STOW, True),
        ("multipart/related; boundary=b", True),  # no type: PS3.18 wants one, senders omit it
        ('multipart/related; type="application/dicom; transfer-syntax=*"; boundary=b', True),
        ('multipart/related; type="application/dicom+json"; boundary=b', False),
        ('multipart/related; type="application/dicom+xml"; boundary=b', False),
        ('multipart/related; type="application/octet-stream"; boundary=b', False),
        ('multipart/related; type="not a type"; boundary=b', False),
        ('multipart/form-data; type="application/dicom"; boundary=b', False),
        ("application/dicom", False),
    ],
)
def test_which_multipart_bodies_hold_dicom_objects(text: str, dicom: bool) -> None:
    assert is_dicom_multipart(read_media_type(text)) is dicom


def test_an_accept_range_that_cannot_be_read_is_skipped() -> None:
    ranges = parse_accept('multipart/related; type="application/dicom, a/b; q=1; q=0.5, c/d')
    assert [r.mime for r in ranges] == []
    ranges = parse_accept("a/b; q=1; q=0.5, c/d;q=0.9")
    assert [r.mime for r in ranges] == ["c/d"]
