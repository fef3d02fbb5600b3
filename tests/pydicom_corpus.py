"""The DICOM files pydicom ships and pydicom-data's real CT, MR, US, RT ..., as a corpus for
round-trip tests."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import data_store  # pydicom-data, a test dependency
import pydicom
from pydicom import dcmread
from pydicom.dataset import Dataset

from app.dicom.uids import is_valid_uid

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DATA_FILES = Path(data_store.__file__).parent / "data"
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    dataset: Dataset
    data: bytes

    @property
    def sop_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.dataset.StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.dataset.SeriesInstanceUID)

    @property
    def transfer_syntax(self) -> str:
        return str(self.dataset.file_meta.TransferSyntaxUID)


def _read(path: Path) -> Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path)
        except Exception:
            return None
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        return None
    return ds


def storable_files() -> list[CorpusFile]:
    """Readable Part 10 files carrying the four identifying UIDs, one per SOP Instance UID."""
    found: dict[str, CorpusFile] = {}
    for path in [*sorted(TEST_FILES.glob("*.dcm")), *sorted(DATA_FILES.glob("*.dcm"))]:
        ds = _read(path)
        if ds is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns of an invalid UID, refused below
            uids = [str(ds.get(k, "") or "") for k in UID_KEYWORDS]
        if not all(is_valid_uid(u) for u in uids):
            continue
        found.setdefault(uids[2], CorpusFile(path, ds, path.read_bytes()))
    return list(found.values())
