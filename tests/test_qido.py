"""QIDO-RS against a real server (PS3.18 §10.6), plus the index's plans and trust scoping."""

from __future__ import annotations

import io
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from app.dicom.instance import read_instance_header
from app.dicom.query import MATCHING_KEYS, PagingLimits, QueryLevel, parse_query
from app.storage.base import AlreadyIndexed, InstanceRecord
from app.storage.sqlite_index import SQLiteMetadataIndex
from app.storage.sqlite_schema import SCHEMA, caseless_name, create_schema
from app.storage.sqlite_search import SUPPORTED_KEYS, build_search
from tests.helpers import (
    CT_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    IexServer,
    make_instance,
    multipart_related,
)

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
RETRIEVE_URL = "00081190"


def _store(client: httpx.Client, parts: list[bytes]) -> None:
    body, ctype = multipart_related(parts)
    r = client.post("/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text


def _first(ds: dict[str, Any], tag: str) -> Any:
    return ds[tag]["Value"][0]


def _search(client: httpx.Client, path: str, params: Any = None) -> list[dict[str, Any]]:
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    body: list[dict[str, Any]] = r.json()
    return body


@dataclass
class Corpus:
    """Four studies with distinct patients; ``scope`` matches exactly these four."""

    token: str
    studies: dict[str, str]
    series: dict[str, str]
    sops: dict[str, list[str]]

    @property
    def scope(self) -> str:
        return f"{self.token}-*"

    def pid(self, letter: str) -> str:
        return f"{self.token}-{letter}"

    def letters(self, datasets: list[dict[str, Any]]) -> set[str]:
        by_uid = {uid: letter for letter, uid in self.studies.items()}
        return {by_uid[_first(ds, STUDY_UID)] for ds in datasets}


@pytest.fixture(scope="module")
def corpus(server: IexServer) -> Corpus:
    token = uuid.uuid4().hex[:10].upper()
    studies = {k: generate_uid() for k in "ABCD"}
    series = {k: generate_uid() for k in ("A1", "A2", "B1", "C1", "D1")}
    sops: dict[str, list[str]] = {k: [] for k in series}
    parts: list[bytes] = []

    def add(key: str, n: int, **kw: Any) -> None:
        for i in range(1, n + 1):
            sop = generate_uid()
            sops[key].append(sop)
            parts.append(
                make_instance(
                    study_uid=studies[key[0]],
                    series_uid=series[key],
                    sop_uid=sop,
                    instance_number=i,
                    patient_id=f"{token}-{key[0]}",
                    **kw,
                )
            )

    common_a: dict[str, Any] = {
        "patient_name": "Jöe^Blow",
        "SpecificCharacterSet": "ISO_IR 192",
        "study_date": "20240115",
        "StudyTime": "083000",
        "AccessionNumber": f"{token}ACCA",
        "StudyID": "SA",
        "ReferringPhysicianName": "House^Gregory",
        "StudyDescription": "Head",
        "TimezoneOffsetFromUTC": "+0100",
    }
    add(
        "A1",
        3,
        modality="CT",
        SeriesNumber=1,
        SeriesDescription="Axial",
        PerformedProcedureStepStartDate="20240115",
        PerformedProcedureStepStartTime="083500",
        **common_a,
    )
    add("A2", 2, modality="MR", SeriesNumber=2, SeriesDescription="T1", **common_a)
    add(
        "B1",
        1,
        modality="CT",
        patient_name="Doe^Jane",
        study_date="20240220",
        StudyTime="141500",
        frames=3,
        AccessionNumber=f"{token}ACCB",
    )
    add("C1", 1, modality="US", patient_name="DOE^JOHN", study_date="20231231")
    add("D1", 1, modality="CT", patient_name="O'Brien^[Ann]", study_date="20230601")
    with httpx.Client(base_url=server.dicomweb, headers=server.headers, timeout=60) as client:
        _store(client, parts)
    return Corpus(token, studies, series, sops)


# -- study level ------------------------------------------------------------------------


def test_study_result_has_the_required_attributes(client: httpx.Client, corpus: Corpus) -> None:
    (ds,) = _search(client, "/studies", {"PatientID": corpus.pid("A")})
    assert _first(ds, STUDY_UID) == corpus.studies["A"]
    assert ds["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Jöe^Blow"}]}
    assert ds["00080090"]["Value"] == [{"Alphabetic": "House^Gregory"}]
    assert ds["00080005"]["Value"] == ["ISO_IR 192"]
    assert ds["00080020"] == {"vr": "DA", "Value": ["20240115"]}
    assert ds["00080030"]["Value"] == ["083000"]
    assert ds["00080050"]["Value"] == [f"{corpus.token}ACCA"]
    assert ds["00080056"] == {"vr": "CS", "Value": ["ONLINE"]}
    assert ds["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert ds["00080201"]["Value"] == ["+0100"]
    assert ds["00100020"]["Value"] == [corpus.pid("A")]
    assert ds["00100030"]["Value"] == ["19700101"]
    assert ds["00100040"]["Value"] == ["F"]
    assert ds["00200010"]["Value"] == ["SA"]
    assert ds["00201206"] == {"vr": "IS", "Value": [2]}
    assert ds["00201208"] == {"vr": "IS", "Value": [5]}
    base = str(client.base_url).rstrip("/")
    assert ds[RETRIEVE_URL] == {"vr": "UR", "Value": [f"{base}/studies/{corpus.studies['A']}"]}
    # Neither lower-level attributes nor unrequested study attributes leak in.
    for tag in (SERIES_UID, SOP_UID, "00080060", "00081030", "00280010"):
        assert tag not in ds
    assert list(ds) == sorted(ds)


def test_missing_required_attributes_are_returned_empty(
    client: httpx.Client, corpus: Corpus
) -> None:
    (ds,) = _search(client, "/studies", {"PatientID": corpus.pid("C")})
    assert "00080201" not in ds  # TimezoneOffsetFromUTC: only when present
    assert "00080005" not in ds
    assert ds["00080061"]["Value"] == ["US"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"StudyDate": "20240115"}, "A"),
        ({"StudyDate": "20240101-20240131"}, "A"),
        ({"StudyDate": "-20240131"}, "ACD"),
        ({"StudyDate": "20240201-"}, "B"),
        ({"StudyDate": "20250101-"}, ""),
        ({"StudyTime": "080000-090000"}, "A"),
        ({"StudyTime": "14-"}, "B"),
        ({"StudyTime": "-0900"}, "A"),
        ({"StudyTime": "083000"}, "A"),
        ({"AccessionNumber": "{T}ACCB"}, "B"),
        ({"AccessionNumber": "{T}ACC?"}, "AB"),
        ({"AccessionNumber": "nope"}, ""),
        ({"ModalitiesInStudy": "MR"}, "A"),
        ({"ModalitiesInStudy": "CT"}, "ABD"),
        ({"ModalitiesInStudy": "US,MR"}, "AC"),
        ({"ModalitiesInStudy": "US\\MR"}, "AC"),
        ({"ModalitiesInStudy": "XA"}, ""),
        ({"ReferringPhysicianName": "House^Gregory"}, "A"),
        ({"ReferringPhysicianName": "house*"}, "A"),
        ({"ReferringPhysicianName": "Who^Doctor"}, "BCD"),
        ({"PatientName": "Doe^Jane"}, "B"),
        ({"PatientName": "doe^jane"}, "B"),  # PN: case-insensitive literal matching
        ({"PatientName": "DOE*"}, "BC"),
        ({"PatientName": "D?E^J*"}, "BC"),
        ({"PatientName": "*john"}, "C"),
        ({"PatientName": "Jöe^Blow"}, "A"),
        ({"PatientName": "j?e^blow"}, "A"),  # "?" is one character, accented or not
        ({"PatientName": "Joe*"}, ""),  # accents count without fuzzy matching
        ({"PatientName": "Doe"}, ""),  # single value matching is not a prefix match
        ({"PatientName": "joe*", "fuzzymatching": "true"}, "A"),
        ({"PatientName": "JOE^BLOW", "fuzzymatching": "true"}, "A"),
        ({"PatientName": "doe", "fuzzymatching": "true"}, "BC"),
        ({"PatientName": "joe*", "fuzzymatching": "false"}, ""),
        ({"PatientName": "O'Brien^[Ann]"}, "D"),
        ({"PatientName": "*[Ann]"}, "D"),
        ({"PatientName": "*[A]*"}, ""),  # "[" is literal, not a GLOB character class
        ({"PatientName": ""}, "ABCD"),  # empty: universal matching
        ({"PatientName": "*"}, "ABCD"),
        ({"StudyID": "SA"}, "A"),
        ({"00200010": "SA"}, "A"),
        ({"StudyInstanceUID": "{A}"}, "A"),
        ({"StudyInstanceUID": "{A},{B}"}, "AB"),
        ({"0020000D": "{C}\\{D}"}, "CD"),
        ({"StudyInstanceUID": "1.2.3"}, ""),
        ({"PatientID": "{T}-B"}, "B"),
        ({"00100020": "{T}-C"}, "C"),
        ({"PatientID": "{T}-b"}, ""),  # LO: case-sensitive
        ({"PatientID": "'; DROP TABLE studies;--"}, ""),
        ({"PatientID": "%"}, ""),
    ],
)
def test_study_matching(
    client: httpx.Client, corpus: Corpus, params: dict[str, str], expected: str
) -> None:
    def fill(value: str) -> str:
        value = value.replace("{T}", corpus.token)
        for letter, uid in corpus.studies.items():
            value = value.replace("{" + letter + "}", uid)
        return value

    query = {k: fill(v) for k, v in params.items()}
    query.setdefault("PatientID", corpus.scope)
    if "00100020" in query:
        del query["PatientID"]
    found = _search(client, "/studies", query)
    assert corpus.letters(found) == set(expected)
    assert len(found) == len(set(expected))


def test_matching_keys_are_returned(client: httpx.Client, corpus: Corpus) -> None:
    (ds,) = _search(client, "/studies", {"PatientID": corpus.pid("A"), "StudyDescription": ""})
    assert ds["00081030"]["Value"] == ["Head"]


def test_hostile_values_are_harmless(client: httpx.Client, corpus: Corpus) -> None:
    for value in ("'; DROP TABLE studies;--", '" OR 1=1 --', "\\'*", "[*", "]", "*?*"):
        r = client.get("/studies", params={"PatientName": value, "PatientID": corpus.scope})
        assert r.status_code == 200, (value, r.text)
    assert len(_search(client, "/studies", {"PatientID": corpus.scope})) == 4


# -- series and instance level ------------------------------------------------------------


def test_series_of_a_study(client: httpx.Client, corpus: Corpus) -> None:
    found = _search(client, f"/studies/{corpus.studies['A']}/series")
    assert [_first(ds, SERIES_UID) for ds in found] == [corpus.series["A1"], corpus.series["A2"]]
    a1, a2 = found
    assert a1["00080060"]["Value"] == ["CT"]
    assert a1["00200011"] == {"vr": "IS", "Value": [1]}
    assert a1["0008103E"]["Value"] == ["Axial"]
    assert a1["00201209"] == {"vr": "IS", "Value": [3]}
    assert a2["00201209"] == {"vr": "IS", "Value": [2]}
    assert a1["00400244"]["Value"] == ["20240115"]
    assert a1["00400245"]["Value"] == ["083500"]
    assert a2["00400244"] == {"vr": "DA"}
    assert _first(a1, STUDY_UID) == corpus.studies["A"]
    base = str(client.base_url).rstrip("/")
    assert _first(a1, RETRIEVE_URL) == (
        f"{base}/studies/{corpus.studies['A']}/series/{corpus.series['A1']}"
    )
    # Inside a study, the study attributes are not repeated.
    assert "00100010" not in a1 and "00201206" not in a1


def test_series_outside_a_study_carry_study_attributes(
    client: httpx.Client, corpus: Corpus
) -> None:
    found = _search(client, "/series", {"PatientID": corpus.pid("A")})
    assert {_first(ds, SERIES_UID) for ds in found} == {corpus.series["A1"], corpus.series["A2"]}
    for ds in found:
        assert ds["00100010"]["Value"] == [{"Alphabetic": "Jöe^Blow"}]
        assert ds["00080061"]["Value"] == ["CT", "MR"]
        assert ds["00201208"]["Value"] == [5]


@pytest.mark.parametrize(
    ("path", "params", "expected"),
    [
        ("/series", {"Modality": "MR"}, {"A2"}),
        ("/series", {"Modality": "CT,US"}, {"A1", "B1", "C1", "D1"}),
        ("/series", {"Modality": "C?"}, {"A1", "B1", "D1"}),
        ("/series", {"SeriesNumber": "2"}, {"A2"}),
        ("/series", {"00200011": "1", "ModalitiesInStudy": "MR"}, {"A1"}),
        ("/series", {"PerformedProcedureStepStartDate": "20240115"}, {"A1"}),
        ("/series", {"PerformedProcedureStepStartDate": "20240101-20240110"}, set()),
        ("/series", {"PerformedProcedureStepStartTime": "08-09"}, {"A1"}),
        ("/series", {"StudyDate": "20240201-", "Modality": "CT"}, {"B1"}),
        ("/studies/{A}/series", {"Modality": "CT,MR"}, {"A1", "A2"}),
        ("/studies/{A}/series", {"SeriesInstanceUID": "{A2}"}, {"A2"}),
        ("/studies/{B}/series", {"SeriesInstanceUID": "{A2}"}, set()),
    ],
)
def test_series_matching(
    client: httpx.Client,
    corpus: Corpus,
    path: str,
    params: dict[str, str],
    expected: set[str],
) -> None:
    def fill(value: str) -> str:
        for key, uid in {**corpus.studies, **corpus.series}.items():
            value = value.replace("{" + key + "}", uid)
        return value

    query = {k: fill(v) for k, v in params.items()}
    query["PatientID"] = corpus.scope
    found = _search(client, fill(path), query)
    by_uid = {uid: key for key, uid in corpus.series.items()}
    assert [by_uid[_first(ds, SERIES_UID)] for ds in found] == sorted(expected)


def test_instances_of_a_series(client: httpx.Client, corpus: Corpus) -> None:
    study, series = corpus.studies["A"], corpus.series["A1"]
    found = _search(client, f"/studies/{study}/series/{series}/instances")
    assert [_first(ds, SOP_UID) for ds in found] == corpus.sops["A1"]
    first = found[0]
    assert first["00080016"]["Value"] == [CT_IMAGE_STORAGE]
    assert first["00200013"] == {"vr": "IS", "Value": [1]}
    assert first["00280010"] == {"vr": "US", "Value": [16]}
    assert first["00280011"] == {"vr": "US", "Value": [16]}
    assert first["00280100"] == {"vr": "US", "Value": [16]}
    assert first["00080056"]["Value"] == ["ONLINE"]
    assert first["00080201"]["Value"] == ["+0100"]
    assert "00280008" not in first  # single frame: no Number of Frames
    assert _first(first, STUDY_UID) == study and _first(first, SERIES_UID) == series
    base = str(client.base_url).rstrip("/")
    assert _first(first, RETRIEVE_URL) == (
        f"{base}/studies/{study}/series/{series}/instances/{corpus.sops['A1'][0]}"
    )
    assert "00100010" not in first and "00080060" not in first


def test_instance_searches(client: httpx.Client, corpus: Corpus) -> None:
    a = corpus.studies["A"]
    assert len(_search(client, "/instances", {"StudyInstanceUID": a, "Modality": "CT"})) == 3
    mr = _search(client, f"/studies/{a}/instances", {"SOPClassUID": MR_IMAGE_STORAGE})
    assert [_first(ds, SOP_UID) for ds in mr] == corpus.sops["A2"]
    assert mr[0]["00080060"]["Value"] == ["MR"]  # series attributes outside a series
    assert "00100010" not in mr[0]
    numbered = _search(client, f"/studies/{a}/instances", {"InstanceNumber": "2"})
    assert {_first(ds, SOP_UID) for ds in numbered} == {corpus.sops["A1"][1], corpus.sops["A2"][1]}
    wanted = f"{corpus.sops['A1'][2]},{corpus.sops['B1'][0]}"
    both = _search(client, "/instances", {"SOPInstanceUID": wanted})
    assert {_first(ds, SOP_UID) for ds in both} == {corpus.sops["A1"][2], corpus.sops["B1"][0]}
    (multi,) = _search(client, "/instances", {"PatientID": corpus.pid("B")})
    assert multi["00280008"] == {"vr": "IS", "Value": [3]}
    assert multi["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]


# -- includefield -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("includefield", "with_classes"),
    [
        (["StudyDescription"], False),
        (["00081030"], False),
        (["StudyDescription,00080062"], True),
        (["StudyDescription", "SOPClassesInStudy"], True),
    ],
)
def test_includefield_forms(
    client: httpx.Client, corpus: Corpus, includefield: list[str], with_classes: bool
) -> None:
    params = [("PatientID", corpus.pid("A"))] + [("includefield", f) for f in includefield]
    (ds,) = _search(client, "/studies", params)
    assert ds["00081030"] == {"vr": "LO", "Value": ["Head"]}
    classes = {"vr": "UI", "Value": sorted([CT_IMAGE_STORAGE, MR_IMAGE_STORAGE])}
    assert ds.get("00080062") == (classes if with_classes else None)


def test_includefield_of_an_absent_attribute_is_empty(client: httpx.Client, corpus: Corpus) -> None:
    (ds,) = _search(
        client, "/studies", {"PatientID": corpus.pid("A"), "includefield": "InstitutionName"}
    )
    assert ds["00080080"] == {"vr": "LO"}


def test_includefield_all_per_level(client: httpx.Client, corpus: Corpus) -> None:
    params = {"PatientID": corpus.pid("A"), "includefield": "all"}
    (study,) = _search(client, "/studies", params)
    assert study["00081030"]["Value"] == ["Head"]
    assert study["00080062"]["Value"] == sorted([CT_IMAGE_STORAGE, MR_IMAGE_STORAGE])
    for tag in ("00080060", "0008103E", "00280004", "00280010", "7FE00010", SERIES_UID):
        assert tag not in study
    series = _search(client, "/series", params)
    assert {_first(s, "0008103E") for s in series} == {"Axial", "T1"}
    assert all("00280004" not in s and "7FE00010" not in s for s in series)
    instances = _search(client, f"/studies/{corpus.studies['A']}/instances", params)
    assert len(instances) == 5
    assert instances[0]["00280004"]["Value"] == ["MONOCHROME2"]
    assert instances[0]["00280101"]["Value"] == [12]
    assert all("7FE00010" not in i for i in instances)  # no bulk data in QIDO-RS


# -- paging -----------------------------------------------------------------------------


def test_paging_has_no_duplicates_or_gaps(client: httpx.Client) -> None:
    pid = "PAGE-" + uuid.uuid4().hex[:8]
    dates = ["20240101", "20240301", "20240301", "20230101", "20240501", "20220101", "20240301"]
    _store(client, [make_instance(patient_id=pid, study_date=d) for d in dates])
    everything = _search(client, "/studies", {"PatientID": pid})
    assert len(everything) == 7
    found_dates = [_first(ds, "00080020") for ds in everything]
    assert found_dates == sorted(dates, reverse=True)  # newest first
    pages = [
        _search(client, "/studies", {"PatientID": pid, "limit": "3", "offset": str(o)})
        for o in (0, 3, 6, 9)
    ]
    assert [len(p) for p in pages] == [3, 3, 1, 0]
    paged = [_first(ds, STUDY_UID) for page in pages for ds in page]
    assert paged == [_first(ds, STUDY_UID) for ds in everything]
    assert _search(client, "/studies", {"PatientID": pid, "limit": "0"}) == []
    huge = {"PatientID": pid, "offset": "99999999999999999999999"}
    assert _search(client, "/studies", huge) == []


def test_server_limit_caps_with_a_warning(make_server: Callable[..., IexServer]) -> None:
    srv = make_server(IEX_DEFAULT_QUERY_LIMIT="2", IEX_MAX_QUERY_LIMIT="3")
    with httpx.Client(base_url=srv.dicomweb, headers=srv.headers, timeout=60) as client:
        assert _search(client, "/studies") == []
        _store(client, [make_instance(patient_id=f"W{i}") for i in range(4)])
        r = client.get("/studies")
        assert len(r.json()) == 2 and r.headers["warning"].startswith("299 iex ")
        r = client.get("/studies", params={"limit": "999999999999"})
        assert len(r.json()) == 3 and "warning" in r.headers
        r = client.get("/studies", params={"limit": "3"})
        assert len(r.json()) == 3 and "warning" not in r.headers  # the client asked for 3
        r = client.get("/studies", params={"offset": "2"})
        assert len(r.json()) == 2 and "warning" not in r.headers  # nothing left over
        assert len(_search(client, "/series", {"limit": "3"})) == 3
        assert len(_search(client, "/instances", {"offset": "1", "limit": "3"})) == 3


def test_computed_counts_follow_stores(client: httpx.Client) -> None:
    study, series = generate_uid(), generate_uid()
    first = make_instance(study_uid=study, series_uid=series)
    _store(client, [first])
    params = {"StudyInstanceUID": study}
    (ds,) = _search(client, "/studies", params)
    assert (_first(ds, "00201206"), _first(ds, "00201208")) == (1, 1)
    _store(client, [make_instance(study_uid=study, series_uid=series, instance_number=2)])
    _store(client, [make_instance(study_uid=study, modality="MR") for _ in range(2)])
    _store(client, [first])  # a retry of the same bytes changes nothing
    (ds,) = _search(client, "/studies", params)
    assert (_first(ds, "00201206"), _first(ds, "00201208")) == (3, 4)
    assert ds["00080061"]["Value"] == ["CT", "MR"]
    counts = [_first(s, "00201209") for s in _search(client, f"/studies/{study}/series")]
    assert sorted(counts) == [1, 1, 2]


# -- errors and negotiation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "query", "named"),
    [
        ("/studies", "limit=abc", "limit"),
        ("/studies", "limit=-1", "limit"),
        ("/studies", "limit=1.5", "limit"),
        ("/studies", "limit=1&limit=2", "limit"),
        ("/studies", "offset=-1", "offset"),
        ("/studies", "offset=", "offset"),
        ("/studies", "fuzzymatching=yes", "fuzzymatching"),
        ("/studies", "StudyDate=2024-01-01", "StudyDate"),
        ("/studies", "StudyDate=2024-13-45", "StudyDate"),
        ("/studies", "StudyDate=20241345", "StudyDate"),
        ("/studies", "StudyDate=abc", "StudyDate"),
        ("/studies", "StudyDate=-", "StudyDate"),
        ("/studies", "StudyDate=20240201-20240101", "StudyDate"),
        ("/studies", "StudyDate=2024*", "StudyDate"),
        ("/studies", "StudyTime=2500", "StudyTime"),
        ("/studies", "StudyInstanceUID=1.2.abc", "StudyInstanceUID"),
        ("/studies", "StudyInstanceUID=1.02", "StudyInstanceUID"),
        ("/studies", "0020000D=1.2,,1.3", "0020000D"),
        ("/studies", "ModalitiesInStudy=CT,*", "ModalitiesInStudy"),
        ("/studies", "foo=bar", "foo"),
        ("/studies", "PatientAge=030Y", "PatientAge"),
        ("/studies", "includefield=NotAKeyword", "NotAKeyword"),
        ("/studies", "Modality=CT", "Modality"),
        ("/studies", "00100020.00100010=x", "00100020.00100010"),
        ("/studies", "PatientID=a%00b", "PatientID"),
        ("/studies", "PatientID=" + "x" * 5000, "PatientID"),
        ("/series", "SOPInstanceUID=1.2.3", "SOPInstanceUID"),
        ("/series", "SeriesNumber=one", "SeriesNumber"),
        ("/instances", "InstanceNumber=1.5", "InstanceNumber"),
        ("/studies/not-a-uid/series", "", "StudyInstanceUID"),
        ("/studies/1.2.3/series/1.2.x/instances", "", "SeriesInstanceUID"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    client: httpx.Client, path: str, query: str, named: str
) -> None:
    r = client.get(f"{path}?{query}")
    assert r.status_code == 400, r.text
    assert named in r.json()["detail"]


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/dicom+json"),
        ("*/*", "application/dicom+json"),
        ("application/dicom+json", "application/dicom+json"),
        ("application/json", "application/json"),
        ("application/dicom+xml;q=1, application/json;q=0.5", "application/json"),
    ],
)
def test_accept(client: httpx.Client, corpus: Corpus, accept: str | None, expected: str) -> None:
    headers = {"Accept": accept} if accept else {}
    r = client.get("/studies", params={"PatientID": corpus.scope}, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == expected
    assert len(r.json()) == 4


@pytest.mark.parametrize(
    "accept", ['multipart/related; type="application/dicom+xml"', "application/dicom+xml"]
)
def test_unacceptable_media_type_is_406(client: httpx.Client, accept: str) -> None:
    r = client.get("/studies", headers={"Accept": accept})
    assert r.status_code == 406, r.text


def test_large_results_are_gzipped(client: httpx.Client, corpus: Corpus) -> None:
    r = client.get(
        "/studies",
        params={"PatientID": corpus.scope, "includefield": "all"},
        headers={"Accept-Encoding": "gzip"},
    )
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert len(r.json()) == 4


# -- dicomweb-client --------------------------------------------------------------------


def test_dicomweb_client_searches(server: IexServer, corpus: Corpus) -> None:
    dw = DICOMwebClient(url=server.dicomweb, headers=server.headers)
    studies = dw.search_for_studies(
        search_filters={"PatientID": corpus.pid("A")}, fields=["StudyDescription"]
    )
    assert len(studies) == 1 and studies[0]["00081030"]["Value"] == ["Head"]
    series = dw.search_for_series(study_instance_uid=corpus.studies["A"])
    assert len(series) == 2
    instances = dw.search_for_instances(
        study_instance_uid=corpus.studies["A"],
        series_instance_uid=corpus.series["A1"],
        search_filters={"InstanceNumber": 2},
    )
    assert [i[SOP_UID]["Value"][0] for i in instances] == [corpus.sops["A1"][1]]
    fuzzy = dw.search_for_studies(
        search_filters={"PatientName": "joe*", "PatientID": corpus.scope}, fuzzymatching=True
    )
    assert len(fuzzy) == 1
    assert dw.search_for_studies(search_filters={"PatientID": "no-such-" + corpus.token}) == []


# -- the index directly -----------------------------------------------------------------


def _record(trust: str, data: bytes) -> InstanceRecord:
    header = read_instance_header(io.BytesIO(data), 1024)
    return InstanceRecord(trust, header, f"blob-{uuid.uuid4().hex}", len(data))


async def test_searches_are_scoped_to_the_trust(tmp_path: Path) -> None:
    index = SQLiteMetadataIndex(tmp_path / "index.sqlite3")
    await index.open()
    try:
        study, sop = generate_uid(), generate_uid()
        a = make_instance(study_uid=study, sop_uid=sop, patient_id="TRUST-A")
        b = make_instance(study_uid=study, sop_uid=sop, patient_id="TRUST-B", modality="MR")
        records = [_record("a", a), _record("b", b), _record("b", make_instance(study_uid=study))]
        assert await index.add_instances(records) == [None] * 3  # all added
        again = await index.add_instances(records[1:2])
        assert again == [AlreadyIndexed(records[1].blob_key, records[1].size)]
        paging = PagingLimits(100, 100)

        async def study_pids(trust: str, params: list[tuple[str, str]]) -> list[str]:
            query = parse_query(params, QueryLevel.STUDY, paging)
            result = await index.search(trust, query)
            return [_pid(m.dataset) for m in result.matches]

        assert await study_pids("a", []) == ["TRUST-A"]
        assert await study_pids("b", []) == ["TRUST-B"]
        assert await study_pids("a", [("PatientID", "TRUST-B")]) == []
        assert await study_pids("c", [("StudyInstanceUID", study)]) == []
        query = parse_query([], QueryLevel.INSTANCE, paging, study_uid=study)
        assert len((await index.search("a", query)).matches) == 1
        found = (await index.search("b", query)).matches
        assert len(found) == 2 and {m.study_instances for m in found} == {2}
        query = parse_query([("ModalitiesInStudy", "MR")], QueryLevel.STUDY, paging)
        assert (await index.search("a", query)).matches == []
    finally:
        await index.close()


def _pid(dataset: bytes) -> str:
    import orjson

    value: str = orjson.loads(dataset)["00100020"]["Value"][0]
    return value


async def test_older_index_gains_counters(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    index = SQLiteMetadataIndex(path)
    await index.open()
    study = generate_uid()
    series = generate_uid()
    await index.add_instances(
        [
            _record("t", make_instance(study_uid=study, series_uid=series)),
            _record("t", make_instance(study_uid=study, series_uid=series)),
            _record("t", make_instance(study_uid=study)),
        ]
    )
    await index.close()
    with sqlite3.connect(path) as conn:  # the schema before QIDO-RS had no counters
        for table, column in (
            ("studies", "num_series"),
            ("studies", "num_instances"),
            ("series", "num_instances"),
        ):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 0")  # nor a schema version
    conn.close()
    index = SQLiteMetadataIndex(path)
    await index.open()
    try:
        query = parse_query([], QueryLevel.SERIES, PagingLimits(10, 10))
        matches = (await index.search("t", query)).matches
        assert [(m.study_series, m.study_instances, m.series_instances) for m in matches] == [
            (2, 3, 2),
            (2, 3, 1),
        ]
    finally:
        await index.close()


async def test_older_index_drops_the_digest_column(tmp_path: Path) -> None:
    """An index made when every instance's SHA-256 was kept (NOT NULL, and no longer
    written) opens, loses that column, and takes new instances."""
    path = tmp_path / "index.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            SCHEMA.replace("size INTEGER NOT NULL,", "size INTEGER NOT NULL, sha256 TEXT NOT NULL,")
        )
    conn.close()
    index = SQLiteMetadataIndex(path)
    await index.open()
    try:
        assert await index.add_instances([_record("t", make_instance())]) == [None]
    finally:
        await index.close()
    with sqlite3.connect(path) as conn:
        assert "sha256" not in {row[1] for row in conn.execute("PRAGMA table_info(instances)")}
    conn.close()


def test_every_matching_key_has_sql() -> None:
    assert set(MATCHING_KEYS) == SUPPORTED_KEYS


def _plan(params: list[tuple[str, str]], level: QueryLevel, **path: str) -> list[str]:
    conn = sqlite3.connect(":memory:")
    conn.create_function("iex_caseless", 1, caseless_name, deterministic=True)
    create_schema(conn)
    query = parse_query(params, level, PagingLimits(100, 1000), **path)
    sql, args = build_search("t", query)
    return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]


@pytest.mark.parametrize(
    ("level", "params", "path", "ordered"),
    [
        (QueryLevel.STUDY, [], {}, True),
        (QueryLevel.STUDY, [("StudyDate", "20240101-20240131")], {}, True),
        (QueryLevel.STUDY, [("ModalitiesInStudy", "CT")], {}, True),
        (QueryLevel.STUDY, [("PatientID", "P1")], {}, False),
        (QueryLevel.STUDY, [("PatientID", "P1"), ("StudyDate", "20240101-")], {}, False),
        (QueryLevel.STUDY, [("PatientName", "SMITH^J*")], {}, False),
        (QueryLevel.STUDY, [("PatientName", "smi"), ("fuzzymatching", "true")], {}, False),
        (QueryLevel.STUDY, [("AccessionNumber", "A1")], {}, False),
        (QueryLevel.STUDY, [("StudyInstanceUID", "1.2,1.3")], {}, False),
        (QueryLevel.SERIES, [], {}, True),
        (QueryLevel.SERIES, [], {"study_uid": "1.2"}, False),
        (QueryLevel.SERIES, [("PatientID", "P1")], {}, False),
        (QueryLevel.INSTANCE, [], {}, True),
        (QueryLevel.INSTANCE, [], {"study_uid": "1.2"}, False),
        (QueryLevel.INSTANCE, [], {"study_uid": "1.2", "series_uid": "1.3"}, False),
        (QueryLevel.INSTANCE, [("SOPInstanceUID", "1.2")], {}, False),
        (QueryLevel.INSTANCE, [("SeriesInstanceUID", "1.2")], {}, False),
    ],
)
def test_searches_use_indexes(
    level: QueryLevel, params: list[tuple[str, str]], path: dict[str, str], ordered: bool
) -> None:
    plan = _plan(params, level, **path)
    assert all(step.startswith("SEARCH") or "SUBQUERY" in step or "B-TREE" in step for step in plan)
    assert not any(step.startswith("SCAN") for step in plan), plan
    if ordered:
        # Unfiltered and range searches read one page in index order: no sort of all matches.
        assert "_order " in plan[0] and "USE TEMP B-TREE FOR ORDER BY" not in plan, plan
    else:
        assert "(trust=? AND " in plan[0], plan  # the first step seeks on a selective key
