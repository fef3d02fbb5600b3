"""WADO-RS against a real server (PS3.18 §10.4): instances, metadata, frames, bulk data."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from app.errors import IexError
from app.services.wado import _exactly
from tests.helpers import IexServer, make_instance, multipart_related

EXPLICIT_LE = "1.2.840.10008.1.2.1"
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
OCTET_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'

Part = tuple[dict[str, str], bytes]


# -- helpers ---------------------------------------------------------------------------------


def parse_multipart(response: httpx.Response, body: bytes | None = None) -> list[Part]:
    """A strict RFC 2046 parser: every part's headers and body (``response.content``, or
    ``body`` when the response was streamed), in order."""
    media, *params = [p.strip() for p in response.headers["content-type"].split(";")]
    assert media == "multipart/related"
    boundary = next(p.split("=", 1)[1].strip('"') for p in params if p.startswith("boundary="))
    body = response.content if body is None else body
    opening = f"--{boundary}\r\n".encode()
    assert body.startswith(opening), body[:100]
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode()), body[-100:]
    inner = body[len(opening) : -len(f"\r\n--{boundary}--\r\n")]
    parts: list[Part] = []
    for raw in inner.split(f"\r\n--{boundary}\r\n".encode()):
        head, sep, content = raw.partition(b"\r\n\r\n")
        assert sep, raw[:200]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def with_new_uids(
    source: str | Dataset, study: str | None = None, series: str | None = None
) -> tuple[bytes, Dataset]:
    """A pydicom test file (or dataset) under fresh UIDs, kept in its transfer syntax."""
    ds = dcmread(get_testdata_file(source)) if isinstance(source, str) else source
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data, dcmread(io.BytesIO(data))


def store(client: httpx.Client, *objects: bytes) -> None:
    body, ctype = multipart_related(objects)
    r = client.post("/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text


def instance_path(ds: Dataset) -> str:
    return (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def stored(client: httpx.Client, source: str | Dataset, **uids: str) -> tuple[bytes, Dataset]:
    data, ds = with_new_uids(source, **uids)
    store(client, data)
    return data, ds


def get(client: httpx.Client, path: str, accept: str | None = None) -> httpx.Response:
    return client.get(path, headers={"Accept": accept} if accept is not None else {})


def assert_problem(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    for word in words:
        assert word in detail, detail


# -- studies, series, instances --------------------------------------------------------------


def test_as_stored_is_byte_identical_at_every_level(client: httpx.Client) -> None:
    study = generate_uid()
    series_a, series_b = generate_uid(), generate_uid()
    a1 = make_instance(study_uid=study, series_uid=series_a, instance_number=1)
    a2 = make_instance(study_uid=study, series_uid=series_a, instance_number=2, frames=3)
    b1, b1_ds = with_new_uids("JPEG2000.dcm", study=study, series=series_b)
    b2, b2_ds = with_new_uids("MR_small_implicit.dcm", study=study, series=series_b)
    store(client, a1, a2, b1, b2)
    by_uid = {dcmread(io.BytesIO(d)).SOPInstanceUID: d for d in (a1, a2, b1, b2)}

    r = get(client, f"/studies/{study}", DICOM_ANY)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    parts = parse_multipart(r)
    assert len(parts) == 4
    for headers, content in parts:
        ds = dcmread(io.BytesIO(content))
        assert content == by_uid[ds.SOPInstanceUID]
        syntax = ds.file_meta.TransferSyntaxUID
        assert headers["content-type"] == f"application/dicom; transfer-syntax={syntax}"
        assert headers["content-location"].endswith(instance_path(ds))

    parts = parse_multipart(get(client, f"/studies/{study}/series/{series_b}", DICOM_ANY))
    assert sorted(c for _, c in parts) == sorted([b1, b2])

    r = get(client, instance_path(b1_ds), DICOM_ANY)
    assert [c for _, c in parse_multipart(r)] == [b1]
    r = get(client, instance_path(b2_ds), DICOM_ANY)
    assert [c for _, c in parse_multipart(r)] == [b2]


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "rtdose_expb.dcm",
        "SC_rgb_small_odd_big_endian.dcm",
        "ExplVR_BigEnd.dcm",
        "image_dfl.dcm",
        "CT_small.dcm",
    ],
)
@pytest.mark.parametrize(
    "accept", [None, "*/*", 'multipart/related; type="application/dicom"', "multipart/related"]
)
def test_default_is_explicit_vr_little_endian(
    client: httpx.Client, name: str, accept: str | None
) -> None:
    original = dcmread(get_testdata_file(name))
    data, ds = stored(client, name)
    r = get(client, instance_path(ds), accept)
    assert r.status_code == 200, r.text
    ((headers, content),) = parse_multipart(r)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    out = dcmread(io.BytesIO(content))
    assert out.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(out.pixel_array, original.pixel_array)
    for keyword in ("PatientName", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        assert out.get(keyword) == original.get(keyword)
    if ds.file_meta.TransferSyntaxUID == EXPLICIT_LE:
        assert content == data


def test_requesting_the_stored_syntax_returns_the_stored_bytes(client: httpx.Client) -> None:
    data, ds = stored(client, "MR_small_implicit.dcm")
    implicit = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'
    ((headers, content),) = parse_multipart(get(client, instance_path(ds), implicit))
    assert content == data
    assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2"


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "JPEG-lossy.dcm"])
def test_compressed_needs_the_wildcard(client: httpx.Client, name: str) -> None:
    data, ds = stored(client, name)
    syntax = ds.file_meta.TransferSyntaxUID
    for accept in (None, "*/*", 'multipart/related; type="application/dicom"'):
        r = get(client, instance_path(ds), accept)
        assert_problem(r, 406, syntax, "transfer-syntax=*")
    for accept in (
        DICOM_ANY,
        f'multipart/related; type="application/dicom"; transfer-syntax={syntax}',
    ):
        r = get(client, instance_path(ds), accept)
        assert r.status_code == 200, r.text
        ((headers, content),) = parse_multipart(r)
        assert content == data
        assert headers["content-type"] == f"application/dicom; transfer-syntax={syntax}"


def test_one_untranscodable_instance_makes_the_study_406(client: httpx.Client) -> None:
    study = generate_uid()
    plain = make_instance(study_uid=study)
    compressed, compressed_ds = with_new_uids("MR_small_RLE.dcm", study=study)
    store(client, plain, compressed)
    r = get(client, f"/studies/{study}")
    assert_problem(r, 406, compressed_ds.SOPInstanceUID)
    # A second, less preferred range lets each instance take its own representation.
    explicit = f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}'
    r = get(client, f"/studies/{study}", f"{explicit}, {DICOM_ANY}; q=0.5")
    assert r.status_code == 200, r.text
    assert sorted(c for _, c in parse_multipart(r)) == sorted([plain, compressed])


def test_requested_syntax_that_cannot_be_produced_is_406(client: httpx.Client) -> None:
    _, ds = stored(client, "CT_small.dcm")
    for accept in (
        "application/dicom",
        'multipart/related; type="application/dicom+xml"',
        "image/jpeg",
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
        'multipart/related; type="application/octet-stream"',
        "text/html",
    ):
        assert_problem(get(client, instance_path(ds), accept), 406, "Available")


def _streamed(client: httpx.Client, path: str, accept: str) -> tuple[httpx.Response, bytes]:
    with client.stream("GET", path, headers={"Accept": accept}) as r:
        assert r.status_code == 200
        return r, b"".join(r.iter_bytes())


def test_as_stored_retrieval_announces_its_exact_length(client: httpx.Client) -> None:
    """Objects sent as stored have known sizes, so the body's length goes out first."""
    study, series = generate_uid(), generate_uid()
    objects = [
        make_instance(study_uid=study, series_uid=series, rows=128, columns=128, instance_number=n)
        for n in range(1, 4)
    ]
    store(client, *objects)
    for path in (f"/studies/{study}", f"/studies/{study}/series/{series}"):
        r, body = _streamed(client, path, DICOM_ANY)
        assert int(r.headers["content-length"]) == len(body)
        assert "transfer-encoding" not in r.headers
        assert sorted(content for _, content in parse_multipart(r, body)) == sorted(objects)


def test_transcoded_retrieval_streams_chunked(client: httpx.Client) -> None:
    """A transcoded object's size is known only once it is made: no Content-Length then."""
    _, ds = stored(client, "MR_small_implicit.dcm")
    default = 'multipart/related; type="application/dicom"'
    r, body = _streamed(client, f"/studies/{ds.StudyInstanceUID}", default)
    assert "content-length" not in r.headers
    assert r.headers["transfer-encoding"] == "chunked"
    ((_, content),) = parse_multipart(r, body)
    assert dcmread(io.BytesIO(content)).file_meta.TransferSyntaxUID == EXPLICIT_LE


def test_retrievals_abandoned_midway_leave_the_server_serving(
    server: IexServer, client: httpx.Client
) -> None:
    """Clients that go away mid-study (the next object already being read) cost nothing
    lasting. The study is larger than the socket buffers, so the server is cut off mid-send."""
    study = generate_uid()
    objects = [make_instance(study_uid=study, rows=1024, columns=1024) for _ in range(4)]
    store(client, *objects)
    for stop_after in (1, 3_000_000, 6_000_000):
        with (
            server.client() as c,
            c.stream("GET", f"/studies/{study}", headers={"Accept": DICOM_ANY}) as r,
        ):
            assert r.status_code == 200
            received = 0
            for chunk in r.iter_raw(65536):
                received += len(chunk)
                if received >= stop_after:
                    break
    r, body = _streamed(client, f"/studies/{study}", DICOM_ANY)
    assert sorted(content for _, content in parse_multipart(r, body)) == sorted(objects)
    assert "Traceback" not in server.log()


async def test_stored_object_of_another_length_than_indexed_is_an_error() -> None:
    """Content-Length is announced from the index: a stored object that disagrees stops the
    response rather than sending a body of another length."""

    async def body(*chunks: bytes) -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    assert [c async for c in _exactly(body(b"ab", b"cd"), 4, "x")] == [b"ab", b"cd"]
    for chunks in ((b"ab",), (b"ab", b"cde"), ()):
        with pytest.raises(IexError, match="does not hold the 4 bytes indexed"):
            [c async for c in _exactly(body(*chunks), 4, "x")]


# -- metadata ----------------------------------------------------------------------------------


def _compare_json(ours: dict[str, Any], expected: dict[str, Any], bulk: list[str]) -> None:
    assert ours.keys() == expected.keys()
    for key, element in ours.items():
        if "BulkDataURI" in element:
            bulk.append(element["BulkDataURI"])
            assert "Value" not in element and "InlineBinary" not in element
            assert element["vr"] == expected[key]["vr"]
        elif element.get("vr") == "SQ":
            items = element.get("Value", [])
            assert len(items) == len(expected[key].get("Value", []))
            for mine, theirs in zip(items, expected[key].get("Value", []), strict=True):
                _compare_json(mine, theirs, bulk)
        else:
            assert element == expected[key], key


def _instance_with_nested_bulk(study: str, series: str) -> tuple[bytes, Dataset]:
    ds = dcmread(io.BytesIO(make_instance(study_uid=study, series_uid=series)))
    item = Dataset()
    item.add_new(0x00181072, "TM", "101010")
    item.add_new(0x00283006, "OW", bytes(range(256)) * 12)  # LUT Data, over the threshold
    lut = Dataset()
    lut.LUTDescriptor = [1536, 0, 16]
    lut.LUTData = bytes(range(200, 256)) * 60
    ds.ModalityLUTSequence = Sequence([lut])
    ds.add_new(0x00540016, "SQ", Sequence([item, Dataset()]))
    ds.EncapsulatedDocument = b"%PDF-" + b"x" * 3000
    return with_new_uids(ds, study=study, series=series)


def test_metadata_at_three_levels_matches_pydicom(client: httpx.Client) -> None:
    study, series = generate_uid(), generate_uid()
    data_a, ds_a = _instance_with_nested_bulk(study, series)
    data_b, ds_b = with_new_uids("MR_small_bigendian.dcm", study=study, series=series)
    data_c, ds_c = with_new_uids("CT_small.dcm", study=study)
    store(client, data_a, data_b, data_c)
    base = str(client.base_url).rstrip("/")

    levels = {
        f"/studies/{study}/metadata": 3,
        f"/studies/{study}/series/{series}/metadata": 2,
        f"{instance_path(ds_a)}/metadata": 1,
    }
    for path, count in levels.items():
        r = client.get(path, headers={"Accept": "application/dicom+json"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/dicom+json"
        assert len(r.json()) == count

    (meta_a,) = client.get(f"{instance_path(ds_a)}/metadata").json()
    expected = ds_a.to_json_dict(1024, lambda e: "bulk")
    bulk: list[str] = []
    _compare_json(meta_a, expected, bulk)
    prefix = f"{base}{instance_path(ds_a)}/bulk/"
    assert sorted(bulk) == sorted(
        prefix + p for p in ("00283000/0/00283006", "00420011", "00540016/0/00283006", "7FE00010")
    )
    values = {
        "00283000/0/00283006": ds_a.ModalityLUTSequence[0].LUTData,
        "00420011": ds_a.EncapsulatedDocument,
        "00540016/0/00283006": ds_a[0x00540016][0][0x00283006].value,
        "7FE00010": ds_a.PixelData,
    }
    for path, value in values.items():
        r = client.get(prefix + path)
        assert r.status_code == 200, (path, r.text)
        ((headers, content),) = parse_multipart(r)
        assert headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
        assert content == value, path

    # A big-endian object: metadata values are the decoded numbers, pixels little endian.
    (meta_b,) = client.get(f"{instance_path(ds_b)}/metadata").json()
    _compare_json(meta_b, ds_b.to_json_dict(1024, lambda e: "bulk"), [])
    r = client.get(meta_b["7FE00010"]["BulkDataURI"])
    ((_, pixels),) = parse_multipart(r)
    arr = ds_b.pixel_array
    assert pixels == arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def test_metadata_gzip_and_negotiation(client: httpx.Client) -> None:
    _, ds = stored(client, "CT_small.dcm")
    path = f"/studies/{ds.StudyInstanceUID}/metadata"
    r = client.get(path, headers={"Accept-Encoding": "gzip", "Accept": "application/json"})
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert r.json()[0]["00080018"]["Value"] == [ds.SOPInstanceUID]
    assert_problem(client.get(path, headers={"Accept": "application/dicom+xml"}), 406)


# -- frames ------------------------------------------------------------------------------------


def _frames(
    client: httpx.Client, ds: Dataset, frames: str, accept: str | None = None
) -> list[Part]:
    r = get(client, f"{instance_path(ds)}/frames/{frames}", accept)
    assert r.status_code == 200, r.text
    return parse_multipart(r)


def test_native_frames_follow_the_requested_order(client: httpx.Client) -> None:
    data = make_instance(frames=4, rows=8, columns=6)
    store(client, data)
    ds = dcmread(io.BytesIO(data))
    size = 8 * 6 * 2
    parts = _frames(client, ds, "3,1,4,3")
    assert [c for _, c in parts] == [ds.PixelData[(n - 1) * size : n * size] for n in (3, 1, 4, 3)]
    for (headers, _), n in zip(parts, (3, 1, 4, 3), strict=True):
        assert headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
        assert headers["content-location"].endswith(f"{instance_path(ds)}/frames/{n}")
    single = make_instance()
    store(client, single)
    single_ds = dcmread(io.BytesIO(single))
    assert [c for _, c in _frames(client, single_ds, "1")] == [single_ds.PixelData]


@pytest.mark.parametrize(
    "name",
    [
        "rtdose.dcm",
        "rtdose_expb.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",
        "SC_rgb_small_odd_big_endian.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
        "liver_1frame.dcm",
        "examples_rgb_color.dcm",
    ],
)
def test_native_frames_are_little_endian_pixels(client: httpx.Client, name: str) -> None:
    _, ds = stored(client, name)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    order = list(range(count, 0, -1))
    parts = _frames(client, ds, ",".join(map(str, order)))
    little = little_endian_pixels(ds)
    frame_size = len(little) // count if count > 1 else None
    for (_, content), n in zip(parts, order, strict=True):
        if frame_size is None:
            assert content == little[: len(content)]
            assert len(little) - len(content) in (0, 1)
        else:
            assert content == little[(n - 1) * frame_size : n * frame_size]


def little_endian_pixels(ds: Dataset) -> bytes:
    """The pixel data as little-endian bytes, by pydicom's own decoding for big endian."""
    if ds.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.2":
        return bytes(ds.PixelData)
    arr = ds.pixel_array
    if ds.BitsAllocated == 1:
        return pack_bits(arr)
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def test_one_bit_frames_that_do_not_end_on_a_byte(client: httpx.Client) -> None:
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 2, size=(3, 3, 3), dtype=np.uint8)
    ds = dcmread(io.BytesIO(make_instance()))
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.Rows = ds.Columns = 3
    ds.NumberOfFrames = 3
    ds.PixelData = pack_bits(frames)
    ds["PixelData"].VR = "OB"
    _, ds = stored(client, ds)
    parts = _frames(client, ds, "2,3,1")
    assert [c for _, c in parts] == [pack_bits(frames[n - 1]) for n in (2, 3, 1)]


@pytest.mark.parametrize(
    ("name", "media"),
    [
        ("SC_rgb_rle_2frame.dcm", "image/dicom-rle"),
        ("rtdose_rle.dcm", "image/dicom-rle"),
        ("examples_ybr_color.dcm", "image/jpeg"),
        ("JPEG2000.dcm", "image/jp2"),
        ("MR_small_jpeg_ls_lossless.dcm", "image/jls"),
    ],
)
def test_compressed_frames_are_sent_as_stored(client: httpx.Client, name: str, media: str) -> None:
    _, ds = stored(client, name)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    expected = list(generate_frames(ds.PixelData, number_of_frames=count))
    order = sorted({count, 1, (count + 1) // 2}, reverse=True)
    syntax = ds.file_meta.TransferSyntaxUID
    for accept in (None, "*/*", f'multipart/related; type="{media}"', OCTET_ANY):
        parts = _frames(client, ds, ",".join(map(str, order)), accept)
        assert [c for _, c in parts] == [expected[n - 1] for n in order]
        assert {h["content-type"] for h, _ in parts} == {f"{media}; transfer-syntax={syntax}"}
    r = get(
        client,
        f"{instance_path(ds)}/frames/1",
        'multipart/related; type="application/octet-stream"',
    )
    assert_problem(r, 406, syntax)
    r = get(client, f"{instance_path(ds)}/frames/1", 'multipart/related; type="image/png"')
    assert_problem(r, 406)


def test_rle_accepts_the_old_media_type_name(client: httpx.Client) -> None:
    _, ds = stored(client, "SC_rgb_rle.dcm")
    parts = _frames(client, ds, "1", 'multipart/related; type="image/x-dicom-rle"')
    assert parts[0][0]["content-type"].startswith("image/dicom-rle;")


def test_frame_errors(client: httpx.Client) -> None:
    _, ds = stored(client, "SC_rgb_rle_2frame.dcm")
    base = f"{instance_path(ds)}/frames/"
    assert_problem(client.get(base + "3"), 404, "frame 3", "2 frames")
    assert_problem(client.get(base + "1,2,9"), 404, "frame 9")
    for bad in ("0", "-1", "a", "1,,2", "1,", ",1", "1;2", "01", "1.5", "9999999999"):
        assert_problem(client.get(base + bad), 400, "frame list")
    _, no_pixels = stored(client, "rtplan.dcm")
    assert_problem(client.get(f"{instance_path(no_pixels)}/frames/1"), 404, "no pixel data")


# -- bulk data ---------------------------------------------------------------------------------


def test_encapsulated_pixel_bulk_data_is_one_part_per_frame(client: httpx.Client) -> None:
    _, ds = stored(client, "SC_rgb_rle_2frame.dcm")
    (meta,) = client.get(f"{instance_path(ds)}/metadata").json()
    r = client.get(meta["7FE00010"]["BulkDataURI"])
    assert r.status_code == 200, r.text
    parts = parse_multipart(r)
    assert [c for _, c in parts] == list(generate_frames(ds.PixelData, number_of_frames=2))
    assert parts[0][0]["content-type"] == "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"


def test_bulk_data_path_errors(client: httpx.Client) -> None:
    _, ds = stored(client, _instance_with_nested_bulk(generate_uid(), generate_uid())[1])
    base = f"{instance_path(ds)}/bulk/"
    for bad in ("", "7FE0001", "7FE00010/", "00540016/0", "00540016/x/00283006", "zzzzzzzz",
                "00540016/01/00283006", "00540016/-1/00283006", "/7FE00010"):  # fmt: skip
        assert_problem(client.get(base + bad), 400, "bulk data path")
    for missing, word in (
        ("00540016/2/00283006", "no item 2"),
        ("00540016/1/00283006", "absent"),
        ("00111010", "absent"),
        ("00100010/0/00283006", "no sequence"),
        ("00100010", "not bulk data"),
    ):
        assert_problem(client.get(base + missing), 404, word)
    assert_problem(client.get(base + "7FE00010", headers={"Accept": "image/jpeg"}), 406)


# -- hostile input -----------------------------------------------------------------------------


HOSTILE_UIDS = ["%2E%2E", "1.2.3.", "01.2", "1" * 65, "1..2", "1.2.3a", "%00", "1.2%20", "-1"]


def _paths(bad: str, good: str) -> list[str]:
    return [
        f"/studies/{bad}",
        f"/studies/{bad}/metadata",
        f"/studies/{good}/series/{bad}",
        f"/studies/{good}/series/{bad}/metadata",
        f"/studies/{good}/series/{good}/instances/{bad}",
        f"/studies/{good}/series/{good}/instances/{bad}/metadata",
        f"/studies/{good}/series/{good}/instances/{bad}/frames/1",
        f"/studies/{good}/series/{good}/instances/{bad}/bulk/7FE00010",
    ]


@pytest.mark.parametrize("bad", HOSTILE_UIDS)
def test_hostile_uids_are_400(client: httpx.Client, bad: str) -> None:
    for path in _paths(bad, "1.2.3"):
        r = client.get(path)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert "UID" in r.json()["detail"]


def test_path_traversal_never_reaches_a_file(client: httpx.Client) -> None:
    for path in _paths("..%2F..%2Fetc", "1.2.3") + ["/studies/..%2F..%2F..%2Fetc%2Fpasswd"]:
        r = client.get(path)
        assert r.status_code in (400, 404), (path, r.status_code, r.text)
        assert r.json()["detail"]


def test_unknown_uids_are_404(client: httpx.Client) -> None:
    data = make_instance()
    store(client, data)
    ds = dcmread(io.BytesIO(data))
    unknown = generate_uid()
    study, series = ds.StudyInstanceUID, ds.SeriesInstanceUID
    for path in _paths(unknown, unknown) + [
        f"/studies/{study}/series/{unknown}",
        f"/studies/{study}/series/{series}/instances/{unknown}/frames/1",
        f"/studies/{study}/series/{series}/instances/{unknown}/bulk/7FE00010",
        f"/studies/{unknown}/series/{series}/instances/{ds.SOPInstanceUID}",
    ]:
        assert_problem(client.get(path), 404, unknown)


def test_no_client_input_causes_a_500(client: httpx.Client) -> None:
    _, ds = stored(client, "SC_rgb_rle_2frame.dcm")
    inst = instance_path(ds)
    accepts = [
        None, "", ";;;", "multipart/related; type=", 'multipart/related; type="a b"',
        "multipart/related; transfer-syntax=", "*/*; q=abc", "image/*", "a/b/c, ,",
        'multipart/related; type="application/dicom"; transfer-syntax="*"',
    ]  # fmt: skip
    for path in (inst, f"{inst}/metadata", f"{inst}/frames/1,2", f"{inst}/bulk/7FE00010"):
        for accept in accepts:
            r = get(client, path, accept)
            assert r.status_code in (200, 406), (path, accept, r.status_code, r.text)
            if r.status_code != 200:
                assert r.json()["detail"]


# -- an independent client -----------------------------------------------------------------------


def test_dicomweb_client_interoperates(server: IexServer, client: httpx.Client) -> None:
    study, series = generate_uid(), generate_uid()
    plain = make_instance(study_uid=study, series_uid=series, frames=3, instance_number=1)
    implicit, implicit_ds = with_new_uids("MR_small_implicit.dcm", study=study, series=series)
    rle, rle_ds = with_new_uids("SC_rgb_rle_2frame.dcm", study=study, series=series)
    store(client, plain, implicit, rle)
    plain_ds = dcmread(io.BytesIO(plain))
    web = DICOMwebClient(url=server.dicomweb, headers=server.headers)

    retrieved = web.retrieve_study(study, media_types=(("application/dicom", "*"),))
    assert sorted(d.SOPInstanceUID for d in retrieved) == sorted(
        d.SOPInstanceUID for d in (plain_ds, implicit_ds, rle_ds)
    )
    series_only = web.retrieve_series(study, series, media_types=(("application/dicom", "*"),))
    assert len(series_only) == 3
    default = web.retrieve_instance(
        study, series, implicit_ds.SOPInstanceUID, media_types=("application/dicom",)
    )
    assert default.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(default.pixel_array, implicit_ds.pixel_array)

    metadata = web.retrieve_series_metadata(study, series)
    assert len(metadata) == 3
    by_uid = {m["00080018"]["Value"][0]: m for m in metadata}
    plain_meta = Dataset.from_json(by_uid[plain_ds.SOPInstanceUID], lambda uri: b"")
    assert plain_meta.PatientName == plain_ds.PatientName

    frames = web.retrieve_instance_frames(study, series, plain_ds.SOPInstanceUID, [2, 3])
    size = len(plain_ds.PixelData) // 3
    assert frames == [plain_ds.PixelData[size : 2 * size], plain_ds.PixelData[2 * size :]]
    rle_frames = web.retrieve_instance_frames(study, series, rle_ds.SOPInstanceUID, [2])
    assert rle_frames == [list(generate_frames(rle_ds.PixelData, number_of_frames=2))[1]]

    # dicomweb-client sends "Host: 127.0.0.1" without the port on non-streamed requests, so
    # URLs built from the Host header (as BulkDataURIs are) lack it; take the URI as seen by
    # a client that sends a correct Host header.
    (meta,) = client.get(f"{instance_path(plain_ds)}/metadata").json()
    uri = meta["7FE00010"]["BulkDataURI"]
    assert by_uid[plain_ds.SOPInstanceUID]["7FE00010"]["BulkDataURI"].endswith("/bulk/7FE00010")
    assert web.retrieve_bulkdata(uri) == [plain_ds.PixelData]
    octet = web.retrieve_bulkdata(uri, media_types=(("application/octet-stream",),))
    assert octet == [plain_ds.PixelData]


def test_fresh_server_serves_what_it_stored(make_server: Callable[..., IexServer]) -> None:
    srv = make_server()
    with httpx.Client(base_url=srv.dicomweb, headers=srv.headers, timeout=60) as c:
        data, ds = stored(c, "MR_small_implicit.dcm")
        r = get(c, instance_path(ds), DICOM_ANY)
        assert [content for _, content in parse_multipart(r)] == [data]
        srv.stop()
        srv.start()
        r = get(c, instance_path(ds), DICOM_ANY)
        assert [content for _, content in parse_multipart(r)] == [data]
