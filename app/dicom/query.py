"""QIDO-RS query model (PS3.18 §10.6) and its parsing from query parameters (PS3.18 §8.3.4).

The HTTP layer hands over the raw ``(name, value)`` pairs; ``parse_query`` turns them into a
``Query`` or raises ``InvalidQuery`` naming the offending parameter. Matching follows the
rules of PS3.4 C.2.2.2:

* single value matching (C.2.2.2.1): exact and case-sensitive, except person names (PN),
  which match case-insensitively (C.2.2.2.1 lets PN matching be "insensitive to some or
  all aspects of case"), but accent-sensitively;
* list of UID matching (C.2.2.2.2): UIDs separated by ``,`` or ``\\``; the same list
  syntax is accepted for the code strings Modality and ModalitiesInStudy;
* universal matching (C.2.2.2.3): an empty value (or only ``*``) matches everything and
  asks for the attribute to be returned;
* wildcard matching (C.2.2.2.4): ``*`` and ``?`` in string values (not UIDs, dates, numbers);
* range matching (C.2.2.2.5): ``a-b``, ``-b``, ``a-`` on dates and times;
* fuzzy matching (PS3.18 §8.3.4, ``fuzzymatching=true``): person names match case- and
  accent-insensitively, and a value without wildcards matches as a prefix.

Combined date-time range matching (C.2.2.2.5.1) and sequence matching are not supported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from enum import Enum
from functools import cached_property

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from app.dicom.uids import is_valid_uid
from app.errors import InvalidQuery


class QueryLevel(Enum):
    STUDY = 0
    SERIES = 1
    INSTANCE = 2


@dataclass(frozen=True)
class MatchingKey:
    """An attribute the index can match on (PS3.18 Table 10.6.1-5)."""

    keyword: str
    tag: int
    vr: str
    level: QueryLevel


def _key(keyword: str, vr: str, level: QueryLevel) -> MatchingKey:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return MatchingKey(keyword, tag, vr, level)


_S, _SE, _I = QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.INSTANCE

#: The matching keys of PS3.18 Table 10.6.1-5, by keyword.
MATCHING_KEYS: dict[str, MatchingKey] = {
    k.keyword: k
    for k in (
        _key("StudyDate", "DA", _S),
        _key("StudyTime", "TM", _S),
        _key("AccessionNumber", "SH", _S),
        _key("ModalitiesInStudy", "CS", _S),
        _key("ReferringPhysicianName", "PN", _S),
        _key("PatientName", "PN", _S),
        _key("PatientID", "LO", _S),
        _key("StudyInstanceUID", "UI", _S),
        _key("StudyID", "SH", _S),
        _key("Modality", "CS", _SE),
        _key("SeriesInstanceUID", "UI", _SE),
        _key("SeriesNumber", "IS", _SE),
        _key("PerformedProcedureStepStartDate", "DA", _SE),
        _key("PerformedProcedureStepStartTime", "TM", _SE),
        _key("SOPClassUID", "UI", _I),
        _key("SOPInstanceUID", "UI", _I),
        _key("InstanceNumber", "IS", _I),
    )
}


@dataclass(frozen=True)
class Single:
    """Single value matching (PS3.4 C.2.2.2.1)."""

    value: str | int


@dataclass(frozen=True)
class Wildcard:
    """Wildcard matching (PS3.4 C.2.2.2.4): ``*`` is any run of characters, ``?`` any one."""

    pattern: str

    @property
    def prefix(self) -> str:
        """The literal text before the first wildcard: what an index can seek on."""
        return re.split(r"[*?]", self.pattern, maxsplit=1)[0]


@dataclass(frozen=True)
class ValueList:
    """List of UID matching (PS3.4 C.2.2.2.2), also used for lists of code strings."""

    values: tuple[str, ...]


@dataclass(frozen=True)
class Range:
    """Range matching (PS3.4 C.2.2.2.5); a missing bound is open. Bounds are inclusive."""

    low: str | None
    high: str | None


Matcher = Single | Wildcard | ValueList | Range


@dataclass(frozen=True)
class Condition:
    key: MatchingKey
    matcher: Matcher


@dataclass(frozen=True)
class ReturnKey:
    """An attribute returned at a level (PS3.18 Tables 10.6.3-3, -4 and -5)."""

    tag: int
    vr: str
    #: Returned empty (``{"vr": ...}``) when the object lacks it; else only when present.
    always: bool = True


SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
INSTANCE_AVAILABILITY = 0x00080056
MODALITIES_IN_STUDY = 0x00080061
SOP_CLASSES_IN_STUDY = 0x00080062
TIMEZONE_OFFSET = 0x00080201
RETRIEVE_URL = 0x00081190
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
STUDY_RELATED_SERIES = 0x00201206
STUDY_RELATED_INSTANCES = 0x00201208
SERIES_RELATED_INSTANCES = 0x00201209

#: Attributes computed by the gateway rather than read from the stored objects.
COMPUTED_TAGS = frozenset(
    {
        INSTANCE_AVAILABILITY,
        MODALITIES_IN_STUDY,
        SOP_CLASSES_IN_STUDY,
        RETRIEVE_URL,
        STUDY_RELATED_SERIES,
        STUDY_RELATED_INSTANCES,
        SERIES_RELATED_INSTANCES,
    }
)

#: Attributes every match returns at each level (PS3.18 Tables 10.6.3-3, -4, -5).
RETURN_KEYS: dict[QueryLevel, tuple[ReturnKey, ...]] = {
    QueryLevel.STUDY: (
        ReturnKey(SPECIFIC_CHARACTER_SET, "CS", always=False),
        ReturnKey(0x00080020, "DA"),  # StudyDate
        ReturnKey(0x00080030, "TM"),  # StudyTime
        ReturnKey(0x00080050, "SH"),  # AccessionNumber
        ReturnKey(INSTANCE_AVAILABILITY, "CS"),
        ReturnKey(MODALITIES_IN_STUDY, "CS"),
        ReturnKey(0x00080090, "PN"),  # ReferringPhysicianName
        ReturnKey(TIMEZONE_OFFSET, "SH", always=False),
        ReturnKey(0x00100010, "PN"),  # PatientName
        ReturnKey(0x00100020, "LO"),  # PatientID
        ReturnKey(0x00100030, "DA"),  # PatientBirthDate
        ReturnKey(0x00100040, "CS"),  # PatientSex
        ReturnKey(STUDY_INSTANCE_UID, "UI"),
        ReturnKey(0x00200010, "SH"),  # StudyID
        ReturnKey(STUDY_RELATED_SERIES, "IS"),
        ReturnKey(STUDY_RELATED_INSTANCES, "IS"),
    ),
    QueryLevel.SERIES: (
        ReturnKey(SPECIFIC_CHARACTER_SET, "CS", always=False),
        ReturnKey(0x00080060, "CS"),  # Modality
        ReturnKey(TIMEZONE_OFFSET, "SH", always=False),
        ReturnKey(0x0008103E, "LO"),  # SeriesDescription
        ReturnKey(SERIES_INSTANCE_UID, "UI"),
        ReturnKey(0x00200011, "IS"),  # SeriesNumber
        ReturnKey(SERIES_RELATED_INSTANCES, "IS"),
        ReturnKey(0x00400244, "DA"),  # PerformedProcedureStepStartDate
        ReturnKey(0x00400245, "TM"),  # PerformedProcedureStepStartTime
        ReturnKey(0x00400275, "SQ", always=False),  # RequestAttributesSequence
    ),
    QueryLevel.INSTANCE: (
        ReturnKey(SPECIFIC_CHARACTER_SET, "CS", always=False),
        ReturnKey(SOP_CLASS_UID, "UI"),
        ReturnKey(SOP_INSTANCE_UID, "UI"),
        ReturnKey(INSTANCE_AVAILABILITY, "CS"),
        ReturnKey(TIMEZONE_OFFSET, "SH", always=False),
        ReturnKey(0x00200013, "IS"),  # InstanceNumber
        # Image attributes: only images have them, so only returned when present.
        ReturnKey(0x00280008, "IS", always=False),  # NumberOfFrames
        ReturnKey(0x00280010, "US", always=False),  # Rows
        ReturnKey(0x00280011, "US", always=False),  # Columns
        ReturnKey(0x00280100, "US", always=False),  # BitsAllocated
    ),
}


def _tags(*keywords: str) -> frozenset[int]:
    tags = {tag_for_keyword(k) for k in keywords}
    assert None not in tags, keywords
    return frozenset(t for t in tags if t is not None)


#: ``includefield=all`` at study level: every Patient attribute (group 0010) and these
#: General Study / Patient Study module attributes (PS3.3 C.7.2.1, C.7.2.2).
STUDY_ALL_TAGS = _tags(
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "TimezoneOffsetFromUTC",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "ReasonForPerformedProcedureCodeSequence",
    "RequestingPhysician",
    "RequestedProcedureDescription",
    "StudyInstanceUID",
    "StudyID",
    "ClinicalTrialTimePointID",
)
PATIENT_GROUP = 0x0010

#: ``includefield=all`` at series level adds these General Series, Frame of Reference and
#: General Equipment module attributes (PS3.3 C.7.3.1, C.7.4.1, C.7.5.1) to the study set.
SERIES_ALL_TAGS = _tags(
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "SeriesDescription",
    "Laterality",
    "ProtocolName",
    "OperatorsName",
    "PerformingPhysicianName",
    "BodyPartExamined",
    "PatientPosition",
    "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepDescription",
    "RequestAttributesSequence",
    "FrameOfReferenceUID",
    "Manufacturer",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "StationName",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "SeriesType",
)


@dataclass(frozen=True)
class PagingLimits:
    """The server's paging policy: ``limit`` when none is given, and the largest allowed."""

    default: int
    maximum: int


@dataclass(frozen=True)
class Query:
    """A parsed QIDO-RS request: what to match, what to return, which page."""

    level: QueryLevel
    conditions: tuple[Condition, ...] = ()
    #: The deepest level fixed by the path (``/studies/{s}/series`` -> STUDY), if any.
    within: QueryLevel | None = None
    limit: int = 1000
    offset: int = 0
    #: True when ``limit`` is the server's (no limit asked, or the one asked was capped).
    server_limited: bool = False
    fuzzy: bool = False
    include_all: bool = False
    include_tags: frozenset[int] = field(default_factory=frozenset)

    @property
    def returned_levels(self) -> tuple[QueryLevel, ...]:
        """Levels whose attributes each match carries (PS3.18 §10.6.3.3).

        Searching series or instances outside a study also returns the study attributes;
        searching instances outside a series also returns the series attributes.
        """
        first = 0 if self.within is None else self.within.value + 1
        return tuple(QueryLevel(v) for v in range(first, self.level.value + 1))

    @cached_property
    def return_keys(self) -> tuple[ReturnKey, ...]:
        """The required return attributes of the returned levels, one per tag."""
        keys: dict[int, ReturnKey] = {}
        for level in self.returned_levels:
            for key in RETURN_KEYS[level]:
                keys.setdefault(key.tag, key)
        return tuple(keys.values())

    def includes_all_of(self, tag: int) -> bool:
        """Whether ``includefield=all`` asks for ``tag`` at this query's level."""
        if not self.include_all:
            return False
        if self.level is QueryLevel.INSTANCE:
            return True
        if tag >> 16 == PATIENT_GROUP or tag in STUDY_ALL_TAGS:
            return True
        return self.level is QueryLevel.SERIES and tag in SERIES_ALL_TAGS

    def wants(self, tag: int) -> bool:
        """Whether each match should carry ``tag`` (required, included, or ``all``)."""
        return (
            tag in self.include_tags
            or any(k.tag == tag for k in self.return_keys)
            or (tag in COMPUTED_TAGS and self.include_all and self.level is not QueryLevel.INSTANCE)
            or self.includes_all_of(tag)
        )


@dataclass(frozen=True)
class Match:
    """One match as the index returns it; the service renders it as DICOM JSON."""

    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    #: Stored DICOM JSON of the level's representative: the study's or series' first
    #: instance, or the instance itself.
    dataset: bytes
    study_series: int
    study_instances: int
    series_instances: int | None = None
    modalities_in_study: tuple[str, ...] = ()
    sop_classes_in_study: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryResult:
    matches: list[Match]
    #: Further matches exist after this page.
    more: bool = False


# -- parsing ----------------------------------------------------------------------------

MAX_VALUE_LENGTH = 1024
#: Larger offsets cannot match anything and would overflow SQLite's 64-bit integers.
MAX_OFFSET = 2**62
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_UINT = re.compile(r"[0-9]+")
_INT = re.compile(r"[+-]?[0-9]{1,10}")
_DATE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
_TIME = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RESERVED = ("limit", "offset", "fuzzymatching", "includefield")


def parse_query(
    params: Iterable[tuple[str, str]],
    level: QueryLevel,
    paging: PagingLimits,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Query:
    """Build a ``Query`` from query parameters (PS3.18 §8.3.4) and path UIDs.

    Raises ``InvalidQuery`` for an unknown parameter, a key that is not a matching key at
    this level, or a malformed value; the message names the parameter.
    """
    conditions: list[Condition] = []
    include: set[int] = set()
    include_all = False
    seen: set[str] = set()
    limit: int | None = None
    offset = 0
    fuzzy = False
    within: QueryLevel | None = None
    if study_uid is not None:
        conditions.append(_path_uid("StudyInstanceUID", study_uid))
        within = QueryLevel.STUDY
    if series_uid is not None:
        conditions.append(_path_uid("SeriesInstanceUID", series_uid))
        within = QueryLevel.SERIES

    for name, raw in params:
        if name == "includefield":
            for item in raw.split(","):
                item = item.strip()
                if item == "all":
                    include_all = True
                elif item:
                    include.add(_attribute(item, "includefield")[0])
            continue
        if name in seen:
            raise InvalidQuery(f"query parameter {name!r} is given more than once")
        seen.add(name)
        if name == "limit":
            limit = _uint(name, raw)
        elif name == "offset":
            offset = min(_uint(name, raw), MAX_OFFSET)
        elif name == "fuzzymatching":
            fuzzy = _boolean(name, raw)
        else:
            tag, keyword = _attribute(name, "query parameter")
            include.add(tag)
            condition = _condition(name, tag, keyword, raw, level)
            if condition is not None:
                conditions.append(condition)

    server_limited = limit is None or limit > paging.maximum
    effective = paging.default if limit is None else min(limit, paging.maximum)
    return Query(
        level=level,
        conditions=tuple(conditions),
        within=within,
        limit=effective,
        offset=offset,
        server_limited=server_limited,
        fuzzy=fuzzy,
        include_all=include_all,
        include_tags=frozenset(include),
    )


def _path_uid(keyword: str, value: str) -> Condition:
    if not is_valid_uid(value):
        raise InvalidQuery(f"{keyword} {value[:70]!r} in the path is not a valid UID")
    return Condition(MATCHING_KEYS[keyword], Single(value))


def _uint(name: str, raw: str) -> int:
    """An unsigned integer (PS3.18 §8.3.4.4); huge values are kept, callers cap them."""
    if _UINT.fullmatch(raw) is None:
        raise InvalidQuery(f"{name} must be a non-negative integer, not {raw[:40]!r}")
    return int(raw) if len(raw) <= 19 else 2**63


def _boolean(name: str, raw: str) -> bool:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise InvalidQuery(f"{name} must be true or false, not {raw[:40]!r}")


def _attribute(attribute_id: str, what: str) -> tuple[int, str | None]:
    """Resolve a keyword or an eight-digit hexadecimal tag (PS3.18 §8.3.4.1)."""
    if _TAG.fullmatch(attribute_id):
        tag = int(attribute_id, 16)
        return tag, keyword_for_tag(tag) or None
    found = tag_for_keyword(attribute_id)
    if found is not None:
        return found, attribute_id
    shown = attribute_id[:64]
    if "." in attribute_id:
        raise InvalidQuery(f"{what} {shown!r}: sequence attribute paths are not supported")
    raise InvalidQuery(
        f"unknown {what} {shown!r}: not a DICOM keyword or tag"
        + (f", nor one of {', '.join(_RESERVED)}" if what == "query parameter" else "")
    )


def _condition(
    name: str, tag: int, keyword: str | None, raw: str, level: QueryLevel
) -> Condition | None:
    value = raw.strip(" ")
    if len(value) > MAX_VALUE_LENGTH:
        raise InvalidQuery(f"the value of {name} is longer than {MAX_VALUE_LENGTH} characters")
    if _CONTROL.search(value):
        raise InvalidQuery(f"the value of {name} contains control characters")
    key = MATCHING_KEYS.get(keyword or "")
    if value.strip("*") == "":
        return None  # universal matching (PS3.4 C.2.2.2.3): return the attribute only
    if key is None:
        raise InvalidQuery(
            f"{name} is not a supported matching key (PS3.18 Table 10.6.1-5); "
            "it can only be returned (give it an empty value or use includefield)"
        )
    if key.level.value > level.value:
        raise InvalidQuery(
            f"{name} is a {key.level.name.lower()}-level attribute and cannot be matched "
            f"in a {level.name.lower()}-level search"
        )
    return Condition(key, _matcher(name, key, value))


def _matcher(name: str, key: MatchingKey, value: str) -> Matcher:
    if key.vr == "UI":
        uids = tuple(u.strip(" ") for u in re.split(r"[,\\]", value))
        for uid in uids:
            if not is_valid_uid(uid):
                raise InvalidQuery(f"{name}: {uid[:70]!r} is not a valid UID (PS3.5 §9.1)")
        return Single(uids[0]) if len(uids) == 1 else ValueList(uids)
    if key.vr in ("DA", "TM"):
        return _range(name, key.vr, value)
    if key.vr == "IS":
        if _INT.fullmatch(value) is None:
            raise InvalidQuery(f"{name} must be an integer, not {value[:40]!r}")
        return Single(int(value))
    if key.vr == "CS":
        codes = tuple(c.strip(" ") for c in re.split(r"[,\\]", value))
        if len(codes) > 1:
            if any(not c or "*" in c or "?" in c for c in codes):
                raise InvalidQuery(f"{name}: a list may not hold empty or wildcard values")
            return ValueList(codes)
    return Wildcard(value) if ("*" in value or "?" in value) else Single(value)


def _range(name: str, vr: str, value: str) -> Single | Range:
    check = _check_date if vr == "DA" else _check_time
    if "-" not in value:
        return Single(check(name, value))
    low, sep, high = value.partition("-")
    if not low and not high:
        raise InvalidQuery(f"{name}: {value!r} is not a range; give at least one bound")
    if "-" in high:
        check(name, value)  # raises, naming the expected format
    lo = check(name, low) if low else None
    hi = check(name, high) if high else None
    if vr == "TM" and hi is not None:
        hi = time_upper_bound(hi)
    if lo is not None and hi is not None and lo > hi:
        raise InvalidQuery(f"{name}: the range {value!r} ends before it starts")
    return Range(lo, hi)


def _check_date(name: str, value: str) -> str:
    m = _DATE.fullmatch(value)
    try:
        if m is None:
            raise ValueError
        date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        raise InvalidQuery(
            f"{name}: {value[:40]!r} is not a date; use YYYYMMDD or a range such as "
            "20240101-20240131 (PS3.5 §6.2 DA)"
        ) from None
    return value


def _check_time(name: str, value: str) -> str:
    m = _TIME.fullmatch(value)
    if (
        m is None
        or int(m[1]) > 23
        or (m[2] is not None and int(m[2]) > 59)
        or (m[3] is not None and int(m[3]) > 60)
    ):
        raise InvalidQuery(
            f"{name}: {value[:40]!r} is not a time; use HH[MM[SS[.FFFFFF]]] or a range "
            "(PS3.5 §6.2 TM)"
        )
    return value


def time_upper_bound(value: str) -> str:
    """The latest full time a partial upper bound admits: ``11`` -> ``115959.999999``."""
    template = "HH5959.999999"
    if "." in value:
        whole, _, fraction = value.partition(".")
        return f"{whole}.{fraction.ljust(6, '9')}"
    return value + template[len(value) :]


def vr_of(tag: int) -> str | None:
    """The dictionary VR of ``tag`` when it is unambiguous, for empty return values."""
    try:
        vr: str = dictionary_VR(tag)
    except KeyError:
        return None
    return vr if len(vr) == 2 else None
