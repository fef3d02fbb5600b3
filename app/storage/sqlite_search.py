"""QIDO-RS searches against the SQLite index (PS3.18 §10.6, matching per PS3.4 C.2.2.2).

Every value is a bound parameter; only column names chosen from fixed tables reach the SQL
text. Each search reads one page (``LIMIT limit + 1`` to learn whether more matches exist),
then computes ModalitiesInStudy and SOPClassesInStudy for the studies on that page only;
the study and series counts are kept by the index at insert time.

Wildcards become ``GLOB`` patterns (case-sensitive, ``*`` and ``?`` as in DICOM, ``[``
escaped), and the literal prefix before the first wildcard also becomes a range on the
column so that the index narrows the scan.
"""

from __future__ import annotations

import re
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from app.dicom.query import (
    MODALITIES_IN_STUDY,
    SOP_CLASSES_IN_STUDY,
    Condition,
    Match,
    Matcher,
    Query,
    QueryLevel,
    QueryResult,
    Range,
    Single,
    ValueList,
    Wildcard,
)
from app.storage.sqlite_schema import caseless_name, normalise_name

#: Matching key -> column, for keys compared as stored.
_COLUMNS = {
    "StudyDate": "st.study_date",
    "StudyTime": "st.study_time",
    "AccessionNumber": "st.accession_number",
    "PatientID": "st.patient_id",
    "StudyInstanceUID": "st.study_uid",
    "StudyID": "st.study_id",
    "Modality": "se.modality",
    "SeriesInstanceUID": "se.series_uid",
    "SeriesNumber": "se.series_number",
    "PerformedProcedureStepStartDate": "se.pps_start_date",
    "PerformedProcedureStepStartTime": "se.pps_start_time",
    "SOPClassUID": "i.sop_class_uid",
    "SOPInstanceUID": "i.sop_uid",
    "InstanceNumber": "i.instance_number",
}
#: Person name keys -> (stored column, accent- and case-folded column).
_NAMES = {
    "PatientName": ("st.patient_name", "st.patient_name_folded"),
    "ReferringPhysicianName": ("st.referring_physician_name", "st.referring_physician_folded"),
}
#: Keys matched through the study's series.
_STUDY_OF_SERIES = {"ModalitiesInStudy": "m.modality"}
#: Every key the SQL can match (checked against ``MATCHING_KEYS`` by the tests).
SUPPORTED_KEYS = frozenset(_COLUMNS) | frozenset(_NAMES) | frozenset(_STUDY_OF_SERIES)

_SELECT = {
    QueryLevel.STUDY: "SELECT st.id, st.study_uid, NULL, NULL, st.study_json, st.num_series,"
    " st.num_instances, NULL",
    QueryLevel.SERIES: "SELECT st.id, st.study_uid, se.series_uid, NULL, se.series_json,"
    " st.num_series, st.num_instances, se.num_instances",
    QueryLevel.INSTANCE: "SELECT st.id, st.study_uid, se.series_uid, i.sop_uid, i.metadata,"
    " st.num_series, st.num_instances, se.num_instances",
}
#: (level searched, table the search starts from) -> FROM clause. ``CROSS JOIN`` makes
#: SQLite keep the left table in the outer loop (its documented join-order override).
_FROM = {
    (QueryLevel.STUDY, "st"): "studies st",
    (QueryLevel.SERIES, "se"): "series se JOIN studies st ON st.id = se.study_pk",
    (QueryLevel.SERIES, "st"): "studies st CROSS JOIN series se ON se.study_pk = st.id",
    (QueryLevel.INSTANCE, "i"): "instances i JOIN series se ON se.id = i.series_pk"
    " JOIN studies st ON st.id = i.study_pk",
    (QueryLevel.INSTANCE, "se"): "series se CROSS JOIN instances i ON i.series_pk = se.id"
    " JOIN studies st ON st.id = se.study_pk",
    (QueryLevel.INSTANCE, "st"): "studies st CROSS JOIN instances i ON i.study_pk = st.id"
    " JOIN series se ON se.id = i.series_pk",
}
#: The result order of each level; each has an index that yields it (``*_order``).
_ORDER = {
    # Newest first: the studies_order index read backwards.
    QueryLevel.STUDY: ("st.study_date DESC", "st.study_time DESC", "st.id DESC"),
    QueryLevel.SERIES: ("se.study_pk", "se.series_number", "se.id"),
    QueryLevel.INSTANCE: ("i.series_pk", "i.instance_number", "i.id"),
}
_ROOT = {QueryLevel.STUDY: "st", QueryLevel.SERIES: "se", QueryLevel.INSTANCE: "i"}
#: Keys whose single values, lists or wildcard prefixes find few rows through an index,
#: most selective first.
_SELECTIVE = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "AccessionNumber",
    "PatientID",
    "StudyID",
    "PatientName",
    "ReferringPhysicianName",
)
#: Parameters per ``IN (...)`` when looking up the studies of a page.
_CHUNK = 500


def build_search(trust: str, query: Query) -> tuple[str, list[Any]]:
    """The SQL and parameters that read one page of matches (plus one, to detect more).

    The plan is chosen here rather than left to SQLite, which has no statistics and
    prefers an index that yields rows in ``ORDER BY`` order even when another would find
    a handful of rows. With a selective key (``_SELECTIVE``) the search starts from that
    key's table and index, every other term is written ``+column`` (which no index can
    serve) and the few matches are sorted. Without one it walks the level's order index
    (for StudyDate ranges, the part of it in range) and stops after one page, so its cost
    follows the page size and the filter's selectivity, not the size of the index.
    """
    driver = _driver(query.conditions)
    table = _ROOT[query.level] if driver is None else _ROOT[driver.key.level]
    where = _Where(query.fuzzy)
    for condition in query.conditions:
        where.add(condition, demote=driver is not None and condition is not driver)
    order: tuple[str, ...] = _ORDER[query.level]
    if driver is not None:
        order = tuple("+" + term for term in order)
    sql = (
        f"{_SELECT[query.level]} FROM {_FROM[query.level, table]} WHERE {table}.trust = ?"
        + "".join(f" AND {c}" for c in where.clauses)
        + " ORDER BY "
        + ", ".join(order)
        + " LIMIT ? OFFSET ?"
    )
    return sql, [trust, *where.params, query.limit + 1, query.offset]


def _driver(conditions: Sequence[Condition]) -> Condition | None:
    """The condition whose index should start the search, if any narrows it well."""
    candidates = [
        c
        for c in conditions
        if c.key.keyword in _SELECTIVE and (not isinstance(c.matcher, Wildcard) or c.matcher.prefix)
    ]
    return min(candidates, key=lambda c: _SELECTIVE.index(c.key.keyword), default=None)


def run_search(conn: sqlite3.Connection, trust: str, query: Query) -> QueryResult:
    sql, params = build_search(trust, query)
    rows = conn.execute(sql, params).fetchall()
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    study_pks = sorted({row[0] for row in rows})
    modalities: dict[int, list[str]] = {}
    sop_classes: dict[int, list[str]] = {}
    if study_pks and query.wants(MODALITIES_IN_STUDY):
        modalities = _per_study(
            conn,
            "SELECT DISTINCT study_pk, modality FROM series"
            " WHERE modality IS NOT NULL AND study_pk IN ({})",
            study_pks,
        )
    if study_pks and query.wants(SOP_CLASSES_IN_STUDY):
        sop_classes = _per_study(
            conn,
            "SELECT DISTINCT study_pk, sop_class_uid FROM instances WHERE study_pk IN ({})",
            study_pks,
        )
    matches = [
        Match(
            study_uid=row[1],
            series_uid=row[2],
            sop_uid=row[3],
            dataset=bytes(row[4]),
            study_series=row[5],
            study_instances=row[6],
            series_instances=row[7],
            modalities_in_study=tuple(sorted(modalities.get(row[0], ()))),
            sop_classes_in_study=tuple(sorted(sop_classes.get(row[0], ()))),
        )
        for row in rows
    ]
    return QueryResult(matches, more)


def _per_study(conn: sqlite3.Connection, sql: str, pks: Sequence[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for start in range(0, len(pks), _CHUNK):
        chunk = pks[start : start + _CHUNK]
        for pk, value in conn.execute(sql.format(",".join("?" * len(chunk))), chunk):
            out[pk].append(value)
    return out


class _Where:
    """Collects SQL conditions and their bound parameters."""

    def __init__(self, fuzzy: bool) -> None:
        self.fuzzy = fuzzy
        self.clauses: list[str] = []
        self.params: list[Any] = []

    def _add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def add(self, condition: Condition, demote: bool = False) -> None:
        """Add a condition; ``demote`` keeps indexes from serving it (``+column``)."""
        keyword = condition.key.keyword
        plus = "+" if demote else ""
        if keyword in _NAMES:
            raw, folded = _NAMES[keyword]
            self._person_name(plus + raw, plus + folded, condition.matcher)
        elif keyword in _STUDY_OF_SERIES:
            # PS3.4 C.6.1.1.3.2: a study matches when any of its series has the modality.
            inner = _Where(self.fuzzy)
            inner._match(_STUDY_OF_SERIES[keyword], condition.matcher)
            self._add(
                "EXISTS (SELECT 1 FROM series m WHERE m.study_pk = st.id"
                + "".join(f" AND {c}" for c in inner.clauses)
                + ")",
                *inner.params,
            )
        else:
            self._match(plus + _COLUMNS[keyword], condition.matcher)

    def _match(self, column: str, matcher: Matcher) -> None:
        if isinstance(matcher, Single):
            self._add(f"{column} = ?", matcher.value)
        elif isinstance(matcher, ValueList):
            self._add(f"{column} IN ({','.join('?' * len(matcher.values))})", *matcher.values)
        elif isinstance(matcher, Range):
            if matcher.low is not None:
                self._add(f"{column} >= ?", matcher.low)
            if matcher.high is not None:
                self._add(f"{column} <= ?", matcher.high)
        else:
            self._wildcard(column, matcher.pattern, lambda s: s)

    def _wildcard(self, column: str, pattern: str, fold: Callable[[str], str | None]) -> None:
        prefix = fold(Wildcard(pattern).prefix) or ""
        if prefix:
            self._add(f"{column} >= ?", prefix)
            upper = _successor(prefix)
            if upper is not None:
                self._add(f"{column} < ?", upper)
        self._add(f"{column} GLOB ?", to_glob(pattern, fold))

    def _person_name(self, column: str, folded: str, matcher: Matcher) -> None:
        """PN matching: caseless literal by default, accent-insensitive prefix when fuzzy."""
        if isinstance(matcher, Single):
            assert isinstance(matcher.value, str)
            if self.fuzzy:
                self._wildcard(folded, matcher.value + "*", normalise_name)
            else:
                # The folded column narrows through its index; the caseless compare decides.
                self._add(f"{folded} = ?", normalise_name(matcher.value))
                self._add(f"iex_caseless({column}) = ?", caseless_name(matcher.value))
        elif isinstance(matcher, Wildcard):
            self._wildcard(folded, matcher.pattern, normalise_name)
            if not self.fuzzy:
                self._add(f"iex_caseless({column}) GLOB ?", to_glob(matcher.pattern, caseless_name))
        else:  # the parser gives names single values or wildcards only
            raise AssertionError(f"unexpected matcher for a person name: {matcher!r}")


def to_glob(pattern: str, fold: Callable[[str], str | None] = lambda s: s) -> str:
    """A GLOB pattern for a DICOM wildcard value: literal runs folded, ``[`` escaped."""
    return "".join(
        part if part in ("*", "?") else (fold(part) or "").replace("[", "[[]")
        for part in re.split(r"([*?])", pattern)
    )


def _successor(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix``."""
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return None
    following = last + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates cannot be encoded; skip past them
        following = 0xE000
    return prefix[:-1] + chr(following)
