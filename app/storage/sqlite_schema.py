"""The SQLite index schema, its upgrade, and the name folding used for PN matching.

Indexes exist for every QIDO-RS matching key that can narrow a search on its own, and the
``*_order`` indexes match the result order of each level, so that a page of an unfiltered
or range search is read in index order without sorting every match (PS3.18 §10.6).
"""

from __future__ import annotations

import sqlite3
import unicodedata

from app.storage.sqlite_db import Migration, migrate, script

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    trust TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    patient_name TEXT,
    patient_name_folded TEXT,
    patient_id TEXT,
    patient_birth_date TEXT,
    patient_sex TEXT,
    study_date TEXT,
    study_time TEXT,
    accession_number TEXT,
    referring_physician_name TEXT,
    referring_physician_folded TEXT,
    study_id TEXT,
    study_description TEXT,
    study_json BLOB NOT NULL,
    created_at REAL NOT NULL,
    num_series INTEGER NOT NULL DEFAULT 0,
    num_instances INTEGER NOT NULL DEFAULT 0,
    UNIQUE (trust, study_uid)
);
CREATE INDEX IF NOT EXISTS studies_patient_id ON studies (trust, patient_id);
CREATE INDEX IF NOT EXISTS studies_accession ON studies (trust, accession_number);
CREATE INDEX IF NOT EXISTS studies_name ON studies (trust, patient_name_folded);

CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    study_pk INTEGER NOT NULL REFERENCES studies (id),
    trust TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    modality TEXT,
    series_number INTEGER,
    series_description TEXT,
    pps_start_date TEXT,
    pps_start_time TEXT,
    series_json BLOB NOT NULL,
    created_at REAL NOT NULL,
    num_instances INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_pk, series_uid)
);
CREATE INDEX IF NOT EXISTS series_uid ON series (trust, series_uid);
CREATE INDEX IF NOT EXISTS series_modality ON series (trust, modality, study_pk);

CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    series_pk INTEGER NOT NULL REFERENCES series (id),
    study_pk INTEGER NOT NULL REFERENCES studies (id),
    trust TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    instance_number INTEGER,
    transfer_syntax TEXT NOT NULL,
    blob_key TEXT NOT NULL,
    size INTEGER NOT NULL,
    number_of_frames INTEGER NOT NULL,
    rows INTEGER,
    columns INTEGER,
    bits_allocated INTEGER,
    pixel_tag INTEGER,
    pixel_vr TEXT,
    pixel_offset INTEGER,
    pixel_length INTEGER,
    metadata BLOB NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (trust, sop_uid)
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_pk, instance_number);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_pk);
CREATE INDEX IF NOT EXISTS instances_class ON instances (trust, sop_class_uid);

CREATE TABLE IF NOT EXISTS counters (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    instances INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (id, instances, bytes) VALUES (1, 0, 0);
"""

#: Indexes for QIDO-RS; created after the counters so that older databases get them too.
SEARCH_INDEXES = """
DROP INDEX IF EXISTS studies_date;
CREATE INDEX IF NOT EXISTS studies_order ON studies (trust, study_date, study_time);
CREATE INDEX IF NOT EXISTS studies_study_id ON studies (trust, study_id);
CREATE INDEX IF NOT EXISTS studies_referring ON studies (trust, referring_physician_folded);
CREATE INDEX IF NOT EXISTS series_order ON series (trust, study_pk, series_number);
CREATE INDEX IF NOT EXISTS instances_order ON instances (trust, series_pk, instance_number);
"""

#: Counters kept per study and series since QIDO-RS, backfilled for older databases.
_COUNTER_UPGRADE = """
ALTER TABLE studies ADD COLUMN num_series INTEGER NOT NULL DEFAULT 0;
ALTER TABLE studies ADD COLUMN num_instances INTEGER NOT NULL DEFAULT 0;
ALTER TABLE series ADD COLUMN num_instances INTEGER NOT NULL DEFAULT 0;
UPDATE series SET num_instances = (SELECT COUNT(*) FROM instances WHERE series_pk = series.id);
UPDATE studies SET
    num_series = (SELECT COUNT(*) FROM series WHERE study_pk = studies.id),
    num_instances = (SELECT COUNT(*) FROM instances WHERE study_pk = studies.id);
"""

_create_tables = script(SCHEMA)
_add_counters = script(_COUNTER_UPGRADE)
_create_search_indexes = script(SEARCH_INDEXES)


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}


def _version_1(conn: sqlite3.Connection) -> None:
    """The schema of ``SCHEMA`` and ``SEARCH_INDEXES``: made new, or reached from a database
    made before the schema had a version. Those are told apart by their columns, here only:
    once a database has a version, its version says what it holds."""
    _create_tables(conn)
    if "num_series" not in _columns(conn, "studies"):
        _add_counters(conn)
    # Each stored instance's SHA-256 was kept only to tell a retried store from a conflicting
    # one; the two blobs are compared instead, so ingest no longer hashes every byte.
    if "sha256" in _columns(conn, "instances"):
        conn.execute("ALTER TABLE instances DROP COLUMN sha256")
    _create_search_indexes(conn)


#: The index's schema versions in order (``PRAGMA user_version``); a change is a new step at
#: the end, never an edit of one a database may already have.
MIGRATIONS: tuple[Migration, ...] = (_version_1,)


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring a database made by an earlier version up to date."""
    migrate(conn, MIGRATIONS)


def normalise_name(value: object) -> str | None:
    """Fold a person name for fuzzy matching: case- and accent-insensitive (PS3.18 §8.3.4)."""
    if value is None:
        return None
    text = unicodedata.normalize("NFKD", str(value))
    return "".join(c for c in text if not unicodedata.combining(c)).casefold()


def caseless_name(value: object) -> str | None:
    """Fold case only, keeping accents: literal PN matching (PS3.4 C.2.2.2.1).

    Composed (NFC), so that an accented letter stays one character for a ``?`` wildcard.
    """
    if value is None:
        return None
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", str(value)).casefold())
