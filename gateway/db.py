"""Engine, schema and migrations.

The schema is plain SQLAlchemy Core: one row per resource holding the current version's JSON (what
reads return, untouched), one row per version for history, and search-index tables for the current
version only. Alembic migrations in gateway/migrations create and change it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    make_url,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, DisconnectionError, InvalidRequestError

metadata = MetaData()

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
PK = BigInteger().with_variant(Integer(), "sqlite")

resource = Table(
    "resource",
    metadata,
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("resource_type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", String(40), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("content", Text, nullable=False),
    UniqueConstraint("resource_type", "id", name="uq_resource_type_id"),
)

resource_version = Table(
    "resource_version",
    metadata,
    Column("seq", PK, primary_key=True, autoincrement=True),
    Column("resource_pk", BigInteger, nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", String(40), nullable=False),
    Column("last_updated_ms", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("content", Text, nullable=True),
    UniqueConstraint("resource_type", "id", "version_id", name="uq_version"),
    Index("ix_version_type_seq", "resource_type", "seq"),
    Index("ix_version_resource", "resource_pk", "version_id"),
    Index("ix_version_time", "last_updated_ms"),
)


def _index_table(name: str, *columns: Column, indexes: list[tuple[str, ...]]) -> Table:
    table = Table(
        name,
        metadata,
        Column("resource_pk", BigInteger, nullable=False),
        Column("resource_type", String(64), nullable=False),
        Column("param", String(64), nullable=False),
        *columns,
        # (resource_pk, param): per-candidate probes (EXISTS ... WHERE resource_pk = ? AND param = ?)
        # match two equality columns, so planners prefer it to range scans over the whole table.
        Index(f"ix_{name}_pk", "resource_pk", "param"),
    )
    for cols in indexes:
        Index(f"ix_{name}_{'_'.join(cols)}", *(table.c[c] for c in cols))
    return table


sp_token = _index_table(
    "sp_token",
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    Column("text", String(255), nullable=True),
    indexes=[("code", "resource_type", "param", "system")],
)
sp_string = _index_table(
    "sp_string",
    Column("value", String(255), nullable=False),
    Column("value_exact", String(255), nullable=False),
    indexes=[("resource_type", "param", "value")],
)
sp_date = _index_table(
    "sp_date",
    Column("low", BigInteger, nullable=False),
    Column("high", BigInteger, nullable=False),
    indexes=[("resource_type", "param", "low"), ("resource_type", "param", "high")],
)
sp_quantity = _index_table(
    "sp_quantity",
    Column("value", Float, nullable=False),
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    indexes=[("resource_type", "param", "value")],
)
sp_reference = _index_table(
    "sp_reference",
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(255), nullable=False),
    indexes=[("target_id", "target_type", "resource_type", "param")],
)
sp_uri = _index_table(
    "sp_uri",
    Column("value", String(1024), nullable=False),
    indexes=[("resource_type", "param", "value")],
)
# Composite values (Observation code$value and the like): one row per pair taken from the same
# element, the parts kept in the same shapes as the simple tables above.
sp_composite = _index_table(
    "sp_composite",
    Column("system1", String(255), nullable=True),
    Column("code1", String(255), nullable=True),
    Column("system2", String(255), nullable=True),
    Column("code2", String(255), nullable=True),
    Column("number2", Float, nullable=True),
    Column("low2", BigInteger, nullable=True),
    Column("high2", BigInteger, nullable=True),
    indexes=[("resource_type", "param", "code1")],
)
# Which patients' compartments a resource belongs to; the access policy filters on this.
compartment = Table(
    "compartment",
    metadata,
    Column("resource_pk", BigInteger, nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Index("ix_compartment_patient", "patient_id", "resource_type", "resource_pk"),
    Index("ix_compartment_pk", "resource_pk"),
)

# --- HL7v2 inbound: every message as received, and what it wrote ---

hl7_message = Table(
    "hl7_message",
    metadata,
    Column("id", PK, primary_key=True, autoincrement=True),
    Column("received_at", String(40), nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    Column("channel", String(16), nullable=False),  # mllp, http, cli, reprocess
    Column("peer", String(128), nullable=True),
    Column("sending_app", String(255), nullable=True),
    Column("sending_facility", String(255), nullable=True),
    Column("control_id", String(255), nullable=True),
    Column("message_type", String(32), nullable=True),  # e.g. ADT^A01
    Column("version", String(16), nullable=True),
    Column("content_hash", String(64), nullable=False),
    # received -> processed | failed | duplicate; a failed message can be reprocessed, or set aside
    # by an operator as ignored (with the reason in `note`).
    Column("status", String(16), nullable=False),
    Column("flagged", Boolean, nullable=False, default=False),  # same control id, different content
    Column("duplicate_of", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
    Column("error_code", String(8), nullable=True),
    Column("error_location", String(64), nullable=True),
    Column("ack", Text, nullable=True),
    Column("patient_id", String(64), nullable=True),
    Column("mrn", String(255), nullable=True),
    Column("raw", Text, nullable=False),
    Column("ack_ms", Integer, nullable=True),  # from receipt to the ACK being ready (after commit)
    Column("note", Text, nullable=True),  # the operator's reason when a message was ignored
    # A message over the receiver's maximum size: its length in bytes, of which `raw` holds only the
    # first segments (it failed, and cannot be reprocessed); NULL when `raw` is the whole message.
    Column("truncated_from_bytes", BigInteger, nullable=True),
    Index("ix_hl7_control", "control_id", "sending_app", "sending_facility"),
    Index("ix_hl7_status", "status", "id"),
    Index("ix_hl7_received", "received_ms"),
    Index("ix_hl7_mrn", "mrn"),
    Index("ix_hl7_patient", "patient_id"),
    Index("ix_hl7_sender", "sending_app", "id"),
    Index("ix_hl7_type", "message_type", "id"),
)

hl7_written = Table(
    "hl7_written",
    metadata,
    Column("message_id", BigInteger, nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("action", String(16), nullable=False),  # created, updated, unchanged, skipped-older, merged
    Index("ix_hl7_written_message", "message_id"),
    Index("ix_hl7_written_resource", "resource_type", "resource_id"),
)

# AuditEvents captured but not yet stored as resources (gateway.audit): one row per event, its
# JSON without id and meta. The request path's audit writer only appends here; the events become
# indexed AuditEvent resources when the process has time, and before any AuditEvent search.
audit_spool = Table(
    "audit_spool",
    metadata,
    Column("seq", PK, primary_key=True, autoincrement=True),
    Column("event", Text, nullable=False),
)

# --- the EHR connection (gateway/upstream) ---

# What patients did that must reach the EHR, queued in the transaction of the local change and
# delivered at least once by the outbox worker. idempotency_key is MSH-10 of the HL7 message (the
# same on every retry) and the outbox identifier used in If-None-Exist for a FHIR write.
outbox = Table(
    "outbox",
    metadata,
    Column("id", PK, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),  # appointment-request, appointment-cancel, refill-request, message
    Column("channel", String(8), nullable=False),  # hl7 or fhir
    Column("status", String(16), nullable=False),  # pending -> delivered | failed (re-sendable) | cancelled
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("patient_id", String(64), nullable=True),
    Column("idempotency_key", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_ms", BigInteger, nullable=False),
    # set while a worker holds the item (its lease ends at next_attempt_ms), cleared with the outcome
    Column("claimed_ms", BigInteger, nullable=True),
    Column("created_at", String(40), nullable=False),
    Column("delivered_at", String(40), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("response", Text, nullable=True),
    UniqueConstraint("idempotency_key", name="uq_outbox_key"),
    UniqueConstraint("kind", "resource_type", "resource_id", name="uq_outbox_kind_resource"),
    Index("ix_outbox_due", "status", "next_attempt_ms"),
)

# The periodic sync's high-water mark: the newest upstream meta.lastUpdated seen per patient and type.
upstream_sync = Table(
    "upstream_sync",
    metadata,
    Column("patient_id", String(64), nullable=False),  # the local Patient id
    Column("resource_type", String(64), nullable=False),
    Column("high_water", String(40), nullable=True),
    Column("synced_at", String(40), nullable=False),
    UniqueConstraint("patient_id", "resource_type", name="uq_upstream_sync"),
)

INDEX_TABLES: dict[str, Table] = {
    "token": sp_token,
    "string": sp_string,
    "date": sp_date,
    "quantity": sp_quantity,
    "number": sp_quantity,
    "reference": sp_reference,
    "uri": sp_uri,
    "composite": sp_composite,
}
ALL_INDEX_TABLES: tuple[Table, ...] = (
    sp_token, sp_string, sp_date, sp_quantity, sp_reference, sp_uri, sp_composite, compartment,
)


class DatabaseSettingError(ValueError):
    """GATEWAY_DATABASE_URL names a database this process can never open (not a passing outage)."""


def check_url(url: str) -> None:
    """A SQLite file whose folder does not exist cannot be created: say so once, at start, instead of
    every background round and request failing with "unable to open database file". The folder is
    not created here: a mistyped path would otherwise become a new, empty database."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return
    folder = Path(database).resolve().parent
    if not folder.is_dir():
        raise DatabaseSettingError(
            f"the folder {folder} for the SQLite database {database} does not exist: create it, "
            "or set GATEWAY_DATABASE_URL to a path in an existing folder")


BEGIN_WRITE, BEGIN_READ = "BEGIN IMMEDIATE", "BEGIN DEFERRED"


def make_engine(url: str, sqlite_synchronous: str = "FULL") -> Engine:
    # hide_parameters: a statement's values (names, identifiers, resource JSON) stay out of exception
    # texts, which reach logs and stored error messages; the SQL itself is kept.
    if url.startswith("sqlite"):
        check_url(url)
        # A pooled connection serves one thread at a time, so pysqlite's same-thread check can go;
        # pooling keeps the per-connection PRAGMAs off the request path.
        engine = create_engine(url, pool_size=16, max_overflow=16, hide_parameters=True,
                               connect_args={"timeout": 30, "check_same_thread": False})
        # Where durable commits go through WalSync (a database file, synchronous FULL or EXTRA), its
        # thread checkpoints, not the commits.
        background_checkpoints = (_database_file(engine) is not None
                                  and sqlite_synchronous.upper() in ("FULL", "EXTRA"))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # Let SQLAlchemy, not pysqlite, decide when transactions begin (see write_tx).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            _record.info["synchronous"] = sqlite_synchronous
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # Statement journals and sorts stay in memory: on disk, an HL7 message bringing new
            # records made a temporary file (created, written, unlinked) about once in 8 messages.
            cur.execute("PRAGMA temp_store=MEMORY")
            if background_checkpoints:  # see WalSync
                cur.execute(f"PRAGMA wal_autocheckpoint={SAFETY_AUTOCHECKPOINT}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # A writer takes the database lock up front, so read-then-write sequences (conditional
            # create, version checks) are serialised instead of failing late with SQLITE_BUSY.
            # Straight to the driver: through SQLAlchemy's statement machinery this cost about
            # 30 µs, ten times SQLite's own BEGIN, on every transaction. A failure is still raised as
            # SQLAlchemy's error for it (unavailable() reads those).
            statement = BEGIN_WRITE if conn.info.get("write") else BEGIN_READ
            try:
                conn.connection.driver_connection.execute(statement)
            except sqlite3.Error as exc:
                raise DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    # psycopg prepares a statement on the server once it has run five times on a connection (its
    # prepare_threshold; executemany's at once): parsed once from then on, the server's CPU for an HL7
    # message 2.0-2.5 ms instead of 2.9. Every run is still planned with its own values
    # (plan_cache_mode=force_custom_plan). A plan made once for any values (a generic plan) lasts until
    # the table is analyzed again: one made while an index table held a page of rows read the whole
    # table for every lookup once it had grown (with autovacuum off, an HL7 benchmark fell from 120 to
    # 30 messages/s as its store grew to 55,000 messages), and a search for one patient's laboratory
    # results was planned from "category = laboratory" (every lab result in the store) instead of
    # from the patient, 1.5 s instead of 2 ms at 1,000,000 resources.
    engine = create_engine(url, pool_size=10, max_overflow=20, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _custom_plans(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # a setting of the session, so outside any transaction
        dbapi_conn.autocommit = True
        try:
            dbapi_conn.execute("SET plan_cache_mode TO force_custom_plan")
        finally:
            dbapi_conn.autocommit = False

    _ping_when_idle(engine)
    return engine


# A pooled PostgreSQL connection unused this long is pinged before it is handed out again.
PING_AFTER_IDLE = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Pre-ping, but only connections that sat in the pool for PING_AFTER_IDLE seconds or more.

    SQLAlchemy's pool_pre_ping asks the server on every checkout: a round trip per transaction (two
    per HL7 message, 10% of its time on PostgreSQL). A connection returned a moment ago was alive
    then; one that waited in the pool may have been cut since (the server restarted, a proxy timed
    it out), and is pinged, and replaced when the ping says it is gone. A connection that breaks
    while busy is handled as before: the failed statement's error marks the pool invalid, and the
    caller answers "try again" (HL7 AE 207, HTTP 503)."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE:
            return  # just connected, or in use a moment ago
        dialect = engine.dialect
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_conn, None):
                raise DisconnectionError(str(exc)) from exc  # the pool connects anew and tries again
            raise


class WriterGate:
    """Queues SQLite writers in the kernel instead of in SQLite's busy handler.

    SQLite lets one writer in at a time and makes the others poll with growing sleeps (up to 100 ms
    each), so under concurrent writes the lock often sits free while waiters sleep. Writers here
    first take an exclusive flock on a file beside the database (shared by every process on it) and a
    lock for the threads of this process; the kernel wakes the next writer the moment the previous
    one commits. The file descriptor is opened per process, so a forked worker gets its own.
    """

    def __init__(self, database_path: str) -> None:
        self.path = database_path + ".writer-lock"
        self._thread_lock = threading.RLock()
        self._fd: int | None = None
        self._pid = 0
        self._depth = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                if self._fd is None or self._pid != os.getpid():
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                    self._pid = os.getpid()
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)


class WalSync:
    """Group commit for SQLite: durable commits share fsyncs of the write-ahead log.

    With synchronous=FULL every commit fsyncs the WAL while it holds the database's only write lock,
    so writers queue behind each other's disk waits. Here a durable transaction commits with
    synchronous=NORMAL (its frames written to the WAL, not yet flushed), releases the lock, and then
    waits in sync() for an fdatasync of the WAL file that began after its commit; one fdatasync
    covers every commit written before it started, so concurrent writers share it, and the next
    writer works while this one waits for the disk. The caller returns (and an HL7 ACK goes out)
    only after that flush: the commit is as durable as under FULL. Frames a checkpoint has already
    copied were flushed by the checkpoint itself (NORMAL still syncs the WAL before a checkpoint
    and the database after it). A WAL file seen for the first time also gets its directory flushed,
    as SQLite does for a new journal, so the file itself survives a power cut.

    Checkpoints (copying the log into the database file, then an fsync of that file) are off the
    commit path too: SQLite runs one inside the commit that takes the log past 1,000 pages, and the
    caller waited for it (18-25 ms on the HL7 feed, one message in about 35: its ACK p99). Here a
    thread of the process runs a PASSIVE checkpoint, which blocks nobody, every CHECKPOINT_EVERY
    flushes and whenever the log file has grown by CHECKPOINT_GROWTH; the connections' own automatic
    checkpoint is kept only as a bound on the log (SAFETY_AUTOCHECKPOINT pages), for a process whose
    checkpointer falls behind.
    """

    def __init__(self, database_path: str) -> None:
        self.path = database_path
        self.checkpoints = 0  # background checkpoints this process ran
        self._checkpointer: _Checkpointer | None = None
        self._cond = threading.Condition()
        self._started = 0  # flushes begun
        self._completed = 0  # flushes finished (the newest begun before it are then durable too)
        self._running = False
        self._wal_inode: int | None = None
        self._wal_size_said = 0  # the WAL's size when its growth last asked for a checkpoint

    def sync(self) -> None:
        with self._cond:
            target = self._started + 1  # the first flush to begin after this commit
            while self._completed < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                number = self._started
                self._cond.release()
                try:
                    grown = self._flush()
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._completed = number
                if number % CHECKPOINT_EVERY == 0 or grown:
                    self._checkpoint_soon()

    def _checkpoint_soon(self) -> None:
        checkpointer = self._checkpointer
        if checkpointer is None or not checkpointer.alive():  # first use, or a forked child
            checkpointer = self._checkpointer = _Checkpointer(self)
        checkpointer.wake()

    def _flush(self) -> bool:
        """fdatasync the WAL; True when it has grown by CHECKPOINT_GROWTH since that was last said."""
        wal = True
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            # no WAL: the last connection checkpointed it into the database file and removed it
            fd = os.open(self.path, os.O_RDONLY)
            wal = False
        try:
            os.fdatasync(fd)
            stat = os.fstat(fd)
        finally:
            os.close(fd)
        inode, size = stat.st_ino, stat.st_size if wal else 0
        if inode != self._wal_inode or size < self._wal_size_said:
            self._wal_size_said = size  # another file, or a shorter one: growth counts from here
        grown = size - self._wal_size_said >= CHECKPOINT_GROWTH
        if grown:
            self._wal_size_said = size
        if inode != self._wal_inode:
            directory = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            self._wal_inode = inode
        return grown


# A background checkpoint every this many WAL flushes of a process (an HL7 message writes about 30
# pages: about 1,000 pages a checkpoint, SQLite's own default).
CHECKPOINT_EVERY = 32
# ... and whenever the WAL file has grown by this much since the last such one (about 1,000 pages of
# 4 KiB): large messages (embedded PDFs) write megabytes of log each, 32 of them tens of MB before the
# thread would copy any of it; so the commit at the bound below has little left to copy. A log file
# that SQLite writes from its start again (after a complete checkpoint) stops growing and asks no more.
CHECKPOINT_GROWTH = 4 * 1024 * 1024
# The connections' automatic checkpoint where the background one runs: a bound on the log. Under
# sustained writes the background checkpoint never finds the whole log copied at the moment a writer
# begins, which is when SQLite starts the log over, so the log grew up to this bound: at 10,000 pages
# that was 41 MB (on an 8-64 MB disk, full again). At 2,000 pages (8 MB) the commit that reaches it
# checkpoints what the thread has not yet copied and the log starts over; ACK p50/p99 in process
# were the same (2.9-3.8 / 7.2-9.7 ms against 3.2-3.3 / 7.2-8.4 ms).
SAFETY_AUTOCHECKPOINT = 2_000


class _Checkpointer:
    """A daemon thread of one process that runs PASSIVE checkpoints of one database when woken, on a
    connection of its own (synchronous=NORMAL: the log is synced before the copy and the database
    file after it, as in SQLite's own checkpoints). sqlite3 lets go of the interpreter lock while
    the checkpoint runs, so the process's other threads go on meanwhile."""

    def __init__(self, sync: WalSync) -> None:
        self._sync = weakref.ref(sync)
        self._path = sync.path
        self._wanted = threading.Event()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._pid == os.getpid() and self._thread.is_alive()

    def wake(self) -> None:
        self._wanted.set()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                woken = self._wanted.wait(timeout=60)
                sync = self._sync()
                if sync is None:
                    return  # the engine is gone
                if not woken:
                    continue
                self._wanted.clear()
                try:
                    if conn is None:
                        conn = sqlite3.connect(self._path, timeout=30, isolation_level=None,
                                               check_same_thread=False)
                        conn.execute("PRAGMA synchronous=NORMAL")
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    sync.checkpoints += 1
                except sqlite3.Error as exc:  # the commits' own bound still holds; try at the next wake
                    logging.getLogger(__name__).warning("background checkpoint of %s failed: %s",
                                                        self._path, exc)
                del sync
        finally:
            if conn is not None:
                conn.close()


_gates: weakref.WeakKeyDictionary[Engine, WriterGate | None] = weakref.WeakKeyDictionary()
_syncs: weakref.WeakKeyDictionary[Engine, WalSync] = weakref.WeakKeyDictionary()


def _wal_sync(engine: Engine) -> WalSync:
    try:
        return _syncs[engine]
    except KeyError:
        sync = _syncs[engine] = WalSync(os.path.abspath(engine.url.database or ""))
        return sync


def _database_file(engine: Engine) -> str | None:
    """The SQLite database file of the engine; None for PostgreSQL and for an in-memory database."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    return os.path.abspath(database) if database and database != ":memory:" else None


def _writer_gate(engine: Engine) -> WriterGate | None:
    try:
        return _gates[engine]
    except KeyError:
        database = _database_file(engine)
        gate = _gates[engine] = WriterGate(database) if database else None
        return gate


@contextmanager
def write_tx(engine: Engine, durable: bool = True) -> Iterator[Connection]:
    """A transaction that will write: serialised on SQLite, row-locked on PostgreSQL.

    durable=False lets the commit return before it reaches the disk (SQLite synchronous=NORMAL,
    PostgreSQL synchronous_commit off). Such a commit survives the process crashing but not the
    machine losing power until the next durable commit, which also makes everything before it
    durable. For writes nobody has been promised yet: a received HL7 message before its ACK
    (whose commit is durable), audit records (kept in memory until written anyway).
    """
    gate = _writer_gate(engine)
    if gate is not None:
        # durable commits on SQLite: group commit (see WalSync), the flush waited for after the
        # write lock is released
        with gate.held(), _write_tx(engine, durable, group=durable) as conn:
            wal = conn.info.get("wal_sync")
            yield conn
        if wal is not None:
            wal.sync()
    else:
        with _write_tx(engine, durable) as conn:
            yield conn


@contextmanager
def _write_tx(engine: Engine, durable: bool, group: bool = False) -> Iterator[Connection]:
    with engine.connect() as conn:
        # info belongs to the pooled DBAPI connection and outlives this checkout: the flags must go
        # again, or every later read on this connection would take SQLite's write lock.
        conn.info["write"] = True
        syncing = conn.info.get("synchronous", "").upper() in ("FULL", "EXTRA")
        relaxed = (not durable or group) and syncing
        conn.info["wal_sync"] = _wal_sync(engine) if durable and group and syncing else None
        if relaxed:  # outside any transaction, where SQLite allows it
            conn.connection.driver_connection.execute("PRAGMA synchronous=NORMAL")
        conn.info["at_commit"] = []
        try:
            with conn.begin() as transaction:
                if not durable and is_postgres(conn):
                    at_commit(conn, _SET_ASYNCHRONOUS_COMMIT, {})  # it only matters to the COMMIT
                yield conn
                _commit(conn, transaction)
        finally:
            conn.info.pop("write", None)
            conn.info.pop("wal_sync", None)
            conn.info.pop("at_commit", None)
            if conn.info.pop("began_in_pipeline", False):
                _end_own_begin(conn)
            if relaxed:
                conn.connection.driver_connection.execute(f"PRAGMA synchronous={conn.info['synchronous']}")


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


def sqlite_execute(conn: Connection, sql: str, args: Any, many: bool = False) -> sqlite3.Cursor:
    """Run SQL on a SQLite connection's driver inside its current transaction, a driver error raised
    as SQLAlchemy's (see Prepared); `args` positional, a list of them with many=True."""
    try:
        driver = conn.connection.driver_connection
        return driver.executemany(sql, args) if many else driver.execute(sql, args)
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, None, exc, sqlite3.Error, hide_parameters=True) from exc


def driver_execute(conn: Connection, sql: str, args: Any = None, many: bool = False) -> Any:
    """Run SQL on the connection's driver inside its current transaction and return the driver's
    cursor: SQLite (`?` placeholders) or psycopg (`%s`, or `%(name)s` with a dict); `args` a tuple or a
    dict, a list of them with many=True. The transaction
    must be one SQLAlchemy began (write_tx, read_tx): a statement here is not seen by SQLAlchemy, which
    commits only what it knows it began (psycopg would otherwise open one that is rolled back when
    the connection goes back to the pool). A driver error
    is raised as SQLAlchemy's; on PostgreSQL through SQLAlchemy's own handling of a failed statement,
    so that a connection the server cut is invalidated and the pool connects anew, as after
    conn.execute (db.unavailable() then reads "unreachable"). Where something listens to the
    statements SQLAlchemy runs (before_cursor_execute: tests that look at the SQL), a PostgreSQL
    statement goes through SQLAlchemy as text, so that it is seen (SQLite shows the statements on its
    driver to a trace callback)."""
    if conn.dialect.name == "sqlite":
        return sqlite_execute(conn, sql, args, many)
    if not _driver_path(conn):
        return conn.exec_driver_sql(sql, args)
    cursor = conn.connection.driver_connection.cursor()
    try:
        if many:
            cursor.executemany(sql, args)
        else:
            cursor.execute(sql, args)
    except conn.dialect.loaded_dbapi.Error as exc:
        conn._handle_dbapi_exception(exc, sql, args, cursor, None)  # raises SQLAlchemy's error
    return cursor


def at_commit(conn: Connection, statement: Prepared, params: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Run a statement whose result nobody reads (an insert, an update) at the end of this write_tx
    transaction, just before its commit: on PostgreSQL in the same round trip as the COMMIT (see
    pipeline). Its error, if any, then fails the commit, as SQLAlchemy's error."""
    queued = conn.info.get("at_commit")
    if queued is None:
        raise RuntimeError("at_commit() belongs in a write_tx transaction")
    queued.append((statement, params))


def _commit(conn: Connection, transaction: Any) -> None:
    """Run the statements at_commit queued, then commit: on PostgreSQL all in one round trip."""
    queued = conn.info["at_commit"]
    together = bool(queued) and _sent_together(conn)
    with pipeline(conn) if together else nullcontext():
        for statement, params in queued:
            statement.execute(conn, params)
        queued.clear()
        if together:
            # The COMMIT as one more statement of the pipeline: psycopg's own commit would wait for
            # it, and the end of the block would then wait again for nothing (a second round trip).
            driver_execute(conn, "COMMIT")
    transaction.commit()  # SQLAlchemy's bookkeeping; psycopg sends nothing when the server committed


def _driver_path(conn: Connection) -> bool:
    """Whether driver_execute runs a PostgreSQL statement on psycopg itself (not through SQLAlchemy)."""
    dispatch = conn.dispatch
    return not (dispatch.before_cursor_execute or dispatch.after_cursor_execute)  # not other events (engine_disposed)


def _sent_together(conn: Connection) -> bool:
    """Whether a pipeline block sends its statements together here: on PostgreSQL, through psycopg."""
    return is_postgres(conn) and _driver_path(conn)


@contextmanager
def pipeline(conn: Connection) -> Iterator[None]:
    """On PostgreSQL, send the statements run in the block (Prepared.send and .execute, driver_execute)
    to the server together, without waiting for each one's answer: the server runs them in order,
    and the block costs one round trip at its end, where their answers come; read their rows after
    the block (a read inside waits for the answers so far: a round trip of its own). A transaction's
    BEGIN of a write_tx transaction goes with the block's statements when they are its first (psycopg
    would send its own and wait for it). Inside, a statement's rowcount is unknown (-1), and
    SQLAlchemy's own execute must not run (it reads each result at once). A statement's error is
    raised at the end of the block, as SQLAlchemy's, and the statements after it are not run.
    SQLite runs each statement at once anyway: nothing to do there."""
    if not _sent_together(conn):
        yield
        return
    driver = conn.connection.driver_connection
    begin = _begin_here(conn, driver)
    try:
        with driver.pipeline():
            if begin:
                driver.execute("BEGIN")
            yield
    except conn.dialect.loaded_dbapi.Error as exc:
        conn._handle_dbapi_exception(exc, "(statements sent together)", None, None, None)  # raises SQLAlchemy's


def _begin_here(conn: Connection, driver: Any) -> bool:
    """Whether a pipeline block starts its write_tx transaction: nothing sent in it yet, and psycopg
    would open it with a plain BEGIN. If so the block sends that BEGIN itself, with psycopg's
    autocommit on so that psycopg sends none of its own, until _write_tx has ended the transaction
    (psycopg's commit and rollback go by the server's transaction status, not by autocommit)."""
    from psycopg.pq import TransactionStatus

    if ("at_commit" not in conn.info or driver.autocommit or driver.pgconn.transaction_status != TransactionStatus.IDLE
            or driver.isolation_level is not None or driver.read_only is not None or driver.deferrable is not None):
        return False
    driver.autocommit = True
    conn.info["began_in_pipeline"] = True
    return True


def _end_own_begin(conn: Connection) -> None:
    """Autocommit off again once the transaction a pipeline began has ended; a connection that cannot
    (still in a transaction its rollback did not end) is dropped, never pooled in autocommit."""
    if conn.invalidated or conn.closed:
        return
    try:
        conn.connection.driver_connection.autocommit = False
    except Exception:  # psycopg's ProgrammingError (in a transaction) or a broken connection
        logging.getLogger(__name__).warning("a database connection left in a transaction after its end was dropped")
        conn.invalidate()


class _Compiled(NamedTuple):
    sql: str
    binds: tuple[tuple[str, bool, Any, Any], ...]  # (name, required, default, processor)
    # the binds' names as the SQL text spells them, when the driver takes a dict of values
    # (psycopg's %(name)s); None when it takes a tuple (SQLite's ?)
    names: tuple[str, ...] | None


class Prepared:
    """A Core statement for a hot path: compiled once per dialect and run straight on the driver.

    SQLAlchemy's execution path (cache key, parameter processing, result set-up) costs 30-50 µs a
    statement where SQLite's own work for a keyed lookup or a one-row insert is 3-5 µs, and every
    HL7 message runs a handful of these. On PostgreSQL it cost 45 µs of CPU beside a 60 µs round
    trip (a keyed lookup: 170 µs through SQLAlchemy, 104 µs on psycopg). Values still go through the
    column types' bind processors and a driver error is still raised as SQLAlchemy's
    (IntegrityError, OperationalError, ...; see driver_execute), so callers see what conn.execute
    would give them. Rows come back as the driver gives them (tuples).
    """

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}  # by dialect name: a process may use both

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self.send(conn, params).fetchall()  # type: ignore[no-any-return]

    def send(self, conn: Connection, params: dict[str, Any]) -> Any:
        """Run it and return the driver's cursor, whose rows (fetchall) may be read later: after the
        end of a pipeline block that sent it with others."""
        return self._cursor(conn, params, many=False)

    def first(self, conn: Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        rows = self.rows(conn, params)
        return rows[0] if rows else None

    def execute(self, conn: Connection, params: dict[str, Any] | list[dict[str, Any]]) -> int:
        """Run it (once per dict in a list); returns the rows it changed, as the driver counts them."""
        if isinstance(params, list) and not params:
            return 0
        return self._cursor(conn, params, many=isinstance(params, list)).rowcount  # type: ignore[no-any-return]

    def _cursor(self, conn: Connection, params: Any, many: bool) -> Any:
        compiled = self._compiled.get(conn.dialect.name) or self._compile(conn.dialect)
        if many:
            return driver_execute(conn, compiled.sql, [self._args(compiled, p) for p in params], many=True)
        return driver_execute(conn, compiled.sql, self._args(compiled, params))

    @staticmethod
    def _args(compiled: _Compiled, values: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        out = []
        for name, required, default, process in compiled.binds:
            if required and name not in values:  # as SQLAlchemy says it
                raise InvalidRequestError(f"A value is required for bind parameter {name!r}")
            value = values.get(name, default)
            out.append(process(value) if process is not None and value is not None else value)
        if compiled.names is not None:
            return dict(zip(compiled.names, out, strict=True))
        return tuple(out)

    def _compile(self, dialect: Any) -> _Compiled:
        compiled = self.statement.compile(dialect=dialect)
        names = compiled.positiontup if compiled.positiontup is not None else list(compiled.binds)
        binds = []
        for name in names:
            bind = compiled.binds[name]
            binds.append((name, bind.required, bind.value, bind.type.bind_processor(dialect)))
        escaped = getattr(compiled, "escaped_bind_names", None) or {}
        named = None if compiled.positiontup is not None else tuple(escaped.get(name, name) for name in names)
        result = self._compiled[dialect.name] = _Compiled(compiled.string, tuple(binds), named)
        return result


_SET_ASYNCHRONOUS_COMMIT = Prepared(text("SET LOCAL synchronous_commit TO OFF"))


def is_postgres(conn_or_engine: Connection | Engine) -> bool:
    return conn_or_engine.dialect.name == "postgresql"


def migrations_dir() -> Path:
    return Path(__file__).parent / "migrations"


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    analyze(engine)


def analyze(engine: Engine) -> None:
    """Refresh the planner's statistics.

    Without them SQLite cannot tell that `resource_pk = ?` finds one row while a date range finds
    thousands, and a selective search becomes a scan (80 ms instead of 7 ms at 200,000 resources).
    analysis_limit keeps it to milliseconds on a large file. PostgreSQL's autovacuum analyses on
    its own; an explicit ANALYZE after bulk loads just saves waiting for it.
    """
    with write_tx(engine) as conn:  # it writes the statistics tables: queue like any writer
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA analysis_limit=1000")
        conn.exec_driver_sql("ANALYZE")


class Analyzer:
    """Keeps the planner's statistics in step with the data.

    Statistics taken while the store was small mislead the planner once it has grown (a date range
    looks as selective as a resource key, and a search walks every date index row), so requests
    call tick(), which at most every `check_every` seconds looks at the highest resource key in a
    short-lived thread and runs analyze() when the store has grown by `growth` since the last time,
    or when `interval` seconds have passed.
    """

    def __init__(self, engine: Engine, interval: float = 600.0, check_every: float = 5.0,
                 growth: float = 0.25, min_rows: int = 1000) -> None:
        self.engine = engine
        self.interval = interval
        self.check_every = check_every
        self.growth = growth
        self.min_rows = min_rows
        self._next_check = 0.0
        self._lock = threading.Lock()
        self._analysed_rows = -1
        self._analysed_at = 0.0
        self._closed = False  # close(): no more checks

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next_check or not self._lock.acquire(blocking=False):
            return
        if self._closed:
            self._lock.release()
            return
        self._next_check = now + self.check_every
        threading.Thread(target=self._run, name="analyze", daemon=True).start()

    def due(self, rows: int, now: float) -> bool:
        if self._analysed_rows < 0:
            return True
        grown = rows - self._analysed_rows
        if grown >= self.min_rows and grown >= self._analysed_rows * self.growth:
            return True
        return now - self._analysed_at >= self.interval

    def check(self) -> bool:
        """Analyse now if due; True when it did."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(func.coalesce(func.max(resource.c.pk), 0))).scalar_one()
        now = time.monotonic()
        if not self.due(rows, now):
            return False
        analyze(self.engine)
        self._analysed_rows, self._analysed_at = rows, now
        return True

    def _run(self) -> None:
        try:
            self.check()
        except Exception as exc:  # statistics are an optimisation; a failure must not reach a request
            log_failure(logging.getLogger(__name__), "ANALYZE", exc)
        finally:
            self._lock.release()

    def close(self, timeout: float = 30.0) -> None:
        """No more checks; waits for one that is running (its connection would outlive the pool)."""
        self._closed = True
        if self._lock.acquire(timeout=timeout):
            self._lock.release()


# SQLite result codes (the primary code, the low byte of sqlite_errorcode) that mean the database
# cannot take writes just now, whatever the statement: the disk is full, or the file cannot be read
# or written (an I/O error, a vanished mount).
_SQLITE_FULL, _SQLITE_IOERR, _SQLITE_CANTOPEN = 13, 10, 14
# PostgreSQL SQLSTATEs of the same kind: 08xxx connection exceptions, the server shutting down or
# starting (57P01-57P03), too many connections, and disk_full (53100).
_PG_UNREACHABLE = ("08", "57P01", "57P02", "57P03", "53300")


def unavailable(exc: BaseException) -> str | None:
    """Why the database cannot do any work now, when that is what `exc` says: "full" (no room on
    the disk), "unreachable" (down, restarting, the connection lost); None for any other error,
    one that the statement itself caused (a constraint, a deadlock, a bug).

    Callers turn it into an answer that says "try again later" (a NAK AE 207, HTTP 503 or 507)
    instead of an internal error, and log one line instead of a stack trace."""
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        primary = code & 0xFF
        if primary == _SQLITE_FULL:
            return "full"
        return "unreachable" if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN) else None
    if exc.connection_invalidated:
        return "unreachable"
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == "53100":
        return "full"
    if sqlstate is not None:
        return "unreachable" if sqlstate.startswith(_PG_UNREACHABLE) else None
    # psycopg gives no SQLSTATE when the connection failed or broke (refused, closed by the server)
    return "unreachable" if type(orig).__name__ in ("OperationalError", "InterfaceError") else None


def log_failure(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """A background task's failure, from inside its except block: one line when the database is down or
    full (the task will be tried again), the stack trace for anything else."""
    reason = unavailable(exc)
    if reason:
        logger.warning("%s failed: the database is %s", what, reason)
    else:
        logger.exception("%s failed", what)


def ping(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
