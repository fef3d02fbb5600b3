"""DICOM JSON (PS3.18 Annex F) straight from the encoded data elements of a data set.

pydicom's route to DICOM JSON reads a ``Dataset``, converts each value to a Python type
(``PersonName``, ``DSfloat``, ``MultiValue``, ...), then asks every element for its JSON
(``DataElement.to_json_dict``); most of the cost of storing an instance was there. This module
goes from the encoded bytes (PS3.5 §7.1, §7.5) to the JSON value in one step and produces what
that route produces, element by element and VR by VR (PS3.18 F.2.2-F.2.7):

* text VRs split on the backslash (PS3.5 §6.4) and padded as pydicom strips them;
* PN as Alphabetic, Ideographic and Phonetic groups (F.2.2);
* IS and DS as JSON numbers, US/SS/UL/SL/FL/FD/SV/UV as numbers, AT as 8 hex digits;
* binary VRs as InlineBinary, or as a BulkDataURI (F.2.6) when their base64 would exceed the
  threshold;
* sequences recursively, items of defined or undefined length (PS3.5 §7.5.1);
* implicit VR by the data dictionary, explicit VR "UN" replaced by the known VR, private
  elements by their creator (PS3.5 §6.2.2, §7.8), the ambiguous "US or SS" of the top-level
  data set by its Pixel Representation.

Whatever it does not do exactly as pydicom does (a character set other than the default
repertoire, ISO_IR 100 or ISO_IR 192; a value pydicom would repair, reinterpret or refuse; a
structure pydicom reads leniently) raises ``Unsupported``: the caller then takes pydicom's
route, so the result never depends on which route was taken. Pure code over bytes, no I/O.
"""

from __future__ import annotations

import base64
import importlib
import re
from functools import lru_cache
from struct import Struct, unpack_from
from typing import Any

from pydicom.datadict import dictionary_VR, private_dictionary_VR


def _pydicom_table(module: str, name: str) -> frozenset[int]:
    """A tag table pydicom settles ambiguous VRs with; empty (so nothing ambiguous is ours)
    in a pydicom release that has renamed it."""
    try:
        return frozenset(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError):  # pragma: no cover
        return frozenset()


_US_OR_SS_TAGS = _pydicom_table("pydicom.filewriter", "_AMBIGUOUS_US_SS_TAGS")
_OVERLAY_DATA_TAGS = _pydicom_table("pydicom.filewriter", "_OVERLAY_DATA_TAGS")
_LUT_DESCRIPTOR_TAGS = _pydicom_table("pydicom.tag", "_LUT_DESCRIPTOR_TAGS")

JsonDataset = dict[str, Any]
#: Tags and sequence item indexes from the top-level data set down to an element.
ElementPath = tuple[int | str, ...]

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_REPRESENTATION = 0x00280103
#: Deeper than this is left to pydicom and the structure check, which refuse it.
MAX_DEPTH = 32

#: VRs with a 4-byte length in explicit VR (PS3.5 Table 7.1-1); the rest have 2 bytes.
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
SHORT_VRS = frozenset(
    {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH", "SL",
     "SS", "ST", "TM", "UI", "UL", "US"}
)  # fmt: skip
#: The VR field as read, for both the lookup and the validity check in one step.
_VR_FIELD = {vr.encode("ascii"): vr for vr in LONG_VRS | SHORT_VRS}
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_NUMBER_FORMATS = {
    "US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"
}  # fmt: skip
_NUMBER_SIZES = {"H": 2, "h": 2, "L": 4, "l": 4, "f": 4, "d": 8, "q": 8, "Q": 8}
#: Defined Terms of Specific Character Set (PS3.3 C.12.1.1.2) decoded here, and how.
_CODECS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
# What Python's int() and float() accept, narrowed to what DICOM IS and DS look like
# (PS3.5 §6.2); anything else (underscores, "nan", "1.0" for IS) goes to pydicom.
# More than 15 digits would not survive pydicom's check against float(value).
_IS = re.compile(r" *[+-]?[0-9]{1,15} *")
_DS = re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")


class Unsupported(Exception):
    """This encoder does not handle the object the way pydicom does; use pydicom's route."""


class NeedMore(Exception):
    """The header goes on past the bytes given: encode again with at least ``end`` bytes."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    try:
        vr: str = dictionary_VR(tag)
    except KeyError:
        return None
    return vr


@lru_cache(maxsize=4096)
def _private_dictionary_vr(tag: int, creator: str) -> str:
    try:
        vr: str = private_dictionary_VR(tag, creator)
    except KeyError:
        return "UN"
    return vr


def _values(vr: str, values: list[Any]) -> dict[str, Any]:
    """An element of ``values`` split on backslashes: one empty value means no value."""
    if len(values) == 1 and not values[0]:
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _person_name(vr: str, text: str) -> dict[str, Any]:
    """PN (PS3.18 F.2.2): each value's component groups, trailing empty groups dropped."""
    values = text.split("\\")
    names = []
    for value in values:
        groups = value.split("=")
        while groups and not groups[-1]:
            groups.pop()
        if not groups and len(values) == 1:
            return {"vr": vr}
        if not groups or len(groups) > 3:
            # pydicom fails on an empty value among several; a fourth group is lost in
            # JSON but kept in the index.
            raise Unsupported("a person name value of no or more than three groups")
        name = {"Alphabetic": groups[0]}
        if len(groups) > 1:
            name["Ideographic"] = groups[1]
        if len(groups) > 2:
            name["Phonetic"] = groups[2]
        names.append(name)
    return {"vr": vr, "Value": names}


class DatasetEncoder:
    """Encodes data sets found in ``buf``, the first bytes of a ``size``-byte object.

    ``threshold`` is the bulk data threshold (PS3.18 §8.3.5.1): a binary value whose base64
    would be longer becomes a BulkDataURI naming its element path.
    """

    def __init__(self, buf: bytes, size: int, little_endian: bool, threshold: int) -> None:
        self._buf = buf
        self._size = size
        endian = "<" if little_endian else ">"
        self._endian = endian
        self._tag = Struct(endian + "HH")
        self._tag_length = Struct(endian + "HHL")
        self._short_length = Struct(endian + "H")
        self._long_length = Struct(endian + "L")
        # pydicom's rule: base64 makes bytes a third longer.
        self._bulk_cutoff = (threshold // 4) * 3
        self._codec = "latin_1"
        self._charset_dependent_seen = False
        self._ambiguous: list[tuple[dict[str, Any], bytes]] = []

    def encode_top_level(self, pos: int, implicit: bool) -> tuple[JsonDataset, int]:
        """The data set from ``pos`` to the first Pixel Data element or the end of the file.

        Returns the JSON and where encoding stopped: at the Pixel Data element's header, or
        fewer than 8 bytes before the end, whatever follows is the caller's to check.
        """
        out, stop = self._dataset(pos, None, implicit, (), 0)
        self._resolve_us_or_ss(out)
        return out, stop

    def _need(self, end: int) -> None:
        if end > self._size:
            raise Unsupported("the object ends inside an element")
        raise NeedMore(end)

    def _dataset(
        self, pos: int, end: int | None, implicit: bool, path: ElementPath, depth: int
    ) -> tuple[JsonDataset, int]:
        """One data set: the top level (``depth`` 0), or an item ending at ``end`` or, when
        ``end`` is ``None``, at its Item Delimitation Item."""
        buf = self._buf
        available = len(buf)
        size = self._size
        top = depth == 0
        out: JsonDataset = {}
        previous = -1
        while True:
            if end is not None and pos >= end:
                if pos != end:
                    raise Unsupported("an element overruns its item")
                return out, pos
            if top and size - pos < 8:
                return out, pos
            if pos + 8 > available:
                self._need(pos + 8)
            group, element, length = self._tag_length.unpack_from(buf, pos)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == ITEM_END and end is None and not top:
                    return out, pos + 8
                raise Unsupported("item or delimiter where an element belongs")
            if top and tag in PIXEL_DATA_TAGS:
                return out, pos
            if tag <= previous or group <= 0x0002:
                raise Unsupported("elements out of order, or meta or command elements")
            previous = tag
            if implicit:
                vr = self._implicit_vr(tag, out, length, pos + 8)
                start = pos + 8
            else:
                field = _VR_FIELD.get(buf[pos + 4 : pos + 6])
                if field is None:
                    raise Unsupported("unknown VR")
                vr = field
                if vr in LONG_VRS:
                    if pos + 12 > available:
                        self._need(pos + 12)
                    (length,) = self._long_length.unpack_from(buf, pos + 8)
                    start = pos + 12
                else:
                    (length,) = self._short_length.unpack_from(buf, pos + 6)
                    start = pos + 8
                if vr == "UN":
                    vr = self._explicit_un_vr(tag, out, length)
            key = f"{tag:08X}"
            if vr == "SQ":
                inner = (*path, tag)
                if length == UNDEFINED_LENGTH:
                    items, pos = self._sequence(start, None, implicit, inner, depth + 1)
                else:
                    pos = start + length
                    if pos > available:
                        self._need(pos)
                    items, _ = self._sequence(start, pos, implicit, inner, depth + 1)
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
                continue
            if length == UNDEFINED_LENGTH:
                raise Unsupported("undefined length outside a sequence")
            pos = start + length
            if pos > available:
                self._need(pos)
            if " or " in vr:
                vr = self._ambiguous_vr(tag, top)
                if vr == "US or SS":
                    entry: dict[str, Any] = {"vr": vr}
                    self._ambiguous.append((entry, buf[start:pos]))
                    out[key] = entry
                    continue
            if length == 0:
                out[key] = {"vr": vr}
            elif vr in _BINARY_VRS:
                if length > self._bulk_cutoff:
                    out[key] = {"vr": vr, "BulkDataURI": bulk_path((*path, tag))}
                else:
                    encoded = base64.b64encode(buf[start:pos]).decode("ascii")
                    out[key] = {"vr": vr, "InlineBinary": encoded}
            else:
                out[key] = self._value(tag, vr, buf[start:pos])
                if tag == SPECIFIC_CHARACTER_SET:
                    self._set_character_set(out[key], top)

    def _sequence(
        self, pos: int, end: int | None, implicit: bool, path: ElementPath, depth: int
    ) -> tuple[list[JsonDataset], int]:
        """Items up to ``end``, or to the Sequence Delimitation Item when ``end`` is None."""
        if depth > MAX_DEPTH:
            raise Unsupported("sequences nested too deep")
        buf = self._buf
        items: list[JsonDataset] = []
        while True:
            if end is not None and pos >= end:
                if pos != end:
                    raise Unsupported("an item overruns its sequence")
                return items, pos
            if pos + 8 > len(buf):
                self._need(pos + 8)
            group, element, length = self._tag_length.unpack_from(buf, pos)
            tag = group << 16 | element
            if tag == SEQUENCE_END and end is None:
                return items, pos + 8
            if tag != ITEM:
                raise Unsupported("a sequence holds something other than items")
            inner = (*path, str(len(items)))
            if length == UNDEFINED_LENGTH:
                item, pos = self._dataset(pos + 8, None, implicit, inner, depth)
            else:
                item_end = pos + 8 + length
                if end is not None and item_end > end:
                    raise Unsupported("an item overruns its sequence")
                if item_end > len(buf):
                    self._need(item_end)
                item, pos = self._dataset(pos + 8, item_end, implicit, inner, depth)
            items.append(item)

    def _implicit_vr(self, tag: int, out: JsonDataset, length: int, start: int) -> str:
        """The VR pydicom gives an element of an implicit VR data set (PS3.5 §7.1.3)."""
        vr = _dictionary_vr(tag)
        if vr is not None:
            return vr
        if tag >> 16 & 1:
            if length == UNDEFINED_LENGTH:
                # A sequence when an item follows; pydicom reads anything else as bytes.
                if start + 4 > len(self._buf):
                    self._need(start + 4)
                group, element = self._tag.unpack_from(self._buf, start)
                if group << 16 | element != ITEM:
                    raise Unsupported("a private value of undefined length")
                return "SQ"
            return self._private_vr(tag, out)
        return "UL" if tag & 0xFFFF == 0 else "UN"

    def _explicit_un_vr(self, tag: int, out: JsonDataset, length: int) -> str:
        """pydicom reads an explicit "UN" as the known VR where there is one (PS3.5 §6.2.2)."""
        if length == UNDEFINED_LENGTH:
            raise Unsupported("UN of undefined length")
        if tag >> 16 & 1:
            vr = self._private_vr(tag, out)
        elif length < 0xFFFF:
            vr = _dictionary_vr(tag) or "UN"
        else:
            vr = "UN"
        if vr == "SQ":
            raise Unsupported("a sequence encoded as UN")
        return vr

    def _private_vr(self, tag: int, out: JsonDataset) -> str:
        """A private element's VR: LO for a creator, else from the creator's dictionary."""
        element = tag & 0xFFFF
        if 0x0010 <= element < 0x0100:
            return "LO"
        if not element & 0xFF00:
            return "UN"
        creator = out.get(f"{tag & 0xFFFF0000 | element >> 8:08X}")
        if creator is None:
            return "UN"
        if creator["vr"] != "LO":
            raise Unsupported("private creator with a VR other than LO")
        names = creator.get("Value", [""])
        if len(names) != 1:
            raise Unsupported("private creator with several values")
        return _private_dictionary_vr(tag, names[0])

    def _ambiguous_vr(self, tag: int, top: bool) -> str:
        """The VR pydicom settles an ambiguous dictionary VR on (PS3.5 Annex A)."""
        if tag in _OVERLAY_DATA_TAGS:
            return "OW"
        if top and tag in _US_OR_SS_TAGS:
            return "US or SS"  # settled by Pixel Representation once the data set is read
        raise Unsupported("an ambiguous VR this encoder does not settle")

    def _resolve_us_or_ss(self, out: JsonDataset) -> None:
        """Settle every top-level "US or SS" by Pixel Representation (PS3.3 C.7.6.3.1)."""
        if not self._ambiguous:
            return
        representation = out.get(f"{PIXEL_REPRESENTATION:08X}")
        if representation is None:
            vr = "US"
        elif representation["vr"] != "US":
            raise Unsupported("Pixel Representation is not US")
        elif "Value" not in representation:
            vr = "SS"
        elif len(representation["Value"]) != 1:
            raise Unsupported("Pixel Representation has several values")
        else:
            vr = "US" if representation["Value"][0] == 0 else "SS"
        for entry, raw in self._ambiguous:
            entry["vr"] = vr
            if raw:
                entry.update(self._value(0, vr, raw))

    def _set_character_set(self, entry: dict[str, Any], top: bool) -> None:
        """Specific Character Set (PS3.3 C.12.1.1.2) decides how later text is decoded."""
        values = entry.get("Value", [""])
        codec = _CODECS.get(values[0]) if top and len(values) == 1 else None
        if codec is None:
            raise Unsupported("a character set this encoder does not decode")
        if codec != self._codec and self._charset_dependent_seen:
            raise Unsupported("text decoded before the character set was known")
        self._codec = codec

    def _text(self, raw: bytes) -> str:
        """Text of a VR that uses the Specific Character Set (PS3.5 §6.1.2.3)."""
        if b"\x1b" in raw:
            raise Unsupported("code extensions (ISO 2022 escape sequences)")
        self._charset_dependent_seen = True
        return raw.decode(self._codec)

    def _value(self, tag: int, vr: str, raw: bytes) -> dict[str, Any]:
        """The JSON of a non-empty, non-binary, non-sequence value, as pydicom gives it."""
        if vr in ("CS", "DA", "TM", "AS", "DT"):
            return _values(vr, raw.decode("latin_1").rstrip(" \x00").split("\\"))
        if vr in ("LO", "SH", "UC"):
            return _values(vr, [v.rstrip("\x00 ") for v in self._text(raw).split("\\")])
        if vr == "UI":
            text = raw.decode("latin_1").rstrip("\x00 ")
            return _values(vr, [v.strip() for v in text.split("\\")])
        if vr == "PN":
            return _person_name(vr, self._text(raw.rstrip(b"\x00 ")))
        if vr in _NUMBER_FORMATS:
            code = _NUMBER_FORMATS[vr]
            count, odd = divmod(len(raw), _NUMBER_SIZES[code])
            if odd:
                raise Unsupported("a value length that is not a multiple of its size")
            numbers = list(unpack_from(f"{self._endian}{count}{code}", raw))
            if tag in _LUT_DESCRIPTOR_TAGS and count > 1 and numbers[0] < 0:
                numbers[0] += 65536  # pydicom reads a first entry of 2^16 this way
            return {"vr": vr, "Value": numbers}
        if vr == "IS":
            items = raw.decode("latin_1").rstrip(" \x00").split("\\")
            if len(items) == 1 and not items[0]:
                return {"vr": vr}
            if not all(_IS.fullmatch(item) for item in items):
                raise Unsupported("an IS value pydicom would reinterpret")
            return {"vr": vr, "Value": [int(item) for item in items]}
        if vr == "DS":
            items = raw.decode("latin_1").strip().rstrip(" \x00").split("\\")
            if len(items) == 1 and not items[0]:
                return {"vr": vr}
            if not all(_DS.fullmatch(item) for item in items):
                raise Unsupported("a DS value pydicom would reinterpret")
            return {"vr": vr, "Value": [float(item) for item in items]}
        if vr in ("LT", "ST", "UT"):
            return _values(vr, [self._text(raw).rstrip("\x00 ")])
        if vr == "AE":
            return _values(vr, [v.strip() for v in raw.decode("latin_1").split("\\")])
        if vr == "UR":
            return _values(vr, [raw.decode("latin_1").rstrip()])
        if vr == "AT":
            if len(raw) % 4:
                raise Unsupported("an AT value length that is not a multiple of 4")
            halves = unpack_from(f"{self._endian}{len(raw) // 2}H", raw)
            tags = [f"{halves[i] << 16 | halves[i + 1]:08X}" for i in range(0, len(halves), 2)]
            return {"vr": vr, "Value": tags}
        raise Unsupported(f"VR {vr}")


def bulk_path(path: ElementPath) -> str:
    """The instance-relative BulkDataURI for an element path (tags and item indexes)."""
    return "bulk/" + "/".join(f"{p:08X}" if isinstance(p, int) else p for p in path)
