"""Every storable file of pydicom and pydicom-data goes in through STOW-RS, comes back unchanged.

Stored, found by QIDO-RS, retrieved byte-identical by WADO-RS, and its metadata equal to
pydicom's own DICOM JSON modulo bulk data. Then the same round trip through dicomweb-client.
"""

from __future__ import annotations

import email.parser
import email.policy
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from tests.helpers import IexServer, multipart_related
from tests.pydicom_corpus import DATA_FILES, CorpusFile, storable_files

CORPUS = storable_files()
ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IexServer]:
    srv = IexServer(tmp_path_factory.mktemp("corpus") / "data").start()
    try:
        body, ctype = multipart_related(f.data for f in CORPUS)
        r = httpx.post(
            srv.dicomweb + "/studies", content=body, headers={"Content-Type": ctype, **srv.headers}
        )
        assert r.status_code == 200, r.text
        yield srv
    finally:
        srv.stop()


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in msg.iter_parts()]


def test_corpus_is_substantial() -> None:
    assert len(CORPUS) >= 50
    assert len([f for f in CORPUS if f.path.parent == DATA_FILES]) >= 20  # the real ones


@pytest.mark.parametrize("item", CORPUS, ids=lambda f: f.path.name)
def test_found_by_qido(corpus_server: IexServer, item: CorpusFile) -> None:
    r = httpx.get(
        corpus_server.dicomweb + "/instances",
        params={"SOPInstanceUID": item.sop_uid, "includefield": "StudyInstanceUID"},
        headers=corpus_server.headers,
    )
    assert r.status_code == 200, r.text
    (found,) = r.json()
    assert found["00080018"]["Value"] == [item.sop_uid]
    assert found["0020000D"]["Value"] == [item.study_uid]


@pytest.mark.parametrize("item", CORPUS, ids=lambda f: f.path.name)
def test_retrieved_byte_identical(corpus_server: IexServer, item: CorpusFile) -> None:
    url = (
        f"{corpus_server.dicomweb}/studies/{item.study_uid}/series/{item.series_uid}"
        f"/instances/{item.sop_uid}"
    )
    r = httpx.get(url, headers={"Accept": ANY_SYNTAX, **corpus_server.headers})
    assert r.status_code == 200, r.text
    ((ctype, payload),) = _parts(r)
    assert ctype == "application/dicom"
    assert payload == item.data


def _without_bulk(meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag, element in meta.items():
        if "BulkDataURI" in element or "InlineBinary" in element:
            out[tag] = {"vr": element["vr"], "bulk": True}
        elif element.get("vr") == "SQ":
            out[tag] = {
                "vr": "SQ",
                "Value": [_without_bulk(i) for i in element.get("Value", [])],
            }
        else:
            out[tag] = element
    return out


def _pydicom_json(ds: Dataset) -> tuple[dict[str, Any], list[str]]:
    """pydicom's DICOM JSON of each top-level element, and the tags it cannot encode."""
    out: dict[str, Any] = {}
    failed: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for elem in ds:
            tag = f"{int(elem.tag):08X}"
            try:
                out[tag] = elem.to_json_dict(lambda _e: "bulk", 1024)
            except ValueError:
                failed.append(tag)
    return out, failed


@pytest.mark.parametrize("item", CORPUS, ids=lambda f: f.path.name)
def test_metadata_equals_pydicom_json(corpus_server: IexServer, item: CorpusFile) -> None:
    url = (
        f"{corpus_server.dicomweb}/studies/{item.study_uid}/series/{item.series_uid}"
        f"/instances/{item.sop_uid}/metadata"
    )
    r = httpx.get(url, headers=corpus_server.headers)
    assert r.status_code == 200, r.text
    (meta,) = r.json()
    expected, unencodable = _pydicom_json(item.dataset)
    # Values pydicom cannot encode for their VR (badVR.dcm's IS "1A") come back as text.
    for tag in unencodable:
        assert "Value" not in meta[tag] or all(isinstance(v, str) for v in meta[tag]["Value"])
        meta.pop(tag)
    # Pixel Data is always a BulkDataURI in ours, whatever its size.
    got, want = _without_bulk(meta), _without_bulk(expected)
    for pixel_tag in ("7FE00010", "7FE00008", "7FE00009"):
        if pixel_tag in want:
            assert "BulkDataURI" in meta[pixel_tag]
            want[pixel_tag] = got[pixel_tag]
    # Elements after Pixel Data (trailing padding) are not part of the indexed header.
    want = {k: v for k, v in want.items() if k <= "7FE00010" or k in got}
    assert got == want


def test_dicomweb_client_round_trip(corpus_server: IexServer) -> None:
    client = DICOMwebClient(url=corpus_server.dicomweb, headers=corpus_server.headers)
    native = next(f for f in CORPUS if f.path.name == "CT_small.dcm")
    studies = client.search_for_studies(search_filters={"PatientID": native.dataset.PatientID})
    assert native.study_uid in [s["0020000D"]["Value"][0] for s in studies]
    series = client.retrieve_series_metadata(native.study_uid, native.series_uid)
    assert native.sop_uid in [m["00080018"]["Value"][0] for m in series]
    (instance,) = client.retrieve_study(
        native.study_uid,
        media_types=(("application/dicom", "*"),),
    )
    assert instance.SOPInstanceUID == native.sop_uid
    (frame,) = client.retrieve_instance_frames(
        native.study_uid, native.series_uid, native.sop_uid, frame_numbers=[1]
    )
    assert frame == native.dataset.PixelData
