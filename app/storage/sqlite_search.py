"""QIDO-RS queries against the SQLite index (PS3.18 §10.6)."""

from __future__ import annotations

import sqlite3

from app.dicom.query import Query, QueryResult


def run_search(conn: sqlite3.Connection, trust: str, query: Query) -> QueryResult:
    raise NotImplementedError("QIDO-RS search is not built yet")
