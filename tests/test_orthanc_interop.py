"""Orthanc's DICOMweb plugin as a client of iex: store, search, retrieve, byte for byte.

Two Orthanc processes (Debian's ``orthanc`` and ``orthanc-dicomweb`` packages, installed when
absent) run on loopback ports with throwaway directories, each configured with iex as a
remote DICOMweb server (``DicomWeb.Servers``) that it reaches with an iex token in its
``Authorization`` header. The first holds a study of several series, one of them compressed,
and stores it to iex with STOW-RS; it searches iex with QIDO-RS; the second, empty, retrieves
the study from iex with WADO-RS. Every instance must arrive exactly as it left.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bench.peers import Peer, ensure_orthanc, start_orthanc
from tests.helpers import IexServer, make_instance
from tests.transfer_helpers import split_multipart

# Slow: on a fresh machine the fixture first installs Orthanc with apt-get.
pytestmark = pytest.mark.slow

PATIENT_ID, PATIENT_NAME = "INTEROP-1", "Interop^Orthanc"
#: pydicom's test files in compressed transfer syntaxes: RLE Lossless, JPEG-LS Near-Lossless.
COMPRESSED = ("SC_rgb_rle.dcm", "JPEGLSNearLossless_16.dcm")
NUMBER_OF_STUDY_RELATED_SERIES = "00201206"
NUMBER_OF_STUDY_RELATED_INSTANCES = "00201208"
NUMBER_OF_SERIES_RELATED_INSTANCES = "00201209"
SERIES_INSTANCE_UID = "0020000E"
STUDY_INSTANCE_UID = "0020000D"
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass(frozen=True)
class Study:
    uid: str
    #: The original Part 10 bytes of every instance, by SOP Instance UID.
    files: dict[str, bytes]
    #: How many instances each series holds, by Series Instance UID.
    series: dict[str, int]


def _compressed(name: str, study: str, series: str, number: int) -> bytes:
    """One of pydicom's compressed test files, moved into our study; its pixel data (the
    encapsulated fragments) untouched."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom's test file {name} is missing"
    ds = dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.InstanceNumber, ds.SeriesNumber = "OT", number, 3
    ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _make_study() -> Study:
    uid = generate_uid()
    ct, mr, compressed = generate_uid(), generate_uid(), generate_uid()
    patient = {"patient_id": PATIENT_ID, "patient_name": PATIENT_NAME}
    files = [
        *(
            make_instance(study_uid=uid, series_uid=ct, instance_number=i, rows=64, columns=64,
                          SeriesNumber=1, **patient)
            for i in range(1, 4)
        ),
        *(
            make_instance(study_uid=uid, series_uid=mr, modality="MR", instance_number=i,
                          rows=32, columns=48, frames=2, SeriesNumber=2, **patient)
            for i in range(1, 3)
        ),
        *(_compressed(name, uid, compressed, i) for i, name in enumerate(COMPRESSED, 1)),
    ]  # fmt: skip
    by_sop = {str(dcmread(io.BytesIO(f), stop_before_pixels=True).SOPInstanceUID): f for f in files}
    syntaxes = {str(dcmread(io.BytesIO(f)).file_meta.TransferSyntaxUID) for f in files}
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.81"} <= syntaxes
    return Study(uid, by_sop, {ct: 3, mr: 2, compressed: len(COMPRESSED)})


# -- the peers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthancs(server: IexServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Peer]]:
    """Two Orthancs, each with iex as its remote DICOMweb server ``iex``."""
    plugin = ensure_orthanc()
    token = server.issue_token("local", "uploader", "reader")
    iex = {"Url": server.dicomweb + "/", "HttpHeaders": {"Authorization": f"Bearer {token}"}}
    peers: list[Peer] = []
    try:
        for n in (1, 2):
            work = tmp_path_factory.mktemp(f"orthanc{n}")
            peers.append(start_orthanc(work, plugin, name=f"interop-{n}", servers={"iex": iex}))
        yield peers
    finally:
        for peer in peers:
            peer.stop()


def _call(peer: Peer, path: str, body: dict[str, Any]) -> Any:
    """POST a JSON body to Orthanc's REST API; its JSON answer, or a failure with its log."""
    r = httpx.post(peer.url + path, json=body, timeout=120)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}\n{peer.log_tail()}"
    return r.json()


@pytest.fixture(scope="module")
def study(orthancs: list[Peer]) -> Study:
    """The study, loaded into the first Orthanc and stored from there to iex (STOW-RS)."""
    first = orthancs[0]
    study = _make_study()
    for data in study.files.values():
        r = httpx.post(first.url + "/instances", content=data, timeout=60)
        assert r.status_code == 200 and r.json()["Status"] == "Success", r.text
    (orthanc_study,) = httpx.get(first.url + "/studies", timeout=30).json()
    _call(first, "/dicom-web/servers/iex/stow", {"Resources": [orthanc_study]})
    return study


# -- the scenario --------------------------------------------------------------------------


def test_orthanc_stores_a_multi_series_study_to_iex(client: httpx.Client, study: Study) -> None:
    r = client.get("/studies", params={"StudyInstanceUID": study.uid})
    assert r.status_code == 200
    (found,) = r.json()
    assert found[NUMBER_OF_STUDY_RELATED_SERIES]["Value"] == [len(study.series)]
    assert found[NUMBER_OF_STUDY_RELATED_INSTANCES]["Value"] == [len(study.files)]
    for sop, data in study.files.items():
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        path = f"/studies/{study.uid}/series/{ds.SeriesInstanceUID}/instances/{sop}"
        retrieved = client.get(path, headers={"Accept": AS_STORED})
        assert retrieved.status_code == 200, retrieved.text
        assert split_multipart(retrieved) == [data], f"iex changed {sop}"


def test_orthanc_searches_iex(orthancs: list[Peer], study: Study) -> None:
    first = orthancs[0]
    query = {"StudyInstanceUID": study.uid}
    (found,) = _call(first, "/dicom-web/servers/iex/get", {"Uri": "/studies", "Arguments": query})
    assert found[STUDY_INSTANCE_UID]["Value"] == [study.uid]
    assert found[NUMBER_OF_STUDY_RELATED_SERIES]["Value"] == [len(study.series)]
    assert found[NUMBER_OF_STUDY_RELATED_INSTANCES]["Value"] == [len(study.files)]
    series = _call(first, "/dicom-web/servers/iex/get", {"Uri": f"/studies/{study.uid}/series"})
    assert {
        s[SERIES_INSTANCE_UID]["Value"][0]: s[NUMBER_OF_SERIES_RELATED_INSTANCES]["Value"][0]
        for s in series
    } == study.series


def test_orthanc_retrieves_from_iex_byte_for_byte(orthancs: list[Peer], study: Study) -> None:
    second = orthancs[1]
    assert httpx.get(second.url + "/instances", timeout=30).json() == []  # it starts empty
    _call(second, "/dicom-web/servers/iex/retrieve", {"Resources": [{"Study": study.uid}]})
    received: dict[str, bytes] = {}
    for orthanc_id in httpx.get(second.url + "/instances", timeout=30).json():
        tags = httpx.get(f"{second.url}/instances/{orthanc_id}", timeout=30).json()
        data = httpx.get(f"{second.url}/instances/{orthanc_id}/file", timeout=30).content
        received[tags["MainDicomTags"]["SOPInstanceUID"]] = data
    assert received.keys() == study.files.keys()
    for sop, data in study.files.items():
        assert received[sop] == data, f"{sop} differs after the round trip"
