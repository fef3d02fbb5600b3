"""Packaging a study for a partner trust: a bundle staged in the outbox, its head kept apart.

The first step of a push (``docs/EXCHANGE.md``, "Transport: pushing a bundle"). Every
instance of the study is read from the encrypted store, decrypted as a stream, and handed
to a ``BundleWriter`` that hashes, compresses and seals it for the recipient trust straight
into the staging file ``exchange/outbox/<transfer id>``: the file holds the data section,
ciphertext only, and no plaintext ever reaches the disk. The head (manifest and signature)
is built last and kept by the caller, in the transfer's checkpoint, with the SHA-256 of the
manifest (what the receipt must name) and the data section's length.

Memory stays at a chunk of an instance and a few segments, whatever the size of the study.
The reading and sealing are blocking and run in one worker thread; when the packaging is
cancelled (the transfer paused or cancelled), the thread stops at its next chunk and the
caller returns only then, so no thread is left writing a file that is being removed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from app.crypto.errors import IntegrityError
from app.crypto.identity import PublicExchangeKey, SigningKey
from app.crypto.keystore import DataKeys
from app.dicom.uids import InstanceRef
from app.durable import fsync_dir
from app.errors import BadRequest, Conflict, NotFound
from app.storage.base import InstanceStore, MetadataIndex, StoredInstance
from app.transfer import canonical_json as cj
from app.transfer.bundle import BundleWriter, read_head
from app.transfer.canonical_json import FieldError
from app.transfer.jobs import TransferJob
from app.transfer.manifest import MAX_INSTANCES, Endpoint, InstanceMeta, Manifest
from app.transfer.outbox import Outbox

#: Bytes of an instance read from the store at a time.
READ_SIZE = 1024 * 1024


class PackagingStopped(Exception):
    """The packaging was cancelled; the thread stopped between two chunks."""


@dataclass(frozen=True)
class StagedBundle:
    """A packaged bundle: its ``head`` (kept in the checkpoint), the SHA-256 of its manifest
    and the length of its data section (staged in the outbox)."""

    head: bytes
    manifest_sha256: str
    data_length: int

    def __repr__(self) -> str:
        return f"StagedBundle({self.manifest_sha256[:12]}…, {self.length} bytes)"

    @property
    def length(self) -> int:
        """The whole bundle's length: head and data."""
        return len(self.head) + self.data_length

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "head": base64.b64encode(self.head).decode("ascii"),
            "manifest_sha256": self.manifest_sha256,
            "data_length": self.data_length,
        }

    @staticmethod
    def from_checkpoint(value: object) -> StagedBundle | None:
        """The bundle a checkpoint recorded; ``None`` when it recorded none (or something
        this version cannot read: the transfer then packages again)."""
        if not isinstance(value, Mapping):
            return None
        try:
            head = base64.b64decode(str(value["head"]), validate=True)
            sha = str(value["manifest_sha256"])
            length = value["data_length"]
        except (KeyError, binascii.Error, ValueError):
            return None
        if not isinstance(length, int) or length < 0 or len(sha) != 64:
            return None
        return StagedBundle(head, sha, length)

    def manifest(self) -> Manifest:
        """The manifest in the head (written and signed by this gateway)."""
        signed = read_head(io.BytesIO(self.head))
        try:
            return Manifest.from_document(cj.decode(signed.manifest_bytes, "the manifest"))
        except FieldError as exc:  # only if the checkpoint was altered
            raise Conflict(f"the recorded bundle head is not readable: {exc}") from None

    def instances(self) -> list[InstanceRef]:
        """What the bundle holds, for the audit trail."""
        manifest = self.manifest()
        return [
            InstanceRef(
                manifest.study,
                entry.meta.series_instance_uid,
                entry.meta.sop_instance_uid,
                entry.meta.sop_class_uid,
            )
            for entry in manifest.instances
        ]


class StudyPackager:
    """Packages a trust's studies for partner trusts, as gateway ``gateway``."""

    def __init__(
        self,
        store: InstanceStore,
        index: MetadataIndex,
        keys: DataKeys,
        outbox: Outbox,
        gateway: str,
    ) -> None:
        self._store = store
        self._index = index
        self._keys = keys
        self._outbox = outbox
        self._gateway = gateway

    async def package(self, job: TransferJob, recipient: PublicExchangeKey) -> StagedBundle:
        """Stage the bundle of ``job``'s study for ``recipient`` (the partner trust's exchange
        key), from scratch: a fresh ephemeral key and manifest, the staging file replaced.

        ``NotFound`` when the trust holds no instance of the study; ``BadRequest`` or
        ``Conflict`` when an instance cannot be bundled (its UIDs, its stored bytes)."""
        instances = await self._index.get_instances(job.trust, job.study)
        if not instances:
            raise NotFound(f"study {job.study} has no instances in trust {job.trust}")
        if len(instances) > MAX_INSTANCES:
            raise BadRequest(
                f"study {job.study} has {len(instances)} instances; a bundle holds at most "
                f"{MAX_INSTANCES}"
            )
        signing = await asyncio.to_thread(self._keys.signing_key)
        stop = threading.Event()
        work = asyncio.ensure_future(
            asyncio.to_thread(self._write, job, signing, recipient, instances, stop)
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.gather(work, return_exceptions=True)
            raise

    # -- in the worker thread ---------------------------------------------------------------

    def _write(
        self,
        job: TransferJob,
        signing: SigningKey,
        recipient: PublicExchangeKey,
        instances: Sequence[StoredInstance],
        stop: threading.Event,
    ) -> StagedBundle:
        self._outbox.prepare()
        path = self._outbox.path(job.id)
        with open(path, "wb", opener=_private) as sink:
            writer = BundleWriter(
                sender=Endpoint(self._gateway, job.trust, signing.id),
                recipient=Endpoint(job.partner, job.partner_trust, recipient.id),
                transfer_id=job.id,
                study=job.study,
                signing_key=signing.private_key(),
                recipient_public=recipient.x25519(),
                sink=sink,
            )
            for instance in instances:
                self._add(writer, instance, stop)
            head = writer.finish()
            sink.flush()
            os.fsync(sink.fileno())
        fsync_dir(path.parent)
        manifest = writer.manifest
        assert manifest is not None  # finish made it
        manifest_bytes = read_head(io.BytesIO(head)).manifest_bytes
        return StagedBundle(head, hashlib.sha256(manifest_bytes).hexdigest(), manifest.data_length)

    def _add(self, writer: BundleWriter, instance: StoredInstance, stop: threading.Event) -> None:
        meta = InstanceMeta(
            instance.sop_uid, instance.series_uid, instance.sop_class_uid, instance.transfer_syntax
        )
        try:
            with self._store.open_blocking(instance.blob_key) as fp:
                entry = writer.add_instance(meta, _chunks(fp, stop))
        except IntegrityError:
            raise Conflict(
                f"instance {instance.sop_uid} failed its integrity check in the store "
                "(altered on the gateway's disk): the study cannot be sent"
            ) from None
        except ValueError as exc:
            raise BadRequest(f"instance {instance.sop_uid} cannot be bundled: {exc}") from None
        if entry.size != instance.size:
            raise Conflict(
                f"instance {instance.sop_uid} holds {entry.size} bytes in the store, but the "
                f"index records {instance.size}: the study cannot be sent"
            )


def _chunks(fp: IO[bytes], stop: threading.Event) -> Iterator[bytes]:
    while chunk := fp.read(READ_SIZE):
        if stop.is_set():
            raise PackagingStopped
        yield chunk


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)
