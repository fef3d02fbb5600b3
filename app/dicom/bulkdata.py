"""Bulk data paths and values (PS3.18 §10.4.1.1.4 and Annex F.2.6).

Stored metadata names each bulk value by an instance-relative URI ``bulk/<path>`` (see
``app.dicom.instance.bulk_path``): tags as 8 hex digits, alternating with sequence item
indexes in decimal, e.g. ``7FE00010`` or ``00540016/0/00181072``. This module parses such a
path strictly and reads the value it names. ``read_bulk_value`` is blocking: call it from a
worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import IO

from pydicom import dcmread
from pydicom.dataset import Dataset

from app.dicom.media import EXPLICIT_VR_BIG_ENDIAN
from app.dicom.transcode import PIXEL_DATA, SWAP_WIDTHS, byteswap, pixel_swap_width
from app.errors import BadRequest, NotFound

#: Deeper nesting than this does not occur in real objects.
MAX_DEPTH = 16
#: VRs whose values are raw bytes, the only ones stored as BulkDataURIs (PS3.18 F.2.6).
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,5}")
#: Tags from here on are read only by parsing past Pixel Data.
_FIRST_PIXEL_TAG = 0x7FE00008


@dataclass(frozen=True)
class BulkPath:
    """An element path: ``tags[0]`` at the top, ``items[i]`` chooses an item of ``tags[i]``."""

    tags: tuple[int, ...]
    items: tuple[int, ...]

    def __str__(self) -> str:
        steps = [f"{self.tags[0]:08X}"]
        for item, tag in zip(self.items, self.tags[1:], strict=True):
            steps += [str(item), f"{tag:08X}"]
        return "/".join(steps)

    @property
    def top_level(self) -> bool:
        return not self.items


def parse_bulk_path(text: str) -> BulkPath:
    """Parse ``tag(/item/tag)*``; raise ``BadRequest`` naming the first bad step."""
    steps = text.split("/")
    if len(steps) % 2 == 0 or len(steps) > 2 * MAX_DEPTH - 1:
        raise BadRequest(
            f"bulk data path {text[:80]!r} is malformed: expected tags (8 hex digits) "
            "alternating with item indexes, starting and ending with a tag, e.g. "
            "7FE00010 or 00540016/0/00181072"
        )
    tags: list[int] = []
    items: list[int] = []
    for position, step in enumerate(steps):
        if position % 2 == 0:
            if not _TAG.fullmatch(step):
                raise BadRequest(f"bulk data path step {step[:20]!r} is not a tag of 8 hex digits")
            tags.append(int(step, 16))
        else:
            if not _INDEX.fullmatch(step):
                raise BadRequest(
                    f"bulk data path step {step[:20]!r} is not a sequence item index "
                    "(a decimal number from 0)"
                )
            items.append(int(step))
    return BulkPath(tuple(tags), tuple(items))


def _show(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _walk(ds: Dataset, path: BulkPath) -> tuple[Dataset, int]:
    """The dataset holding the path's last element, and that element's tag."""
    for depth, item in enumerate(path.items):
        tag = path.tags[depth]
        if tag not in ds:
            raise NotFound(f"bulk data {path}: element {_show(tag)} is absent")
        elem = ds[tag]
        if elem.VR != "SQ":
            raise NotFound(f"bulk data {path}: {_show(tag)} is no sequence")
        sequence = elem.value or []
        if item >= len(sequence):
            raise NotFound(
                f"bulk data {path}: sequence {_show(tag)} has "
                f"{len(sequence)} item(s), no item {item}"
            )
        ds = sequence[item]
    return ds, path.tags[-1]


def read_bulk_value(fp: IO[bytes], path: BulkPath, transfer_syntax: str) -> bytes:
    """The value bytes of the binary element at ``path``, little endian.

    Values stored big endian are swapped by the word size of their VR (PS3.5 §7.3), so
    the bytes always mean what the Explicit VR Little Endian label on the part says.
    """
    ds = dcmread(fp, stop_before_pixels=path.tags[0] < _FIRST_PIXEL_TAG)
    parent, tag = _walk(ds, path)
    if tag not in parent:
        raise NotFound(f"bulk data {path}: element {_show(tag)} is absent")
    elem = parent[tag]
    if elem.VR not in BINARY_VRS:
        raise NotFound(f"bulk data {path}: the element has VR {elem.VR} and is not bulk data")
    value = bytes(elem.value or b"")
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN and elem.VR in SWAP_WIDTHS:
        width = (
            pixel_swap_width(elem.VR, parent.get("BitsAllocated"))
            if tag == PIXEL_DATA
            else SWAP_WIDTHS[elem.VR]
        )
        value = byteswap(value, width)
    return value
