"""The SQLite index schema and the name folding used for fuzzy matching."""

from __future__ import annotations

import unicodedata

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
    UNIQUE (trust, study_uid)
);
CREATE INDEX IF NOT EXISTS studies_date ON studies (trust, study_date);
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
    sha256 TEXT NOT NULL,
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


def normalise_name(value: object) -> str | None:
    """Fold a person name for fuzzy matching: case- and accent-insensitive (PS3.18 §8.3.4.6)."""
    if value is None:
        return None
    text = unicodedata.normalize("NFKD", str(value))
    return "".join(c for c in text if not unicodedata.combining(c)).casefold()
