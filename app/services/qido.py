"""QIDO-RS: search for studies, series and instances (PS3.18 §10.6).

The service parses the query (``app.dicom.query``), asks the index for one page, and
renders each match as a DICOM JSON dataset (PS3.18 Annex F) holding:

* the required return attributes of each returned level (PS3.18 Tables 10.6.3-3, -4, -5),
  empty (``{"vr": ...}``) when the stored object lacks them;
* the UIDs of the match and of its parents, and its absolute Retrieve URL (0008,1190);
* the attributes named by ``includefield`` or given as matching keys; with
  ``includefield=all``, the study-level set (group 0010 and the study module attributes)
  at study level, that plus the series modules at series level, and every attribute but
  bulk data at instance level;
* computed attributes (PS3.4 C.3.4): counts, ModalitiesInStudy, SOPClassesInStudy and
  InstanceAvailability (always ONLINE: nothing is nearline here).

Study and series attributes are read from the stored DICOM JSON of the first instance
received for that study or series.

Policy is the service's too: how many matches a page may hold (``PagingLimits``, given at
construction) and which searches are expensive enough to be rate limited (``unfiltered``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from app.dicom.query import (
    INSTANCE_AVAILABILITY,
    MODALITIES_IN_STUDY,
    RETRIEVE_URL,
    SERIES_INSTANCE_UID,
    SERIES_RELATED_INSTANCES,
    SOP_CLASSES_IN_STUDY,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    STUDY_RELATED_INSTANCES,
    STUDY_RELATED_SERIES,
    Match,
    PagingLimits,
    Query,
    QueryLevel,
    parse_query,
    vr_of,
)
from app.services.security import Gatekeeper, Principal
from app.storage.base import MetadataIndex

#: PS3.18 §8.3.4.4.1: the origin server returned fewer matches than exist because of its
#: own limit; the text is the one the standard suggests for the Warning header.
MORE_RESULTS = (
    "The number of results exceeded the maximum supported by the server. "
    "Additional results can be requested."
)
#: Pages whose stored JSON is larger than this are rendered off the event loop.
RENDER_THREAD_BYTES = 256 * 1024
#: Parameters that shape the answer but match nothing (PS3.18 §8.3.4).
_NOT_MATCHING = frozenset({"limit", "offset", "fuzzymatching", "includefield"})
#: What the rate limiter charges an unfiltered search to; the 429 names it.
UNFILTERED = "searches without matching keys"


@dataclass(frozen=True)
class SearchResult:
    """DICOM JSON datasets in response order, and the Warning text if there is one."""

    datasets: list[dict[str, Any]]
    warning: str | None = None


def unfiltered(params: Iterable[tuple[str, str]]) -> bool:
    """A search with no matching key, or only universal matching (PS3.4 C.2.2.2.3), scans
    the whole trust: the expensive kind that is rate limited."""
    return all(name in _NOT_MATCHING or not value.strip("*") for name, value in params)


class QidoService:
    def __init__(self, index: MetadataIndex, paging: PagingLimits, gate: Gatekeeper) -> None:
        self._index = index
        self._paging = paging
        self._gate = gate

    async def search(
        self,
        principal: Principal,
        level: QueryLevel,
        params: Sequence[tuple[str, str]],
        base_url: str,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> SearchResult:
        """Search the principal's trust; raises ``TooManyRequests`` (429) when an unfiltered
        search is over its rate, ``InvalidQuery`` (400) for unknown or malformed parameters."""
        # Within one study the search is bounded by the study, whatever the parameters.
        if study_uid is None and unfiltered(params):
            self._gate.throttle(principal, UNFILTERED)
        query = parse_query(params, level, self._paging, study_uid=study_uid, series_uid=series_uid)
        result = await self._index.search(principal.trust, query)
        size = sum(len(m.dataset) for m in result.matches)
        if size > RENDER_THREAD_BYTES:
            datasets = await asyncio.to_thread(render_all, result.matches, query, base_url)
        else:
            datasets = render_all(result.matches, query, base_url)
        warning = MORE_RESULTS if result.more and query.server_limited else None
        return SearchResult(datasets, warning)


def render_all(matches: list[Match], query: Query, base_url: str) -> list[dict[str, Any]]:
    return [render(m, query, base_url) for m in matches]


def render(match: Match, query: Query, base_url: str) -> dict[str, Any]:
    """One match as a DICOM JSON dataset, attributes in tag order (PS3.18 F.2)."""
    stored: dict[str, Any] = orjson.loads(match.dataset)
    computed = _computed(match, query.level, base_url)
    out: dict[str, Any] = {}
    for key in query.return_keys:
        element = computed.get(key.tag) or _stored(stored, key.tag)
        if element is not None:
            out[f"{key.tag:08X}"] = element
        elif key.always:
            out[f"{key.tag:08X}"] = {"vr": key.vr}
    for tag in query.include_tags:
        element = computed.get(tag) or _stored(stored, tag)
        if element is None:
            vr = vr_of(tag)
            element = {"vr": vr} if vr else None
        if element is not None:
            out[f"{tag:08X}"] = element
    if query.include_all:
        for tag, element in computed.items():
            if query.wants(tag):
                out.setdefault(f"{tag:08X}", element)
        for hex_tag in stored:
            tag = int(hex_tag, 16)
            if hex_tag not in out and query.includes_all_of(tag):
                element = _stored(stored, tag)
                if element is not None:
                    out[hex_tag] = element
    # Identity and location of the match, whatever else was asked for.
    out[f"{STUDY_INSTANCE_UID:08X}"] = _value("UI", match.study_uid)
    if match.series_uid is not None:
        out[f"{SERIES_INSTANCE_UID:08X}"] = _value("UI", match.series_uid)
    if match.sop_uid is not None:
        out[f"{SOP_INSTANCE_UID:08X}"] = _value("UI", match.sop_uid)
    out[f"{RETRIEVE_URL:08X}"] = computed[RETRIEVE_URL]
    return dict(sorted(out.items()))


def _computed(match: Match, level: QueryLevel, base_url: str) -> dict[int, dict[str, Any]]:
    url = f"{base_url}/studies/{match.study_uid}"
    if level is not QueryLevel.STUDY:
        url += f"/series/{match.series_uid}"
    if level is QueryLevel.INSTANCE:
        url += f"/instances/{match.sop_uid}"
    values = {
        INSTANCE_AVAILABILITY: _value("CS", "ONLINE"),
        RETRIEVE_URL: _value("UR", url),
        MODALITIES_IN_STUDY: _value("CS", *match.modalities_in_study),
        SOP_CLASSES_IN_STUDY: _value("UI", *match.sop_classes_in_study),
        STUDY_RELATED_SERIES: _value("IS", match.study_series),
        STUDY_RELATED_INSTANCES: _value("IS", match.study_instances),
    }
    if match.series_instances is not None:
        values[SERIES_RELATED_INSTANCES] = _value("IS", match.series_instances)
    return values


def _value(vr: str, *values: str | int) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _stored(stored: dict[str, Any], tag: int) -> dict[str, Any] | None:
    """A stored element without bulk data, or ``None`` if absent or itself bulk data."""
    element: dict[str, Any] | None = stored.get(f"{tag:08X}")
    if element is None or "BulkDataURI" in element:
        return None
    return _without_bulk(element)


def _without_bulk(element: dict[str, Any]) -> dict[str, Any]:
    """The element with nested bulk data references removed: their URIs are relative to
    the instance's metadata, and QIDO-RS responses carry no bulk data."""
    if element.get("vr") != "SQ" or "Value" not in element:
        return element
    items = [
        {t: _without_bulk(e) for t, e in item.items() if "BulkDataURI" not in e}
        for item in element["Value"]
    ]
    return {"vr": "SQ", "Value": items}
