"""STOW-RS against bad and hostile input (PS3.18 §10.5): exact statuses, no 500, no trace.

Every request here must leave the store as it found it: the instance and byte counts in
``/metrics``, the blob files and ``staging/`` are compared before and after.
"""

from __future__ import annotations

import io
import socket
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.config import disable_value_validation
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from app.dicom.instance import InvalidInstance, read_instance_header
from app.dicom.multipart import MAX_BOUNDARY_LENGTH
from app.dicom.status import FailureReason
from tests.helpers import IexServer, make_instance, multipart_related, wait_until

FAILED_SEQ = "00081198"
FAILURE_REASON = "00081197"
STOW_ROUTES = ("/dicomweb/studies", "/dicomweb/studies/{study}", "/dicomweb/studies/{study:path}")
MULTIPART = 'multipart/related; type="application/dicom"; boundary={}'

# -- the store, observed from outside ------------------------------------------------------


@dataclass(frozen=True)
class StoreState:
    instances: float
    bytes: float
    blobs: frozenset[str]
    staged: frozenset[str]


def _metrics(server: IexServer) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(
        server.url + "/metrics", headers=server.headers, timeout=30
    ).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _stow_requests(server: IexServer) -> float:
    """STOW-RS requests the server has finished (the metrics middleware counts at the end)."""
    return sum(
        v
        for k, v in _metrics(server).items()
        if k.startswith("iex_http_requests_total{")
        and 'method="POST"' in k
        and any(f'route="{r}"' in k for r in STOW_ROUTES)
    )


def _files(directory: Path) -> frozenset[str]:
    return frozenset(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def _state(server: IexServer) -> StoreState:
    m = _metrics(server)
    return StoreState(
        instances=m["iex_instances_stored"],
        bytes=m["iex_bytes_stored"],
        blobs=_files(server.data_dir / "blobs"),
        # Staged blobs, not the lock of the process staging them.
        staged=frozenset(f for f in _files(server.data_dir / "staging") if not f.endswith(".lock")),
    )


@contextmanager
def store_unchanged(server: IexServer, requests: int = 1) -> Iterator[None]:
    """Assert that the block's ``requests`` STOW-RS requests leave no trace in the store.

    Waits until the server has finished them (they may outlive a client that hung up).
    """
    before = _state(server)
    done = _stow_requests(server)
    yield
    wait_until(
        lambda: _stow_requests(server) >= done + requests,
        timeout=60,
        interval=0.02,
        message="the server to finish",
    )
    after = _state(server)
    assert after.staged == frozenset(), f"staging not cleaned: {sorted(after.staged)}"
    assert after == before
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200


# -- bodies --------------------------------------------------------------------------------


def _modified(**changes: str | None) -> bytes:
    """A valid instance with attributes removed (``None``) or set without validation."""
    ds = dcmread(io.BytesIO(make_instance()))
    with disable_value_validation():
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        buf = io.BytesIO()
        ds.save_as(buf)
    return buf.getvalue()


def _multipart(*parts: bytes, boundary: str = "iex-test-boundary") -> tuple[bytes, str]:
    return multipart_related(parts, boundary)


def _reasons(r: httpx.Response) -> list[int]:
    items = r.json().get(FAILED_SEQ, {}).get("Value", [])
    return [item[FAILURE_REASON]["Value"][0] for item in items]


@dataclass(frozen=True)
class Case:
    """One bad request: what is sent and the exact answer expected."""

    body: Callable[[], tuple[bytes, str]]
    status: int
    reasons: tuple[FailureReason, ...] = ()
    path: str = "/studies"
    detail: str = ""


def _json_part() -> tuple[bytes, str]:
    return multipart_related([b'{"00100010": {"vr": "PN"}}'], content_type="application/json")


def _cut_before_close() -> tuple[bytes, str]:
    body, ctype = _multipart(make_instance(), make_instance(), make_instance())
    return body[: body.rindex(b"\r\n--")], ctype


def _cut_in_last_part() -> tuple[bytes, str]:
    body, ctype = _multipart(make_instance(), make_instance(), make_instance())
    return body[: body.rindex(b"\r\n--") - 300], ctype


def _wrong_boundary() -> tuple[bytes, str]:
    body, _ = _multipart(make_instance(), boundary="the-body-uses-this")
    return body, MULTIPART.format("the-header-says-this")


def _with_type(ctype: str) -> Callable[[], tuple[bytes, str]]:
    return lambda: (_multipart(make_instance())[0], ctype)


def _ending_in(last: bytes) -> bytes:
    """A valid instance whose last byte (the end of its pixel data) is ``last``."""
    ds = dcmread(io.BytesIO(make_instance()))
    ds.PixelData = ds.PixelData[:-1] + last
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _bare_lf_body() -> tuple[bytes, str]:
    """What a sender ending every line with LF alone sends: not framed by RFC 2046.

    Each object ends with a byte other than CR: CR, LF, boundary is a delimiter, and would
    (rightly) frame a part.
    """
    head = b"--iex-test-boundary\nContent-Type: application/dicom\n\n"
    body = b"".join(head + _ending_in(b"\x00") + b"\n" for _ in range(2))
    return body + b"--iex-test-boundary--\n", MULTIPART.format("iex-test-boundary")


LONG_UID = "1." + "2" * 63

CASES: dict[str, Case] = {
    "truncated-dicom-part": Case(
        lambda: _multipart(make_instance()[:-100]), 409, (FailureReason.CANNOT_UNDERSTAND,)
    ),
    "truncated-dicom-part-in-header": Case(
        lambda: _multipart(make_instance()[:400]), 409, (FailureReason.CANNOT_UNDERSTAND,)
    ),
    "no-closing-delimiter": Case(_cut_before_close, 400, detail="truncated multipart body"),
    "cut-inside-the-last-part": Case(_cut_in_last_part, 400, detail="truncated multipart body"),
    "wrong-boundary": Case(_wrong_boundary, 400, detail="does not contain the multipart boundary"),
    "missing-boundary": Case(
        _with_type('multipart/related; type="application/dicom"'), 400, detail="no boundary"
    ),
    "boundary-over-the-cap": Case(
        lambda: _multipart(make_instance(), boundary="b" * (MAX_BOUNDARY_LENGTH + 1)),
        400,
        detail=f"{MAX_BOUNDARY_LENGTH + 1} characters long; iex accepts up to ",
    ),
    "boundary-with-a-control-character": Case(
        _with_type(MULTIPART.format('"iex-test\tboundary"')),
        400,
        detail="the multipart boundary has a control or non-ASCII character",
    ),
    "boundary-given-twice": Case(
        _with_type(MULTIPART.format("iex-test-boundary; boundary=other")),
        400,
        detail="the Content-Type is malformed: media type parameter 'boundary' is given twice",
    ),
    "boundary-quote-not-closed": Case(
        _with_type(MULTIPART.format('"iex-test-boundary')),
        400,
        detail="the Content-Type is malformed: the value of parameter 'boundary' has no closing",
    ),
    "not-a-media-type": Case(
        _with_type("multipart related"),
        400,
        detail="the Content-Type is malformed: 'multipart related' is not a media type",
    ),
    "bare-lf-before-boundaries": Case(
        _bare_lf_body,
        400,
        detail="its boundary lines end with LF alone: every boundary must follow a CRLF",
    ),
    "non-dicom-part": Case(
        lambda: _multipart(b"\x00" * 200 + b"not DICOM"), 409, (FailureReason.CANNOT_UNDERSTAND,)
    ),
    "json-part": Case(_json_part, 409, (FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,)),
    "missing-sop-instance-uid": Case(
        lambda: _multipart(_modified(SOPInstanceUID=None)),
        409,
        (FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,),
    ),
    "missing-study-uid": Case(
        lambda: _multipart(_modified(StudyInstanceUID=None)),
        409,
        (FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,),
    ),
    "missing-sop-class-uid": Case(
        lambda: _multipart(_modified(SOPClassUID=None)),
        409,
        (FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,),
    ),
    "leading-zero-uid": Case(
        lambda: _multipart(_modified(SeriesInstanceUID="1.2.03")),
        409,
        (FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,),
    ),
    "65-char-uid": Case(
        lambda: _multipart(_modified(StudyInstanceUID=LONG_UID)),
        409,
        (FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,),
    ),
    "good-and-bad-parts-all-fail": Case(
        lambda: _multipart(b"junk", _modified(SOPClassUID=None), make_instance()[:-1]),
        409,
        (
            FailureReason.CANNOT_UNDERSTAND,
            FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            FailureReason.CANNOT_UNDERSTAND,
        ),
    ),
    # What arrives: the client keeps %2F, the server decodes it to "/".
    "dot-dot-in-url": Case(
        lambda: _multipart(make_instance()),
        400,
        path="/studies/..%2F..%2Fetc",
        detail="'../../etc' is not a DICOM UID",
    ),
    "trailing-dot-in-url": Case(
        lambda: _multipart(make_instance()),
        400,
        path="/studies/1.2.3.",
        detail="'1.2.3.' is not a DICOM UID",
    ),
    "leading-zero-in-url": Case(
        lambda: _multipart(make_instance()),
        400,
        path="/studies/01.2",
        detail="'01.2' is not a DICOM UID",
    ),
    "65-char-uid-in-url": Case(
        lambda: _multipart(make_instance()),
        400,
        path=f"/studies/{LONG_UID}",
        detail="65 characters long",
    ),
    "extra-segment-in-url": Case(
        lambda: _multipart(make_instance()),
        400,
        path="/studies/1.2.3/series",
        detail="'1.2.3/series' is not a DICOM UID",
    ),
    "text-plain": Case(_with_type("text/plain"), 415),
    "application-json": Case(_with_type("application/json"), 415),
    "form-data": Case(_with_type("multipart/form-data; boundary=iex-test-boundary"), 415),
    "related-dicom-json": Case(
        _with_type('multipart/related; type="application/dicom+json"; boundary=iex-test-boundary'),
        415,
    ),
    "no-content-type": Case(lambda: (_multipart(make_instance())[0], ""), 415),
    "empty-multipart-body": Case(
        lambda: (b"", MULTIPART.format("iex-test-boundary")), 400, detail="empty"
    ),
    "empty-dicom-body": Case(lambda: (b"", "application/dicom"), 400, detail="empty"),
    "zero-parts": Case(
        lambda: (b"--iex-test-boundary--\r\n", MULTIPART.format("iex-test-boundary")),
        400,
        detail="no parts",
    ),
    "single-truncated-dicom": Case(
        lambda: (make_instance()[:-7], "application/dicom"),
        409,
        (FailureReason.CANNOT_UNDERSTAND,),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request(server: IexServer, name: str) -> None:
    case = CASES[name]
    body, ctype = case.body()
    headers = {"Content-Type": ctype} if ctype else {}
    with (
        store_unchanged(server),
        httpx.Client(base_url=server.dicomweb, headers=server.headers, timeout=60) as c,
    ):
        r = c.post(case.path, content=body, headers=headers)
    assert r.status_code == case.status, r.text
    if case.reasons:
        assert r.headers["content-type"] == "application/dicom+json"
        assert _reasons(r) == [int(x) for x in case.reasons]
        assert "00081199" not in r.json()
        assert r.headers["warning"].startswith('299 iex "')
    else:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail
        assert case.detail in detail


def test_hostile_path_does_not_turn_other_methods_into_405(client: httpx.Client) -> None:
    assert client.get("/studies/1.2.3/no-such-resource").status_code == 404


# -- size limits ---------------------------------------------------------------------------

REQUEST_LIMIT = 256 * 1024
INSTANCE_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IexServer]:
    env = {
        "IEX_MAX_REQUEST_BYTES": str(REQUEST_LIMIT),
        "IEX_MAX_INSTANCE_BYTES": str(INSTANCE_LIMIT),
    }
    srv = IexServer(tmp_path_factory.mktemp("limited") / "data", env=env).start()
    yield srv
    srv.stop()


def _raw(server: IexServer, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    auth = f"\r\nAuthorization: Bearer {server.token}\r\nHost:".encode()
    sock.sendall(head.replace(b"\r\nHost:", auth, 1) + body)
    return sock


def _head(path: str, ctype: str, length: int | None) -> bytes:
    lines = [f"POST /dicomweb{path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {ctype}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP/1.1 response, or ``None`` if the server closed the connection first."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    want = int(headers.get("content-length", "0"))
    while len(rest) < want:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(status_line.split()[1]), headers, rest


def test_declared_content_length_over_the_limit_is_413_before_the_body(
    limited: IexServer,
) -> None:
    with store_unchanged(limited):
        # No body is ever sent: the answer can only come from the headers.
        sock = _raw(limited, _head("/studies", MULTIPART.format("b"), 10 * REQUEST_LIMIT))
        with sock:
            response = _read_response(sock)
    assert response is not None
    status, headers, content = response
    assert status == 413
    assert str(REQUEST_LIMIT) in httpx.Response(413, content=content).json()["detail"]


def test_chunked_body_over_the_limit_is_413_and_stores_nothing(limited: IexServer) -> None:
    good = make_instance()
    body, ctype = _multipart(good, make_instance(rows=512, columns=512))
    assert len(body) > REQUEST_LIMIT

    def chunks() -> Iterator[bytes]:  # a generator: httpx sends it chunked
        for i in range(0, len(body), 16 * 1024):
            yield body[i : i + 16 * 1024]

    with (
        store_unchanged(limited),
        httpx.Client(base_url=limited.dicomweb, headers=limited.headers, timeout=60) as c,
    ):
        r = c.post("/studies", content=chunks(), headers={"Content-Type": ctype})
    assert r.status_code == 413
    assert str(REQUEST_LIMIT) in r.json()["detail"]


def test_instance_over_the_limit_is_a_part_failure(limited: IexServer) -> None:
    big = make_instance(rows=256, columns=256)
    assert INSTANCE_LIMIT < len(big) < REQUEST_LIMIT
    body, ctype = _multipart(big)
    with (
        store_unchanged(limited),
        httpx.Client(base_url=limited.dicomweb, headers=limited.headers, timeout=60) as c,
    ):
        r = c.post("/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 409
    assert _reasons(r) == [FailureReason.OUT_OF_RESOURCES]


def test_instance_over_the_limit_does_not_stop_the_others(limited: IexServer) -> None:
    small = make_instance()
    body, ctype = _multipart(make_instance(rows=256, columns=256), small)
    before = _state(limited)
    with httpx.Client(base_url=limited.dicomweb, headers=limited.headers, timeout=60) as c:
        r = c.post("/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 202
    assert _reasons(r) == [FailureReason.OUT_OF_RESOURCES]
    after = _state(limited)
    assert after.instances == before.instances + 1
    assert after.bytes == before.bytes + len(small)
    assert len(after.blobs - before.blobs) == 1
    assert after.staged == frozenset()


# -- lying and vanishing clients -----------------------------------------------------------


def test_content_length_shorter_than_the_body(server: IexServer) -> None:
    body, ctype = _multipart(make_instance(), make_instance())
    with store_unchanged(server):
        sock = _raw(server, _head("/studies", ctype, len(body) - 500), body)
        with sock:
            response = _read_response(sock)
    # The server sees a truncated body, then garbage where the next request should be.
    if response is not None:
        assert 400 <= response[0] < 500


def test_content_length_longer_than_the_body(server: IexServer) -> None:
    body, ctype = _multipart(make_instance(), make_instance())
    with store_unchanged(server):
        sock = _raw(server, _head("/studies", ctype, len(body) + 500), body)
        with sock:
            # The whole multipart body, closing delimiter included, has arrived; the
            # server must still wait for the promised bytes rather than store it.
            sock.shutdown(socket.SHUT_WR)
            response = _read_response(sock)
    if response is not None:
        assert 400 <= response[0] < 500


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
def test_client_disconnecting_mid_upload(server: IexServer, fraction: float) -> None:
    parts = [make_instance(rows=128, columns=128) for _ in range(6)]
    body, ctype = _multipart(*parts)
    with store_unchanged(server):
        sock = _raw(server, _head("/studies", ctype, len(body)), body[: int(len(body) * fraction)])
        sock.close()


def test_chunked_client_disconnecting_mid_upload(server: IexServer) -> None:
    body, ctype = _multipart(*(make_instance() for _ in range(4)))
    head = _head("/studies", ctype, None).replace(
        b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    half = body[: len(body) // 2]
    with store_unchanged(server):
        sock = _raw(server, head, f"{len(half):x}\r\n".encode() + half + b"\r\n")
        sock.close()


def test_server_keeps_serving_after_all_of_this(server: IexServer) -> None:
    data = make_instance(study_uid=generate_uid())
    r = httpx.post(
        server.dicomweb + "/studies",
        content=data,
        headers={"Content-Type": "application/dicom", **server.headers},
        timeout=60,
    )
    assert r.status_code == 200


# -- the object parser on its own ----------------------------------------------------------


def _top_level_tags(data: bytes) -> set[int]:
    ds = dcmread(io.BytesIO(data))
    return {int(t) for t in ds.keys()} | {int(t) for t in ds.file_meta.keys()}


def _header(data: bytes) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about values cut mid-way
        return read_instance_header(io.BytesIO(data), 1024)


def test_every_cut_of_an_instance_is_refused() -> None:
    """A cut inside an element fails as 0xC000. A cut exactly between two elements leaves
    a shorter, well-formed object: refused for what it lacks once the cut drops Pixel Data
    but keeps the Image Pixel Module, and only undetectable (without knowing the IOD) when
    it drops the whole module."""
    data = make_instance()
    tags = {(t >> 16, t & 0xFFFF) for t in _top_level_tags(data)}
    pixel_module = data.index(struct.pack("<HH", 0x0028, 0x0002))
    pixel_start = data.rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    accepted = []
    for cut in range(len(data)):
        on_boundary = (
            132 <= cut <= len(data) - 4 and struct.unpack("<HH", data[cut : cut + 4]) in tags
        )
        try:
            _header(data[:cut])
        except InvalidInstance as exc:
            if not on_boundary or cut > pixel_start:
                assert exc.reason == FailureReason.CANNOT_UNDERSTAND, (cut, exc.detail)
        else:
            accepted.append(cut)
            assert on_boundary and cut <= pixel_module, cut
    assert len(accepted) < 10


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR little endian, trailing padding
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "JPEG2000.dcm",  # encapsulated pixel data
        "SC_rgb_rle.dcm",
    ],
)
def test_known_good_objects_are_accepted_and_their_cuts_refused(name: str) -> None:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    data = Path(path).read_bytes()
    header = _header(data)
    pixel = header.pixel_data
    assert pixel is not None
    if pixel.value_length is not None:
        assert pixel.value_offset is not None
        stored = data[pixel.value_offset : pixel.value_offset + pixel.value_length]
        assert stored == dcmread(io.BytesIO(data)).PixelData
    for cut in (len(data) - 1, len(data) - 8, (len(data) + pixel.value_offset) // 2):
        with pytest.raises(InvalidInstance) as info:
            _header(data[:cut])
        assert info.value.reason == FailureReason.CANNOT_UNDERSTAND


@pytest.mark.parametrize("closed", [False, True])
def test_runaway_sequence_nesting_is_refused(closed: bool) -> None:
    data = bytearray(make_instance())
    pixel_start = data.rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    # Before Pixel Data, a private SQ of undefined length holding an item of undefined
    # length holding a SQ ... 100 deep, then closed properly or never.
    depth = 100
    nested = b"".join(
        struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        for _ in range(depth)
    )
    if closed:
        nested += (
            struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        ) * depth
    data[pixel_start:pixel_start] = nested
    with pytest.raises(InvalidInstance) as info:
        _header(bytes(data))
    assert info.value.reason == FailureReason.CANNOT_UNDERSTAND
    if closed:  # pydicom reads it; the structure check draws the line
        assert info.value.detail == "sequences are nested deeper than 64 levels"
