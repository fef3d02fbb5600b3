"""The audit trail: one record per access to patient data and per security event.

Records carry the fields of the DICOM audit message (PS3.15 Annex A.5), rendered as JSON
with the schema's element and attribute names, so that a forwarder can turn them into
RFC 3881 / DICOM XML for an IHE ATNA repository:

* ``EventIdentification``: ``EventID`` and ``EventTypeCode`` (codes of PS3.16 CID 400 and
  CID 401, scheme ``DCM``), ``EventActionCode`` (C, R, U, D, E), ``EventDateTime`` (UTC),
  ``EventOutcomeIndicator`` (0 success, 4 minor failure, 8 serious failure; A.5.2.1);
* ``ActiveParticipant``: the requestor (``UserID`` the token id, ``AlternativeUserID`` its
  trust, ``NetworkAccessPointID`` the client address, type 2 = IP address) and the gateway;
* ``AuditSourceIdentification``: this gateway (type 4, application server);
* ``ParticipantObjectIdentification``: studies (ID type 110180 Study Instance UID) with
  their series in ``ParticipantObjectDetail`` and instances in
  ``ParticipantObjectDescription.SOPClass.Instance`` (A.5.2.5); for a query, the query SOP
  class with ``ParticipantObjectQuery`` (A.5.3.12); for a push to a partner gateway, the
  partner's trust (role Data Destination, ``partner:<name>/<trust>``) and the transfer
  (role Job, ``transfer:<id>``) beside the study.

An ``iex`` element adds what the schema has no place for: route, HTTP status, bytes.
Records hold identifiers only: never patient names; query values of attributes outside an
allow-list of identifiers are replaced by ``*``.

Tamper evidence: each record holds ``seq`` and the ``prev_hash`` of the one before, and is
stored as the canonical JSON text whose SHA-256 is its ``hash``. Editing, deleting or
reordering a record breaks the chain at that record (``verify``).

Durability: ``AuditTrail.record`` returns only once its record is committed and fsynced, and
the caller answers only then; when the trail cannot be written it raises
``AuditUnavailable`` and the access does not happen. One writer task commits every record
waiting at that moment in one transaction (a group commit), so concurrent requests share a
transaction and its fsync rather than queueing for one each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from app.crypto.sqlcipher import DatabaseErrors
from app.dicom.uids import InstanceRef
from app.errors import AuditUnavailable, BadRequest
from app.storage.security import (
    GENESIS,
    AuditAppend,
    AuditFilter,
    SecurityStore,
)

if TYPE_CHECKING:
    from app.services.security import Principal

log = logging.getLogger(__name__)

#: The most records one transaction appends; more wait for the next.
BATCH = 1000
#: Seconds between the probes of a trail that could not be written.
PROBE_INTERVAL = 1.0
#: Seconds a transaction may wait for the records of exchanges under way (see ``Expected``).
GATHER = 0.0005

#: Study Root Query/Retrieve Information Model - FIND (PS3.4 C.6.2), the model QIDO-RS serves.
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _code(code: str, meaning: str) -> dict[str, str]:
    return {"csd-code": code, "codeSystemName": "DCM", "originalText": meaning}


# PS3.16 CID 400 (Audit Event ID) and CID 401 (Audit Event Type Code).
APPLICATION_ACTIVITY = _code("110100", "Application Activity")
BEGIN_TRANSFERRING = _code("110102", "Begin Transferring DICOM Instances")
AUDIT_LOG_USED = _code("110101", "Audit Log Used")
INSTANCES_ACCESSED = _code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _code("110104", "DICOM Instances Transferred")
EXPORT = _code("110106", "Export")
QUERY = _code("110112", "Query")
SECURITY_ALERT = _code("110113", "Security Alert")
USER_AUTHENTICATION = _code("110114", "User Authentication")
LOGIN = _code("110122", "Login")
USE_OF_RESTRICTED_FUNCTION = _code("110132", "Use of Restricted Function")
SECURITY_CONFIGURATION = _code("110129", "Security Configuration")
SOURCE_ROLE = _code("110153", "Source Role ID")
DESTINATION_ROLE = _code("110152", "Destination Role ID")
STUDY_UID_TYPE = _code("110180", "Study Instance UID")
SOP_CLASS_UID_TYPE = _code("110181", "SOP Class UID")

#: Query parameters whose values are identifiers or paging, kept as sent; others become ``*``.
_QUERY_KEPT = frozenset(
    {
        "limit", "offset", "fuzzymatching", "includefield",
        "StudyInstanceUID", "0020000D", "SeriesInstanceUID", "0020000E",
        "SOPInstanceUID", "00080018", "SOPClassUID", "00080016",
        "PatientID", "00100020", "AccessionNumber", "00080050",
        "StudyDate", "00080020", "StudyTime", "00080030",
        "Modality", "00080060", "ModalitiesInStudy", "00080061",
        "StudyID", "00200010", "SeriesNumber", "00200011", "InstanceNumber", "00200013",
    }
)  # fmt: skip


@dataclass(frozen=True)
class TransferSubject:
    """The push an exchange acted on: its transfer id (``None`` when it was refused before
    one was made), the partner gateway and the trust there it goes to."""

    partner: str
    partner_trust: str
    transfer: str | None = None


@dataclass(frozen=True)
class AccessFacts:
    """What one HTTP exchange did, as the HTTP layer observed it; no framework types."""

    at: float
    method: str
    route: str
    status: int
    client: str | None
    actor: str | None
    trust: str | None
    kind: str  # "store", "upload", "retrieve", "metadata", "query", "export", "delete", "audit",
    # "push" (a transfer to a partner asked for), "push-change" (one cancelled, paused,
    # resumed or retried), or "other"
    objects: Sequence[InstanceRef] = ()
    query: Sequence[tuple[str, str]] = ()
    bytes_received: int = 0
    #: The length of the response body, as declared when the record is made (before any of
    #: it is sent); ``None`` for a body streamed without a declared length.
    bytes_sent: int | None = 0
    #: What came of it in words (``EventOutcomeDescription``): why it was refused, or for a
    #: push what was done.
    reason: str | None = None
    #: What happened, in words, for an event its route and status do not tell (a partner's
    #: bundle stored or refused, and from whom): identifiers only, never patient data.
    description: str | None = None
    transfer: TransferSubject | None = None


_ACTIONS = {
    "store": (INSTANCES_TRANSFERRED, "C"),
    # Bytes of a resumable upload arriving: data transferred in, created on completion.
    "upload": (INSTANCES_TRANSFERRED, "C"),
    "retrieve": (INSTANCES_TRANSFERRED, "R"),
    "metadata": (INSTANCES_ACCESSED, "R"),
    "query": (QUERY, "E"),
    "export": (EXPORT, "R"),
    "delete": (INSTANCES_ACCESSED, "D"),
    "audit": (AUDIT_LOG_USED, "R"),
    # A transfer to a partner gateway: asked for (execute), then changed (update).
    "push": (BEGIN_TRANSFERRING, "E"),
    "push-change": (BEGIN_TRANSFERRING, "U"),
}


def _outcome(status: int, kind: str) -> str:
    """EventOutcomeIndicator (PS3.15 A.5.2.1): a partial store (202 to STOW-RS) is a minor
    failure; a push accepted (202 to ``POST /transfers``) is a success."""
    if status < 300 and not (status == 202 and kind == "store"):
        return "0"
    return "4" if status < 500 else "8"


def event_time(at: float) -> str:
    """``EventDateTime``: UTC to the millisecond."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _redact(query: Sequence[tuple[str, str]]) -> str:
    return "&".join(f"{k}={v if k in _QUERY_KEPT else '*'}" for k, v in query)


def study_objects(objects: Sequence[InstanceRef]) -> list[dict[str, Any]]:
    """One participant object per study (PS3.15 A.5.2.5), series and instances within."""
    by_study: dict[str, list[InstanceRef]] = {}
    for ref in objects:
        by_study.setdefault(ref.study_uid, []).append(ref)
    out = []
    for study, refs in by_study.items():
        item: dict[str, Any] = {
            "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3",
            "ParticipantObjectIDTypeCode": STUDY_UID_TYPE,
            "ParticipantObjectID": study,
        }
        series = sorted({r.series_uid for r in refs if r.series_uid})
        if series:
            item["ParticipantObjectDetail"] = [
                {"type": "SeriesInstanceUID", "value": s} for s in series
            ]
        classes: dict[str, list[str]] = {}
        for r in refs:
            if r.sop_uid:
                classes.setdefault(r.sop_class_uid or "", []).append(r.sop_uid)
        if classes:
            item["ParticipantObjectDescription"] = {
                "SOPClass": [
                    {
                        **({"UID": uid} if uid else {}),
                        "NumberOfInstances": len(instances),
                        "Instance": [{"UID": i} for i in instances],
                    }
                    for uid, instances in classes.items()
                ]
            }
        out.append(item)
    return out


def transfer_objects(subject: TransferSubject) -> list[dict[str, Any]]:
    """The partner's trust a push goes to (type 2 system object, role 16 Data Destination)
    and, once there is one, the transfer (role 20 Job), as RFC 3881 names the roles."""
    out: list[dict[str, Any]] = [
        {
            "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "16",
            "ParticipantObjectID": f"partner:{subject.partner}/{subject.partner_trust}",
        }
    ]
    if subject.transfer is not None:
        out.append(
            {
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "20",
                "ParticipantObjectID": f"transfer:{subject.transfer}",
            }
        )
    return out


def build_record(facts: AccessFacts, source: str) -> AuditAppend:
    """The PS3.15 A.5 record of one exchange seen by the gateway named ``source``. 401 is a
    failed User Authentication (A.5.3.x, type Login), 403 a Security Alert (Use of
    Restricted Function); anything else is the event of the transaction attempted, its
    outcome taken from the status. ``reason``, when given, describes the outcome."""
    if facts.status == 401:
        event, action, types = USER_AUTHENTICATION, "E", [LOGIN]
    elif facts.status == 403:
        event, action, types = SECURITY_ALERT, "E", [USE_OF_RESTRICTED_FUNCTION]
    else:
        event, action = _ACTIONS.get(facts.kind, (APPLICATION_ACTIVITY, "E"))
        types = []
    identification: dict[str, Any] = {
        "EventID": event,
        "EventActionCode": action,
        "EventDateTime": event_time(facts.at),
        "EventOutcomeIndicator": _outcome(facts.status, facts.kind),
    }
    if types:
        identification["EventTypeCode"] = types
    if facts.description:
        identification["EventOutcomeDescription"] = facts.description
    elif facts.reason:
        identification["EventOutcomeDescription"] = facts.reason
    requestor: dict[str, Any] = {
        "UserID": facts.actor or "unknown",
        "UserIsRequestor": True,
        "RoleIDCode": [DESTINATION_ROLE if action == "R" else SOURCE_ROLE],
    }
    if facts.trust:
        requestor["AlternativeUserID"] = facts.trust
    if facts.client:
        requestor["NetworkAccessPointID"] = facts.client
        requestor["NetworkAccessPointTypeCode"] = "2"
    gateway = {
        "UserID": source,
        "UserIsRequestor": False,
        "RoleIDCode": [SOURCE_ROLE if action == "R" else DESTINATION_ROLE],
    }
    objects = study_objects(facts.objects)
    if facts.transfer is not None:
        objects += transfer_objects(facts.transfer)
    if facts.kind == "query" and facts.query is not None:
        objects.append(
            {
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
                "ParticipantObjectIDTypeCode": SOP_CLASS_UID_TYPE,
                "ParticipantObjectID": STUDY_ROOT_FIND,
                "ParticipantObjectQuery": base64.b64encode(
                    _redact(facts.query).encode("utf-8")
                ).decode("ascii"),
            }
        )
    record: dict[str, Any] = {
        "EventIdentification": identification,
        "ActiveParticipant": [requestor, gateway],
        "AuditSourceIdentification": {"AuditSourceID": source, "AuditSourceTypeCode": "4"},
        "iex": {
            "route": f"{facts.method} {facts.route}",
            "status": facts.status,
            "trust": facts.trust,
            "bytesReceived": facts.bytes_received,
            "bytesSent": facts.bytes_sent,
        },
    }
    if objects:
        record["ParticipantObjectIdentification"] = objects
    studies = tuple(dict.fromkeys(r.study_uid for r in facts.objects))
    return AuditAppend(record, facts.at, facts.trust, facts.actor, studies)


# -- the hash chain ---------------------------------------------------------------------


def canonical(record: dict[str, Any]) -> str:
    """The one text a record is hashed as: sorted keys, no spaces, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def seal(record: dict[str, Any]) -> tuple[str, str]:
    text = canonical(record)
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def export_line(entry: str, digest: str) -> str:
    """A JSON line of the exported trail: the record with its ``hash``."""
    return canonical({**json.loads(entry), "hash": digest})


class ChainVerifier:
    """Checks a chain record by record and stops at the first bad one, naming it.

    Feed ``(entry text, stored hash)``; an exported line passes ``None`` as its hash and
    carries it inside. ``anchored``: the first record must be seq 1 chained from the genesis
    hash (a whole trail); an export ``--since`` starts mid-chain and anchors on its first
    record. ``finish(head)`` compares the end with the gateway's head (last seq and hash),
    which catches deleted newest records.
    """

    def __init__(self, anchored: bool = True) -> None:
        self.anchored = anchored
        self.checked = 0
        self.first_bad: int | None = None
        self.problem: str | None = None
        self.last_seq = 0
        self.last_hash = GENESIS

    @property
    def ok(self) -> bool:
        return self.problem is None

    def feed(self, entry: str, stored_hash: str | None) -> bool:
        if not self.ok:
            return False
        position = self.checked + 1
        try:
            record = json.loads(entry)
            if stored_hash is None:
                stored_hash = str(record.pop("hash"))
                entry = canonical(record)
            seq = int(record["seq"])
            prev = str(record["prev_hash"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return self._bad(None, f"entry {position} is not an audit record")
        if hashlib.sha256(entry.encode("utf-8")).hexdigest() != stored_hash:
            return self._bad(seq, "its content does not match its hash (edited)")
        if position == 1 and not self.anchored:
            self.last_seq, self.last_hash = seq - 1, prev
        if seq != self.last_seq + 1:
            return self._bad(
                seq, f"expected record {self.last_seq + 1} here (a record was deleted or moved)"
            )
        if prev != self.last_hash:
            return self._bad(seq, "its prev_hash is not the hash of the record before it")
        self.checked += 1
        self.last_seq, self.last_hash = seq, stored_hash
        return True

    def finish(self, head: tuple[int, str] | None = None) -> bool:
        if self.ok and head is not None and head != (self.last_seq, self.last_hash):
            return self._bad(
                self.last_seq + 1,
                f"the trail ends at record {self.last_seq} but the head records {head[0]} "
                "(the newest records were deleted or changed)",
            )
        return self.ok

    def _bad(self, seq: int | None, problem: str) -> bool:
        self.first_bad = seq
        self.problem = problem
        return False


# -- times --------------------------------------------------------------------------------


def parse_time(text: str) -> float:
    """Seconds since the epoch from ISO 8601 (``2024-05-01``, ``2024-05-01T10:00:00Z``),
    epoch seconds, or an age such as ``15m``, ``24h``, ``7d`` (that long ago)."""
    value = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if value[:-1].isdigit() and value[-1:] in units:
        return time.time() - int(value[:-1]) * units[value[-1]]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"{text[:40]!r} is not a time: use ISO 8601, epoch seconds or an age like 24h"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(seconds=1)


# -- the trail ----------------------------------------------------------------------------


def _why(exc: BaseException) -> str:
    """What went wrong, for a client and the log: the database's or the system's words,
    never a path."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, DatabaseErrors):
        return str(exc)
    return type(exc).__name__


class Expected:
    """An exchange under way whose record is still to come; settled when it is appended, or
    when the exchange ends without one. While some are unsettled, a transaction waits a
    moment (``GATHER``) for their records: one commit then carries several, which costs
    less CPU and fewer fsyncs than a commit each (concurrent small retrievals spent a fifth
    more CPU without it). A lone exchange never waits."""

    def __init__(self, trail: AuditTrail) -> None:
        self._trail: AuditTrail | None = trail

    def settle(self) -> None:
        if self._trail is not None:
            self._trail._settle()
            self._trail = None


class AuditTrail:
    """Appends records durably, every record waiting at once in one transaction.

    ``record`` and ``append`` return when their record is committed and fsynced. One writer
    task takes all the records waiting, appends them in one transaction (one fsync), and
    answers each waiter; records arriving meanwhile wait for the next transaction. While
    other exchanges are under way (``expect``), a transaction waits a moment for their
    records too. Nothing
    outlives its waiter: when a transaction fails, each of its waiters gets
    ``AuditUnavailable`` and the trail is unhealthy until a write succeeds again.
    """

    def __init__(self, store: SecurityStore, source: str, *, gather: float = GATHER) -> None:
        self.store = store
        #: The gateway's name (``IEX_NAME``): the audit source of every record it makes.
        self.source = source
        #: The longest a transaction waits for the records of exchanges under way.
        self.gather = gather
        self._waiting: list[tuple[AuditAppend, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._expected = 0
        #: Why the last write failed; ``None`` while writes succeed.
        self.problem: str | None = None
        #: Transactions (each one fsync) and the records they appended, since the start.
        self.commits = 0
        self.records = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._write(), name="iex-audit")

    def expect(self) -> Expected:
        """Note an exchange under way that will probably append a record."""
        self._expected += 1
        return Expected(self)

    def _settle(self) -> None:
        self._expected -= 1
        self._wake.set()

    async def record(self, facts: AccessFacts, expected: Expected | None = None) -> None:
        """Append the record of an exchange; return once it is durable."""
        await self.append(build_record(facts, self.source), expected)

    async def append(self, item: AuditAppend, expected: Expected | None = None) -> None:
        """Return once ``item`` is durable; ``AuditUnavailable`` if it cannot be written."""
        if expected is not None:
            expected.settle()
        if self._task is None or self._task.done() or self._closing:
            raise AuditUnavailable("the audit trail is closed: the gateway is shutting down")
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        self._wake.set()
        # A waiter cancelled meanwhile (its client left) still has its record written.
        await done

    async def security_change(
        self, what: str, *, actor: str, trust: str | None, subject: str
    ) -> None:
        """A change to trusts, tokens or partners (Security Alert, Security Configuration)."""
        await self.append(security_change(what, actor, trust, subject, self.source))

    async def check(self) -> None:
        """For readiness: a durable write that adds no record. ``AuditUnavailable`` when it
        fails; when it succeeds the trail is healthy again (the next append will tell)."""
        try:
            await self.store.probe_audit()
        except Exception as exc:
            raise AuditUnavailable(
                f"the audit trail cannot be written ({self._failed(exc)}): patient data is "
                "not served until it can"
            ) from exc
        self._succeeded()

    @property
    def healthy(self) -> bool:
        return self.problem is None

    async def _write(self) -> None:
        while True:
            if self.healthy:
                await self._wake.wait()
            else:
                # Changes to patient data are refused while the trail is unhealthy, so it
                # probes by itself rather than wait for an append or /readyz to find it mended.
                try:
                    await asyncio.wait_for(self._wake.wait(), PROBE_INTERVAL)
                except TimeoutError:
                    with contextlib.suppress(AuditUnavailable):
                        await self.check()
                    continue
            self._wake.clear()
            if self._waiting:
                await self._gather()
            while self._waiting:
                batch = self._waiting[:BATCH]
                del self._waiting[:BATCH]
                await self._commit(batch)
            if self._closing:
                return

    async def _gather(self) -> None:
        """Wait, ``gather`` seconds at most, while exchanges under way may still add records."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gather
        while self._expected > 0 and len(self._waiting) < BATCH and not self._closing:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return
            self._wake.clear()

    async def _commit(self, batch: list[tuple[AuditAppend, asyncio.Future[None]]]) -> None:
        try:
            await self.store.append_audit([item for item, _ in batch], seal)
        except Exception as exc:
            detail = (
                f"the audit trail cannot be written ({self._failed(exc)}): this access to "
                "patient data cannot be recorded, so it is refused; try again later"
            )
            for _, done in batch:
                if not done.done():
                    done.set_exception(AuditUnavailable(detail))
            return
        self.commits += 1
        self.records += len(batch)
        self._succeeded()
        for _, done in batch:
            if not done.done():
                done.set_result(None)

    def _failed(self, exc: BaseException) -> str:
        """Note a failed write (logged when the trail was healthy until now); why it failed."""
        why = _why(exc)
        if self.problem is None:
            log.error(
                "the audit trail cannot be written (%s): patient data is not served and "
                "/readyz fails until it can",
                why,
                exc_info=not isinstance(exc, (OSError, *DatabaseErrors)),
            )
        self.problem = why
        return why

    def _succeeded(self) -> None:
        if self.problem is not None:
            log.warning("the audit trail can be written again")
            self.problem = None

    async def read(self, where: AuditFilter, reader: Principal) -> list[dict[str, Any]]:
        """Records for ``GET /audit``, each with its ``hash``. An admin reads its own trust's
        records (another trust's read as none, like another trust's studies); an admin of the
        operator trust reads every trust's and those of callers that never authenticated."""
        if not reader.is_operator:
            if where.trust not in (None, reader.trust):
                return []
            where = replace(where, trust=reader.trust)
        rows = await self.store.audit(where)
        return [{**json.loads(r.entry), "hash": r.hash} for r in rows]

    async def close(self) -> None:
        """Write what is waiting, then stop; later appends raise ``AuditUnavailable``."""
        self._closing = True
        if self._task is None:
            return
        self._wake.set()
        await self._task
        self._task = None


def security_change(
    what: str, actor: str, trust: str | None, subject: str, source: str
) -> AuditAppend:
    """The record of a change to who may do what (PS3.15 A.5.3.11, Security Alert), made by
    the gateway or command line named ``source``."""
    now = time.time()
    record = {
        "EventIdentification": {
            "EventID": SECURITY_ALERT,
            "EventActionCode": "E",
            "EventDateTime": event_time(now),
            "EventOutcomeIndicator": "0",
            "EventTypeCode": [SECURITY_CONFIGURATION],
            "EventOutcomeDescription": what,
        },
        "ActiveParticipant": [{"UserID": actor, "UserIsRequestor": True}],
        "AuditSourceIdentification": {"AuditSourceID": source, "AuditSourceTypeCode": "4"},
        "ParticipantObjectIdentification": [
            {
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "13",  # Security Resource
                "ParticipantObjectID": subject,
            }
        ],
        "iex": {"route": "cli", "status": 0, "trust": trust},
    }
    return AuditAppend(record, now, trust, actor)
