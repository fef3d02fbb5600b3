"""``MetadataIndex`` on SQLite in WAL mode, the embedded default.

All SQL runs on worker threads, never on the event loop: one thread owns the single
writer connection (SQLite allows one writer at a time anyway), and a small pool of threads
each own a read connection (WAL lets readers run beside the writer).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from app.dicom.query import Query, QueryResult
from app.errors import ServiceUnavailable
from app.storage.base import AddOutcome, IndexStats, InstanceRecord, StoredInstance
from app.storage.sqlite_schema import caseless_name, create_schema, normalise_name
from app.storage.sqlite_search import run_search

T = TypeVar("T")

READ_THREADS = 4

_INSTANCE_COLUMNS = (
    "st.study_uid, se.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax, i.blob_key,"
    " i.size, i.sha256, i.number_of_frames, i.rows, i.columns, i.bits_allocated,"
    " i.pixel_tag, i.pixel_vr, i.pixel_offset, i.pixel_length"
)


def _connect(path: Path) -> sqlite3.Connection:
    # Each connection is used by one thread only; the check is off so close() can reap them.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode keeps the database consistent after power loss; the blob fsync
    # before each index commit is what makes a stored instance durable.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.create_function("iex_fold", 1, normalise_name, deterministic=True)
    conn.create_function("iex_caseless", 1, caseless_name, deterministic=True)
    return conn


class SQLiteMetadataIndex:
    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="iex-index-write")
        self._reader_pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="iex-index-read")
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._writer: sqlite3.Connection | None = None

    async def open(self) -> None:
        def init() -> None:
            self._writer = _connect(self._path)
            create_schema(self._writer)

        await self._on_writer(init)

    async def _on_writer(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer_pool, fn)

    async def _on_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = _connect(self._path)
                self._readers.append(conn)
            return fn(conn)

        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, run)

    # -- writes -------------------------------------------------------------------------

    async def add_instances(self, records: Sequence[InstanceRecord]) -> list[AddOutcome]:
        if not records:
            return []
        return await self._on_writer(lambda: self._add_all(records))

    def _add_all(self, records: Sequence[InstanceRecord]) -> list[AddOutcome]:
        conn = self._writer
        assert conn is not None, "index not opened"
        outcomes: list[AddOutcome] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for record in records:
                outcomes.append(self._add_one(conn, record))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return outcomes

    def _add_one(self, conn: sqlite3.Connection, record: InstanceRecord) -> AddOutcome:
        h = record.header
        a = h.attributes
        existing = conn.execute(
            "SELECT sha256 FROM instances WHERE trust = ? AND sop_uid = ?",
            (record.trust, h.sop_uid),
        ).fetchone()
        if existing is not None:
            return (
                AddOutcome.ALREADY_STORED if existing[0] == record.sha256 else AddOutcome.CONFLICT
            )
        now = time.time()
        conn.execute(
            "INSERT INTO studies (trust, study_uid, patient_name, patient_name_folded, patient_id,"
            " patient_birth_date, patient_sex, study_date, study_time, accession_number,"
            " referring_physician_name, referring_physician_folded, study_id, study_description,"
            " study_json, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (trust, study_uid) DO NOTHING",
            (
                record.trust,
                h.study_uid,
                a.get("PatientName"),
                normalise_name(a.get("PatientName")),
                a.get("PatientID"),
                a.get("PatientBirthDate"),
                a.get("PatientSex"),
                a.get("StudyDate"),
                a.get("StudyTime"),
                a.get("AccessionNumber"),
                a.get("ReferringPhysicianName"),
                normalise_name(a.get("ReferringPhysicianName")),
                a.get("StudyID"),
                a.get("StudyDescription"),
                h.metadata,
                now,
            ),
        )
        (study_pk,) = conn.execute(
            "SELECT id FROM studies WHERE trust = ? AND study_uid = ?", (record.trust, h.study_uid)
        ).fetchone()
        added_series = conn.execute(
            "INSERT INTO series (study_pk, trust, series_uid, modality, series_number,"
            " series_description, pps_start_date, pps_start_time, series_json, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (study_pk, series_uid) DO NOTHING",
            (
                study_pk,
                record.trust,
                h.series_uid,
                a.get("Modality"),
                a.get("SeriesNumber"),
                a.get("SeriesDescription"),
                a.get("PerformedProcedureStepStartDate"),
                a.get("PerformedProcedureStepStartTime"),
                h.metadata,
                now,
            ),
        ).rowcount
        (series_pk,) = conn.execute(
            "SELECT id FROM series WHERE study_pk = ? AND series_uid = ?", (study_pk, h.series_uid)
        ).fetchone()
        pixel = h.pixel_data
        conn.execute(
            "INSERT INTO instances (series_pk, study_pk, trust, sop_uid, sop_class_uid,"
            " instance_number, transfer_syntax, blob_key, size, sha256, number_of_frames, rows,"
            " columns, bits_allocated, pixel_tag, pixel_vr, pixel_offset, pixel_length, metadata,"
            " created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                series_pk,
                study_pk,
                record.trust,
                h.sop_uid,
                h.sop_class_uid,
                a.get("InstanceNumber"),
                h.transfer_syntax,
                record.blob_key,
                record.size,
                record.sha256,
                h.number_of_frames,
                a.get("Rows"),
                a.get("Columns"),
                a.get("BitsAllocated"),
                pixel.tag if pixel else None,
                pixel.vr if pixel else None,
                pixel.value_offset if pixel else None,
                pixel.value_length if pixel else None,
                h.metadata,
                now,
            ),
        )
        # Counters for QIDO-RS computed attributes (PS3.4 C.3.4): kept here so that a
        # search never counts the instances of the studies it returns.
        conn.execute(
            "UPDATE series SET num_instances = num_instances + 1 WHERE id = ?", (series_pk,)
        )
        conn.execute(
            "UPDATE studies SET num_instances = num_instances + 1,"
            " num_series = num_series + ? WHERE id = ?",
            (1 if added_series else 0, study_pk),
        )
        conn.execute(
            "UPDATE counters SET instances = instances + 1, bytes = bytes + ? WHERE id = 1",
            (record.size,),
        )
        return AddOutcome.STORED

    # -- reads --------------------------------------------------------------------------

    @staticmethod
    def _instance_filter(
        trust: str, study_uid: str, series_uid: str | None, sop_uid: str | None
    ) -> tuple[str, list[Any]]:
        where = "st.trust = ? AND st.study_uid = ?"
        params: list[Any] = [trust, study_uid]
        if series_uid is not None:
            where += " AND se.series_uid = ?"
            params.append(series_uid)
        if sop_uid is not None:
            where += " AND i.sop_uid = ?"
            params.append(sop_uid)
        return where, params

    async def get_instances(
        self,
        trust: str,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[StoredInstance]:
        where, params = self._instance_filter(trust, study_uid, series_uid, sop_uid)
        sql = (
            f"SELECT {_INSTANCE_COLUMNS} FROM instances i"
            " JOIN series se ON se.id = i.series_pk JOIN studies st ON st.id = i.study_pk"
            f" WHERE {where} ORDER BY se.id, i.instance_number, i.id"
        )
        rows = await self._on_reader(lambda c: c.execute(sql, params).fetchall())
        return [StoredInstance(*row) for row in rows]

    async def get_metadata(
        self,
        trust: str,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[tuple[StoredInstance, bytes]]:
        where, params = self._instance_filter(trust, study_uid, series_uid, sop_uid)
        sql = (
            f"SELECT {_INSTANCE_COLUMNS}, i.metadata FROM instances i"
            " JOIN series se ON se.id = i.series_pk JOIN studies st ON st.id = i.study_pk"
            f" WHERE {where} ORDER BY se.id, i.instance_number, i.id"
        )
        rows = await self._on_reader(lambda c: c.execute(sql, params).fetchall())
        return [(StoredInstance(*row[:-1]), bytes(row[-1])) for row in rows]

    async def search(self, trust: str, query: Query) -> QueryResult:
        return await self._on_reader(lambda c: run_search(c, trust, query))

    async def stats(self) -> IndexStats:
        row = await self._on_reader(
            lambda c: c.execute("SELECT instances, bytes FROM counters WHERE id = 1").fetchone()
        )
        return IndexStats(instances=row[0], bytes=row[1])

    async def check(self) -> None:
        try:
            await self._on_reader(lambda c: c.execute("SELECT 1 FROM counters").fetchone())
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"the index is not usable: {exc}") from exc

    async def close(self) -> None:
        def close_writer() -> None:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

        await self._on_writer(close_writer)
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)
        for conn in self._readers:
            conn.close()
        self._readers.clear()
