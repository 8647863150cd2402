"""Engine behaviour the store relies on."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from sqlalchemy import bindparam, event, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from gateway import db
from tests.conftest import sql_run


def test_reads_after_a_write_do_not_take_the_sqlite_write_lock(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'lock.sqlite'}")
    with sql_run(engine) as statements:
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
    with sql_run(engine) as statements:
        with db.read_tx(engine) as conn:
            conn.execute(text("SELECT 1"))
        with db.write_tx(engine) as conn:
            conn.execute(text("SELECT 1"))
    assert statements.count("BEGIN IMMEDIATE") == 1
    engine.dispose()


def _observation(i: int) -> dict:
    return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/p{i % 50}"},
            "category": [{"coding": [{"code": "laboratory"}]}], "code": {"text": "x"},
            "effectiveDateTime": f"20{10 + i % 15}-01-01"}


def test_statistics_follow_the_store_as_it_grows(tmp_path: Path) -> None:
    """Statistics taken on an empty store made SQLite answer a patient's dated search by walking
    every date row of the type; after growth the analyzer refreshes them and the date probe goes
    through the resource key."""
    from sqlalchemy import select

    from gateway.fhir.search import SearchBuilder, _base_conditions, _shape_of
    from gateway.fhir.store import FhirStore

    engine = db.make_engine(f"sqlite:///{tmp_path / 'grow.sqlite'}")
    db.upgrade(engine)
    analyzer = db.Analyzer(engine, min_rows=1000, growth=0.25)
    assert analyzer.check()  # the first look always analyses: here, an empty store
    assert not analyzer.check()
    store = FhirStore(engine)
    with store.writing() as repo:
        for i in range(1500):
            repo.create(_observation(i), check=False)
    assert analyzer.check()

    with store.reading() as repo:
        query = SearchBuilder(repo, "Observation").parse(
            [("patient", "p1"), ("category", "laboratory"), ("date", "ge2015-01-01")])
        stmt = select(db.resource.c.pk).where(
            *_base_conditions("Observation", _shape_of(query), None, False)).params(query.values())
        sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
        plan = " | ".join(str(row[-1]) for row in repo.conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
    assert "sp_date USING INDEX ix_sp_date_pk" in plan, plan
    engine.dispose()


def test_analyzer_waits_for_real_growth() -> None:
    analyzer = db.Analyzer(None, interval=600, min_rows=1000, growth=0.25)  # type: ignore[arg-type]
    assert analyzer.due(0, 0.0)
    analyzer._analysed_rows, analyzer._analysed_at = 20_000, 0.0
    assert not analyzer.due(24_000, 10.0)  # grown by a fifth
    assert analyzer.due(25_000, 10.0)  # by a quarter
    assert analyzer.due(20_000, 700.0)  # the interval passed


def test_writers_queue_on_the_gate_across_threads(tmp_path: Path) -> None:
    import threading
    import time

    engine = db.make_engine(f"sqlite:///{tmp_path / 'gate.sqlite'}")
    with db.write_tx(engine) as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    inside: list[int] = []
    overlap: list[int] = []

    def writer(n: int) -> None:
        for _ in range(20):
            with db.write_tx(engine) as conn:
                inside.append(n)
                if len(inside) > 1:
                    overlap.append(n)
                conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": n})
                time.sleep(0.001)
                inside.remove(n)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.read_tx(engine) as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 80
    assert overlap == []
    assert Path(str(tmp_path / "gate.sqlite") + ".writer-lock").exists()
    engine.dispose()


def test_a_write_that_need_not_be_durable_skips_only_its_own_flush(store: Any) -> None:
    engine = store.engine

    def level(conn: Any) -> str:
        if db.is_postgres(conn):
            return str(conn.exec_driver_sql("SHOW synchronous_commit").scalar_one())
        return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[conn.exec_driver_sql("PRAGMA synchronous").scalar_one()]

    if db.is_postgres(engine):
        # The level only matters to the COMMIT, and is set just before it, in its round trip: a
        # statement run at the commit, after it, writes down the level the COMMIT then ran under.
        with db.write_tx(engine) as conn:
            conn.execute(text("CREATE TABLE commit_level (durable BOOLEAN, level TEXT)"))
        note = db.Prepared(text("INSERT INTO commit_level VALUES (:durable, current_setting('synchronous_commit'))"))
        try:
            for durable in (False, True):
                with db.write_tx(engine, durable=durable) as conn:
                    db.at_commit(conn, note, {"durable": durable})
                    assert level(conn) == "on"  # not yet
            with db.read_tx(engine) as conn:
                assert dict(conn.execute(text("SELECT durable, level FROM commit_level")).all()) == {
                    False: "off", True: "on"}
                assert level(conn) == "on"
        finally:
            with db.write_tx(engine) as conn:
                conn.execute(text("DROP TABLE commit_level"))
        return
    with db.write_tx(engine, durable=False) as conn:
        assert level(conn) == "NORMAL"
    with db.write_tx(engine) as conn:
        # the commit itself is NORMAL, and write_tx returns after a flush of the WAL that began
        # after it (group commit, see the next test)
        assert level(conn) == "NORMAL"
    with db.read_tx(engine) as conn:
        assert level(conn) == "FULL"


def test_a_durable_sqlite_write_returns_only_after_a_flush_of_the_log_begun_after_its_commit(
        tmp_path: Path, monkeypatch: Any) -> None:
    import os
    import threading

    path = tmp_path / "group.sqlite"
    engine = db.make_engine(f"sqlite:///{path}")
    with db.write_tx(engine) as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    events: list[tuple[str, Any]] = []
    lock = threading.Lock()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        with lock:
            events.append(("flush-start", os.readlink(f"/proc/self/fd/{fd}")))
        real_fdatasync(fd)
        with lock:
            events.append(("flush-end", None))

    monkeypatch.setattr(db.os, "fdatasync", fdatasync)
    event.listen(engine, "commit", lambda conn: events.append(("commit", threading.get_ident())))

    with db.write_tx(engine, durable=False) as conn:
        conn.execute(text("INSERT INTO t VALUES (0)"))
    assert [e for e, _ in events] == ["commit"]  # nobody was promised this one: no flush
    events.clear()

    def writer(n: int) -> None:
        for i in range(15):
            with db.write_tx(engine) as conn:
                conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": n * 100 + i})
            with lock:
                events.append(("returned", threading.get_ident()))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kinds = [e for e, _ in events]
    assert kinds.count("commit") == kinds.count("returned") == 60
    assert {target for e, target in events if e == "flush-start"} == {str(path) + "-wal"}
    # every writer's return is preceded by a flush that started after its own commit and has ended
    for index, (kind, who) in enumerate(events):
        if kind != "returned":
            continue
        commit = max(i for i, (k, w) in enumerate(events[:index]) if k == "commit" and w == who)
        starts = [i for i, (k, _) in enumerate(events[commit:index], commit) if k == "flush-start"]
        assert starts, f"write returned at {index} without a flush after its commit at {commit}"
        assert any(k == "flush-end" for k, _ in events[starts[0]:index])
    # flushes are shared: never more than commits, usually fewer
    assert 1 <= kinds.count("flush-start") <= 60
    with db.read_tx(engine) as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 61
    engine.dispose()


def test_checkpoints_run_on_a_thread_of_their_own_not_in_the_commits(tmp_path: Path) -> None:
    """Durable commits leave checkpoints to WalSync's thread (SQLite's own automatic checkpoint only
    bounds the log); a database whose commits are not group-committed keeps SQLite's default."""
    path = tmp_path / "checkpoints.sqlite"
    engine = db.make_engine(f"sqlite:///{path}")
    with db.write_tx(engine) as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER, pad TEXT)"))
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == db.SAFETY_AUTOCHECKPOINT
    sync = db._wal_sync(engine)
    size_before = path.stat().st_size
    for i in range(db.CHECKPOINT_EVERY * 2):
        with db.write_tx(engine) as conn:
            conn.execute(text("INSERT INTO t VALUES (:x, :pad)"), {"x": i, "pad": "p" * 3000})
    deadline = time.monotonic() + 10
    while sync.checkpoints < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sync.checkpoints >= 1
    # the rows reached the database file, which only a checkpoint writes
    assert path.stat().st_size > size_before + 3000 * db.CHECKPOINT_EVERY
    engine.dispose()

    relaxed = db.make_engine(f"sqlite:///{tmp_path / 'normal.sqlite'}", "NORMAL")
    with db.write_tx(relaxed) as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == 1000
    relaxed.dispose()


def test_sqlite_keeps_its_temporary_storage_in_memory(tmp_path: Path) -> None:
    """Statement journals and sorts make no temporary files (see make_engine)."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'temp.sqlite'}")
    with db.write_tx(engine) as conn:
        assert conn.exec_driver_sql("PRAGMA temp_store").scalar_one() == 2  # MEMORY
    engine.dispose()


def test_a_log_that_grows_fast_is_checkpointed_before_its_count_of_flushes(tmp_path: Path) -> None:
    """Large commits (messages with embedded PDFs) are checkpointed by the log's growth, not only
    every CHECKPOINT_EVERY flushes: 40 commits of 1 MB kept the log to a few MB, where waiting for
    32 flushes let it reach 32 MB or more (a small disk ran full)."""
    path = tmp_path / "growth.sqlite"
    wal = Path(str(path) + "-wal")
    engine = db.make_engine(f"sqlite:///{path}")
    with db.write_tx(engine) as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER, pad BLOB)"))
    sync = db._wal_sync(engine)
    largest = 0
    for i in range(40):
        with db.write_tx(engine) as conn:
            conn.execute(text("INSERT INTO t VALUES (:x, :pad)"), {"x": i, "pad": os.urandom(1024 * 1024)})
        largest = max(largest, wal.stat().st_size)
        if i == 7:  # far fewer flushes than CHECKPOINT_EVERY, 8 MB of log
            deadline = time.monotonic() + 10
            while sync.checkpoints < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert sync.checkpoints >= 1
    assert largest < 20 * 1024 * 1024, largest
    engine.dispose()


def test_tasks_stored_before_task_joined_the_compartment_are_indexed_by_the_migration(tmp_path: Path) -> None:
    from sqlalchemy import delete

    from gateway.fhir.store import FhirStore

    engine = db.make_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    db.upgrade(engine, "0006")
    store = FhirStore(engine)
    with store.writing() as repo:
        task = repo.create({"resourceType": "Task", "status": "requested", "intent": "order",
                            "for": {"reference": "Patient/p1"}}).stored
        repo.create({"resourceType": "Task", "status": "requested", "intent": "order"})
    with engine.begin() as conn:  # as a store before Task was in the patient compartment left it
        conn.execute(delete(db.compartment).where(db.compartment.c.resource_type == "Task"))
    db.upgrade(engine)
    with engine.connect() as conn:
        rows = conn.execute(select(db.compartment.c.resource_pk, db.compartment.c.patient_id)).all()
    assert [(r.resource_pk, r.patient_id) for r in rows] == [(task.pk, "p1")]
    engine.dispose()


def test_the_id_token_rows_of_earlier_versions_are_dropped_by_the_migration_and_id_search_still_finds(
        tmp_path: Path) -> None:
    from sqlalchemy import insert

    from gateway.fhir.search import search
    from gateway.fhir.store import FhirStore

    engine = db.make_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    db.upgrade(engine, "0009")
    store = FhirStore(engine)
    with store.writing() as repo:
        patient = repo.create({"resourceType": "Patient", "gender": "female"}).stored
    with engine.begin() as conn:  # the row an earlier version wrote for every resource
        conn.execute(insert(db.sp_token).values(resource_pk=patient.pk, resource_type="Patient", param="_id",
                                                system=None, code=patient.id, text=None))
    def params() -> set[str]:
        with engine.connect() as conn:
            return set(conn.execute(select(db.sp_token.c.param).where(db.sp_token.c.resource_pk == patient.pk))
                       .scalars())

    assert "_id" in params()
    db.upgrade(engine)
    assert "_id" not in params() and "gender" in params()
    with store.reading() as repo:
        _, result = search(repo, "Patient", [("_id", patient.id)])
    assert [e.id for e in result.matches] == [patient.id]
    engine.dispose()


def test_the_migrations_build_exactly_the_tables_the_code_declares(database_url: str) -> None:
    """Every table, column and index the code's metadata declares comes from a migration, and the
    migrations make nothing the code does not know of (both databases)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import gateway.admin.models
    import gateway.portal.models
    import gateway.smart_auth.models
    from gateway import db

    assert gateway.admin.models and gateway.portal.models and gateway.smart_auth.models  # all tables declared

    engine = db.make_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = [d for d in compare_metadata(context, db.metadata)
                    if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name == "alembic_version")]
    finally:
        engine.dispose()
    assert diff == []


def test_unavailable_tells_a_database_that_cannot_work_from_a_statement_that_failed() -> None:
    import sqlite3

    import psycopg
    from sqlalchemy.exc import IntegrityError, OperationalError

    def sqlite_error(message: str, code: int) -> OperationalError:
        error = sqlite3.OperationalError(message)
        error.sqlite_errorcode = code  # type: ignore[attr-defined]
        return OperationalError("INSERT ...", {}, error)

    assert db.unavailable(sqlite_error("database or disk is full", 13)) == "full"
    assert db.unavailable(sqlite_error("disk I/O error", 10 | (3 << 8))) == "unreachable"  # SQLITE_IOERR_WRITE
    assert db.unavailable(sqlite_error("no such table: nope", 1)) is None
    assert db.unavailable(OperationalError("SELECT 1", {}, psycopg.OperationalError("connection failed"))) \
        == "unreachable"
    assert db.unavailable(OperationalError("INSERT", {}, psycopg.errors.DiskFull("no space left"))) == "full"
    assert db.unavailable(OperationalError("SELECT 1", {}, psycopg.errors.AdminShutdown("shutting down"))) \
        == "unreachable"
    assert db.unavailable(OperationalError("UPDATE", {}, psycopg.errors.DeadlockDetected("deadlock"))) is None
    assert db.unavailable(IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("dup"))) is None
    assert db.unavailable(ValueError("not a database error")) is None


def test_postgresql_prepares_what_runs_often_and_plans_every_run_with_its_own_values(database_url: str) -> None:
    """A statement that has run five times on a connection is prepared (parsed once), but each run
    is still planned with its values: a generic plan, made once for any values, drove a patient's
    search from its most common token (every laboratory result in the store)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("prepared statements are PostgreSQL's")
    engine = db.make_engine(database_url)
    try:
        with db.read_tx(engine) as conn:
            for n in range(10):
                conn.execute(select(db.resource.c.pk).where(db.resource.c.version_id == n)).all()
            prepared = conn.exec_driver_sql(
                "SELECT name FROM pg_prepared_statements WHERE strpos(statement, 'version_id') > 0").scalars().all()
            assert len(prepared) == 1
            plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN EXECUTE {prepared[0]}(7)").scalars())
        assert "version_id = 7" in plan and "$1" not in plan, plan
    finally:
        engine.dispose()


def test_a_statement_prepared_on_a_small_table_still_finds_rows_by_index_once_it_has_grown(
        database_url: str) -> None:
    """A prepared statement planned once for any values (a generic plan) keeps that plan until the
    table is analyzed again. A plan made while an index table held a page of rows read the whole
    table for every lookup once it had grown (autovacuum is off on this machine): an HL7 benchmark
    fell from 120 to 30 messages/s as its store grew to 55,000 messages. So a prepared statement is
    still planned with its values on every run: once the table has grown, from the index."""
    from sqlalchemy import BigInteger, Column, Index, MetaData, Table

    if not database_url.startswith("postgresql"):
        pytest.skip("prepared statements are PostgreSQL's")
    name = f"plan_growth_{os.getpid()}"
    scratch = Table(name, MetaData(), Column("n", BigInteger, primary_key=True), Column("k", BigInteger),
                    Index(f"ix_{name}_k", "k"))
    engine = db.make_engine(database_url)
    by_key = db.Prepared(select(scratch.c.n).where(scratch.c.k == bindparam("k")))
    scratch.create(engine)
    try:
        with db.write_tx(engine) as conn:
            conn.exec_driver_sql(f"INSERT INTO {name} SELECT n, n FROM generate_series(1, 20) AS n")
            conn.exec_driver_sql(f"ANALYZE {name}")  # a page of rows: reading it all is the cheapest plan
            for k in range(20):  # prepared, and planned often enough for PostgreSQL to try a generic plan
                by_key.first(conn, {"k": k})
            conn.exec_driver_sql(f"INSERT INTO {name} SELECT n, mod(n, 1000) FROM generate_series(21, 50000) AS n")
            assert len(by_key.rows(conn, {"k": 432})) == 50
            statement = conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalar_one()
            plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN EXECUTE {statement}(432)").scalars())
        assert "Index" in plan and "Seq Scan" not in plan, plan
    finally:
        scratch.drop(engine)
        engine.dispose()


def test_closed_services_leave_no_connection_open(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A web app's first request starts an ANALYZE in a thread of its own, the audit writer and the
    metrics thread write on their own: after close() none of them holds a connection to the
    database (left to garbage collection, such connections exhausted PostgreSQL's 100 in test runs)."""
    import psycopg

    from gateway import create_app

    if not settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite has no server-side connections to count")
    analyze, analysed = db.analyze, threading.Event()

    def slow_analyze(engine: Any) -> None:  # still running when the test closes the services
        time.sleep(0.5)
        analyze(engine)
        analysed.set()

    monkeypatch.setattr(db, "analyze", slow_analyze)
    tag = f"close-test-{os.getpid()}"  # only this app's connections count: earlier tests' may await collection
    settings.database_url += f"?application_name={tag}"
    app = create_app(settings)
    client = app.test_client()
    created = client.post("/fhir/Patient", json={"resourceType": "Patient"},
                          headers={"Content-Type": "application/fhir+json"})
    client.get(f"/fhir/Patient/{created.get_json()['id']}")
    app.extensions["gateway"].close()
    assert analysed.wait(5)
    # A backend leaves pg_stat_activity a moment after its client hangs up; one still there after
    # seconds is a connection left open.
    deadline = time.monotonic() + 5
    with psycopg.connect(settings.database_url.split("?")[0], autocommit=True) as conn:
        while True:
            left = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                (tag,)).fetchone()
            if left == (0,) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert left == (0,)


def test_prepared_statements_give_what_sqlalchemy_gives(database_url: str) -> None:
    """db.Prepared runs on SQLite's driver (and through SQLAlchemy elsewhere): the same rows, bound
    values through the column types (a Boolean), several rows at once, a RETURNING."""
    from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table, bindparam, insert

    engine = db.make_engine(database_url)
    meta = MetaData()
    table = Table(f"prepared_{os.getpid()}_{time.monotonic_ns()}", meta, Column("pk", Integer, primary_key=True),
                  Column("name", String(20), unique=True), Column("flag", Boolean))
    meta.create_all(engine)
    try:
        add = db.Prepared(insert(table).values(name=bindparam("name"), flag=bindparam("flag")).returning(table.c.pk))
        named = db.Prepared(select(table.c.name, table.c.flag).where(table.c.name == bindparam("name")))
        with db.write_tx(engine) as conn:
            pk = add.rows(conn, {"name": "a", "flag": True})[0][0]
            assert db.Prepared(insert(table).values(name=bindparam("name"), flag=bindparam("flag"))).execute(
                conn, [{"name": "b", "flag": False}, {"name": "c", "flag": None}]) == 2
            name, flag = named.first(conn, {"name": "a"})
            assert name == "a" and flag  # SQLite gives 1, PostgreSQL True
            assert named.first(conn, {"name": "zz"}) is None
            everything = select(table.c.pk, table.c.name, table.c.flag).order_by(table.c.pk)
            expected = [tuple(r) for r in conn.execute(everything)]
            got = db.Prepared(everything).rows(conn, {})
        assert [row[:2] for row in got] == [row[:2] for row in expected] == [(pk, "a"), (pk + 1, "b"), (pk + 2, "c")]
        assert type(got[0]) is tuple  # from the driver itself (SQLAlchemy's would be its Row)
        assert [bool(row[2]) if row[2] is not None else None for row in got] == [True, False, None]
        # a value the statement needs and was not given
        with pytest.raises(SQLAlchemyError, match="A value is required"), db.read_tx(engine) as conn:
            named.rows(conn, {})
        # raised as SQLAlchemy's, as conn.execute would
        with pytest.raises(IntegrityError), db.write_tx(engine) as conn:
            add.rows(conn, {"name": "a", "flag": False})
        # other events of the engine (the revocation reader listens to engine_disposed) leave the
        # statements on the driver
        event.listen(engine, "engine_disposed", lambda _engine: None)
        with db.read_tx(engine) as conn:
            assert type(named.first(conn, {"name": "a"})) is tuple
        # where SQLAlchemy's statement events are listened to, PostgreSQL's go through SQLAlchemy
        # (tests see the SQL); the same rows either way
        seen: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda _c, _cur, statement, *_: seen.append(statement))
        with db.read_tx(engine) as conn:
            assert [row[:2] for row in db.Prepared(everything).rows(conn, {})] == [row[:2] for row in got]
            assert named.first(conn, {"name": "b"})[0] == "b"
        assert len(seen) == (0 if engine.dialect.name == "sqlite" else 2)
    finally:
        meta.drop_all(engine)
        engine.dispose()


class _Names(NamedTuple):
    engine: Any
    table: Any
    add: db.Prepared  # inserts {"name": ...}
    names: Callable[[], list[str]]  # the names stored, in the order they came


@pytest.fixture
def names_table(database_url: str) -> Iterator[_Names]:
    """A table of unique names of its own on a fresh engine, dropped afterwards."""
    from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, insert

    engine = db.make_engine(database_url)
    meta = MetaData()
    table = Table(f"names_{os.getpid()}_{time.monotonic_ns()}", meta, Column("pk", Integer, primary_key=True),
                  Column("name", String(20), unique=True))
    meta.create_all(engine)

    def names() -> list[str]:
        with db.read_tx(engine) as conn:
            return list(conn.execute(select(table.c.name).order_by(table.c.pk)).scalars())

    try:
        yield _Names(engine, table, db.Prepared(insert(table).values(name=bindparam("name"))), names)
    finally:
        meta.drop_all(engine)
        engine.dispose()


def test_a_transaction_begun_by_its_first_statements_sent_together_is_still_one_transaction(
        names_table: _Names) -> None:
    """On PostgreSQL a write_tx's BEGIN goes with the statements of a first pipeline block (one round
    trip, not two): psycopg's autocommit is on meanwhile, so that it sends no BEGIN of its own. What
    follows, through SQLAlchemy or not, is in that transaction; a failure or an exception takes all of
    it back; and no connection goes back to the pool with autocommit on."""
    from sqlalchemy import event, insert

    engine, table, add, names = names_table
    pooled_in_autocommit: list[bool] = []
    event.listen(engine, "checkin", lambda dbapi_conn, _: pooled_in_autocommit.append(
        bool(getattr(dbapi_conn, "autocommit", False)) if db.is_postgres(engine) else False))
    with pytest.raises(RuntimeError, match="changed my mind"), db.write_tx(engine) as conn:
        with db.pipeline(conn):
            add.execute(conn, {"name": "a"})
        conn.execute(insert(table).values(name="b"))
        assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 2
        raise RuntimeError("changed my mind")
    assert names() == []
    with pytest.raises(IntegrityError), db.write_tx(engine) as conn:
        with db.pipeline(conn):
            add.execute(conn, {"name": "c"})
        add.execute(conn, {"name": "d"})
        conn.execute(insert(table).values(name="c"))  # taken, by the first statement
    assert names() == []
    with db.write_tx(engine, durable=False) as conn:
        with db.pipeline(conn):
            add.execute(conn, {"name": "e"})
        db.at_commit(conn, add, {"name": "f"})
    with db.write_tx(engine) as conn:  # statements one at a time: psycopg's own BEGIN, as before
        add.execute(conn, {"name": "g"})
        with db.pipeline(conn):
            add.execute(conn, {"name": "h"})
    assert names() == ["e", "f", "g", "h"]
    assert pooled_in_autocommit and not any(pooled_in_autocommit)


def test_statements_sent_together_run_in_order_and_fail_as_sqlalchemys(names_table: _Names) -> None:
    """db.pipeline and db.at_commit (on PostgreSQL several statements to a round trip; on SQLite each
    runs at once): rows read after the block; statements at the commit run in order just before
    it; a failure among them is SQLAlchemy's IntegrityError, and nothing of that transaction stays."""
    from sqlalchemy import bindparam

    engine, table, add, names = names_table
    counted = db.Prepared(select(func.count()).select_from(table).where(table.c.name == bindparam("name")))
    with db.write_tx(engine) as conn:
        with db.pipeline(conn):
            add.execute(conn, {"name": "a"})
            answer = counted.send(conn, {"name": "a"})
        assert answer.fetchall() == [(1,)]
        db.at_commit(conn, add, [{"name": "b"}, {"name": "c"}])
        db.at_commit(conn, add, {"name": "d"})
        assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 1  # not yet
    assert names() == ["a", "b", "c", "d"]
    with pytest.raises(IntegrityError), db.write_tx(engine) as conn:
        add.execute(conn, {"name": "e"})
        db.at_commit(conn, add, {"name": "a"})  # taken
        db.at_commit(conn, add, {"name": "f"})
    with pytest.raises(IntegrityError), db.write_tx(engine, durable=False) as conn, db.pipeline(conn):
        add.execute(conn, {"name": "a"})
        add.execute(conn, {"name": "g"})
    assert names() == ["a", "b", "c", "d"]
    with db.write_tx(engine, durable=False) as conn:  # the connections are fine afterwards
        db.at_commit(conn, add, {"name": "h"})
    assert names() == ["a", "b", "c", "d", "h"]
    with pytest.raises(RuntimeError, match="write_tx"), db.read_tx(engine) as conn:
        db.at_commit(conn, add, {"name": "x"})


def test_a_begin_that_cannot_get_the_lock_raises_sqlalchemys_error(tmp_path: Path) -> None:
    """BEGIN goes to SQLite's driver directly; its failure is still SQLAlchemy's OperationalError,
    which db.unavailable() and the callers' handlers read."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    path = tmp_path / "locked.sqlite"
    engine = db.make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with engine.connect() as conn:
            conn.connection.driver_connection.execute("PRAGMA busy_timeout=0")
            conn.info["write"] = True
            with pytest.raises(OperationalError, match="locked"):
                conn.begin()
            conn.info.pop("write")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()


def test_a_pooled_postgresql_connection_cut_while_idle_is_replaced(database_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that sat in the pool is pinged before use, and replaced when the server cut it;
    one returned a moment ago is not pinged (no round trip per transaction), and when it turns out
    to be cut, its statement fails as "unreachable" (the caller says try again) and the pool
    connects anew for the next transaction."""
    import psycopg

    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has no server connection to lose")
    engine = db.make_engine(database_url)

    def cut_pooled() -> None:
        with engine.connect() as conn:
            backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        time.sleep(0.2)

    try:
        cut_pooled()
        monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.0)  # it has sat long enough: pinged, replaced
        with db.read_tx(engine) as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
        monkeypatch.setattr(db, "PING_AFTER_IDLE", 3600.0)  # in use a moment ago: not pinged
        # through SQLAlchemy, and on the driver (db.Prepared, as the HL7 feed's statements run)
        on_driver = db.Prepared(select(func.pg_backend_pid()))
        for run in (lambda conn: conn.execute(text("SELECT 1")), lambda conn: on_driver.rows(conn, {})):
            cut_pooled()
            with pytest.raises(DBAPIError) as failed, db.read_tx(engine) as conn:
                run(conn)
            assert db.unavailable(failed.value) == "unreachable"
            with db.read_tx(engine) as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
                assert on_driver.rows(conn, {})[0][0] > 0
    finally:
        engine.dispose()


def test_current_rows_name_the_resource_table_columns_in_order() -> None:
    """Rows read on SQLite's driver become CurrentRow by position: the two must not drift apart."""
    from gateway.fhir.store import RESOURCE_COLUMNS, CurrentRow

    assert tuple(column.name for column in db.resource.c) == CurrentRow._fields
    assert ", ".join(CurrentRow._fields) == RESOURCE_COLUMNS
