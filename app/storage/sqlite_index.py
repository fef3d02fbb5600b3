"""``MetadataIndex`` on SQLite in WAL mode, the embedded default.

All SQL runs on the database's worker threads (``SQLiteDatabase``), never on the event loop.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from operator import itemgetter
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


_PARAMETER = re.compile(r":([a-z_]+)")


class _Statement:
    """SQL written with named parameters (``:study_uid``), run with their values taken by
    name from a row but bound by position. Adding instances is the STOW-RS hot path, and
    CPython's ``sqlite3`` makes a string for every parameter it binds by name: with some 55
    parameters an instance, that made adding one about a quarter slower."""

    def __init__(self, sql: str) -> None:
        names = _PARAMETER.findall(sql)
        self.sql = _PARAMETER.sub("?", sql)
        get = itemgetter(*names)
        self._values: Callable[[dict[str, Any]], Any] = (
            get if len(names) > 1 else lambda row: (get(row),)
        )

    def __call__(self, conn: sqlite3.Connection, row: dict[str, Any]) -> sqlite3.Cursor:
        return conn.execute(self.sql, self._values(row))


def _insert(table: str, columns: str, *, unless: str | None = None) -> _Statement:
    """``INSERT`` into the space-separated ``columns`` of the row's values of the same names;
    with ``unless`` (the columns of a unique key), nothing when such a row exists."""
    names = columns.split()
    values = ", ".join(f":{name}" for name in names)
    sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({values})"
    return _Statement(sql + f" ON CONFLICT ({unless}) DO NOTHING" if unless else sql)


# The statements of ``_add_one``, their parameters all taken from one row (``_row``).
_FIND_INSTANCE = _Statement(
    "SELECT blob_key, size FROM instances WHERE trust = :trust AND sop_uid = :sop_uid"
)
_INSERT_STUDY = _insert(
    "studies",
    "trust study_uid patient_name patient_name_folded patient_id patient_birth_date"
    " patient_sex study_date study_time accession_number referring_physician_name"
    " referring_physician_folded study_id study_description study_json created_at",
    unless="trust, study_uid",
)
_FIND_STUDY = _Statement("SELECT id FROM studies WHERE trust = :trust AND study_uid = :study_uid")
_INSERT_SERIES = _insert(
    "series",
    "study_pk trust series_uid modality series_number series_description pps_start_date"
    " pps_start_time series_json created_at",
    unless="study_pk, series_uid",
)
_FIND_SERIES = _Statement(
    "SELECT id FROM series WHERE study_pk = :study_pk AND series_uid = :series_uid"
)
_INSERT_INSTANCE = _insert(
    "instances",
    "series_pk study_pk trust sop_uid sop_class_uid instance_number transfer_syntax blob_key"
    " size number_of_frames rows columns bits_allocated pixel_tag pixel_vr pixel_offset"
    " pixel_length metadata created_at",
)
_COUNT_IN_SERIES = _Statement(
    "UPDATE series SET num_instances = num_instances + 1 WHERE id = :series_pk"
)
_COUNT_IN_STUDY = _Statement(
    "UPDATE studies SET num_instances = num_instances + 1,"
    " num_series = num_series + :added_series WHERE id = :study_pk"
)
_COUNT_IN_INDEX = _Statement(
    "UPDATE counters SET instances = instances + 1, bytes = bytes + :size WHERE id = 1"
)


def _row(record: InstanceRecord, now: float) -> dict[str, Any]:
    """The values of one record by column name: the parameters of every statement adding it."""
    h = record.header
    a = h.attributes
    pixel = h.pixel_data
    return {
        "trust": record.trust,
        "study_uid": h.study_uid,
        "series_uid": h.series_uid,
        "sop_uid": h.sop_uid,
        "sop_class_uid": h.sop_class_uid,
        "transfer_syntax": h.transfer_syntax,
        "blob_key": record.blob_key,
        "size": record.size,
        "number_of_frames": h.number_of_frames,
        # studies
        "patient_name": a.get("PatientName"),
        "patient_name_folded": normalise_name(a.get("PatientName")),
        "patient_id": a.get("PatientID"),
        "patient_birth_date": a.get("PatientBirthDate"),
        "patient_sex": a.get("PatientSex"),
        "study_date": a.get("StudyDate"),
        "study_time": a.get("StudyTime"),
        "accession_number": a.get("AccessionNumber"),
        "referring_physician_name": a.get("ReferringPhysicianName"),
        "referring_physician_folded": normalise_name(a.get("ReferringPhysicianName")),
        "study_id": a.get("StudyID"),
        "study_description": a.get("StudyDescription"),
        "study_json": h.metadata,
        # series
        "modality": a.get("Modality"),
        "series_number": a.get("SeriesNumber"),
        "series_description": a.get("SeriesDescription"),
        "pps_start_date": a.get("PerformedProcedureStepStartDate"),
        "pps_start_time": a.get("PerformedProcedureStepStartTime"),
        "series_json": h.metadata,
        # instances
        "instance_number": a.get("InstanceNumber"),
        "rows": a.get("Rows"),
        "columns": a.get("Columns"),
        "bits_allocated": a.get("BitsAllocated"),
        "pixel_tag": pixel.tag if pixel else None,
        "pixel_vr": pixel.vr if pixel else None,
        "pixel_offset": pixel.value_offset if pixel else None,
        "pixel_length": pixel.value_length if pixel else None,
        "metadata": h.metadata,
        "created_at": now,
    }


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
        row = _row(record, time.time())
        existing = _FIND_INSTANCE(conn, row).fetchone()
        if existing is not None:
            return AlreadyIndexed(*existing)
        _INSERT_STUDY(conn, row)
        (row["study_pk"],) = _FIND_STUDY(conn, row).fetchone()
        row["added_series"] = _INSERT_SERIES(conn, row).rowcount
        (row["series_pk"],) = _FIND_SERIES(conn, row).fetchone()
        _INSERT_INSTANCE(conn, row)
        # Counters for QIDO-RS computed attributes (PS3.4 C.3.4): kept here so that a
        # search never counts the instances of the studies it returns.
        _COUNT_IN_SERIES(conn, row)
        _COUNT_IN_STUDY(conn, row)
        _COUNT_IN_INDEX(conn, row)
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
