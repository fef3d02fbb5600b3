"""An independent tus client, tuspy, uploads a 300 MB zip of generated DICOM; the study
becomes searchable and every instance is stored byte for byte."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from tusclient.client import TusClient

from tests.helpers import IexServer, make_instance
from tests.transfer_helpers import stored_digests, studies_found, tus_client, wait_report

TARGET_BYTES = 300 * 1000 * 1000


@pytest.mark.slow
def test_tuspy_uploads_a_300_mb_zip(server: IexServer, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    path = tmp_path / "study.zip"
    digests: dict[str, str] = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        while path.stat().st_size < TARGET_BYTES:
            sop = generate_uid()
            data = make_instance(  # 1024 x 1024 x 16 bits: about 2 MB each
                study_uid=study,
                series_uid=series,
                sop_uid=sop,
                rows=1024,
                columns=1024,
                instance_number=len(digests) + 1,
            )
            digests[sop] = hashlib.sha256(data).hexdigest()
            z.writestr(f"DICOM/{len(digests):05d}.dcm", data)
    assert path.stat().st_size >= TARGET_BYTES

    client = TusClient(
        server.url + "/transfers/uploads", headers={"Authorization": f"Bearer {server.token}"}
    )
    # An open stream rather than a path: given a path, tuspy leaves a file open per chunk.
    with open(path, "rb") as stream:
        uploader = client.uploader(
            file_stream=stream,
            chunk_size=32 * 1024 * 1024,
            metadata={"filename": "study.zip", "content-type": "application/zip"},
        )
        uploader.upload()
    assert uploader.url is not None

    with tus_client(server) as tus:
        report = wait_report(tus, uploader.url, timeout=300)
    assert report["state"] == "complete", report
    assert report["counts"]["stored"] == len(digests)
    found = studies_found(server, study)
    assert len(found) == 1 and found[0]["00201208"]["Value"] == [len(digests)]
    assert stored_digests(server, study) == digests
