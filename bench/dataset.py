"""The data the side-by-side benchmark sends: real images nobody here wrote, re-identified.

The templates are the uncompressed 512x512 CT (``693_UNCR.dcm``) and 1024x1024 MR
(``MR2_UNCR.dcm``) of the ``pydicom-data`` package, and pydicom's own ``CT_small.dcm``
(128x128). Each copy gets fresh UIDs: the study and series it is told, a new SOP Instance UID
and a new value for every other instance UID in the object (frame of reference, referenced
instances), so neither server can deduplicate anything. Registry UIDs (SOP classes, transfer
syntaxes) are kept.

Nothing is downloaded: when ``pydicom-data`` is not installed the CT and MR are generated with
pydicom at the same sizes instead, and ``Templates.source`` says so.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pydicom
from pydicom._uid_dict import UID_dictionary
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

BOUNDARY = "iex-compare-boundary"
STOW_CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Set from the arguments of each copy; every other instance UID becomes a new one.
_SET_PER_COPY = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}


@dataclass(frozen=True)
class Templates:
    """The three objects every copy is made from, and where they came from."""

    ct: Dataset
    mr: Dataset
    small: Dataset
    source: str


def _packaged(name: str) -> Dataset | None:
    # download=False: a missing file must never turn into a fetch at run time.
    path = get_testdata_file(name, download=False)
    return pydicom.dcmread(path) if isinstance(path, str) else None


def generated_image(sop_class: str, modality: str, rows: int, columns: int) -> Dataset:
    """An uncompressed 16-bit image of the given size, for when pydicom-data is missing."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Generated^Bench"
    ds.PatientID = "GEN"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = os.urandom(rows * columns * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def load_templates() -> Templates:
    """The real CT and MR from pydicom-data when installed, else generated stand-ins."""
    small = _packaged("CT_small.dcm")
    if small is None:
        raise RuntimeError("pydicom's own test file CT_small.dcm is missing")
    ct, mr = _packaged("693_UNCR.dcm"), _packaged("MR2_UNCR.dcm")
    if ct is not None and mr is not None:
        return Templates(ct, mr, small, "pydicom-data 693_UNCR.dcm (CT) and MR2_UNCR.dcm (MR)")
    return Templates(
        generated_image(CT_IMAGE_STORAGE, "CT", 512, 512),
        generated_image(MR_IMAGE_STORAGE, "MR", 1024, 1024),
        small,
        "GENERATED 512x512 CT and 1024x1024 MR (pydicom-data is not installed)",
    )


@dataclass
class Reidentifier:
    """Makes copies of one template with fresh UIDs, serialised as Part 10 files.

    The template is changed in place for each copy (no deep copy of megabytes of pixels);
    the instance UIDs it holds are found once, nested sequences included.
    """

    template: Dataset
    _uid_slots: list[tuple[Dataset, BaseTag]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        def visit(ds: Dataset, top: bool) -> Iterator[tuple[Dataset, BaseTag]]:
            for elem in ds:
                if elem.VR == "SQ":
                    for item in elem.value:
                        yield from visit(item, False)
                elif elem.VR == "UI" and not (top and elem.keyword in _SET_PER_COPY):
                    values = elem.value if elem.VM > 1 else [elem.value]
                    if any(str(v) not in UID_dictionary for v in values):
                        yield ds, elem.tag

        self._uid_slots = list(visit(self.template, True))

    def copy(
        self,
        *,
        study_uid: str,
        series_uid: str,
        patient_id: str,
        patient_name: str,
        instance_number: int,
    ) -> bytes:
        """One re-identified Part 10 object with a new SOP Instance UID."""
        ds = self.template
        for holder, tag in self._uid_slots:
            elem = holder[tag]
            elem.value = [generate_uid() for _ in range(elem.VM)] if elem.VM > 1 else generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.PatientID = patient_id
        ds.PatientName = patient_name
        ds.InstanceNumber = instance_number
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


@dataclass(frozen=True)
class InstanceRef:
    """Where a stored instance lives, and its size as sent."""

    study: str
    series: str
    sop: str
    size: int


@dataclass
class Batch:
    """One STOW-RS request body and the instances in it."""

    body: bytes
    instances: list[InstanceRef]


def multipart(parts: list[bytes]) -> bytes:
    """A ``multipart/related`` body of Part 10 objects with :data:`BOUNDARY`."""
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    chunks: list[bytes] = []
    for part in parts:
        chunks += [head, part, b"\r\n"]
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks)


def _batches(objects: Iterator[tuple[bytes, InstanceRef]], per_request: int) -> list[Batch]:
    batches: list[Batch] = []
    parts: list[bytes] = []
    refs: list[InstanceRef] = []
    for data, ref in objects:
        parts.append(data)
        refs.append(ref)
        if len(parts) == per_request:
            batches.append(Batch(multipart(parts), refs))
            parts, refs = [], []
    if parts:
        batches.append(Batch(multipart(parts), refs))
    return batches


def ingest_batches(templates: Templates, instances: int, per_request: int) -> list[Batch]:
    """STOW requests of ``per_request`` instances, each request one study of CT and MR.

    Half of each request is the 512x512 CT series, half the 1024x1024 MR series.
    """
    ct, mr = Reidentifier(templates.ct), Reidentifier(templates.mr)

    def objects() -> Iterator[tuple[bytes, InstanceRef]]:
        study = series_ct = series_mr = ""
        for n in range(instances):
            if n % per_request == 0:
                study, series_ct, series_mr = generate_uid(), generate_uid(), generate_uid()
            use_mr = n % 2 == 1
            source, series = (mr, series_mr) if use_mr else (ct, series_ct)
            data = source.copy(
                study_uid=study,
                series_uid=series,
                patient_id=f"STOW{n // per_request:05d}",
                patient_name=f"Ingest^{n // per_request}",
                instance_number=n + 1,
            )
            sop = str(source.template.SOPInstanceUID)
            yield data, InstanceRef(study, series, sop, len(data))

    return _batches(objects(), per_request)


def ct_study_batches(templates: Templates, instances: int, per_request: int) -> list[Batch]:
    """One study of ``instances`` 512x512 CT slices in one series, as STOW requests."""
    ct = Reidentifier(templates.ct)
    study, series = generate_uid(), generate_uid()

    def objects() -> Iterator[tuple[bytes, InstanceRef]]:
        for n in range(instances):
            data = ct.copy(
                study_uid=study,
                series_uid=series,
                patient_id="BIGSTUDY",
                patient_name="Large^Study",
                instance_number=n + 1,
            )
            yield data, InstanceRef(study, series, str(ct.template.SOPInstanceUID), len(data))

    return _batches(objects(), per_request)


def patient_id(study_index: int) -> str:
    """The Patient ID of the n-th search study: two studies per patient."""
    return f"Q{study_index // 2:06d}"


def search_batches(templates: Templates, studies: int, per_request: int) -> list[Batch]:
    """``studies`` one-instance studies of the small CT, two per patient, for QIDO-RS."""
    small = Reidentifier(templates.small)

    def objects() -> Iterator[tuple[bytes, InstanceRef]]:
        for s in range(studies):
            study, series = generate_uid(), generate_uid()
            data = small.copy(
                study_uid=study,
                series_uid=series,
                patient_id=patient_id(s),
                patient_name=f"Search^Patient{s // 2}",
                instance_number=1,
            )
            yield data, InstanceRef(study, series, str(small.template.SOPInstanceUID), len(data))

    return _batches(objects(), per_request)
