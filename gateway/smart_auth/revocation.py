"""The revocation generation: how a revocation in one process reaches the token caches of all.

Each process keeps what it learnt about a bearer token for a few seconds (SmartAuth.principal_for),
so that a request does not re-run the token, grant and proxy queries. Every change that takes
access away (a grant revoked through the revocation endpoint, the connected-apps page, a reused
refresh token or code; a proxy relationship ended) calls `bump` in its transaction and `publish`
once that has committed. A cached token is reused only while `current` still returns the value it
was cached under, so a revocation committed by any process is honoured by every process on its
next request.

Where the generation is read, per request with a cached token:
- PostgreSQL: the revocation_generation row, one primary-key read per request (processes may be on
  several hosts, and the database is what they share), on a connection the process keeps for it
  (DatabaseReader): one round trip instead of a pool checkout's four.
- SQLite (a file, so every process is on this host): an 8-byte counter in a file beside the
  database, memory-mapped, which `publish` increments after the revoking commit. Reading the row
  instead cost several times the rest of the token check: each call into sqlite3 releases the
  GIL, and under load (the audit writer's thread) waits to get it back. The mapped read makes no
  call at all. The row is bumped all the same, in the transaction.

The signal goes out after the commit and before the revoking call returns: by the time a revocation
has been answered, every process refuses. A process that dies between its commit and `publish`
leaves the SQLite counter unmoved; cached entries then still end within GATEWAY_TOKEN_CACHE_SECONDS.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
import weakref
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.dialects import postgresql, sqlite

from gateway.smart_auth.models import revocation_generation

ROW_ID = 1
_CURRENT = f"SELECT generation FROM revocation_generation WHERE id = {ROW_ID}"
_WIDTH = 8


def bump(conn: Connection) -> None:
    """Move the database generation on, inside the revoking transaction; call it last there (the
    row lock is then held only until the commit), and `publish` after the commit."""
    table = revocation_generation
    # An upsert: the row is made by the migration, but a database emptied table by table (tests)
    # must not lose the announcement.
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(id=ROW_ID, generation=1)
    conn.execute(statement.on_conflict_do_update(index_elements=[table.c.id],
                                                 set_={"generation": table.c.generation + 1}))


def publish(engine: Engine) -> None:
    """After a revoking commit: tell the other processes on a SQLite file (PostgreSQL readers see
    the committed row already)."""
    counter = _counter(engine)
    if counter is not None:
        counter.increment()


def current(engine: Engine) -> int:
    """The generation as this process should compare it (equality only: values are not ordered)."""
    counter = _counter(engine)
    if counter is not None:
        return counter.read()
    if engine.dialect.name == "postgresql":
        return _reader(engine).read()
    return _pooled_read(engine)  # an in-memory SQLite database: one process, rarely used


def _pooled_read(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql(_CURRENT).scalar() or 0


class DatabaseReader:
    """Reads the generation row for one process over a connection of its own, in autocommit.

    Through the pool each read would also pay a checkout with its pre-ping (another round trip)
    and BEGIN and ROLLBACK around the SELECT, each call into the driver another wait to get the
    GIL back under load; measured, that doubled the cost. The connection is taken out of the
    engine's pool (so it has the engine's settings and events), opened lazily in the process that
    reads (a forked worker opens its own and never touches its parent's), shared by the threads
    (psycopg serialises them), replaced after an error and closed when the engine is disposed.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0

    def read(self) -> int:
        try:
            return self._read_once()
        except Exception:
            with self._lock:  # broken (a database restart, say): one more try on a new connection
                broken, self._conn = self._conn, None
            if broken is not None and self._pid == os.getpid():
                with contextlib.suppress(Exception):  # it is gone either way
                    broken.close()
            return self._read_once()

    def close(self) -> None:
        """With the engine's disposal: the connection goes too (in the process that opened it)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()

    def _read_once(self) -> int:
        conn = self._connection()
        cursor = conn.cursor()
        try:
            cursor.execute(_CURRENT)
            row = cursor.fetchone()
        finally:
            cursor.close()
        return int(row[0]) if row else 0

    def _connection(self) -> Any:
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                if self._conn is not None:
                    # A parent's connection: kept referenced and never closed here, since closing
                    # (or collecting) it would end the session the parent still uses.
                    _inherited.append(self._conn)
                fairy = self.engine.raw_connection()
                fairy.detach()
                dbapi = fairy.dbapi_connection
                if getattr(dbapi, "autocommit", None) is False:  # psycopg; SQLite's run without one
                    dbapi.autocommit = True
                self._conn, self._pid = dbapi, os.getpid()
            return self._conn


class SharedCounter:
    """An 8-byte counter in a file, shared by the processes that map it.

    Reads are a copy out of the mapping (no system call, the GIL kept); increments take an
    exclusive flock on the file, so two processes never lose one. A forked worker inherits the
    mapping, which stays shared with the file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            with self._lock:
                if self._map is None:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                        if os.fstat(fd).st_size < _WIDTH:
                            os.ftruncate(fd, _WIDTH)  # zeros
                        fcntl.flock(fd, fcntl.LOCK_UN)
                        self._map = mmap.mmap(fd, _WIDTH)  # keeps its own descriptor
                    finally:
                        os.close(fd)
        return self._map

    def read(self) -> int:
        return int.from_bytes(self._mapping()[:_WIDTH], "little")

    def increment(self) -> None:
        mapping = self._mapping()
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            value = (int.from_bytes(mapping[:_WIDTH], "little") + 1) % (1 << 63)
            mapping[:_WIDTH] = value.to_bytes(_WIDTH, "little")
        finally:
            os.close(fd)  # releases the flock


_counters: weakref.WeakKeyDictionary[Engine, SharedCounter | None] = weakref.WeakKeyDictionary()
_readers: weakref.WeakKeyDictionary[Engine, DatabaseReader] = weakref.WeakKeyDictionary()
_inherited: list[Any] = []
_registry_lock = threading.Lock()


def _reader(engine: Engine) -> DatabaseReader:
    with _registry_lock:
        reader = _readers.get(engine)
        if reader is None:
            reader = _readers[engine] = DatabaseReader(engine)
            event.listen(engine, "engine_disposed", lambda _engine: reader.close())
    return reader


def _counter(engine: Engine) -> SharedCounter | None:
    try:
        return _counters[engine]
    except KeyError:
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        counter = SharedCounter(os.path.abspath(database) + ".revocations") \
            if database and database != ":memory:" else None
        _counters[engine] = counter
        return counter
