"""Schema versions of the SQLite stores: ``PRAGMA user_version`` and ordered migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from app.crypto.sqlcipher import connect
from app.storage import sqlite_schema, sqlite_security
from app.storage.sqlite_db import migrate, schema_version, script, statements
from app.storage.sqlite_index import SQLiteMetadataIndex
from app.storage.sqlite_security import SQLiteSecurityStore
from app.transfer import state
from app.transfer.state import SQLiteUploadState


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_statements_end_at_semicolons_outside_strings_and_triggers() -> None:
    sql = """
    CREATE TABLE t (a TEXT DEFAULT ';');
    INSERT INTO t VALUES ('x;y');
    CREATE TRIGGER t_added AFTER INSERT ON t BEGIN UPDATE t SET a = a || ';'; END;
    """
    assert [s.split()[0] for s in statements(sql)] == ["CREATE", "INSERT", "CREATE"]
    with pytest.raises(ValueError, match="unterminated"):
        statements("CREATE TABLE t (a); CREATE TABLE u (b)")


def test_each_missing_step_runs_once(tmp_path: Path) -> None:
    conn = connect(tmp_path / "db.sqlite3", None)
    steps = [script("CREATE TABLE a (x);"), script("INSERT INTO a VALUES (1);")]
    migrate(conn, steps[:1])
    assert schema_version(conn) == 1 and conn.execute("SELECT COUNT(*) FROM a").fetchone()[0] == 0
    migrate(conn, steps)
    migrate(conn, steps)
    assert schema_version(conn) == 2 and conn.execute("SELECT COUNT(*) FROM a").fetchone()[0] == 1
    conn.close()


def test_a_failing_step_leaves_the_database_at_the_version_before_it(tmp_path: Path) -> None:
    conn = connect(tmp_path / "db.sqlite3", None)
    first = script("CREATE TABLE a (x);")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        migrate(conn, [first, script("CREATE TABLE b (y); INSERT INTO missing VALUES (1);")])
    assert schema_version(conn) == 1 and _tables(conn) == {"a"}
    migrate(conn, [first, script("CREATE TABLE b (y);")])
    assert schema_version(conn) == 2 and _tables(conn) == {"a", "b"}
    conn.close()


async def test_new_stores_record_their_latest_version(tmp_path: Path) -> None:
    index = SQLiteMetadataIndex(tmp_path / "index.sqlite3")
    uploads = SQLiteUploadState(tmp_path / "uploads.sqlite3")
    security = SQLiteSecurityStore(tmp_path / "security.sqlite3")
    for store in (index, uploads, security):
        await store.open()
        await store.close()
    for name, latest in (
        ("index.sqlite3", len(sqlite_schema.MIGRATIONS)),
        ("uploads.sqlite3", len(state.MIGRATIONS)),
        ("security.sqlite3", len(sqlite_security.MIGRATIONS)),
    ):
        conn = sqlite3.connect(tmp_path / name)
        assert schema_version(conn) == latest, name
        conn.close()


async def test_upload_state_from_before_versions_gains_the_actor_column(tmp_path: Path) -> None:
    path = tmp_path / "uploads.sqlite3"
    with sqlite3.connect(path) as conn:  # uploads did not record who made them
        conn.executescript(state.SCHEMA.replace(",\n    actor TEXT\n", "\n"))
        assert "actor" not in {r[1] for r in conn.execute("PRAGMA table_info(uploads)")}
    conn.close()
    uploads = SQLiteUploadState(path)
    await uploads.open()
    await uploads.close()
    with sqlite3.connect(path) as conn:
        assert "actor" in {r[1] for r in conn.execute("PRAGMA table_info(uploads)")}
        assert schema_version(conn) == 1
    conn.close()
