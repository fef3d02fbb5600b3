"""Exchange between gateways in tests: a sending gateway's data directory paired with a
running receiver through the real command line, bundles built with its keys from real
DICOM, and pushes over tus as a sender makes them (partial uploads joined by a final one)."""

from __future__ import annotations

import copy
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.uid import generate_uid

from app.crypto.identity import IdentityDocument, decode_identity
from app.services.keys import open_data_keys
from app.transfer.bundle import BundleWriter
from app.transfer.jobs import new_job_id
from app.transfer.manifest import Endpoint, InstanceMeta
from app.transfer.receipts import Receipt, verify_receipt
from tests.bundle_helpers import TEST_FILES, meta_of, pieces
from tests.helpers import IexServer, iex, make_instance
from tests.transfer_helpers import TUS, metadata, wait_report

BUNDLE = "application/vnd.iex.bundle"


@dataclass(frozen=True)
class Sender:
    """A sending gateway known only by its data directory: its name, and its signing key
    as ``iex serve`` made it."""

    data_dir: Path
    gateway: str

    def identity(self) -> str:
        return iex(
            self.data_dir,
            "identity",
            "export",
            "--url",
            f"http://{self.gateway}.example:8080",
            env={"IEX_NAME": self.gateway},
        )


def make_sender(data_dir: Path, gateway: str, *trusts: str) -> Sender:
    for trust in trusts:
        iex(data_dir, "trust", "add", trust, env={"IEX_NAME": gateway})
    return Sender(data_dir, gateway)


def pair(receiver: IexServer, sender: Sender, local_trust: str, tmp: Path) -> None:
    """Register ``sender`` at the receiver from its identity document, acting for
    ``local_trust``."""
    document = tmp / f"{sender.gateway}.json"
    document.write_text(sender.identity())
    receiver.iex(
        "partner", "add", sender.gateway, "--trust", local_trust, "--identity", str(document)
    )


def identity_of(server: IexServer) -> IdentityDocument:
    return decode_identity(server.iex("identity", "export", "--url", server.url))


@dataclass(frozen=True)
class Built:
    """A bundle as the sender keeps it: the head and the data section apart."""

    transfer: str
    head: bytes
    data: bytes
    study: str
    instances: dict[str, bytes]

    @property
    def whole(self) -> bytes:
        return self.head + self.data

    @property
    def manifest_sha256(self) -> str:
        length = int.from_bytes(self.head[8:12], "big")
        return hashlib.sha256(self.head[12 : 12 + length]).hexdigest()


def study_instances(count: int) -> dict[str, bytes]:
    """``count`` generated instances of one new study, and a real compressed one from
    pydicom's test files moved into it: by SOP Instance UID."""
    study = generate_uid()
    series = generate_uid()
    out = {}
    for i in range(count):
        data = make_instance(study_uid=study, series_uid=series, instance_number=i + 1, rows=64)
        out[meta_of(data).sop_instance_uid] = data
    ds = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    ds = copy.deepcopy(ds)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out[str(ds.SOPInstanceUID)] = buf.getvalue()
    return out


def study_of(instances: dict[str, bytes]) -> str:
    data = next(iter(instances.values()))
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)


def build(
    sender: Sender,
    sender_trust: str,
    recipient: IdentityDocument,
    recipient_trust: str,
    instances: dict[str, bytes],
    *,
    transfer: str | None = None,
    sender_key_id: str | None = None,
    recipient_gateway: str | None = None,
    sealed_for: str | None = None,
) -> Built:
    """A bundle of ``instances`` from ``sender_trust`` at ``sender`` to ``recipient_trust``
    at the gateway whose identity is ``recipient``. ``sealed_for``: seal to another trust's
    key than the one addressed; ``sender_key_id``: claim another key id."""
    keys = open_data_keys(sender.data_dir, None)
    signing = keys.signing_key()
    exchange = recipient.exchange_key(sealed_for or recipient_trust)
    assert exchange is not None
    transfer = transfer or new_job_id()
    study = study_of(instances)
    sink = io.BytesIO()
    writer = BundleWriter(
        sender=Endpoint(sender.gateway, sender_trust, sender_key_id or signing.id),
        recipient=Endpoint(recipient_gateway or recipient.gateway, recipient_trust, exchange.id),
        transfer_id=transfer,
        study=study,
        signing_key=signing.private_key(),
        recipient_public=exchange.x25519(),
        sink=sink,
        segment_size=64 * 1024,
    )
    for data in instances.values():
        meta: InstanceMeta = meta_of(data)
        writer.add_instance(meta, pieces(data, 50_000))
    head = writer.finish()
    return Built(transfer, head, sink.getvalue(), study, instances)


def _partial(c: httpx.Client, part: bytes) -> str:
    r = c.post(
        "/transfers/uploads", headers={"Upload-Concat": "partial", "Upload-Length": str(len(part))}
    )
    assert r.status_code == 201, r.text
    url = r.headers["location"]
    r = c.patch(
        url,
        content=part,
        headers={"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"},
    )
    assert r.status_code == 204, r.text
    return url


def push(
    server: IexServer, token: str, head: bytes, data: bytes, transfer: str, *, parts: int = 2
) -> str:
    """Send head and data as partial uploads (the data in ``parts`` ranges) and join them
    with a final upload naming the transfer; the final upload's URL."""
    step = -(-len(data) // parts)
    pieces_ = [head] + [data[i : i + step] for i in range(0, len(data), step)]
    headers = {"Authorization": f"Bearer {token}", **TUS}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
        urls = [_partial(c, p) for p in pieces_]
        r = c.post(
            "/transfers/uploads",
            headers={
                "Upload-Concat": "final;" + " ".join(urls),
                "Upload-Metadata": metadata(content_type=BUNDLE, transfer=transfer),
            },
        )
        assert r.status_code == 201, r.text
        return str(r.headers["location"])


def pushed(server: IexServer, token: str, built: Built, **kwargs: Any) -> dict[str, Any]:
    """Push ``built`` and wait for the final upload's report."""
    url = push(server, token, built.head, built.data, built.transfer, **kwargs)
    headers = {"Authorization": f"Bearer {token}", **TUS}
    with httpx.Client(headers=headers, timeout=120) as c:
        return wait_report(c, url)


def receipt_response(server: IexServer, token: str, transfer: str) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        return c.get(f"/exchange/receipts/{transfer}", headers={"Authorization": f"Bearer {token}"})


def verified_receipt(
    document: bytes, receiver: IdentityDocument, built: Built, trust: str
) -> Receipt:
    """The receipt as a sender accepts it: against the receiver's signing keys on record."""

    def lookup(gateway: str, key_id: str) -> Any:
        key = receiver.signing_key(key_id)
        if gateway != receiver.gateway or key is None:
            raise LookupError(key_id)
        return key.ed25519()

    return verify_receipt(
        document,
        lookup,
        expect_transfer=built.transfer,
        expect_manifest_sha256=built.manifest_sha256,
        expect_receiver=Endpoint(receiver.gateway, trust, "any"),
    )


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def instance_count(server: IexServer, token: str, study: str) -> int:
    with server.client(token) as c:
        r = c.get("/instances", params={"StudyInstanceUID": study})
        assert r.status_code in (200, 204), r.text
        return len(r.json()) if r.status_code == 200 else 0


def digests(instances: dict[str, bytes]) -> dict[str, str]:
    return {uid: hashlib.sha256(d).hexdigest() for uid, d in instances.items()}
