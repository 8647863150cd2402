"""Test harness: every app test runs against SQLite and, when it is reachable, PostgreSQL.

Each pytest run creates its own databases (a SQLite file in a temporary folder, a PostgreSQL
database named gw_test_<random>) and drops them at the end, so runs never collide or leave state
behind. Tables are emptied before each test.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, text
from werkzeug.serving import make_server

from gateway import create_app, db
from gateway.config import Settings

PG_ADMIN_URL = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL.replace("postgresql://", "postgresql://", 1), connect_timeout=3):
            return True
    except Exception:
        return False


BACKENDS = ["sqlite"] + (["postgresql"] if _pg_reachable() else [])


@pytest.fixture(scope="session", autouse=True)
def cheap_password_hashing() -> Iterator[None]:
    """Argon2 at its cheapest parameters inside the test process. The product's default costs about
    0.18 s of CPU per hash or verification here, and the portal and SMART tests create logins and
    sign in through the login form in almost every test (about 1 s of set-up each); what they test
    is the flow, not the cost. Verification reads the parameters from each stored hash, so hashes
    made either way verify. Gateways started as separate processes keep the default."""
    from argon2 import PasswordHasher

    from gateway.smart_auth import people

    original = people._hasher
    people._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    yield
    people._hasher = original


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "gateway.sqlite"
        url = f"sqlite:///{path}"
        engine = db.make_engine(url)
        db.upgrade(engine)
        engine.dispose()
        yield url
        return
    import psycopg

    name = f"gw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def empty_tables(engine: Any) -> None:
    with engine.begin() as conn:
        for table in reversed(db.metadata.sorted_tables):
            conn.execute(text(f"DELETE FROM {table.name}"))


@pytest.fixture
def settings(database_url: str, tmp_path: Any) -> Settings:
    return Settings.from_env(
        environ={}, database_url=database_url, open_access=True, base_url="http://testserver",
        instance_path=str(tmp_path), secret_key="test-secret", max_body_bytes=2 * 1024 * 1024,
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[Any]:
    app = create_app(settings)
    gateway = app.extensions["gateway"]
    empty_tables(gateway.engine)
    yield app
    # This test's AuditEvents and counts go to its database, and nothing of it stays open: a pool
    # or a thread left behind holds PostgreSQL connections until garbage collection gets to it.
    gateway.close()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def store(app: Any) -> Any:
    return app.extensions["gateway"].store


_ISSUED_PORTS: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now and that this process has not handed out before: ports taken
    for several servers before any of them binds must differ (the kernel may offer one twice)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _ISSUED_PORTS:
            _ISSUED_PORTS.add(port)
            return port


@pytest.fixture
def live_server(settings: Settings) -> Iterator[str]:
    """The app over real HTTP on 127.0.0.1 (threaded werkzeug server) at a free port."""
    port = free_port()
    settings.base_url = f"http://127.0.0.1:{port}"
    app = create_app(settings)
    empty_tables(app.extensions["gateway"].engine)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield settings.base_url
    finally:
        server.shutdown()
        app.extensions["gateway"].close()


# --- the real browser (portal and console journeys): one Chromium per test process ---

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@contextmanager
def pg_round_trips(engine: Any, trace_path: Any) -> Iterator[list[list[str]]]:
    """What this thread's connections of a PostgreSQL `engine` send meanwhile before each wait for
    the server's answers (a round trip): the first 40 characters of each statement, from libpq's
    protocol trace (written to `trace_path`), read into the list at the end of the block. The
    connections must be checked out inside the block. A statement the connection has prepared
    (psycopg does after five runs; see db.make_engine), earlier or here, is sent by its name: the
    name is looked up in the connection's pg_prepared_statements when it goes back to the pool."""
    import os
    import re

    from psycopg.pq import Trace

    me = threading.get_ident()
    trips: list[list[str]] = []
    prepared: dict[int, dict[str, str]] = {}  # by connection: statement name -> SQL
    with open(trace_path, "w") as trace:
        def traced(dbapi_conn: Any, *_: Any) -> None:
            if threading.get_ident() == me:
                os.write(trace.fileno(), f"connection\t{id(dbapi_conn)}\n".encode())
                dbapi_conn.pgconn.trace(trace.fileno())
                dbapi_conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)

        def untraced(dbapi_conn: Any, *_: Any) -> None:
            if threading.get_ident() == me:
                dbapi_conn.pgconn.untrace()
                with dbapi_conn.cursor() as cursor:
                    cursor.execute("SELECT name, statement FROM pg_prepared_statements")
                    prepared.setdefault(id(dbapi_conn), {}).update(cursor.fetchall())
                dbapi_conn.rollback()

        event.listen(engine, "checkout", traced)
        event.listen(engine, "checkin", untraced)
        try:
            yield trips
        finally:
            event.remove(engine, "checkout", traced)
            event.remove(engine, "checkin", untraced)
    sent: list[str] = []
    previous = ""
    names: dict[str, str] = {}
    with open(trace_path) as written:
        lines = written.read().splitlines()
    for line in lines:
        direction, _, rest = line.partition("\t")
        if direction == "connection":
            names = prepared.get(int(rest), {})
            continue
        if direction == "F" and previous == "B":
            trips.append(sent)
            sent = []
        unnamed = re.search(r'\t(?:Parse\t "" |Query\t )"([^"]{0,40})', line)
        by_name = re.search(r'\tBind\t "" "([^"]+)"', line)
        if direction == "F" and unnamed:
            sent.append(unnamed.group(1))
        elif direction == "F" and by_name:
            sent.append(names.get(by_name.group(1), by_name.group(1))[:40])
        if direction in ("F", "B"):
            previous = direction
    trips.append(sent)


@contextmanager
def sql_run(engine: Any) -> Iterator[list[str]]:
    """The SQL the database is given on `engine` meanwhile: on SQLite as SQLite itself runs it
    (statements that go to the driver directly, db.Prepared and BEGIN, included; the pool is
    emptied so that the connections made meanwhile trace it), elsewhere as SQLAlchemy sends it."""
    statements: list[str] = []
    if engine.dialect.name == "sqlite":
        def trace(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.set_trace_callback(statements.append)

        engine.dispose()
        event.listen(engine, "connect", trace)
        try:
            yield statements
        finally:
            event.remove(engine, "connect", trace)
            engine.dispose()
        return

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", seen)
