"""The raw element route against pydicom's, element by element.

``app.dicom.instance`` reads an instance's header by two routes: straight from the encoded
elements (``read_from_raw_elements``, DICOM JSON by ``app.dicom.json_encoding``) and through
pydicom (``read_instance_header_with_pydicom``). The raw route must give exactly the pydicom
route's header, or decline; it must never accept what pydicom refuses. Checked for every file
pydicom and pydicom-data ship and for objects built byte by byte with the edge cases of each
VR (PS3.5 §6.2, §7; PS3.18 Annex F).
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import data_store  # pydicom-data, a test dependency: real CT, MR, US ...
import orjson
import pydicom
import pytest

from app.dicom.instance import (
    InstanceHeader,
    InvalidInstance,
    read_from_raw_elements,
    read_instance_header,
    read_instance_header_with_pydicom,
)
from app.dicom.json_encoding import bulk_path

THRESHOLD = 1024
#: pydicom's cut-off: a binary value longer than this is a BulkDataURI at THRESHOLD.
INLINE_MAX = (THRESHOLD // 4) * 3
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

_PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
PYDICOM_FILES = sorted(
    [*_PYDICOM_DATA.glob("test_files/*.dcm"), *_PYDICOM_DATA.glob("charset_files/*.dcm")]
)
DATA_FILES = sorted((Path(data_store.__file__).parent / "data").glob("*.dcm"))
#: Files the raw route is expected to take, among them every encoding it handles.
MUST_TAKE = {
    "CT_small.dcm",  # explicit VR little endian, private elements
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "JPEG2000.dcm",  # encapsulated pixel data
    "rtplan.dcm",  # nested sequences
    "chrFren.dcm",  # ISO_IR 100
    "chrX1.dcm",  # ISO_IR 192
}


# -- both routes ------------------------------------------------------------------------------


Outcome = InstanceHeader | InvalidInstance


def _pydicom_route(data: bytes) -> Outcome:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd values on purpose here
        try:
            return read_instance_header_with_pydicom(io.BytesIO(data), THRESHOLD)
        except InvalidInstance as exc:
            return exc


def _dispatched(data: bytes) -> Outcome:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read_instance_header(io.BytesIO(data), THRESHOLD)
        except InvalidInstance as exc:
            return exc


def _raw_route(data: bytes) -> InstanceHeader | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the raw route itself never warns
        return read_from_raw_elements(io.BytesIO(data), THRESHOLD)


def _assert_same(raw: InstanceHeader, reference: Outcome, what: str) -> None:
    assert isinstance(reference, InstanceHeader), f"{what}: raw route took what pydicom refuses"
    got, want = orjson.loads(raw.metadata), orjson.loads(reference.metadata)
    for key in sorted(set(got) | set(want)):
        assert got.get(key) == want.get(key), f"{what}: element {key}"
    assert raw.metadata == reference.metadata, f"{what}: the JSON bytes"
    for name in ("study_uid", "series_uid", "sop_uid", "sop_class_uid", "transfer_syntax"):
        assert getattr(raw, name) == getattr(reference, name), f"{what}: {name}"
    assert raw.attributes == reference.attributes, what
    assert raw.pixel_data == reference.pixel_data, what
    assert raw.number_of_frames == reference.number_of_frames, what


def _check_both_routes(data: bytes, what: str) -> InstanceHeader | None:
    """The raw route's header (``None`` when it declines), checked against pydicom's."""
    raw = _raw_route(data)
    reference = _pydicom_route(data)
    if raw is not None:
        _assert_same(raw, reference, what)
    # Whoever decides, read_instance_header answers as the pydicom route would.
    dispatched = _dispatched(data)
    if isinstance(reference, InvalidInstance):
        assert isinstance(dispatched, InvalidInstance), what
        assert (dispatched.reason, dispatched.detail) == (reference.reason, reference.detail)
    else:
        assert isinstance(dispatched, InstanceHeader), what
        _assert_same(dispatched, reference, what)
    return raw


# -- the corpus --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PYDICOM_FILES + DATA_FILES, ids=lambda p: p.name)
def test_corpus_file_same_header_by_both_routes(path: Path) -> None:
    _check_both_routes(path.read_bytes(), path.name)


def test_raw_route_takes_most_of_the_corpus() -> None:
    taken = {p.name for p in PYDICOM_FILES if _raw_route(p.read_bytes()) is not None}
    assert MUST_TAKE <= taken
    assert len(taken) >= 50, sorted(taken)


# -- objects built byte by byte ---------------------------------------------------------------


@dataclass(frozen=True)
class Seq:
    """A sequence value: items of elements, all of defined or all of undefined length."""

    items: Sequence[Sequence[Element]]
    undefined: bool = False


Element = tuple[int, str, "bytes | Seq"]
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _encode(elements: Sequence[Element], implicit: bool, big: bool) -> bytes:
    e = ">" if big else "<"
    out = bytearray()
    for tag, vr, value in elements:
        if isinstance(value, Seq):
            body = b"".join(_item(item, value.undefined, implicit, big) for item in value.items)
            if value.undefined:
                body += struct.pack(e + "HHL", 0xFFFE, 0xE0DD, 0)
            length = 0xFFFFFFFF if value.undefined else len(body)
        else:
            body, length = value, len(value)
        group, elem = tag >> 16, tag & 0xFFFF
        if implicit:
            out += struct.pack(e + "HHL", group, elem, length)
        elif vr in _LONG:
            out += struct.pack(e + "HH2sHL", group, elem, vr.encode(), 0, length)
        else:
            out += struct.pack(e + "HH2sH", group, elem, vr.encode(), length)
        out += body
    return bytes(out)


def _item(elements: Sequence[Element], undefined: bool, implicit: bool, big: bool) -> bytes:
    e = ">" if big else "<"
    body = _encode(elements, implicit, big)
    if undefined:
        return (
            struct.pack(e + "HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + body
            + struct.pack(e + "HHL", 0xFFFE, 0xE00D, 0)
        )
    return struct.pack(e + "HHL", 0xFFFE, 0xE000, len(body)) + body


def _ui(uid: str) -> bytes:
    data = uid.encode()
    return data + b"\x00" * (len(data) % 2)


def _us(*values: int, big: bool = False) -> bytes:
    return struct.pack(f"{'>' if big else '<'}{len(values)}H", *values)


def part10(
    extra: Sequence[Element],
    transfer_syntax: str = EXPLICIT_LE,
    *,
    pixels: bool = True,
    sort: bool = True,
    trailer: bytes = b"",
) -> bytes:
    """A Part 10 object: the identifying UIDs, a 4x4 16-bit image and ``extra`` elements."""
    big = transfer_syntax == EXPLICIT_BE
    implicit = transfer_syntax == IMPLICIT_LE
    base: list[Element] = [
        (0x00080016, "UI", _ui("1.2.840.10008.5.1.4.1.1.7")),
        (0x00080018, "UI", _ui("1.2.3.4.5.6")),
        (0x0020000D, "UI", _ui("1.2.3.4")),
        (0x0020000E, "UI", _ui("1.2.3.4.5")),
    ]
    if pixels:
        base += [
            (0x00280002, "US", _us(1, big=big)),
            (0x00280004, "CS", b"MONOCHROME2 "),
            (0x00280010, "US", _us(4, big=big)),
            (0x00280011, "US", _us(4, big=big)),
            (0x00280100, "US", _us(16, big=big)),
        ]
    tags = {tag for tag, _, _ in extra}
    elements = [el for el in base if el[0] not in tags] + list(extra)
    if sort:
        elements.sort(key=lambda el: el[0])
    if pixels:
        elements.append((0x7FE00010, "OW", bytes(range(32))))
    meta_body = _encode(
        [
            (0x00020001, "OB", b"\x00\x01"),
            (0x00020002, "UI", _ui("1.2.840.10008.5.1.4.1.1.7")),
            (0x00020003, "UI", _ui("1.2.3.4.5.6")),
            (0x00020010, "UI", _ui(transfer_syntax)),
        ],
        implicit=False,
        big=False,
    )
    meta = _encode([(0x00020000, "UL", struct.pack("<L", len(meta_body)))], False, False)
    dataset = _encode(elements, implicit, big)
    return b"\x00" * 128 + b"DICM" + meta + meta_body + dataset + trailer


def _pn(text: str, charset: str = "", tag: int = 0x00100010) -> list[Element]:
    data = text.encode("utf-8" if charset == "ISO_IR 192" else "latin-1")
    head: list[Element] = [(0x00080005, "CS", charset.encode())] if charset else []
    return [*head, (tag, "PN", data)]


OPERATORS_NAME = 0x00081070  # PN of several values, not indexed


def _text(vr: str, data: bytes, tag: int = 0x00181030) -> list[Element]:
    return [(tag, vr, data)]


def _private(implicit: bool = False) -> list[Element]:
    return [
        (0x00090010, "LO", b"ACME 1.0"),
        (0x00091001, "LO", b"private text\\second "),
        (0x00091002, "OB", b"\x01\x02\x03\x04"),
        (0x00091003, "OB", bytes(INLINE_MAX + 1)),
        (0x00290010, "LO", b"SIEMENS CSA HEADER"),  # a creator in pydicom's dictionary
        (0x00291008, "CS", b"IMAGE NUM 4 "),
        (0x00291009, "LO", b"20021106"),
        (0x00291010, "OB", b"SV10" + bytes(12)),
    ]


def _nested(undefined: bool) -> list[Element]:
    leaf: list[Element] = [
        (0x00081150, "UI", _ui("1.2.840.10008.5.1.4.1.1.2")),
        (0x00081155, "UI", _ui("1.2.3.99")),
        (0x00091001, "OB", bytes(INLINE_MAX + 2)),  # bulk data two sequences deep
    ]
    middle: list[Element] = [
        (0x00081140, "SQ", Seq([leaf, leaf[:1], []], undefined)),
        (0x00081160, "IS", b"1\\2 "),
    ]
    return [
        (0x00081115, "SQ", Seq([middle, []], undefined)),
        (0x00081120, "SQ", Seq([], undefined)),  # an empty sequence
        (0x0040A730, "SQ", Seq([[(0x0040A040, "CS", b"TEXT")]], not undefined)),
    ]


def _every_vr_empty() -> list[Element]:
    vrs = {
        0x00080050: "SH", 0x00080054: "AE", 0x00080060: "CS", 0x00080090: "PN",
        0x00081010: "SH", 0x00081030: "LO", 0x00081155: "UI", 0x00100030: "DA",
        0x00101010: "AS", 0x00101020: "DS", 0x00104000: "LT", 0x00180015: "CS",
        0x00181030: "LO", 0x00200011: "IS", 0x00200013: "IS", 0x00209161: "UI",
        0x00280030: "DS", 0x00280034: "IS", 0x00281050: "DS", 0x00283003: "LO",
        0x00321060: "LO", 0x00400244: "DA", 0x00400245: "TM", 0x0040A120: "DT",
        0x0040A132: "UL", 0x0040A160: "UT", 0x00189219: "SS", 0x00209165: "AT",
        0x00420011: "OB", 0x00460040: "FD", 0x00460044: "FL", 0x00081190: "UR",
        0x00280106: "US", 0x0072007A: "SL", 0x00189089: "FD", 0x00660017: "OF",
        0x00189507: "OD", 0x00660040: "OL", 0x00720082: "SV", 0x00720083: "UV",
        0x00400275: "SQ", 0x00081080: "LO", 0x00081084: "SQ", 0x00080100: "SH",
        0x00080119: "UC", 0x00080120: "UR", 0x00082218: "SQ", 0x00321030: "LO",
        0x00380500: "LO", 0x40000010: "LT",
    }  # fmt: skip
    return [(tag, vr, b"") for tag, vr in vrs.items()]


CASES: dict[str, tuple[bytes, bool]] = {
    # name: (object, whether the raw route must take it)
    "pn_groups_utf8": (part10(_pn("Wang^XiaoDong=王^小東=", "ISO_IR 192")), True),
    "pn_latin1": (part10(_pn("Müller^Jürgen", "ISO_IR 100")), True),
    "pn_default_charset_high_bytes": (part10(_pn("M\xfcller^J")), True),
    "pn_empty": (part10(_pn("")), True),
    "pn_spaces": (part10(_pn("  ")), True),
    "pn_only_group_separators": (part10(_pn("==")), True),
    "pn_ideographic_only": (part10(_pn("=Yamada^Tarou")), True),
    "pn_multi": (part10(_pn("Doe^John\\Roe^Jane=R^J\\=I=P ", tag=OPERATORS_NAME)), True),
    "pn_trailing_carets": (part10(_pn("Doe^John^^^ ")), True),
    "pn_multi_with_an_empty_value": (part10(_pn("Doe^John\\", tag=OPERATORS_NAME)), False),
    "pn_four_groups": (part10(_pn("a=b=c=d", tag=OPERATORS_NAME)), False),
    "ds_odd_formatting": (part10(_text("DS", b" 1.50\\-2e3 \\+.5\\7.\\0012 ", 0x00280030)), True),
    "ds_single_padded": (part10(_text("DS", b" 3.25  ", 0x00180050)), True),
    "ds_nul_padded": (part10(_text("DS", b"1.5\x00", 0x00180050)), True),
    "ds_all_spaces": (part10(_text("DS", b"    ", 0x00180050)), True),
    "ds_blank_value_among_several": (part10(_text("DS", b"1\\ \\2 ", 0x00280030)), False),
    "ds_not_a_number": (part10(_text("DS", b"1A", 0x00180050)), False),
    "ds_nan": (part10(_text("DS", b"nan ", 0x00180050)), False),
    "is_spaces_and_signs": (part10(_text("IS", b" 12\\-3 \\+4\\0007", 0x00280034)), True),
    "is_float_string": (part10(_text("IS", b"1.0 ", 0x00200013)), False),
    "is_too_long_for_a_float": (part10(_text("IS", b"1234567890123456", 0x00200013)), False),
    "is_blank": (part10(_text("IS", b"  ", 0x00200013)), True),
    "numbers_multi": (
        part10(
            [
                (0x00189219, "SS", struct.pack("<3h", -5, 0, 7)),
                (0x00280106, "US", _us(0, 1, 65535)),
                (0x00460040, "FD", struct.pack("<2d", 1.5, -1e300)),
                (0x00460044, "FL", struct.pack("<3f", 0.1, -2.5, 3e38)),
                (0x0040A132, "UL", struct.pack("<2L", 0, 2**32 - 1)),
                (0x0072007A, "SL", struct.pack("<2l", -(2**31), 5)),
                (0x00720082, "SV", struct.pack("<2q", -(2**63), 1)),
                (0x00720083, "UV", struct.pack("<2Q", 2**64 - 1, 0)),
            ]
        ),
        True,
    ),
    "number_of_wrong_length": (part10([(0x00280106, "US", b"\x01\x02\x03")]), False),
    "lut_descriptor_first_entry_65536": (
        part10([(0x00283002, "SS", struct.pack("<3h", -32768, 0, 16))]),
        True,
    ),
    "at_multi": (part10([(0x00209165, "AT", _us(0x0010, 0x0010, 0x7FE0, 0x0010))]), True),
    "at_odd_length": (part10([(0x00209165, "AT", b"\x10\x00\x10\x00\x01\x02")]), False),
    "binary_inline_and_bulk": (
        part10(
            [
                (0x00420011, "OB", bytes(INLINE_MAX)),  # the largest inline value
                (0x00660017, "OF", bytes(INLINE_MAX + 4)),
                (0x00189507, "OD", bytes(16)),
                (0x00660040, "OL", bytes(8)),
                (0x00691001, "UN", b"\x01\x02"),  # private, no creator: stays UN
                (0x50003000, "OW", bytes(INLINE_MAX + 2)),
            ]
        ),
        True,
    ),
    "text_vrs": (
        part10(
            [
                (0x00080005, "CS", b"ISO_IR 100"),
                (0x00080008, "CS", b"ORIGINAL\\PRIMARY\\AXIAL "),
                (0x00080020, "DA", b"20240101"),
                (0x00080021, "DA", b"20240101\x00 "),
                (0x00080030, "TM", b"101500.123 "),
                (0x00080054, "AE", b" AE ONE \\AE2 "),
                (0x00080060, "CS", b"CT"),
                (0x00080090, "PN", b""),
                (0x00181030, "LO", b"Protocol \\name\x00"),
                (0x00081190, "UR", b"http://example.org/a b  "),
                (0x00081155, "UI", b"1.2.3\\ 4.5 \x00"),
                (0x00101010, "AS", b"042Y"),
                (0x00180015, "CS", b"CHEST\x00"),
                (0x00104000, "LT", b"line\\one\r\nline two  "),
                (0x0040A120, "DT", b"20240101101500+0100"),
                (0x0040A160, "UT", b"a\\b\\c \x00"),
                (0x00321060, "LO", b"\\"),
                (0x00080119, "UC", b"long code \\value"),
                (0x00321030, "LO", b" leading kept"),
                (0x40000010, "LT", b"\xe9t\xe9  "),
            ]
        ),
        True,
    ),
    "every_vr_empty": (part10(_every_vr_empty()), True),
    "group_lengths": (
        part10([(0x00080000, "UL", struct.pack("<L", 0)), (0x00100000, "UL", b"\0\0\0\0")]),
        True,
    ),
    "private_explicit": (part10(_private()), True),
    "private_implicit": (part10(_private(), IMPLICIT_LE), True),
    "private_explicit_un": (
        part10([(tag, "UN" if tag >> 16 == 0x0029 else vr, v) for tag, vr, v in _private()]),
        True,
    ),
    "public_explicit_un": (
        part10([(0x00180050, "UN", b"2.5 "), (0x00280106, "UN", _us(3))]),
        True,
    ),
    "public_un_sequence": (
        part10([(0x00081115, "UN", _encode([(0x00081150, "UI", b"1.2\x00")], True, False))]),
        False,
    ),
    "sequences_defined_length": (part10(_nested(False)), True),
    "sequences_undefined_length": (part10(_nested(True)), True),
    "sequences_implicit": (part10(_nested(True), IMPLICIT_LE), True),
    "sequences_big_endian": (part10(_nested(False), EXPLICIT_BE), True),
    "icon_image_nested_pixel_data": (
        part10(
            [
                (
                    0x00880200,
                    "SQ",
                    Seq([[(0x00280010, "US", _us(32)), (0x7FE00010, "OW", bytes(2048))]]),
                )
            ]
        ),
        True,
    ),
    "implicit_us_or_ss_unsigned": (
        part10(
            [(0x00280103, "US", _us(0)), (0x00280106, "US", _us(2)), (0x00280107, "US", b"")],
            IMPLICIT_LE,
        ),
        True,
    ),
    "implicit_us_or_ss_signed": (
        part10(
            [(0x00280103, "US", _us(1)), (0x00280106, "SS", struct.pack("<2h", -2, 5))],
            IMPLICIT_LE,
        ),
        True,
    ),
    "implicit_us_or_ss_without_pixel_representation": (
        part10([(0x00280106, "US", _us(2))], IMPLICIT_LE),
        True,
    ),
    "implicit_us_or_ss_in_a_sequence": (
        part10(
            [(0x00081115, "SQ", Seq([[(0x00280106, "US", _us(2))]]))],
            IMPLICIT_LE,
        ),
        False,
    ),
    "implicit_overlay_data": (
        part10(
            [(0x60000010, "US", _us(4)), (0x60003000, "OW", bytes(INLINE_MAX + 2))], IMPLICIT_LE
        ),
        True,
    ),
    "implicit_unknown_public_tag": (part10([(0x00190001, "UN", b"ab")], IMPLICIT_LE), True),
    "big_endian_numbers": (
        part10(
            [
                (0x00189219, "SS", struct.pack(">2h", -5, 7)),
                (0x00209165, "AT", _us(0x0010, 0x0020, big=True)),
                (0x00460040, "FD", struct.pack(">d", 2.5)),
                (0x00420011, "OB", b"\x01\x02"),
            ],
            EXPLICIT_BE,
        ),
        True,
    ),
    "encapsulated_pixel_data": (
        part10([], JPEG_BASELINE, pixels=False)
        + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 4)
        + b"\xff\xd8\xff\xd9"
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0),
        True,
    ),
    "trailing_padding": (
        part10([], trailer=struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, 6) + bytes(6)),
        True,
    ),
    "zero_bytes_after_the_data_set": (part10([], trailer=bytes(5)), True),
    "no_pixel_data": (part10([], pixels=False), True),
    "header_longer_than_the_first_read": (
        part10([(0x00420011, "OB", bytes(300_000)), (0x00321060, "UT", b"after" * 20_000)]),
        True,
    ),
    "elements_out_of_order": (
        part10([(0x00100020, "LO", b"PID"), (0x00100010, "PN", b"Doe")], sort=False),
        False,
    ),
    "duplicate_element": (
        part10([(0x00100020, "LO", b"PID1"), (0x00100020, "LO", b"PID2")], sort=False),
        False,
    ),
    "iso_2022_character_set": (part10(_pn("Doe", "ISO 2022 IR 100")), False),
    "several_character_sets": (part10(_pn("Doe", "\\ISO 2022 IR 87")), False),
    "other_single_byte_character_set": (part10(_pn("Doe", "ISO_IR 101")), False),
    "escape_sequence_in_text": (
        part10([(0x00080005, "CS", b"ISO_IR 100"), (0x00100010, "PN", b"\x1b(BDoe")]),
        False,
    ),
    "utf8_that_is_not": (part10([*_pn("x", "ISO_IR 192")[:1], (0x00100010, "PN", b"\xff")]), False),
    "character_set_in_an_item": (
        part10([(0x00081115, "SQ", Seq([[(0x00080005, "CS", b"ISO_IR 192")]]))]),
        False,
    ),
    "unknown_vr": (part10([(0x00100020, "XX", b"PID1")]), False),
    "cut_inside_pixel_data": (part10([])[:-7], False),
    "cut_inside_a_header_element": (part10([(0x00321060, "LO", b"x" * 40)])[:-80], False),
    "image_module_without_pixel_data": (
        part10([(0x00280100, "US", _us(16))], pixels=False),
        False,
    ),
    "missing_series_uid": (
        part10([(0x0020000E, "UI", b"")]),
        False,
    ),
    "invalid_sop_uid": (part10([(0x00080018, "UI", b"1.02.3\x00")]), False),
    "indexed_attribute_of_another_vr": (part10([(0x00200013, "DS", b"3.0 ")]), False),
    "indexed_attribute_with_several_values": (part10([(0x00200011, "IS", b"1\\2 ")]), False),
    "indexed_attributes": (
        part10(
            [
                *_pn("Doe^Jane=D^J"),
                (0x00080020, "DA", b"20240102"),
                (0x00080050, "SH", b"ACC1 "),
                (0x00080060, "CS", b"MR"),
                (0x00080090, "PN", b"Who^Doctor "),
                (0x00100020, "LO", b"PID-1 "),
                (0x00200011, "IS", b" 7 "),
                (0x00200013, "IS", b"12"),
                (0x00280008, "IS", b"3 "),
            ]
        ),
        True,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_built_object_same_header_by_both_routes(name: str) -> None:
    data, taken = CASES[name]
    raw = _check_both_routes(data, name)
    if taken:
        assert raw is not None, f"{name}: the raw route declined"
    else:
        assert raw is None, f"{name}: the raw route must leave this to pydicom"


def _metadata(name: str) -> dict[str, Any]:
    header = _raw_route(CASES[name][0])
    assert header is not None
    meta: dict[str, Any] = orjson.loads(header.metadata)
    return meta


def test_person_name_groups() -> None:
    """PS3.18 F.2.2: one object per value, its groups named; trailing empty groups dropped."""
    assert _metadata("pn_multi")["00081070"]["Value"] == [
        {"Alphabetic": "Doe^John"},
        {"Alphabetic": "Roe^Jane", "Ideographic": "R^J"},
        {"Alphabetic": "", "Ideographic": "I", "Phonetic": "P"},
    ]
    assert _metadata("pn_groups_utf8")["00100010"]["Value"] == [
        {"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小東"}
    ]
    assert "Value" not in _metadata("pn_only_group_separators")["00100010"]


def test_numbers_are_json_numbers() -> None:
    meta = _metadata("ds_odd_formatting")
    assert meta["00280030"]["Value"] == [1.5, -2000.0, 0.5, 7.0, 12.0]
    assert _metadata("is_spaces_and_signs")["00280034"]["Value"] == [12, -3, 4, 7]
    assert _metadata("lut_descriptor_first_entry_65536")["00283002"]["Value"] == [32768, 0, 16]
    assert _metadata("implicit_us_or_ss_signed")["00280106"] == {"vr": "SS", "Value": [-2, 5]}


def test_binary_values_inline_up_to_the_threshold_then_bulk() -> None:
    meta = _metadata("binary_inline_and_bulk")
    assert len(meta["00420011"]["InlineBinary"]) == INLINE_MAX // 3 * 4
    assert meta["00660017"] == {"vr": "OF", "BulkDataURI": "bulk/00660017"}
    assert meta["00691001"] == {"vr": "UN", "InlineBinary": "AQI="}
    nested = _metadata("sequences_undefined_length")["00081115"]["Value"][0]["00081140"]
    assert nested["Value"][0]["00091001"]["BulkDataURI"] == bulk_path(
        (0x00081115, "0", 0x00081140, "0", 0x00091001)
    )
