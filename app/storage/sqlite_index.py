"""``MetadataIndex`` on SQLite in WAL mode, the embedded default.

All SQL runs on the database's worker threads (``SQLiteDatabase``), never on the event loop.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from app.crypto.sqlcipher import DatabaseErrors
from app.dicom.query import Query, QueryResult
from app.errors import ServiceUnavailable
from app.storage.base import AlreadyIndexed, IndexStats, InstanceRecord, StoredInstance
from app.storage.sqlite_db import SQLiteDatabase, transaction
from app.storage.sqlite_schema import caseless_name, create_schema, normalise_name
from app.storage.sqlite_search import run_search

T = TypeVar("T")

READ_THREADS = 4

_INSTANCE_COLUMNS = (
    "st.study_uid, se.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax, i.blob_key,"
    " i.size, i.number_of_frames, i.rows, i.columns, i.bits_allocated,"
    " i.pixel_tag, i.pixel_vr, i.pixel_offset, i.pixel_length"
)


def _functions(conn: sqlite3.Connection) -> None:
    conn.create_function("iex_fold", 1, normalise_name, deterministic=True)
    conn.create_function("iex_caseless", 1, caseless_name, deterministic=True)


class _RolledBack(Exception):
    """Raised inside a transaction to undo it while still returning its outcomes."""

    def __init__(self, outcomes: list[AlreadyIndexed | None]) -> None:
        self.outcomes = outcomes


class SQLiteMetadataIndex:
    def __init__(self, path: Path, key: bytes | None = None) -> None:
        self._db = SQLiteDatabase(
            path, name="index", key=key, read_threads=READ_THREADS, setup=_functions
        )

    async def open(self) -> None:
        await self._db.write(create_schema)

    async def _on_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._db.read(fn)

    # -- writes -------------------------------------------------------------------------

    async def add_instances(
        self, records: Sequence[InstanceRecord], *, all_or_nothing: bool = False
    ) -> list[AlreadyIndexed | None]:
        if not records:
            return []

        def add_all(conn: sqlite3.Connection) -> list[AlreadyIndexed | None]:
            outcomes = [self._add_one(conn, r) for r in records]
            if all_or_nothing and any(outcomes):
                raise _RolledBack(outcomes)
            return outcomes

        try:
            return await self._db.write(lambda conn: transaction(conn, add_all))
        except _RolledBack as rolled_back:
            return rolled_back.outcomes

    def _add_one(self, conn: sqlite3.Connection, record: InstanceRecord) -> AlreadyIndexed | None:
        h = record.header
        a = h.attributes
        existing = conn.execute(
            "SELECT blob_key, size FROM instances WHERE trust = ? AND sop_uid = ?",
            (record.trust, h.sop_uid),
        ).fetchone()
        if existing is not None:
            return AlreadyIndexed(*existing)
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
            " instance_number, transfer_syntax, blob_key, size, number_of_frames, rows,"
            " columns, bits_allocated, pixel_tag, pixel_vr, pixel_offset, pixel_length, metadata,"
            " created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
        return None

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

    async def blob_keys(self) -> set[str]:
        return await self._on_reader(
            lambda c: {str(r[0]) for r in c.execute("SELECT blob_key FROM instances")}
        )

    async def check(self) -> None:
        try:
            await self._on_reader(lambda c: c.execute("SELECT 1 FROM counters").fetchone())
        except DatabaseErrors as exc:
            raise ServiceUnavailable(f"the index is not usable: {exc}") from exc

    async def close(self) -> None:
        await self._db.close()
