"""Engine behaviour the store relies on."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event, text

from gateway import db


def test_reads_after_a_write_do_not_take_the_sqlite_write_lock(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'lock.sqlite'}")
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *args: statements.append(statement))
    for _ in range(3):
        with db.write_tx(engine) as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        statements.clear()
        with db.read_tx(engine) as conn:
            conn.execute(text("SELECT 1"))
        assert "BEGIN DEFERRED" in statements
        assert "BEGIN IMMEDIATE" not in statements
    engine.dispose()


def test_a_write_still_takes_the_lock_up_front(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'lock.sqlite'}")
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *args: statements.append(statement))
    with db.read_tx(engine) as conn:
        conn.execute(text("SELECT 1"))
    with db.write_tx(engine) as conn:
        conn.execute(text("SELECT 1"))
    assert statements.count("BEGIN IMMEDIATE") == 1
    engine.dispose()
